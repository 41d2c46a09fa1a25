"""The compile cache: AOTInductor packages kept by what determines their code, so a rebuild compiles only what
changed.

torch's own FX graph cache is never used in AOT mode (torch 2.13, ``_inductor/compile_fx.py``: ``use_cache = ...
and not aot_mode``), so without this every build of an unchanged component pays the whole C++ compile again.

A package is code only (weights are bound at load), so its key leaves weight values out, as a rebind does: the
exported program with its node metadata (stack traces, source locations) removed, every inductor setting of the
compile, the target (device, CPU instruction sets, GPU), the torch build, the C++ compiler, and the torch and
environment settings inductor reads. A program that cannot be serialized is compiled without the cache.

Entries are written atomically and inspected with the loader's package checks when read; one that fails them is
deleted and compiled again. The folder (``$DIFFBAKE_COMPILE_CACHE``, else ``~/.cache/diffbake/compiled``) may be
deleted at any time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from diffbake import __version__
from diffbake.errors import DiffbakeError
from diffbake.format.host import cache_folder, cpu_features, host_facts
from diffbake.format.packages import ALLOWED, inspect_package

logger = logging.getLogger(__name__)

CACHE_ENV = "DIFFBAKE_COMPILE_CACHE"


class CompileCache:
    """Compiled packages by key, in one folder."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_folder(CACHE_ENV, "compiled")

    def key(self, exported: Any, *, device: str, inductor_configs: dict[str, Any]) -> str | None:
        """The key of compiling ``exported`` with ``inductor_configs`` for ``device``; None when the program cannot
        be serialized (it is then compiled without the cache)."""
        program = program_digest(exported)
        if program is None:
            return None
        ingredients = {
            "program": program,
            "inductor_configs": inductor_configs,
            "target": target_facts(device),
            "diffbake": __version__,
            # What a stored package may hold: a package stripped by another allow-list is compiled again.
            "package_entries": {kind: pattern.pattern for kind, pattern in ALLOWED.items()},
        }
        text = json.dumps(ingredients, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str, name: str) -> Path:
        # A package's entries sit under a folder named after its file (model-1/ in model-1.pt2), which the loader
        # checks: a package is cached under its own file name, and reused only under it.
        return self.folder / key[:2] / key / name

    def lookup(self, key: str, device: str, name: str) -> Path | None:
        """The cached package of ``key`` saved as ``name`` (model.pt2, model-1.pt2, block-0.pt2), if there is one
        that passes the loader's package checks (one that does not is deleted)."""
        path = self._path(key, name)
        if not path.is_file():
            return None
        try:
            inspect_package(path, device, platform.machine())
        except DiffbakeError as e:
            logger.warning("compile cache: dropping %s, which fails the package checks (%s)", path, e)
            path.unlink(missing_ok=True)
            return None
        return path

    def store(self, key: str, package: Path) -> None:
        """Copy ``package`` in as ``key``'s entry, atomically; a cache that cannot be written is only a warning."""
        path = self._path(key, package.name)
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}-", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
            shutil.copyfile(package, tmp)
            os.replace(tmp, path)  # readers see the whole entry or none
        except OSError as e:
            logger.warning("compile cache: could not store %s in %s (%s); builds still work", package, path, e)
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def program_digest(exported: Any) -> str | None:
    """sha256 of the exported program's graph, signature and tensor metadata, without node metadata (stack traces
    and source locations, which change with line numbers but not the computation) and without weight values."""
    from torch._export.serde.serialize import serialize

    try:
        # The graph only: serializing the weights too would copy every one of them into memory.
        artifact = serialize(
            exported, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
        )
        document = json.loads(artifact.exported_program)
    except Exception as e:  # the serializer raises many types for programs it cannot write
        logger.info("compile cache: not used for this program, which torch cannot serialize (%s)", e)
        return None
    text = json.dumps(_without_metadata(document), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_metadata(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_metadata(v) for k, v in value.items() if k != "metadata"}
    if isinstance(value, list):
        return [_without_metadata(v) for v in value]
    return value


def target_facts(device: str) -> dict[str, Any]:
    """What the generated code depends on besides the program and the inductor settings."""
    import torch

    facts: dict[str, Any] = {
        **host_facts(device),
        "cpu_features": sorted(cpu_features() or ()),
        "torch": torch.__version__,
        "git_version": torch.version.git_version,
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        # Inductor reads its settings from these too.
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_")},
    }
    facts["environment"].pop("TORCHINDUCTOR_CACHE_DIR", None)
    if torch.device(device).type == "cpu":
        facts["compiler"] = _cpp_compiler()
    return facts


@functools.lru_cache(maxsize=1)
def _cpp_compiler() -> str:
    """The C++ compiler inductor uses, with its version line."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as e:  # no compiler: the compile itself fails with the message that matters
        return f"unknown ({type(e).__name__})"
    return f"{compiler}: {version.splitlines()[0] if version else ''}"
