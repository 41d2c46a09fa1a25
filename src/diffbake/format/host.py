"""Host facts: what compiled code depends on (device, GPU, platform, CPU instruction sets), the CPU targets a
build may name, and the check that an artifact's recorded facts fit this host.

Loading an AOTInductor package dlopens a shared library; a crash inside it (wrong CPU instructions, another torch
build) cannot be caught, so this check runs before any compiled code is loaded.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from diffbake.errors import CompatibilityError
from diffbake.format.manifest import Manifest

# x86 CPU capabilities as torch names them, lowest first: code built for one runs on it and above.
_CPU_CAPABILITY_RANK = {"DEFAULT": 0, "NO AVX": 0, "AVX2": 1, "AVX512": 2}


# CPU targets a recipe may name (besides "native"): the -march level each compiles for, the vector width
# inductor's kernels use, and the instruction-set extensions (as /proc/cpuinfo names them) that level implies.
_X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")


_X86_64_V3 = (*_X86_64_V2, "abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")


CPU_TARGETS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "avx2": ("x86-64-v3", 256, _X86_64_V3),
    "avx512": ("x86-64-v4", 512, (*_X86_64_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
}


# Extensions that compiled code can contain; a native build requires every one of them the build host has.
ISA_FEATURES = frozenset(
    {f for _, _, features in CPU_TARGETS.values() for f in features}
    | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg"}
    | {"avx512_vpopcntdq", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "gfni", "vaes", "vpclmulqdq"}
    # aarch64 names them in the "Features" line
    | {"asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm", "fphp", "svebf16", "svei8mm"}
)


# Extensions by which oneDNN picks its kernels, and with them the blocked layouts it packs weights in. Weights
# prepacked at build (the compiler option ``freezing``) keep their layout's descriptor, so a CPU whose oneDNN picks
# other kernels still computes right, but reorders every weight on every call: SD 1.5's bfloat16 UNet prepacked
# without AMX ran its step 2.2x slower on an AMX Xeon than the same UNet prepacked there (same output to bfloat16
# rounding; measured by limiting oneDNN with ONEDNN_MAX_CPU_ISA at build). A frozen artifact is for CPUs with the
# build host's set exactly; elsewhere the loader refuses it rather than run at a fraction of its speed.
ONEDNN_ISA = frozenset(
    {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16"}
    | {"avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"}
)


# Extensions that run each half precision natively (/proc/cpuinfo names; x86, then aarch64). Without one torch
# emulates it: on an AVX2-only AMD EPYC a 256-channel 3x3 convolution took 16.6 s in bfloat16 against 0.086 s
# in float32 (190x), a 2048x2048 linear 6x.
NATIVE_HALF: dict[str, tuple[str, ...]] = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "asimdhp", "fphp"),
}


def half_precision_path(dtype: str, features: frozenset[str] | set[str] | None) -> str:
    """How a CPU with ``features`` runs ``dtype``: "native (amx_bf16, ...)", "emulated", or "float32"/"unknown"."""
    if dtype not in NATIVE_HALF:
        return dtype
    if features is None:
        return "unknown"
    have = [f for f in NATIVE_HALF[dtype] if f in features]
    return f"native ({', '.join(have)})" if have else "emulated"


def emulated_half_warning(dtype: str) -> str | None:
    """A warning for loading a CPU artifact of ``dtype`` on this CPU, or None where it runs natively."""
    features = cpu_features()
    if dtype not in NATIVE_HALF or features is None or half_precision_path(dtype, features) != "emulated":
        return None
    return (
        f"this CPU has no native {dtype} ({' or '.join(NATIVE_HALF[dtype][:2])}): torch emulates it, often many "
        f"times slower than float32; rebuild the artifact in float32 (or float32 with int8 quantization) for "
        "this CPU"
    )


def cpu_features() -> frozenset[str] | None:
    """The instruction-set extensions this CPU has (among :data:`ISA_FEATURES`); None where unknown (no
    /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split()) & ISA_FEATURES
    except OSError:
        pass
    return None


def cache_folder(env: str, name: str) -> Path:
    """Where diffbake keeps ``name`` on this host (verification stamps, Hub builds, compiled packages): the folder
    ``$env`` names, else diffbake/``name`` under $XDG_CACHE_HOME or ~/.cache."""
    chosen = os.environ.get(env)
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffbake" / name


