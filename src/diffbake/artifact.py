"""Writing an artifact atomically: everything goes into a staging folder beside the destination, the manifest is
written last, and the folder is renamed into place. An interrupted build never leaves a destination that looks
complete; a failed one leaves the previous artifact, if any, untouched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .manifest import MANIFEST_FILE, FileEntry, Manifest, sha256_file, write_manifest


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
        self.path = self.dest.parent / f".{self.dest.name}.partial-{uuid.uuid4().hex[:8]}"
        self._committed = False

    def __enter__(self) -> Staging:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, make_manifest: Callable[[dict[str, FileEntry]], Manifest]) -> Path:
        """Hash every file, write the manifest last, then move the folder into place (replacing ``dest``)."""
        write_manifest(self.path, make_manifest(list_files(self.path)))
        old = None
        if self.dest.exists():
            # Two renames: the old artifact stays whole until the new one is complete and in place.
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dest, old)
        os.replace(self.path, self.dest)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest
