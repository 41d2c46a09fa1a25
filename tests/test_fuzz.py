"""Fuzzed manifests and packages: every outcome is a typed diffbake error (or a clean pass), never a crash or hang."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffbake
from diffbake.errors import DiffbakeError
from diffbake.format.manifest import FORMAT_VERSION, MANIFEST_FILE, seal
from diffbake.format.packages import ALLOWED, inspect_package

SETTINGS = settings(
    max_examples=300,
    deadline=timedelta(seconds=10),  # a hang fails the example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure is reproducible
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class _Reached(Exception):
    """Raised where torch's loader would run: everything before it passed."""


class _Original:
    """An artifact and its manifest's bytes (with a short repr for hypothesis' reports)."""

    def __init__(self, art: Path):
        self.art, self.manifest = art, (art / MANIFEST_FILE).read_bytes()

    def __iter__(self):
        return iter((self.art, self.manifest))

    def __repr__(self) -> str:
        return f"<artifact {self.art}>"


@pytest.fixture(scope="module")
def fuzz_artifact(artifacts, tmp_path_factory: pytest.TempPathFactory) -> _Original:
    return _Original(Path(shutil.copytree(artifacts("sd"), tmp_path_factory.mktemp("fuzz") / "sd")))


def _load_until_native_code(art: Path, monkeypatch, *, intact: bool) -> None:
    """Load until native code would run. ``intact``: the manifest says what the original says (its bytes differ
    at most in layout), so every check must pass; otherwise any outcome but an untyped error is allowed."""
    import torch

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", reached)
    try:
        diffbake.load(art)
    except _Reached:
        return
    except DiffbakeError as e:
        assert not intact, f"a manifest equal to the original was refused: {e}"
        return
    raise AssertionError("the load passed without opening a package")


def _same_content(raw: bytes, original: bytes) -> bool:
    """Whether ``raw`` is a strict JSON text (no duplicate keys, NaN or Infinity) of the original's content."""

    def strict(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    def refuse(name):
        raise ValueError(name)

    try:
        mutated = json.loads(raw, object_pairs_hook=strict, parse_constant=refuse)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return False
    # Compared as canonical text, so that 2.0 is not taken for 2, nor true for 1.
    return json.dumps(mutated, sort_keys=True) == json.dumps(json.loads(original), sort_keys=True)


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


def test_the_fuzz_oracle_tells_an_intact_manifest_from_a_damaged_one(fuzz_artifact, monkeypatch):
    art, original = fuzz_artifact
    spaced = json.dumps(json.loads(original), indent=3).encode()  # another layout of the same content
    assert _same_content(spaced, original)
    (art / MANIFEST_FILE).write_bytes(spaced)
    _load_until_native_code(art, monkeypatch, intact=True)
    version = f'"format_version": {FORMAT_VERSION}'.encode()
    damaged = original.replace(version, f'"format_version": {FORMAT_VERSION + 1}'.encode(), 1)
    assert damaged != original and not _same_content(damaged, original)
    (art / MANIFEST_FILE).write_bytes(damaged)
    with pytest.raises(AssertionError, match="a manifest equal to the original was refused"):
        _load_until_native_code(art, monkeypatch, intact=True)
    (art / MANIFEST_FILE).write_bytes(original)


@SETTINGS
@given(data=st.data())
def test_fuzzed_manifest_bytes(fuzz_artifact, monkeypatch, data):
    art, original = fuzz_artifact
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        if how == "replace":
            raw[at] = data.draw(st.integers(0, 255))
        elif how == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del raw[at : at + data.draw(st.integers(1, 64))]
        else:
            del raw[at:]
    (art / MANIFEST_FILE).write_bytes(bytes(raw))
    _load_until_native_code(art, monkeypatch, intact=_same_content(bytes(raw), original))


@SETTINGS
@given(data=st.data())
def test_fuzzed_manifest_structure_sealed_again(fuzz_artifact, monkeypatch, data):
    """Values swapped for others of any type, keys dropped and added, then sealed, so the schema is what stops them."""
    art, original = fuzz_artifact
    manifest = json.loads(original)
    paths = list(_paths(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        if not path:
            continue
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            how = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if how == "replace":
                parent[path[-1]] = data.draw(JSON)
            elif how == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    (art / MANIFEST_FILE).write_text(json.dumps(seal(manifest)))
    _load_until_native_code(art, monkeypatch, intact=_same_content(json.dumps(seal(manifest)).encode(), original))


class _Bytes(bytes):
    def __repr__(self) -> str:
        return f"<{len(self)} bytes of a real package>"


@pytest.fixture(scope="module")
def real_package(artifacts) -> bytes:
    return _Bytes((artifacts("sd") / "vae_decoder" / "model.pt2").read_bytes())


NAMES = st.sampled_from(
    [
        "archive_format",
        "byteorder",
        ".data/version",
        "data/aotinductor/model/abc.wrapper.so",
        "data/aotinductor/model/abc.wrapper_metadata.json",
        "data/aotinductor/model/abc.wrapper.cpp",
        "data/aotinductor/model/k.cubin",
        "data.pkl",
        "../x.so",
        "",
    ]
) | st.text(max_size=30)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@SETTINGS
@given(data=st.data())
def test_fuzzed_packages(real_package, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("pkg") / "model.pt2"
    if data.draw(st.booleans()):
        # Bytes of a real package, damaged.
        raw = bytearray(real_package)
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        path.write_bytes(bytes(raw))
    else:
        # An archive of arbitrary entries, some real, some not.
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for _ in range(data.draw(st.integers(0, 6))):
                name = data.draw(st.sampled_from(["model/", "other/", ""])) + data.draw(NAMES)
                info = zipfile.ZipInfo(name or "x")
                info.compress_type = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
                info.external_attr = data.draw(st.sampled_from([0, 0o100644, 0o120777, 0o040755])) << 16
                payload = data.draw(
                    st.binary(max_size=64) | st.just(real_package[:4096]) | st.just(b'{"AOTI_DEVICE_KEY": "cpu"}')
                )
                z.writestr(info, payload)
        path.write_bytes(buffer.getvalue())
    try:
        info = inspect_package(path, "cpu", "x86_64")
    except DiffbakeError:
        return
    # Whatever passes holds only allowed entries and one library.
    assert ALLOWED["library"].fullmatch(info.library.removeprefix("model/"))
