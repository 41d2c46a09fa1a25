"""Portable CPU builds: an AVX2 artifact built on an AVX-512/AMX host contains no AVX-512 or AMX instruction."""

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
from diffbake.format.manifest import read_manifest

RECIPE = """
[source]
model = "{source}"
[target]
cpu_isa = "avx2"
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
"""
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


def test_an_avx2_build_has_no_avx512_or_amx_instructions(avx2: Path, artifacts, tmp_path: Path):
    text = _disassemble(avx2 / "vae_decoder" / "model.pt2", tmp_path)
    assert len(text.splitlines()) > 10_000  # a real library, not an empty one
    assert "ymm" in text  # vectorized for AVX2
    assert "zmm" not in text
    assert AMX.findall(text) == []
    host = read_manifest(avx2).host
    assert host.cpu_isa == "avx2"
    assert not [f for f in host.cpu_features if f.startswith(("avx512", "amx"))]
    assert {"avx2", "fma", "f16c"} <= set(host.cpu_features)
    # The control: on a host with AVX-512, the native build of the same decoder does use it.
    have = diffbake.format.host.cpu_features() or frozenset()
    if "avx512f" in have:
        assert "zmm" in _disassemble(artifacts("sd") / "vae_decoder" / "model.pt2", tmp_path)


def test_an_avx2_build_loads_and_matches_stock_on_a_cpu_without_avx512(avx2: Path, saved_pipelines, monkeypatch):
    older = frozenset(diffbake.format.host.CPU_TARGETS["avx2"][2])
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: older)
    pipe = diffbake.load(avx2, self_test=True)
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    call = dict(prompt="a photo of a cat", num_inference_steps=2, output_type="np", height=64, width=64)
    got, want = (p(**call, generator=torch.Generator().manual_seed(0)).images for p in (pipe, stock))
    assert np.abs(got - want).max() <= 5e-4
