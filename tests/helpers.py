"""Test helpers that play a builder who wrote something else: they edit an artifact and seal it again."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

from diffbake.format.manifest import MANIFEST_FILE, seal, sha256_file


def edit_manifest(folder: Path, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to the manifest's JSON and seal it again, as a build that recorded those values would."""
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(seal(data)))


def rehash(folder: Path, *rels: str) -> None:
    """Record the current size and sha256 of the files ``rels`` (listing them if new), and seal again."""

    def update(data: dict) -> None:
        for rel in rels:
            data["files"][rel] = {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}

    edit_manifest(folder, update)


def rewrite_package(path: Path, entries: dict[str, bytes | None], *, compress: int = zipfile.ZIP_STORED) -> None:
    """Rewrite a package: ``entries`` maps an entry name (relative to the archive's folder) to new bytes, or to
    None to drop it; other entries are kept."""
    root = path.name.removesuffix(".pt2") + "/"
    with zipfile.ZipFile(path) as z:
        kept = {i.filename: z.read(i) for i in z.infolist()}
    for rel, data in entries.items():
        if data is None:
            kept.pop(root + rel, None)
        else:
            kept[root + rel] = data
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in kept.items():
            z.writestr(name, data)


def package_entry(path: Path, suffix: str) -> str:
    """The name, relative to the archive's folder, of the package's entry ending with ``suffix``."""
    root = path.name.removesuffix(".pt2") + "/"
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
    return name.removeprefix(root)
