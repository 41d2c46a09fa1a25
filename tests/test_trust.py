"""Trust: no compiled code loads until the manifest, the host, every file and every package have passed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import diffbake
import diffbake.format.host
from diffbake.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    CompatibilityError,
    DiffbakeError,
    IntegrityError,
    SelfTestError,
)
from diffbake.format.manifest import MANIFEST_FILE, read_manifest
from diffbake.format.packages import inspect_package
from helpers import edit_manifest, package_entry, rehash, rewrite_package


def _mapped_packages() -> set[str]:
    """Compiled libraries mapped into this process (AOTInductor wrappers)."""
    with open("/proc/self/maps") as f:
        # A library whose temporary folder was removed shows as "path (deleted)": the same library.
        return {line.split(maxsplit=5)[-1].strip().removesuffix(" (deleted)") for line in f if ".wrapper.so" in line}


@pytest.fixture
def copy(artifacts, tmp_path: Path):
    count = iter(range(1000))

    def make(family: str = "sd") -> Path:
        return Path(shutil.copytree(artifacts(family), tmp_path / f"{family}-{next(count)}", symlinks=True))

    return make


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _symlink(path: Path, scratch: Path) -> None:
    # Even the very same bytes are refused behind a link: a link can be re-pointed after verification.
    target = Path(shutil.copy(path, scratch / f"linked-{path.name}"))
    path.unlink()
    path.symlink_to(target)


# Each damages one file; ``scratch`` is a folder outside the artifact.
CORRUPTIONS = {
    "flip a byte": lambda p, scratch: _flip(p),
    "truncate": lambda p, scratch: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p, scratch: p.write_bytes(b""),
    "delete": lambda p, scratch: p.unlink(),
    "symlink": _symlink,
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_every_file_corrupted_is_refused_naming_it(artifacts, tmp_path: Path, how: str, no_package_loaded):
    source = artifacts("sd")
    mapped = _mapped_packages()
    rels = [MANIFEST_FILE, *read_manifest(source).files]
    assert len(rels) >= 10
    for i, rel in enumerate(rels):
        art = Path(shutil.copytree(source, tmp_path / f"a{i}"))
        scratch = tmp_path / f"scratch{i}"
        scratch.mkdir()
        CORRUPTIONS[how](art / rel, scratch)
        with pytest.raises(ArtifactError) as e:
            diffbake.load(art)
        named = str(art / rel) if rel != MANIFEST_FILE else f"{art}"
        assert named in str(e.value) and (rel != MANIFEST_FILE or "manifest.json" in str(e.value)), str(e.value)
        if rel != MANIFEST_FILE:
            assert isinstance(e.value, IntegrityError), str(e.value)
        shutil.rmtree(art)
    # No library mapped since (earlier tests' libraries may have been unloaded meanwhile).
    assert no_package_loaded == [] and _mapped_packages() <= mapped


def test_exact_messages_for_each_kind_of_damage(copy, no_package_loaded):
    art = copy()
    weights = art / "unet" / "weights.safetensors"
    size = weights.stat().st_size
    CORRUPTIONS["truncate"](weights, None)
    with pytest.raises(IntegrityError) as e:
        diffbake.load(art)
    assert str(e.value) == (
        f"{weights}: {size // 2} bytes, but the manifest records {size}; the file was changed or truncated; "
        "rebuild or re-download the artifact"
    )
    art = copy()
    (art / "unet" / "model.pt2").unlink()
    with pytest.raises(IntegrityError) as e:
        diffbake.load(art)
    assert str(e.value) == (
        f"{art / 'unet' / 'model.pt2'}: listed in the manifest but missing; the artifact is incomplete; rebuild or "
        "re-download it"
    )
    art = copy()
    _flip(art / MANIFEST_FILE)
    with pytest.raises(ArtifactError, match=r"manifest\.json: not a valid manifest \("):
        diffbake.load(art)
    art = copy()
    edit_manifest(art, lambda d: None)
    text = (art / MANIFEST_FILE).read_text().replace('"max_abs_error": ', '"max_abs_error": 1', 1)
    (art / MANIFEST_FILE).write_text(text)
    with pytest.raises(IntegrityError) as e:
        diffbake.load(art)
    assert str(e.value) == (
        f"{art / MANIFEST_FILE}: its content does not match the digest it was sealed with; the manifest was changed "
        "after the build; rebuild or re-download the artifact"
    )
    assert no_package_loaded == []


def test_an_unlisted_file_anywhere_is_refused(artifacts, tmp_path: Path, no_package_loaded):
    source = artifacts("sd")
    folders = sorted({p.parent for p in source.rglob("*") if p.is_file()})
    assert len(folders) >= 6
    for i, folder in enumerate(folders):
        art = Path(shutil.copytree(source, tmp_path / f"a{i}"))
        extra = art / folder.relative_to(source) / "extra.so"
        extra.write_bytes(b"\x7fELF")
        with pytest.raises(IntegrityError) as e:
            diffbake.load(art)
        assert str(e.value) == (
            f"{extra}: not listed in the manifest; an artifact holds only the files its manifest lists; remove it "
            "or rebuild the artifact"
        )
        shutil.rmtree(art)
    assert no_package_loaded == []


# --- host facts -------------------------------------------------------------------------------------------------

FACTS = {
    "torch": (lambda d: d["versions"].update(torch="2.12.0"), "torch: this artifact was built with '2.12.0'"),
    "cuda": (lambda d: d["host"].update(cuda="12.8"), "cuda: this artifact was built with '12.8', this host has None"),
    "platform": (lambda d: d["host"].update(platform="darwin"), "platform: this artifact was built with 'darwin'"),
    "machine": (lambda d: d["host"].update(machine="aarch64"), "machine: this artifact was built with 'aarch64'"),
    "compute_capability": (
        lambda d: d["host"].update(compute_capability="9.0"),
        "compute_capability: this artifact was built with '9.0', this host has None",
    ),
    "cpu_features": (
        lambda d: d["host"]["cpu_features"].append("sve2"),
        "cpu_features: this artifact's code (cpu_isa 'native') uses sve2, which this CPU lacks",
    ),
    "device": (
        lambda d: d["host"].update(device="cuda"),
        "device: this artifact was compiled for 'cuda', but this host has no CUDA GPU",
    ),
}


@pytest.mark.parametrize("fact", FACTS)
def test_each_changed_host_fact_is_refused_by_name(copy, fact: str, no_package_loaded):
    if fact in ("cuda", "compute_capability", "device") and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    art = copy()
    edit, message = FACTS[fact]
    edit_manifest(art, edit)
    with pytest.raises(CompatibilityError) as e:
        diffbake.load(art)
    assert str(e.value).startswith(message), str(e.value)
    assert no_package_loaded == []


def test_a_hand_edited_host_fact_is_refused_by_name_too(copy, no_package_loaded):
    # Host facts are compared before the manifest's seal is checked, so the refusal names the field.
    art = copy()
    path = art / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["versions"]["torch"] = "2.12.0"
    path.write_text(json.dumps(data))
    with pytest.raises(CompatibilityError, match=r"^torch: this artifact was built with '2\.12\.0'"):
        diffbake.load(art)
    assert no_package_loaded == []


def test_an_older_cpu_is_refused_a_native_build(copy, monkeypatch, no_package_loaded):
    art = copy()
    older = frozenset(diffbake.format.host.CPU_TARGETS["avx2"][2])
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: older)
    with pytest.raises(CompatibilityError) as e:
        diffbake.load(art)
    message = str(e.value)
    assert message.startswith("cpu_features: this artifact's code (cpu_isa 'native') uses ") and "avx512f" in message
    assert message.endswith(
        "which this CPU lacks; executing it would crash the process (illegal instruction); rebuild with [target] "
        'cpu_isa = "avx2" for a fleet of older CPUs, or build on this CPU'
    )


# --- packages -----------------------------------------------------------------------------------------------------


@pytest.fixture
def package(artifacts, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    shutil.copy(artifacts("sd") / "vae_decoder" / "model.pt2", path)
    return path


def test_a_built_package_holds_only_the_library_its_metadata_and_format_records(package: Path):
    with zipfile.ZipFile(package) as z:
        names = sorted(n.removeprefix("model/") for n in z.namelist())
    assert [n for n in names if not n.startswith("data/")] == [
        ".data/serialization_id",
        ".data/version",
        "archive_format",
        "archive_version",
        "byteorder",
    ]
    rest = [n.rsplit(".", 2)[-2:] for n in names if n.startswith("data/")]
    assert sorted(rest) == [["wrapper", "so"], ["wrapper_metadata", "json"]]
    info = inspect_package(package, "cpu", "x86_64")
    assert info.metadata["AOTI_DEVICE_KEY"] == "cpu"


BAD_PACKAGES = {
    "a C++ source": ({"data/aotinductor/model/abc.wrapper.cpp": b"int main(){}"}, "unexpected entry"),
    "compile flags": ({"data/aotinductor/model/abc_compile_flags.json": b"{}"}, "unexpected entry"),
    "a pickle": ({"data.pkl": b"\x80\x04K\x01."}, "unexpected entry 'model/data.pkl'"),
    "pickled weights": ({"data/weights/w.pt": b"\x80\x04K\x01."}, "unexpected entry"),
    "an exported program": ({"models/model.json": b"{}"}, "unexpected entry"),
    "a path that escapes": ({"../../data/aotinductor/model/abc.wrapper.so": b"\x7fELF"}, "unexpected entry"),
    "a path outside the folder": ({"/../evil.so": b"\x7fELF"}, "unexpected entry"),
    "a second library": ({"data/aotinductor/model/zzz.wrapper.so": b"\x7fELF"}, "2 shared libraries"),
    "weights of another library": (
        {"data/aotinductor/model/zzz.wrapper_weights.blob": b"\x00"},
        "weights ['model/data/aotinductor/model/zzz.wrapper_weights.blob'] are not those of",
    ),
    "an op list of another library": (
        {"data/aotinductor/model/zzz.wrapper.json": b'{"nodes": []}'},
        "op lists ['model/data/aotinductor/model/zzz.wrapper.json'] are not those of",
    ),
    "a CUDA kernel in a CPU package": (
        {"data/aotinductor/model/k.cubin": b"\x00"},
        "is a CUDA kernel in a cpu package",
    ),
}


@pytest.mark.parametrize("case", BAD_PACKAGES)
def test_malformed_packages_are_refused_naming_the_entry(package: Path, case: str):
    entries, message = BAD_PACKAGES[case]
    rewrite_package(package, entries)
    with pytest.raises(ArtifactError) as e:
        inspect_package(package, "cpu", "x86_64")
    assert message in str(e.value) and str(e.value).startswith(f"{package}: "), str(e.value)


def test_an_op_list_beside_the_library_is_read_only_as_a_list_of_named_ops(package: Path):
    # The calls a library hands to torch's dispatcher (ops without a C shim), as AOTInductor writes them.
    op_list = package_entry(package, ".wrapper.so").replace(".so", ".json")
    call = {"name": "buf1", "node": {"target": "aten::split_with_sizes", "inputs": [], "outputs": []}}
    rewrite_package(package, {op_list: json.dumps({"nodes": [call]}).encode()})
    assert inspect_package(package, "cpu", "x86_64").extern == "model/" + op_list
    for data, message in [
        (b"import os", "is not JSON (JSONDecodeError)"),
        (b'{"nodes": [{"node": {"target": 1}}]}', "is not a list of calls of named ops"),
        (b"[]", "is not a list of calls of named ops"),
    ]:
        rewrite_package(package, {op_list: data})
        with pytest.raises(ArtifactError) as e:
            inspect_package(package, "cpu", "x86_64")
        assert str(e.value) == (
            f"{package}: op list 'model/{op_list}' {message}; a diffbake package holds only what the build "
            "writes; rebuild it"
        )


def test_source_only_compressed_linked_and_padded_packages_are_refused(package: Path, tmp_path: Path):
    library = package_entry(package, ".wrapper.so")
    original = package.read_bytes()

    def refused(message: str) -> None:
        with pytest.raises(ArtifactError) as e:
            inspect_package(package, "cpu", "x86_64")
        assert message in str(e.value), str(e.value)
        package.write_bytes(original)

    # Source only: torch's loader would compile it at load time.
    rewrite_package(package, {library: None, library.replace(".so", ".cpp"): b"int x;"})
    refused("unexpected entry")
    rewrite_package(package, {library: None})
    refused("0 shared libraries and 1 metadata files")
    rewrite_package(package, {}, compress=zipfile.ZIP_DEFLATED)
    refused("is compressed or encrypted")
    package.write_bytes(b"#!/bin/sh\n" + original)  # bytes the directory does not account for
    refused("belong to no entry")
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(package, "a") as z:
        link = zipfile.ZipInfo("model/" + package_entry(package, "_metadata.json"))
        link.external_attr = 0o120777 << 16
        z.writestr(link, "/etc/passwd")
    refused("appears twice")
    with zipfile.ZipFile(package) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(package, "w") as z:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name.endswith("archive_format"):
                info.external_attr = 0o120777 << 16  # a symbolic link
            z.writestr(info, data)
    refused("is not a regular file")
    with zipfile.ZipFile(package) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(package, "w") as z:
        for name, data in entries.items():
            z.writestr(name.replace("model/", "/", 1) if name.endswith("byteorder") else name, data)
    refused("is outside the archive's folder 'model/'")
    package.write_bytes(b"not a zip at all")
    refused("not a readable package (BadZipFile")


def test_a_package_for_another_device_or_machine_is_refused(package: Path):
    with pytest.raises(ArtifactError, match="compiled for device 'cpu', but the manifest says 'cuda'"):
        inspect_package(package, "cuda", "x86_64")
    with pytest.raises(CompatibilityError, match=r"^machine: model\.pt2's shared library is for ELF machine 62"):
        inspect_package(package, "cpu", "aarch64")


def test_a_malformed_package_in_a_sealed_artifact_loads_nothing(copy, no_package_loaded):
    art = copy()
    package = art / "vae_decoder" / "model.pt2"
    rewrite_package(package, {"data/aotinductor/model/abc.kernel.cpp": b"int x;"})
    rehash(art, "vae_decoder/model.pt2")
    with pytest.raises(ArtifactError, match="unexpected entry 'model/data/aotinductor/model/abc.kernel.cpp'"):
        diffbake.load(art)
    assert no_package_loaded == []


def test_a_full_load_never_unpickles(artifacts):
    script = r"""
