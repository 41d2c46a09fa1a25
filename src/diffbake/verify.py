"""Checks run before any compiled code is loaded: file integrity and host compatibility.

Loading an AOTInductor package dlopens a shared library; a crash inside it (wrong CPU instructions, another torch
build) cannot be caught, so everything that can be checked is checked first. The runtime imports this module; it
imports nothing from the build side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from .errors import CompatibilityError, IntegrityError
from .manifest import MANIFEST_FILE, Manifest, check_seal, sha256_file

logger = logging.getLogger(__name__)

# x86 CPU capabilities as torch names them, lowest first: code built for one runs on it and above.
_CPU_CAPABILITY_RANK = {"DEFAULT": 0, "NO AVX": 0, "AVX2": 1, "AVX512": 2}


STAMP_ENV = "DIFFBAKE_STAMP_DIR"
STAMP_VERSION = 1


def verify_files(artifact: str | Path, manifest: Manifest, *, use_stamp: bool = False, record: bool = True) -> str:
    """Check every file against the manifest: a regular file, right size and sha256, none unlisted; and the
    manifest against the digest it was sealed with.

    Hashing costs about 0.7 s per GB (1.5 GB/s measured). After a full check, a stamp of every file's size,
    mtime, ctime and inode is recorded for this host (in $DIFFBAKE_STAMP_DIR, else ~/.cache/diffbake/stamps);
    with ``use_stamp`` a stamp that still matches skips the hashing. Anything that rewrites a file changes its
    ctime, so the stamp no longer matches and the full check runs again. ``record=False`` records no stamp (for
    a folder about to be moved: see :func:`record_stamp`).

    Returns:
        "stamp" if a matching stamp skipped the hashing, else "full".

    Raises:
        IntegrityError: naming the first file that differs.
    """
    root = Path(artifact)
    _check_listing(root, manifest)
    stats = _stats(root, manifest)
    if use_stamp and _read_stamp(root) == stats:
        return "stamp"
    check_seal(root)
    for rel, entry in manifest.files.items():
        path = root / rel
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise IntegrityError(
                f"{path}: sha256 {digest[:16]}…, but the manifest records {entry.sha256[:16]}…; the file was changed; "
                "rebuild or re-download the artifact"
            )
    if record and _stats(root, manifest) == stats:  # unchanged while it was hashed
        _write_stamp(root, stats)
    return "full"


def record_stamp(artifact: str | Path, manifest: Manifest) -> None:
    """Record a stamp for files that were fully verified elsewhere and then moved here unchanged (a rename keeps
    size, times and inode), so that the next load with ``use_stamp`` need not hash them again."""
    root = Path(artifact)
    _check_listing(root, manifest)
    _write_stamp(root, _stats(root, manifest))


def _check_listing(root: Path, manifest: Manifest) -> None:
    """Everything but the hashes: cheap enough for every load."""
    for rel, entry in manifest.files.items():
        path = root / rel
        if any(p.is_symlink() for p in [path, *path.parents][: len(Path(rel).parts)]):
            raise IntegrityError(
                f"{path}: is (or lies under) a symbolic link; an artifact holds regular files only; "
                "rebuild or re-download it"
            )
        if not path.is_file():
            raise IntegrityError(
                f"{path}: listed in the manifest but missing; the artifact is incomplete; rebuild or re-download it"
            )
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"{path}: {size} bytes, but the manifest records {entry.size}; the file was changed or truncated; "
                "rebuild or re-download the artifact"
            )
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE and rel not in manifest.files:
                raise IntegrityError(
                    f"{root / rel}: not listed in the manifest; an artifact holds only the files its manifest lists; "
                    "remove it or rebuild the artifact"
                )


def _stats(root: Path, manifest: Manifest) -> dict[str, list[int]]:
    out = {}
    for rel in [MANIFEST_FILE, *manifest.files]:
        st = (root / rel).stat()
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return out


def stamp_path(root: Path) -> Path:
    folder = (
        os.environ.get(STAMP_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffbake/stamps"
    )
    key = hashlib.sha256(f"{platform.node()}\0{root.resolve()}".encode()).hexdigest()[:32]
    return Path(folder) / f"{key}.json"


def _read_stamp(root: Path) -> dict[str, list[int]] | None:
    try:
        data = json.loads(stamp_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != STAMP_VERSION
        or data.get("artifact") != str(root.resolve())
    ):
        return None
    return data.get("files")


def _write_stamp(root: Path, stats: dict[str, list[int]]) -> None:
    path = stamp_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": STAMP_VERSION, "artifact": str(root.resolve()), "files": stats}))
        os.replace(tmp, path)
    except OSError as e:  # a stamp only saves time later; failing to record one is not an error
        logger.debug("no verification stamp recorded for %s: %s", root, e)


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


def host_facts(device: str) -> dict[str, Any]:
    """The facts about this host that compiled code depends on, named as :class:`~diffbake.manifest.Host` names
    them."""
    import torch

    facts: dict[str, Any] = {
        "device": device,
        "platform": platform.system().lower(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "gpu": None,
        "compute_capability": None,
    }
    if device == "cuda" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    return facts


def check_compatibility(manifest: Manifest, device: str) -> None:
    """Refuse to load where the compiled code cannot run correctly; every recorded fact is compared.

    Raises:
        CompatibilityError: naming the field, the value recorded at build, the value found here and the remedy.
    """
    import torch

    built = manifest.host
    if device != built.device:
        raise CompatibilityError(
            f"device: this artifact was compiled for {built.device!r}, but {device!r} was asked for; "
            f"load it with device={built.device!r}, or rebuild the recipe with [target] device = {device!r}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise CompatibilityError(
            "device: this artifact was compiled for 'cuda', but this host has no CUDA GPU; load it on a GPU host"
        )
    here = host_facts(device)

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


_ISA_REMEDY = (
    'executing it would crash the process (illegal instruction); rebuild with [target] cpu_isa = "avx2" '
    "for a fleet of older CPUs, or build on this CPU"
)
