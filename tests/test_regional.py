"""Regional compilation: one package per distinct repeated block, bound to every instance's own weights; the
rest of the model runs eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffbake
from diffbake.errors import InputMismatchError
from diffbake.format.manifest import read_manifest
from diffbake.runtime.regional import CompiledBlock

RECIPES = {
    "sd": """
[source]
model = "{source}"
[components.unet]
shapes = {{ batch = 1, height = 64, width = 64 }}
mode = "regional"
channels_last = true
""",
    "flux": """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 32, width = 48, text_tokens = 32 }}
mode = "regional"
""",
}
CALLS = {
    "sd": dict(prompt="a photo of a cat", num_inference_steps=3),
    "flux": dict(prompt="a photo of a cat", num_inference_steps=3, height=32, width=48, max_sequence_length=32),
}
BLOCKS = {
    "sd": ("unet", {"BasicTransformerBlock"}),
    "flux": ("transformer", {"FluxTransformerBlock", "FluxSingleTransformerBlock"}),
}


@pytest.fixture(scope="module")
def regional(tmp_path_factory, saved_pipelines):
    folder = tmp_path_factory.mktemp("regional")
    built = {}
    for family, recipe in RECIPES.items():
        (folder / f"{family}.toml").write_text(recipe.format(source=saved_pipelines(family).as_posix()))
        built[family] = diffbake.build(folder / f"{family}.toml", folder / family)
    return built


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_regional_images_match_stock(regional, saved_pipelines, family):
    loaded = diffbake.load(regional[family])
    stock = DiffusionPipeline.from_pretrained(saved_pipelines(family))
    got, want = (
        p(**CALLS[family], generator=torch.Generator().manual_seed(0), output_type="np").images for p in (loaded, stock)
    )
    assert np.abs(got - want).max() <= 5e-4
    attr, classes = BLOCKS[family]
    module = getattr(loaded, attr)
    compiled = {type(m).__name__ for m in module.modules() if isinstance(m.__dict__.get("forward"), CompiledBlock)}
    assert compiled == classes


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_manifest_lists_each_block_group_once(regional, family):
    attr, classes = BLOCKS[family]
    entry = read_manifest(regional[family]).components[attr]
    assert entry.mode == "regional" and entry.variants[0].package == ""
    assert {b.class_name for b in entry.blocks} == classes
    packages = sorted(p.name for p in (regional[family] / attr).glob("*.pt2"))
    assert packages == [f"block-{i}.pt2" for i in range(len(entry.blocks))]
    instances = [i for b in entry.blocks for i in b.instances]
    assert len(instances) == len(set(instances)) and all(len(b.instances) >= 1 for b in entry.blocks)
    v = entry.variants[0]
    assert v.max_abs_error <= v.tolerance


def test_regional_blocks_refuse_other_shapes(regional):
    pipe = diffbake.load(regional["sd"])
    with pytest.raises(InputMismatchError) as e:
        pipe("a cat", height=96, width=96, num_inference_steps=1)
    assert str(e.value) == (
        "unet: block 'down_blocks.1.attentions.0.transformer_blocks.0': input 'hidden_states' is float32 "
        "(2, 576, 64), but it was compiled for float32 (2, 256, 64) (1 image(s) per call at 64x64 pixels, with "
        "classifier-free guidance); a regional build runs exactly these shapes: call the pipeline with them, or "
        "rebuild with the shapes of this call"
    )


def test_inspect_shows_the_block_groups(regional):
    from click.testing import CliRunner

    from diffbake.cli import cli

    result = CliRunner().invoke(cli, ["inspect", str(regional["flux"])])
    assert result.exit_code == 0, result.output
    assert "  transformer (FluxTransformer2DModel): regional, built in " in result.output
    assert "    block FluxTransformerBlock x1: package " in result.output
    assert "    block FluxSingleTransformerBlock x1: package " in result.output


def test_a_regional_artifact_rebinds_to_new_weights(regional, saved_pipelines, tmp_path, monkeypatch):
    import diffbake.builder.build

    monkeypatch.setattr(diffbake.builder.build, "compile_package", lambda *a, **k: pytest.fail("rebind compiled"))
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pipe.save_pretrained(tmp_path / "finetune")
    out = diffbake.rebind(regional["sd"], weights=tmp_path / "finetune", out=tmp_path / "rebound")
    old, new = read_manifest(regional["sd"]), read_manifest(out)
    assert [new.files[b.package].sha256 for b in new.components["unet"].blocks] == [
        old.files[b.package].sha256 for b in old.components["unet"].blocks
    ]
    got, want = (
        p(**CALLS["sd"], generator=torch.Generator().manual_seed(0), output_type="np").images
        for p in (diffbake.load(out, self_test=True), DiffusionPipeline.from_pretrained(tmp_path / "finetune"))
    )
    assert np.abs(got - want).max() <= 5e-4