import pickle, sys
def refuse(*args, **kwargs):
    raise RuntimeError("pickle was used")
class Refuse:
    def __init__(self, *args, **kwargs):
        refuse()
pickle.load = pickle.loads = refuse
pickle.Unpickler = Refuse
import torch
torch.load = refuse
import diffbake
pipe = diffbake.load(sys.argv[1], self_test=True)
image = pipe("a cat", num_inference_steps=2, output_type="np").images
print("shape", list(image.shape))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(artifacts("sd"))], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "shape [1, 64, 64, 3]"


# --- weights ------------------------------------------------------------------------------------------------------


def test_weights_that_differ_from_the_manifest_are_refused_before_loading(copy, no_package_loaded):
    from safetensors.torch import load_file, save_file

    art = copy()
    path = art / "unet" / "weights.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].half()
    save_file(tensors, path)
    rehash(art, "unet/weights.safetensors")
    with pytest.raises(ArtifactError) as e:
        diffbake.load(art)
    shape = list(tensors[name].shape)
    assert str(e.value) == (
        f"unet: constant {name!r} is float16 {shape}, but the package was compiled for float32 {shape}; rebuild the "
        "artifact"
    )
    del tensors[name]
    save_file(tensors, path)
    rehash(art, "unet/weights.safetensors")
    with pytest.raises(ArtifactError, match=rf"does not hold the constants the manifest lists \(missing: \['{name}'\]"):
        diffbake.load(art)
    assert no_package_loaded == []


