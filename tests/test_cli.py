"""Every command of the CLI, on the built-in demo recipe, through click's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import diffbake.builder.build
from diffbake.builder.cache import CACHE_ENV
from diffbake.cli import cli
from diffbake.errors import BuildError

DEMO = Path(__file__).parent.parent / "recipes" / "tiny-sd.toml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, artifacts) -> tuple[Path, str]:
    """The demo recipe (source tiny:sd) built through the CLI, once, after the suite's "sd" artifact: the same
    pipeline at the same shapes from a saved folder, so its packages come from the compile cache."""
    artifacts("sd")
    out = tmp_path_factory.mktemp("cli") / "tiny-sd"
    result = CliRunner().invoke(cli, ["build", str(DEMO), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_build_prints_each_stage_and_the_artifact(demo):
    out, output = demo
    for stage in (
        "read source",
        "unet: export",
        "unet: look up the compile cache",
        "unet: compile (AOTInductor), found in the compile cache",
        "unet: verify against eager",
        "vae_decoder: compile (AOTInductor), found in the compile cache",
        "write manifest",
    ):
        assert f"  {stage} done in " in output
    assert "  unet [batch=1, height=64, width=64, cfg=true]: max abs error vs eager" in output
    assert output.rstrip().splitlines()[-1] == str(out)
    assert (out / "manifest.json").is_file()
    assert not list(out.parent.glob(".tiny-sd.partial-*"))


def test_generate_writes_pngs(demo, tmp_path: Path):
    out, _ = demo
    png = tmp_path / "img" / "cat.png"
    result = CliRunner().invoke(
        cli, ["generate", str(out), "--prompt", "a photo of a cat", "--steps", "2", "--out", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert str(png) in result.output
    with Image.open(png) as image:
        assert image.size == (64, 64)


def test_inspect_shows_components_and_manifest(demo):
    out, _ = demo
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}: StableDiffusionPipeline (denoiser: unet) from tiny:sd" in result.output
    assert "  unet (UNet2DConditionModel): 1 variant(s), built in " in result.output
    assert "    [batch=1, height=64, width=64, cfg=true] package " in result.output
    assert "      input sample: float32[2, 4, 32, 32]" in result.output
    assert "max abs error vs eager" in result.output
    as_json = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert json.loads(as_json.output)["format"] == "diffbake-artifact"


def test_build_refuses_to_overwrite_without_force(demo):
    out, _ = demo
    result = CliRunner().invoke(cli, ["build", str(DEMO), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.splitlines()[-2] == (
        f"error: {out}: already exists; pass --force to replace it (only once the new build is complete), or --out DIR"
    )


def test_a_failed_build_leaves_the_old_artifact_and_no_debris(demo, tmp_path: Path, tmp_path_factory, monkeypatch):
    out, _ = demo
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("empty-cache")))  # so that the build compiles
    victim = Path(shutil.copytree(out, tmp_path / "tiny-sd"))
    before = sorted(p.relative_to(victim).as_posix() for p in victim.rglob("*"))

    def fail(name, exported, path, **kwargs):
        raise BuildError(f"{name}: AOTInductor compile failed (simulated)")

    monkeypatch.setattr(diffbake.builder.build, "compile_package", fail)
    result = CliRunner().invoke(cli, ["build", str(DEMO), "--out", str(victim), "--force"])
    assert result.exit_code == 1
    assert "error: unet: AOTInductor compile failed (simulated)" in result.output
    assert "  unet: compile (AOTInductor) failed after" in result.output
    assert sorted(p.relative_to(victim).as_posix() for p in victim.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"]


def test_errors_are_one_line(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[source]\nmodel = "tiny:sd"\n[target]\ndtype = "float64"\n')
    result = CliRunner().invoke(cli, ["build", str(bad)])
    assert result.exit_code == 1
    assert result.output == (
        f"building {bad}\n"
        f"error: {bad}: [target] dtype = 'float64' is not supported; expected one of: float32, bfloat16, float16\n"
        "(set DIFFBAKE_DEBUG=1 for the traceback)\n"
    )
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {tmp_path / 'missing'}: no such artifact folder")


def test_missing_source_folder(tmp_path: Path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[source]\nmodel = "{tmp_path}/no-model"\n[components.unet]\nshapes = {{ batch = 1, height = 64, width = 64 }}\n'
    )
    result = CliRunner().invoke(cli, ["build", str(recipe), "--out", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert result.output.splitlines()[-2] == (
        f"error: {recipe}: [source] model = '{tmp_path}/no-model': no such folder; expected a folder saved with "
        "diffusers' save_pretrained (holding model_index.json), a Hub id such as 'org/name', or one of tiny:sd, "
        "tiny:sdxl, tiny:flux, tiny:dit, tiny:ddpm, tiny:ddim, tiny:pixart, tiny:sd3, tiny:sana, tiny:sd-img2img, "
        "tiny:sd-inpaint, tiny:sd-controlnet, tiny:sdxl-img2img, tiny:sdxl-controlnet, tiny:flux-img2img, "
        "tiny:flux-kontext, tiny:z-image, random:sd15, random:flux-small"
    )
    assert not (tmp_path / "a").exists()


def test_debug_variable_shows_the_traceback(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DIFFBAKE_DEBUG", "1")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "ArtifactNotFoundError"


@pytest.mark.parametrize("command", [[], ["build"], ["generate"], ["inspect"]])
def test_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output


def test_force_never_replaces_a_folder_that_is_not_an_artifact(tmp_path: Path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["build", str(DEMO), "--out", str(precious), "--force"])
    assert result.exit_code == 1
    assert result.output.splitlines()[-2] == (
        f"error: {precious}: exists and is not a diffbake artifact (no manifest.json); refusing to replace it even "
        "with --force; choose another --out"
    )
    assert (precious / "notes.txt").read_text() == "keep me"


def test_rebind_command(demo, tmp_path: Path):
    out, _ = demo
    # The demo's own source (tiny:sd) rebound: the same weights on the same code, no compile stage printed.
    result = CliRunner().invoke(cli, ["rebind", str(out), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert "compile (AOTInductor)" not in result.output
    assert "(no compile)" in result.output and result.output.strip().endswith(str(tmp_path / "again"))
    result = CliRunner().invoke(cli, ["rebind", str(out), "--scale", "0.5", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "1 --scale values for 0 --lora files" in result.output
    result = CliRunner().invoke(cli, ["rebind", str(out), "--out", str(tmp_path / "again")])
    assert result.exit_code == 1 and f"error: {tmp_path / 'again'}: already exists; pass --force" in result.output