def host_facts(device: str) -> dict[str, Any]:
    """The facts about this host that compiled code depends on, named as :class:`~diffbake.format.manifest.Host`
    names them. ``device`` may carry an index ("cuda:1"): the GPU facts are that GPU's."""
    import torch

    d = torch.device(device)
    facts: dict[str, Any] = {
        "device": d.type,
        "platform": platform.system().lower(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "gpu": None,
        "compute_capability": None,
    }
    if d.type == "cuda" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(d)
        facts["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(d))
    return facts


def check_compatibility(manifest: Manifest, device: str) -> None:
    """Refuse to load where the compiled code cannot run correctly; every recorded fact is compared.

    Raises:
        CompatibilityError: naming the field, the value recorded at build, the value found here and the remedy.
    """
    import torch

    built = manifest.host
    asked, device = device, torch.device(device).type  # "cuda:1" is checked as that GPU, below
    if device != built.device:
        raise CompatibilityError(
            f"device: this artifact was compiled for {built.device!r}, but {device!r} was asked for; "
            f"load it with device={built.device!r}, or rebuild the recipe with [target] device = {device!r}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise CompatibilityError(
            "device: this artifact was compiled for 'cuda', but this host has no CUDA GPU; load it on a GPU host"
        )
    here = host_facts(asked)

    def refuse(fld: str, was: Any, now: Any, remedy: str) -> None:
        raise CompatibilityError(f"{fld}: this artifact was built with {was!r}, this host has {now!r}; {remedy}")

    wanted_torch = manifest.versions["torch"]
    if wanted_torch != torch.__version__:
        # Compiled packages link against one torch build's C++ ABI; another build can fail or crash at load.
        refuse(
            "torch",
            wanted_torch,
            torch.__version__,
            f"install torch=={wanted_torch} here, or rebuild the artifact with this torch",
        )
    if built.cuda != here["cuda"]:
        refuse("cuda", built.cuda, here["cuda"], "install the torch build (CUDA version) the artifact was built with")
    for fld in ("platform", "machine"):
        if getattr(built, fld) != here[fld]:
            refuse(fld, getattr(built, fld), here[fld], "rebuild the artifact on a host of this platform")
    if built.compute_capability != here["compute_capability"]:
        refuse(
            "compute_capability",
            built.compute_capability,
            here["compute_capability"],
            "CUDA code is built for one GPU architecture; rebuild the artifact on this GPU",
        )
    have = cpu_features()
    if have is None:
        # No feature list here (not Linux): fall back to torch's coarser capability names.
        want, now = _CPU_CAPABILITY_RANK.get(built.cpu_capability), _CPU_CAPABILITY_RANK.get(here["cpu_capability"])
        if want is None or now is None or now < want:
            refuse("cpu_capability", built.cpu_capability, here["cpu_capability"], _ISA_REMEDY)
        return
    missing = sorted(set(built.cpu_features) - have)
    if missing:
        raise CompatibilityError(
            f"cpu_features: this artifact's code (cpu_isa {built.cpu_isa!r}) uses {', '.join(missing)}, which "
            f"this CPU lacks; {_ISA_REMEDY}"
        )
    frozen = [name for name, entry in manifest.components.items() if entry.frozen]
    extra = sorted((have & ONEDNN_ISA) - set(built.cpu_features))
    if frozen and extra:
        raise CompatibilityError(
            f"cpu_features: the weights of {', '.join(frozen)} are prepacked (compiler freezing) in the layouts "
            f"oneDNN chose for the build host's CPU, which lacks {', '.join(extra)}; on this CPU oneDNN would reorder "
            "them on every call (a bfloat16 SD 1.5 UNet step measured 2.2x slower); rebuild the artifact on a CPU "
            "like this one, or without freezing"
        )


def requirements(manifest: Manifest) -> dict[str, Any]:
    """What a host must match (or, for CPU features, have) to run an artifact's code: what
    :func:`check_compatibility` compares, in one place for whatever else tells builds apart by host."""
    host = manifest.host
    return {
        "torch": manifest.versions["torch"],
        "device": host.device,
        "platform": host.platform,
        "machine": host.machine,
        "cuda": host.cuda,
        "compute_capability": host.compute_capability,
        "cpu_features": sorted(host.cpu_features),
    }


_ISA_REMEDY = (
    'executing it would crash the process (illegal instruction); rebuild with [target] cpu_isa = "avx2" '
    "for a fleet of older CPUs, or build on this CPU"
)