# --- self-test, verification stamp, unpack folder -----------------------------------------------------------------


def test_self_test_passes_here_and_catches_a_different_result(copy):
    art = copy()
    stages = []
    diffbake.load(art, self_test=True, progress=lambda stage, detail: stages.append((stage, detail)))
    assert [s for s, _ in stages] == [
        "manifest",
        "host",
        "files",
        "packages",
        "weights",
        "self-test",
        "self-test",
        "pipeline",
    ]
    edit_manifest(art, lambda d: d["components"]["unet"]["variants"][0]["self_test"]["probes"].__setitem__(3, 9.0))
    with pytest.raises(SelfTestError) as e:
        diffbake.load(art, self_test=True)
    assert "self-test of unet variant 1/1 (1 image(s) per call at 64x64 pixels, with classifier-free guidance) " in str(
        e.value
    )
    assert "failed: value " in str(e.value) and ", recorded 9 (tolerance " in str(e.value)


def test_a_stamp_skips_hashing_only_while_every_file_is_unchanged(copy):
    art = copy()

    def files_stage(**kwargs) -> str:
        stages = {}
        diffbake.load(art, progress=lambda stage, detail: stages.update({stage: detail}), **kwargs)
        return stages["files"]

    assert files_stage(verify="stamp").endswith("sha256 checked")  # no stamp yet
    assert files_stage(verify="stamp").endswith("stamp matched")
    assert files_stage().endswith("sha256 checked")  # full verification stays the default
    # Same size, same mtime, other bytes: the ctime changes, so the stamp no longer matches.
    weights = art / "vae_decoder" / "weights.safetensors"
    st = weights.stat()
    _flip(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="sha256"):
        diffbake.load(art, verify="stamp")


