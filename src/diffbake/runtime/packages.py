"""Opening an AOTInductor package with nothing but its shared library loaded, and where it is extracted.

The package is inspected first (:func:`diffbake.format.packages.inspect_package`); it is then opened through
torch's C++ loader directly, which neither compiles nor unpickles anything (a frozen CPU package through the
runner of its library, to move its weights to aligned memory: see :func:`_open_frozen_cpu`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffbake.errors import ArtifactError, CompatibilityError
from diffbake.format.packages import inspect_package

logger = logging.getLogger(__name__)

# torch's loader extracts into std::filesystem::temp_directory_path(), which reads TMPDIR. TMPDIR is process-wide,
# so packages are opened one at a time.
_UNPACK_LOCK = threading.Lock()


UNPACK_ENV = "DIFFBAKE_UNPACK_DIR"


def unpack_dir(requested: str | Path | None = None) -> Path:
    """Where packages are extracted before their library is loaded: ``requested``, else $DIFFBAKE_UNPACK_DIR,
    else the system's temporary folder. It must be writable and allow executing what it holds.

    Raises:
        CompatibilityError: the folder is missing, not writable, or on a filesystem mounted ``noexec``.
    """
    chosen = requested or os.environ.get(UNPACK_ENV) or tempfile.gettempdir()
    folder = Path(chosen)
    how = (
        "pass unpack_dir=... to diffbake.load, or set " + UNPACK_ENV + " to a writable folder on a filesystem "
        "that allows executing programs"
    )
    if not folder.is_dir():
        raise CompatibilityError(f"unpack_dir: {folder} is not a folder; {how}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CompatibilityError(f"unpack_dir: {folder} is not writable; {how}")
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & getattr(os, "ST_NOEXEC", 8):
        raise CompatibilityError(
            f"unpack_dir: {folder} is on a filesystem mounted noexec, so the compiled library extracted there "
            f"could not be loaded (dlopen would fail with 'failed to map segment'); {how}"
        )
    return folder


@contextlib.contextmanager
def _tmpdir(folder: Path) -> Iterator[None]:
    with _UNPACK_LOCK:
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(folder)
        try:
            yield
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before


class Package:
    """An opened package: its runner, called on a list of tensors. Weights are bound with :meth:`bind`."""

    def __init__(
        self,
        path: str | Path,
        device: str,
        *,
        folder: Path,
        machine: str,
        device_index: int = -1,
        runners: int = 1,
    ):
        """``runners``: how many calls may run at once; each runner has its own activation buffers and all share
        the bound weights (calls beyond that wait for a free runner)."""
        import torch

        self.path = Path(path)
        # Also when load() inspected every package first (so none loads if any is bad): a package opened on
        # its own is checked too, and it costs a read of the zip directory.
        info = inspect_package(self.path, device, machine)
        # The weights a frozen CPU package holds, copied to memory of diffbake's own (see _open_frozen_cpu).
        self._weights: dict[str, Any] = {}
        try:
            opened = _open_frozen_cpu(self.path, info, folder, runners) if info.weights and device == "cpu" else None
            if opened is not None:
                self._runner, self._weights = opened
                self._run = self._runner.run
            else:
                with _tmpdir(folder):
                    self._loader = torch._C._aoti.AOTIModelPackageLoader(
                        str(self.path), "model", False, runners, device_index
                    )
                self._run = self._loader.boxed_run
        except RuntimeError as e:
            raise ArtifactError(
                f"{self.path}: torch could not load this package ({str(e).strip().splitlines()[0]}); "
                "check that torch and the artifact come from the same build, or rebuild the artifact"
            ) from e

    def constant_names(self) -> list[str]:
        """The original names of the constants the package expects (those :meth:`bind` takes)."""
        if self._weights:
            return list(self._runner.get_constant_names_to_original_fqns().values())
        return list(self._loader.get_constant_fqns())

    def constants_in_use(self) -> dict[str, Any]:
        """The tensors the library reads, by constant name, where it holds its own (a frozen CPU package); else {}."""
        if not self._weights:
            return {}
        return _constants_by_name(self._runner) or {}

    def bind(self, constants: dict[str, Any]) -> None:
        """Bind every constant the package expects, in place (``user_managed``: the caller keeps them alive)."""
        # (constants, use_inactive, check_full_update, user_managed, allow_h2d_copy), as torch's own wrapper calls it
        self._loader.load_constants(constants, False, True, True, False)

    def __call__(self, *tensors: Any) -> list[Any]:
        return self._run(list(tensors))


def _open_frozen_cpu(path: Path, info: Any, folder: Path, runners: int) -> tuple[Any, dict[str, Any]] | None:
    """The runner of a frozen CPU package, its weights in 64-byte-aligned memory that the process owns; None
    where torch's runtime cannot hand every weight over (then torch's loader opens it, weights as they are).

    torch's runtime copies a package's weights blob into one ``malloc``'d buffer, which glibc returns 16 bytes
    past a page boundary, so every prepacked weight sits 16 bytes off the 64-byte lines that oneDNN's AMX and
    AVX-512 kernels load: SD 1.5's convolutions ran 2x slower than eager's on the same weights. So the weights
    are read through one runner, copied (torch's allocator aligns to 64 bytes) and bound to a second runner of
    the same library, which never holds the misaligned copy; the first is dropped. The load's peak memory is
    twice the weights, for a moment.
    """
    import zipfile

    import torch

    with tempfile.TemporaryDirectory(dir=folder, prefix="diffbake-") as tmp, zipfile.ZipFile(path) as z:
        library, blob = z.extract(info.library, tmp), z.extract(info.weights, tmp)
        if info.extern:  # read by the runner from beside its library
            z.extract(info.extern, tmp)
        reader = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1)
        reader.update_constant_buffer_from_blob(blob)
        held = _constants_by_name(reader)
        if held is None:
            logger.info("%s: not every weight can be read out, so they stay where torch's runtime put them", path)
            return None
        weights = {name: t.clone() for name, t in held.items()}
        del reader, held
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(library, runners)
        # (constants, use_inactive, validate_full_updates, user_managed): every constant, read in place.
        runner.update_constant_buffer(weights, False, True, True)
    return runner, weights


def _constants_by_name(runner: Any) -> dict[str, Any] | None:
    """Every constant a runner's library reads, by constant name; None where the runtime cannot hand them all
    over: it hands them over by original name, and inductor's max_autotune GEMM templates give several packed
    weights the same one (only the first comes out)."""
    fqns = runner.get_constant_names_to_original_fqns()
    names = {fqn: name for name, fqn in fqns.items()}
    if len(names) < len(fqns):
        return None
    held = {names.get(fqn): t for fqn, t in runner.extract_constants_map(False).items()}
    return held if set(held) == set(fqns) else None
