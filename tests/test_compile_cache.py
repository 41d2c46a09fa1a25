"""The compile cache: a rebuild takes the package compiled before for the same program and target, and nothing
else; a bad entry is dropped and compiled again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import diffbake
import diffbake.builder.build
import diffbake.builder.cache
from diffbake.builder.aoti import inductor_configs
from diffbake.builder.cache import CACHE_ENV, CompileCache
from diffbake.cli import cli
from diffbake.errors import BuildError

RECIPE = """
[source]
model = "{source}"
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
"""


class Small(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


def _exported(seed: int = 0, width: int = 8, rows: int = 2):
    torch.manual_seed(seed)
    return torch.export.export(Small(width), (torch.randn(rows, width),))


def _key(exported, **configs):
    return CompileCache(Path("unused")).key(exported, device="cpu", inductor_configs=inductor_configs(**configs))


def test_the_key_follows_the_code_not_the_weights(monkeypatch):
    base = _key(_exported(seed=0))
    assert base is not None and len(base) == 64
    # Other weights of the same program: the same code (weights are bound at load).
    assert _key(_exported(seed=1)) == base
    # Another shape, another compiler setting, another CPU target: other code.
    assert _key(_exported(rows=3)) != base
    assert _key(_exported(width=16)) != base
    assert _key(_exported(), options={"max_autotune": True}) != base
    assert _key(_exported(), cpu_isa="avx2") != base
    monkeypatch.setattr(diffbake.builder.cache, "cpu_features", lambda: frozenset({"avx2"}))
    assert _key(_exported()) != base
    monkeypatch.undo()
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE", "1")
    assert _key(_exported()) != base


def test_a_bad_entry_is_dropped(tmp_path: Path, caplog):
    cache = CompileCache(tmp_path)
    key = "ab" * 32
    entry = tmp_path / "ab" / key / "model.pt2"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="diffbake.builder.cache"):
        assert cache.lookup(key, "cpu", "model.pt2") is None
    assert not entry.exists()
    assert f"compile cache: dropping {entry}, which fails the package checks" in caplog.text


@pytest.fixture(scope="module")
def recipe(saved_pipelines, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "vae.toml"
    path.write_text(RECIPE.format(source=saved_pipelines("sd").as_posix()))
    return path


def _build(recipe: Path, out: Path, *flags: str):
    result = CliRunner().invoke(cli, ["build", str(recipe), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_rebuild_takes_the_package_from_the_cache(recipe: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = _build(recipe, tmp_path / "first")
    assert "  vae_decoder: compile (AOTInductor) done in " in first
    assert len(list((tmp_path / "cache").glob("*/*/model.pt2"))) == 1

    second = _build(recipe, tmp_path / "second")
    assert "  vae_decoder: compile (AOTInductor), found in the compile cache done in " in second
    assert "  vae_decoder: compile (AOTInductor) done in " not in second
    package = Path("vae_decoder") / "model.pt2"
    assert (tmp_path / "second" / package).read_bytes() == (tmp_path / "first" / package).read_bytes()

    # The rebuilt artifact passes every check and decodes as the first one does.
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    images = [diffbake.load(tmp_path / name, self_test=True).vae.decode(latents).sample for name in ("first", "second")]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)

    # --no-cache compiles although an entry exists (the compile is made to fail to show it was reached).
    def fail(name, exported, path, **kwargs):
        raise BuildError(f"{name}: AOTInductor compile failed (simulated)")

    monkeypatch.setattr(diffbake.builder.build, "compile_package", fail)
    result = CliRunner().invoke(cli, ["build", str(recipe), "--out", str(tmp_path / "third"), "--no-cache"])
    assert result.exit_code == 1
    assert "error: vae_decoder: AOTInductor compile failed (simulated)" in result.output
