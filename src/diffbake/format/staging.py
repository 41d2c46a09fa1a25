"""Writing an artifact atomically: everything goes into a staging folder beside the destination, the manifest is
written last, and the folder is renamed into place. An interrupted build (even by SIGKILL) never leaves a
destination that looks complete; a failed one leaves the previous artifact, if any, untouched.

On Linux an existing artifact is replaced with one atomic exchange of the two folders (``renameat2`` with
``RENAME_EXCHANGE``), so the destination is always either the old artifact or the new one. Elsewhere it takes two
renames; a build killed between them leaves the old artifact beside the destination, and the next build of that
destination puts it back. Staging folders of killed builds are removed by the next build of the same destination.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from diffbake.format.manifest import MANIFEST_FILE, FileEntry, Manifest, sha256_file, write_manifest

logger = logging.getLogger(__name__)


def list_files(root: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under ``root`` but the manifest, keyed by POSIX relative path."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST_FILE:
            files[rel] = FileEntry(size=path.stat().st_size, sha256=sha256_file(path))
    return files


class Staging:
    """A staging folder that becomes ``dest`` on :meth:`commit` and is removed if the build fails."""

    def __init__(self, dest: str | Path):
        self.dest = Path(dest)
        self.path = self.dest.parent / f".{self.dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._committed = False

    def __enter__(self) -> Staging:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        recover(self.dest)
        self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, make_manifest: Callable[[dict[str, FileEntry]], Manifest] | None = None) -> Path:
        """Hash every file, write the manifest last, then move the folder into place (replacing ``dest``).

        Without ``make_manifest`` the staging folder already holds its manifest (a copy of a verified artifact)."""
        if make_manifest is not None:
            write_manifest(self.path, make_manifest(list_files(self.path)))
        if not self.dest.exists():
            os.rename(self.path, self.dest)
        elif _exchange(self.path, self.dest):
            shutil.rmtree(self.path, ignore_errors=True)  # now the old artifact
        else:
            old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.dest, old)
            os.replace(self.path, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.dest


def recover(dest: Path) -> None:
    """Clean up after builds of ``dest`` that were killed: remove their staging folders, and put back an old
    artifact that a kill between two renames left beside an empty destination."""
    pattern = re.compile(re.escape(f".{dest.name}.") + r"(partial|old)-(\d+)-[0-9a-f]{8}")
    for path in sorted(dest.parent.iterdir()) if dest.parent.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not dest.exists() and (path / MANIFEST_FILE).is_file():
            logger.warning("restoring %s, left beside it by an interrupted build", dest)
            os.rename(path, dest)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