def test_packages_unpack_where_asked(copy, tmp_path: Path, monkeypatch):
    art = copy()
    folder = tmp_path / "unpack"
    folder.mkdir()
    pipe = diffbake.load(art, unpack_dir=folder)
    assert len([p for p in folder.iterdir() if p.name.startswith("aotinductor_")]) == 2  # unet and VAE
    del pipe
    other = tmp_path / "from-env"
    other.mkdir()
    monkeypatch.setenv("DIFFBAKE_UNPACK_DIR", str(other))
    before = os.environ.get("TMPDIR")
    pipe = diffbake.load(art)
    assert any(p.name.startswith("aotinductor_") for p in other.iterdir())
    assert os.environ.get("TMPDIR") == before  # set only while a package is opened
    del pipe


def test_a_noexec_unpack_folder_gives_a_clear_error(copy, tmp_path: Path, monkeypatch, no_package_loaded):
    art = copy()
    mount = tmp_path / "noexec"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "noexec,size=16m", "tmpfs", str(mount)], capture_output=True
    )
    try:
        if mounted.returncode != 0:  # not allowed to mount here: make the folder look noexec instead
            real = os.statvfs

            class NoExec:
                def __init__(self, path):
                    self.f_flag = real(path).f_flag | os.ST_NOEXEC

            monkeypatch.setattr(os, "statvfs", NoExec)
        with pytest.raises(CompatibilityError) as e:
            diffbake.load(art, unpack_dir=mount)
        assert str(e.value) == (
            f"unpack_dir: {mount} is on a filesystem mounted noexec, so the compiled library extracted there could "
            "not be loaded (dlopen would fail with 'failed to map segment'); pass unpack_dir=... to diffbake.load, "
            "or set DIFFBAKE_UNPACK_DIR to a writable folder on a filesystem that allows executing programs"
        )
        with pytest.raises(CompatibilityError, match="is not a folder"):
            diffbake.load(art, unpack_dir=tmp_path / "missing")
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(mount)], check=False)
    assert no_package_loaded == []


