"""Checks run before any compiled code is loaded: file integrity and host compatibility.

Loading an AOTInductor package dlopens a shared library; a crash inside it (wrong CPU instructions, another torch
build) cannot be caught, so everything that can be checked is checked first. The runtime imports this module; it
imports nothing from the build side.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from .errors import CompatibilityError, IntegrityError
from .manifest import MANIFEST_FILE, Manifest, sha256_file

# x86 CPU capabilities as torch names them, lowest first: code built for one runs on it and above.
_CPU_CAPABILITY_RANK = {"DEFAULT": 0, "NO AVX": 0, "AVX2": 1, "AVX512": 2}


def verify_files(artifact: str | Path, manifest: Manifest) -> None:
    """Check every file against the manifest: present, a regular file, right size and sha256, none unlisted.

    Raises:
        IntegrityError: naming the first file that differs.
    """
    root = Path(artifact)
    for rel, entry in manifest.files.items():
        path = root / rel
        if path.is_symlink():
            raise IntegrityError(
                f"{path}: is a symbolic link; an artifact holds regular files only; rebuild or re-download it"
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
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise IntegrityError(
                f"{path}: sha256 {digest[:16]}…, but the manifest records {entry.sha256[:16]}…; the file was changed; "
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


def host_facts(device: str) -> dict[str, Any]:
    """The facts about this host that compiled code depends on."""
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
    """Refuse to load where the compiled code cannot run correctly.

    Raises:
        CompatibilityError: naming the field, the value recorded at build, the value found here and the remedy.
    """
    import torch

    built = manifest.host
    if device != built["device"]:
        raise CompatibilityError(
            f"device: this artifact was compiled for {built['device']!r}, but {device!r} was asked for; "
            f"load it with device={built['device']!r}, or rebuild the recipe with [target] device = {device!r}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise CompatibilityError(
            "device: this artifact was compiled for 'cuda', but this host has no CUDA GPU; load it on a GPU host"
        )
    here = host_facts(device)

    def refuse(fld: str, remedy: str, was: Any = None, now: Any = None) -> None:
        was, now = (built.get(fld), here.get(fld)) if was is None else (was, now)
        raise CompatibilityError(f"{fld}: this artifact was built with {was!r}, this host has {now!r}; {remedy}")

    wanted_torch = manifest.versions.get("torch")
    if wanted_torch != torch.__version__:
        # Compiled packages link against one torch build's C++ ABI; another build can fail or crash at load.
        refuse(
            "torch",
            f"install torch=={wanted_torch} here, or rebuild the artifact with this torch",
            wanted_torch,
            torch.__version__,
        )
    for fld in ("platform", "machine"):
        if built.get(fld) != here[fld]:
            refuse(fld, "rebuild the artifact on a host of this platform")
    if device == "cpu":
        want = _CPU_CAPABILITY_RANK.get(str(built.get("cpu_capability")))
        have = _CPU_CAPABILITY_RANK.get(str(here["cpu_capability"]))
        if want is None or have is None or have < want:
            refuse(
                "cpu_capability", "its code uses instructions this CPU lacks; rebuild the artifact on (or for) this CPU"
            )
    else:
        if built.get("compute_capability") != here["compute_capability"]:
            refuse(
                "compute_capability", "CUDA code is built for one GPU architecture; rebuild the artifact on this GPU"
            )
