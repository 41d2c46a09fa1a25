"""AOTInductor: compile an exported program into a code-only package, for a chosen CPU instruction set.

Weights stay outside the package (``package_constants_in_so = False``) and are bound at load time, so one set of
weights can serve several packages and be swapped without a recompile. Every setting is scoped to the compile.
After compiling, the package is rewritten to hold only what the loader needs (no sources, no flags), and is
inspected with the loader's own checks: the build fails if loading would.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

from diffbake.errors import BuildError
from diffbake.format.host import CPU_TARGETS, ONEDNN_ISA, cpu_features
from diffbake.format.packages import entry_kind, inspect_package

INDUCTOR_CONFIGS: dict[str, Any] = {
    # Code only: the weights go to weights.safetensors, stored once.
    "aot_inductor.package_constants_in_so": False,
    # Without this, tensors of 8 elements or fewer are baked into the code and could not be rebound.
    "always_keep_tensor_constants": True,
    # Otherwise the build host's thread count is baked into the CPU kernels, underusing a bigger server.
    "cpp.dynamic_threads": True,
    # Precompiled headers pay off only across many compiles of one process; a build compiles each package once.
    "aot_inductor.precompile_headers": False,
}

# gcc's -m flags as /proc/cpuinfo names the extension.
_GCC_FEATURES = {
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avxvnni": "avx_vnni",
}


def isa_configs(cpu_isa: str) -> dict[str, Any]:
    """Inductor settings for a CPU target. "native" is inductor's default (-march=native, the host's widest
    vectors); a named target sets both the -march level and the vector width, since either alone still lets
    the compiler or the kernels use the build host's wider instructions."""
    if cpu_isa == "native":
        return {}
    march, simdlen, _ = CPU_TARGETS[cpu_isa]
    return {"cpp.march": march, "cpp.simdlen": simdlen}


def required_cpu_features(cpu_isa: str, prepacked: bool = False) -> list[str]:
    """The CPU extensions code compiled for ``cpu_isa`` may use, as /proc/cpuinfo names them.

    A named target implies its -march level's extensions plus those the vector kernels inductor picks for that
    width are compiled with (on a build host with AMX, its AVX-512 kernels are built with AMX, VNNI and BF16
    enabled, so those are required too). A native build may use anything the build host has. Weights
    ``prepacked`` (compiler freezing) are in layouts oneDNN chose by the build host's :data:`ONEDNN_ISA`: all
    of those are required too (and the loader refuses a CPU with more of them), since any other CPU would reorder
    the weights on every call.
    """
    host = cpu_features() or frozenset()
    if cpu_isa == "native":
        return sorted(host)
    if prepacked:
        return sorted(set(required_cpu_features(cpu_isa)) | (host & ONEDNN_ISA))
    import torch._inductor.config
    from torch._inductor import cpu_vec_isa

    _, _, implied = CPU_TARGETS[cpu_isa]
    with torch._inductor.config.patch(isa_configs(cpu_isa)):
        flags = cpu_vec_isa.pick_vec_isa().build_arch_flags()
    extra = {_GCC_FEATURES.get(f, f.replace("-", "_")) for f in re.findall(r"-m([a-z0-9-]+)", flags)}
    return sorted(set(implied) | extra)


def inductor_configs(cpu_isa: str = "native", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every inductor setting of a compile: the recipe's options first, so diffbake's own packaging settings
    always win, then the CPU target's."""
    configs = {**(options or {}), **INDUCTOR_CONFIGS, **isa_configs(cpu_isa)}
    if configs.get("freezing"):
        # Freezing folds the weights into the code and prepacks them in oneDNN's layouts (opaque tensors that no
        # weights file can hold): they can only live in the package. As a blob beside the library, which torch's
        # loader reads into memory once; inside the library they stayed mapped besides (SD 1.5's bfloat16 UNet:
        # 3.6 GB resident against 2.0 GB).
        configs["aot_inductor.package_constants_on_disk_format"] = "binary_blob"
    return configs


def compile_package(name: str, exported: Any, path: Path, *, device: str, configs: dict[str, Any]) -> Path:
    """Compile ``exported`` with AOTInductor and ``configs`` (:func:`inductor_configs`) into ``path`` (a .pt2
    package), then strip and inspect it.

    Raises:
        BuildError: the compile failed (for example no C++ compiler on a CPU build).
    """
    import platform

    import torch._inductor

    try:
        # Without grad: inductor applies freezing (when asked) only to graphs compiled so; nothing else changes.
        with torch.no_grad():
            out = torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=configs)
    except Exception as e:  # inductor raises many unrelated types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BuildError(
            f"{name}: AOTInductor compile failed ({type(e).__name__}: {first}); a CPU build needs a working C++ "
            "compiler (g++); set DIFFBAKE_DEBUG=1 for the traceback"
        ) from e
    out = Path(out)
    strip_package(out, device)
    inspect_package(out, device, platform.machine())
    return out


def strip_package(path: Path, device: str) -> None:
    """Rewrite a package with only the entries the loader needs, stored uncompressed, in place (atomically)."""
    root = path.name.removesuffix(".pt2") + "/"
    tmp = path.with_name(path.name + ".strip")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            rel = info.filename.removeprefix(root)
            kind = entry_kind(rel)
            if kind is None or (kind == "kernel" and device != "cuda"):
                continue  # sources, flags, per-kernel metadata: nothing the loader reads
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.external_attr = 0o644 << 16
            dst.writestr(entry, src.read(info), compress_type=zipfile.ZIP_STORED)
    os.replace(tmp, path)
