"""AOTInductor packages: what one may hold, checked without opening it.

A ``.pt2`` package is a zip file. torch's loader extracts it and ``dlopen``s the shared library inside; if there
is none, it compiles the C++ sources it finds, with flags read from the archive. torch's Python reader
(``load_package``) also runs the C++ compiler at every load to probe the CPU, and unpickles weights when an
archive holds any. So diffbake inspects each package first and opens it through the C++ loader directly
(:mod:`diffbake.runtime.packages`).

The inspection is an allow-list of exactly what ``diffbake build`` writes (see :data:`ALLOWED`): the archive's
format records, one shared library, its metadata, on CUDA the kernel binaries, for a frozen build the
library's weights blob, and where the library calls ops through torch's dispatcher, the list of those calls. Sources, compile flags, pickles, exported programs and anything else are refused. Entries must be stored (not compressed), and the
archive must hold no bytes outside its entries, so Python's zip reader and torch's (miniz) see the same files.
The build strips its packages with the same allow-list, so a build fails where the loader would refuse.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbake.errors import ArtifactError, CompatibilityError, DiffbakeError

# The model folder inside a package, under the archive's root folder (the package's file name without .pt2).
MODEL_DIR = "data/aotinductor/model/"


# Entry names relative to the root folder. Generated file names are inductor's base32 hashes.
ALLOWED: dict[str, re.Pattern[str]] = {
    "format": re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"),
    "library": re.compile(re.escape(MODEL_DIR) + r"[a-z0-9]+\.wrapper\.so"),
    "metadata": re.compile(re.escape(MODEL_DIR) + r"[a-z0-9]+\.wrapper_metadata\.json"),
    # The weights of a frozen build (compiler freezing), raw bytes the library reads; other builds bind theirs.
    "weights": re.compile(re.escape(MODEL_DIR) + r"[a-z0-9]+\.wrapper_weights\.blob"),
    # The ops the library hands back to torch's dispatcher by name (torch's proxy executor: aten ops without a C
    # shim, such as those on complex tensors in Z-Image's rotary embeddings), as data: a list of calls.
    "extern": re.compile(re.escape(MODEL_DIR) + r"[a-z0-9]+\.wrapper\.json"),
    # CUDA kernels are separate binaries the library loads (cuModuleLoad), not code the loader compiles.
    "kernel": re.compile(re.escape(MODEL_DIR) + r"[A-Za-z0-9_]+\.(cubin|fatbin)"),
}


MAX_ENTRIES = 4096


MAX_METADATA_BYTES = 64 * 1024
MAX_EXTERN_BYTES = 16 * 1024 * 1024


_ELF_MACHINES = {"x86_64": 62, "AMD64": 62, "aarch64": 183, "arm64": 183, "ppc64le": 21, "s390x": 22}


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError)


_ZIP_ERRORS += (RuntimeError, zlib.error, struct.error, KeyError, UnicodeDecodeError, OverflowError)


def entry_kind(rel: str) -> str | None:
    """Which allowed kind of entry ``rel`` (a name inside the archive's folder) is, or None if none."""
    return next((kind for kind, pattern in ALLOWED.items() if pattern.fullmatch(rel)), None)


@dataclass(frozen=True)
class PackageInfo:
    library: str  # the shared library's entry name
    metadata: dict[str, str]  # AOTI_DEVICE_KEY, AOTI_PLATFORM, AOTI_CPU_ISA, ...
    weights: str | None = None  # the library's weights blob (a frozen build), else None: weights are bound
    extern: str | None = None  # the ops it calls through torch's dispatcher (see ALLOWED), if any


def inspect_package(path: str | Path, device: str, machine: str) -> PackageInfo:
    """Check that ``path`` holds exactly what a diffbake build writes, for ``device`` and this ``machine``.

    Raises:
        ArtifactError: naming the package, the entry and what is wrong with it.
    """
    path = Path(path)
    try:
        return _inspect(path, device, machine)
    except DiffbakeError:
        raise
    except _ZIP_ERRORS as e:
        raise ArtifactError(f"{path}: not a readable package ({type(e).__name__}: {e}); rebuild the artifact") from None


def _inspect(path: Path, device: str, machine: str) -> PackageInfo:
    def refuse(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: {what}; a diffbake package holds only what the build writes; rebuild it")

    root = path.name.removesuffix(".pt2") + "/"
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as z:
        infos = z.infolist()
        if not infos or len(infos) > MAX_ENTRIES:
            raise refuse(f"{len(infos)} entries")
        seen: set[str] = set()
        kinds: dict[str, list[str]] = {kind: [] for kind in ALLOWED}
        offset = 0
        for info in sorted(infos, key=lambda i: i.header_offset):
            name = info.filename
            if name in seen:
                raise refuse(f"entry {name!r} appears twice")
            seen.add(name)
            if not name.startswith(root):
                raise refuse(f"entry {name!r} is outside the archive's folder {root!r}")
            rel = name[len(root) :]
            kind = entry_kind(rel)
            if kind is None:
                raise refuse(
                    f"unexpected entry {name!r} (not a file the build writes: sources, flags and pickles are refused)"
                )
            if kind == "kernel" and device != "cuda":
                raise refuse(f"entry {name!r} is a CUDA kernel in a {device} package")
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                raise refuse(f"entry {name!r} is not a regular file (a link or a device)")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise refuse(f"entry {name!r} is compressed or encrypted; the build stores entries as they are")
            if info.header_offset != offset:
                raise refuse(f"bytes before entry {name!r} belong to no entry")
            offset = _entry_end(raw, info)
            kinds[kind].append(name)
        if offset != z.start_dir:
            raise refuse("bytes between the last entry and the archive's directory belong to no entry")
        if len(kinds["library"]) != 1 or len(kinds["metadata"]) != 1:
            raise refuse(
                f"{len(kinds['library'])} shared libraries and {len(kinds['metadata'])} metadata files; "
                "a package holds one of each"
            )
        library, meta_name = kinds["library"][0], kinds["metadata"][0]
        if meta_name.removesuffix("_metadata.json") != library.removesuffix(".so"):
            raise refuse(f"metadata {meta_name!r} is not that of {library!r}")
        for kind, suffix, what in (("weights", "_weights.blob", "weights"), ("extern", ".json", "op lists")):
            if len(kinds[kind]) > 1 or any(e.removesuffix(suffix) != library.removesuffix(".so") for e in kinds[kind]):
                raise refuse(f"{what} {kinds[kind]} are not those of {library!r}")
        metadata = _metadata(z, meta_name, refuse)
        for name in kinds["extern"]:
            _extern_calls(z, name, refuse)
        with z.open(library) as f:
            header = f.read(20)
    if metadata.get("AOTI_DEVICE_KEY") != device:
        raise refuse(f"compiled for device {metadata.get('AOTI_DEVICE_KEY')!r}, but the manifest says {device!r}")
    want = _ELF_MACHINES.get(machine)
    if header[:4] != b"\x7fELF" or header[4] != 2:
        raise refuse(f"{library!r} is not a 64-bit ELF shared library")
    found = struct.unpack("<H" if header[5] == 1 else ">H", header[18:20])[0]
    if want is not None and found != want:
        raise CompatibilityError(
            f"machine: {path.name}'s shared library is for ELF machine {found}, this host is {machine} "
            f"(ELF machine {want}); rebuild the artifact on a host of this platform"
        )
    return PackageInfo(
        library=library,
        metadata=metadata,
        weights=next(iter(kinds["weights"]), None),
        extern=next(iter(kinds["extern"]), None),
    )


def _entry_end(raw: Any, info: zipfile.ZipInfo) -> int:
    """Where an entry's data ends, read from its local header (which must agree with the directory)."""
    raw.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    signature, name_len, extra_len = fields[0], fields[10], fields[11]
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename!r}")
    name = raw.read(name_len)
    if name.decode("utf-8" if info.flag_bits & 0x800 else "cp437") != info.filename:
        raise zipfile.BadZipFile(f"local header of {info.filename!r} names another file")
    if info.flag_bits & 0x8 or info.file_size != info.compress_size:
        raise zipfile.BadZipFile(f"entry {info.filename!r} has a data descriptor or a size mismatch")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size


def _json_entry(z: zipfile.ZipFile, name: str, what: str, limit: int, refuse: Any) -> Any:
    """An entry read as strict JSON, at most ``limit`` bytes."""
    info = z.getinfo(name)
    if info.file_size > limit:
        raise refuse(f"{what} {name!r} is {info.file_size} bytes")
    try:
        return json.loads(z.read(name).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise refuse(f"{what} {name!r} is not JSON ({type(e).__name__})") from None


def _metadata(z: zipfile.ZipFile, name: str, refuse: Any) -> dict[str, str]:
    data = _json_entry(z, name, "metadata", MAX_METADATA_BYTES, refuse)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise refuse(f"metadata {name!r} is not an object of strings")
    return data


def _extern_calls(z: zipfile.ZipFile, name: str, refuse: Any) -> None:
    """The proxy executor's list of calls: strict JSON, ``{"nodes": [{"name": ..., "node": {"target": op}}]}``."""
    data = _json_entry(z, name, "op list", MAX_EXTERN_BYTES, refuse)
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list) or not all(
        isinstance(n, dict) and isinstance(n.get("node"), dict) and isinstance(n["node"].get("target"), str)
        for n in nodes
    ):
        raise refuse(f"op list {name!r} is not a list of calls of named ops")