# --- diffbake verify ------------------------------------------------------------------------------------------------


def _verify(art: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffbake.cli", "verify", str(art)], capture_output=True, text=True, timeout=600
    )


def _segfaulting_library(tmp_path: Path) -> bytes:
    source = tmp_path / "crash.c"
    source.write_text("#include <signal.h>\n__attribute__((constructor)) static void boom(void) { raise(SIGSEGV); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "crash.so"), str(source)], check=True)
    return (tmp_path / "crash.so").read_bytes()


def test_verify_exits_0_on_a_good_artifact_and_1_with_the_reason_otherwise(copy, tmp_path: Path):
    good = copy()
    proc = _verify(good)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ok: {good} passed every check"
    assert "ok  self-test: unet variant 1/1" in proc.stderr

    def bad(edit, reason: str) -> None:
        art = copy()
        edit(art)
        proc = _verify(art)
        assert proc.returncode == 1, proc.stderr
        assert f"error: {art}: " + reason.format(art=art) in proc.stderr, proc.stderr

    bad(lambda a: _flip(a / "unet" / "weights.safetensors"), "{art}/unet/weights.safetensors: sha256 ")
    bad(lambda a: (a / "unet" / "model.pt2").unlink(), "{art}/unet/model.pt2: listed in the manifest but missing")
    bad(lambda a: (a / "pipeline" / "x.bin").write_bytes(b"\x80"), "{art}/pipeline/x.bin: not listed in the manifest")
    bad(lambda a: edit_manifest(a, FACTS["machine"][0]), "machine: this artifact was built with 'aarch64'")
    bad(lambda a: (a / MANIFEST_FILE).write_text("{"), "{art}/manifest.json: not a valid manifest")

    def archive(a: Path) -> None:
        rewrite_package(a / "unet" / "model.pt2", {"data.pkl": b"\x80\x04."})
        rehash(a, "unet/model.pt2")

    bad(archive, "{art}/unet/model.pt2: unexpected entry 'model/data.pkl'")

    def self_test(a: Path) -> None:
        edit_manifest(a, lambda d: d["components"]["vae_decoder"]["variants"][0]["self_test"].update(mean=5.0))

    bad(self_test, "{art}: self-test of vae_decoder variant 1/1 (1 image(s) per call at 64x64 pixels) failed: mean is ")
    crash = _segfaulting_library(tmp_path)

    def segfault(a: Path) -> None:
        package = a / "unet" / "model.pt2"
        rewrite_package(package, {package_entry(package, ".wrapper.so"): crash})
        rehash(a, "unet/model.pt2")

    bad(segfault, "the check crashed with SIGSEGV after the 'packages' stage; loading this artifact")


def test_verify_is_not_stalled_by_a_child_that_writes_much_to_stderr(copy, tmp_path: Path):
    # 256 KB on stderr before anything on stdout: a parent that reads stdout first would leave the child blocked
    # on a full pipe until the timeout, and report a crash.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.stderr.write('w' * (1 << 18) + '\\n')\nsys.stderr.flush()\n"
    )
    good = copy()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "diffbake.cli", "verify", str(good), "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"ok: {good} passed every check"


def test_errors_are_typed():
    assert issubclass(IntegrityError, ArtifactError) and issubclass(SelfTestError, ArtifactError)
    assert issubclass(ArtifactError, DiffbakeError) and issubclass(ArtifactNotFoundError, FileNotFoundError)
