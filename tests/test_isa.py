"""Portable CPU builds: an AVX2 artifact contains no AVX-512 or AMX instruction, whatever the build host has, and
an artifact whose code needs AVX-512 is refused on a CPU without it, by the facts its manifest records."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffbake
import diffbake.format.host
from diffbake.format.host import CPU_TARGETS
from diffbake.format.manifest import read_manifest

RECIPE = """
[source]
model = "{source}"
[target]
cpu_isa = "avx2"
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
"""
# AVX-512 registers as objdump writes them (AT&T syntax); a bare "zmm" also occurs in generated kernel file names.
ZMM = re.compile(r"%zmm\d+")
AMX = re.compile(r"\b(tdp\w+|tileloadd\w*|tilestored|ldtilecfg|sttilecfg|tilezero|tilerelease)\b")


@pytest.fixture(scope="module")
def avx2(saved_pipelines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("isa")
    (folder / "avx2.toml").write_text(RECIPE.format(source=saved_pipelines("sd").as_posix()))
    return diffbake.build(folder / "avx2.toml", folder / "avx2")


def _disassemble(package: Path, scratch: Path) -> str:
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    with zipfile.ZipFile(package) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".so")]
        library = scratch / f"{package.parent.parent.name}-{package.parent.name}.so"
        library.write_bytes(z.read(name))
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout


def _library_with_avx512(scratch: Path) -> Path:
    """A library that certainly holds AVX-512 code (gcc emits it for any host): the disassembly check's control."""
    source = scratch / "wide.c"
    source.write_text(
        "#include <immintrin.h>\n"
        "void add(float *a, const float *b) { _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), "
        "_mm512_loadu_ps(b))); }\n"
    )
    library = scratch / "wide.so"
    subprocess.run(["gcc", "-O2", "-march=x86-64-v4", "-shared", "-fPIC", "-o", library, source], check=True)
    return library


def test_an_avx2_build_has_no_avx512_or_amx_instructions(avx2: Path, artifacts, tmp_path: Path):
    # The control first, on any host: the check sees AVX-512 code where there is some.
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    wide = subprocess.run(["objdump", "-d", _library_with_avx512(tmp_path)], capture_output=True, text=True).stdout
    assert ZMM.search(wide)
    text = _disassemble(avx2 / "vae_decoder" / "model.pt2", tmp_path)
    assert len(text.splitlines()) > 10_000  # a real library, not an empty one
    assert "%ymm" in text  # vectorized for AVX2
    assert ZMM.findall(text) == []
    assert AMX.findall(text) == []
    host = read_manifest(avx2).host
    assert host.cpu_isa == "avx2"
    assert not [f for f in host.cpu_features if f.startswith(("avx512", "amx"))]
    assert {"avx2", "fma", "f16c"} <= set(host.cpu_features)
    # And on a host with AVX-512, the native build of the same decoder does use it.
    have = diffbake.format.host.cpu_features() or frozenset()
    if "avx512f" in have:
        assert ZMM.search(_disassemble(artifacts("sd") / "vae_decoder" / "model.pt2", tmp_path))


def test_an_avx2_build_loads_and_matches_stock_on_a_cpu_without_avx512(avx2: Path, saved_pipelines, monkeypatch):
    older = frozenset(CPU_TARGETS["avx2"][2])
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: older)
    pipe = diffbake.load(avx2, self_test=True)
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    call = dict(prompt="a photo of a cat", num_inference_steps=2, output_type="np", height=64, width=64)
    got, want = (p(**call, generator=torch.Generator().manual_seed(0)).images for p in (pipe, stock))
    assert np.abs(got - want).max() <= 5e-4


def test_an_artifact_needing_avx512_is_refused_on_an_avx2_cpu_by_its_recorded_facts(avx2: Path, tmp_path, monkeypatch):
    from diffbake.errors import CompatibilityError
    from helpers import edit_manifest

    art = Path(shutil.copytree(avx2, tmp_path / "avx512"))
    edit_manifest(art, lambda d: d["host"].update(cpu_isa="avx512", cpu_features=list(CPU_TARGETS["avx512"][2])))
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: frozenset(CPU_TARGETS["avx2"][2]))
    with pytest.raises(CompatibilityError) as e:
        diffbake.load(art)
    assert str(e.value).startswith(
        "cpu_features: this artifact's code (cpu_isa 'avx512') uses avx512bw, avx512cd, avx512dq, avx512f, "
        "avx512vl, which this CPU lacks; executing it would crash the process (illegal instruction)"
    )
