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
    # Any diffusers model that lists its repeated blocks: Z-Image's blocks take a required attn_mask as None.
    "z-image": """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 32, width = 32, text_tokens = 16 }}
mode = "regional"
""",
}
CALLS = {
    "sd": dict(prompt="a photo of a cat", num_inference_steps=3),
    "flux": dict(prompt="a photo of a cat", num_inference_steps=3, height=32, width=48, max_sequence_length=32),
    "z-image": dict(prompt="a photo of a cat", num_inference_steps=3, height=32, width=32, max_sequence_length=16),
}
BLOCKS = {
    "sd": ("unet", {"BasicTransformerBlock"}),
    "flux": ("transformer", {"FluxTransformerBlock", "FluxSingleTransformerBlock"}),
    "z-image": ("transformer", {"ZImageTransformerBlock"}),
}


def _build_all(folder, recipes: dict[str, str], saved_pipelines) -> dict:
    """family -> artifact, each built from its recipe (kept beside it as FAMILY.toml) on the saved tiny pipeline."""
    built = {}
    for family, recipe in recipes.items():
        (folder / f"{family}.toml").write_text(recipe.format(source=saved_pipelines(family).as_posix()))
        built[family] = diffbake.build(folder / f"{family}.toml", folder / family)
    return built


@pytest.fixture(scope="module")
def regional(tmp_path_factory, saved_pipelines):
    return _build_all(tmp_path_factory.mktemp("regional"), RECIPES, saved_pipelines)


@pytest.mark.parametrize("family", ["sd", "flux", "z-image"])
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


# The regional recipes with QKV fusion, and (Flux) int8 quantization of the blocks' linears on top.
TRANSFORMED = {
    "sd": RECIPES["sd"] + "fuse_qkv = true\n",
    "flux": RECIPES["flux"] + 'fuse_qkv = true\nquantization = {{ method = "int8_weight_only" }}\n',
}


@pytest.fixture(scope="module")
def transformed(tmp_path_factory, saved_pipelines):
    return _build_all(tmp_path_factory.mktemp("regional-transformed"), TRANSFORMED, saved_pipelines)


def _eager_with_transforms(artifact, source, family):
    """The stock pipeline from ``source`` with the transforms of the artifact's recipe, applied as the build
    applies them (eager torchao)."""
    from diffbake.builder.build import LogReporter, apply_transforms
    from diffbake.builder.recipe import load_recipe

    recipe = load_recipe(artifact.parent / f"{family}.toml")
    stock = DiffusionPipeline.from_pretrained(source)
    name, _ = BLOCKS[family]
    apply_transforms(recipe.components[name], getattr(stock, name).eval(), LogReporter())
    return stock


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_regional_with_fused_and_quantized_blocks_matches_eager_with_the_same_transforms(
    transformed, saved_pipelines, family
):
    loaded = diffbake.load(transformed[family], self_test=True)
    stock = _eager_with_transforms(transformed[family], saved_pipelines(family), family)
    got, want = (
        p(**CALLS[family], generator=torch.Generator().manual_seed(0), output_type="np").images for p in (loaded, stock)
    )
    assert np.abs(got - want).max() <= 5e-4  # the same int8 weights and dequantization, compiled or eager


def test_regional_weights_hold_what_the_blocks_read_once(transformed, regional):
    from click.testing import CliRunner

    from diffbake.cli import cli

    # Fused: each block instance stores its fused projection, and not the unfused ones it no longer reads, so the
    # weights file holds as many numbers as the unfused artifact's.
    fused = read_manifest(transformed["sd"]).components["unet"]
    plain = read_manifest(regional["sd"]).components["unet"]
    instances = [fqn for b in fused.blocks for fqn in b.instances]
    for fqn in instances:
        assert f"{fqn}.attn1.to_qkv.weight" in fused.constants and f"{fqn}.attn1.to_q.weight" not in fused.constants
    assert sum(np.prod(c.shape) for c in fused.constants.values()) == sum(
        np.prod(c.shape) for c in plain.constants.values()
    )
    loaded = diffbake.load(transformed["sd"]).unet
    block = loaded.get_submodule(instances[0])
    assert hasattr(block.attn1, "to_qkv") and not hasattr(block.attn1, "to_q")
    assert not any(t.is_meta for t in loaded.state_dict().values())

    # Quantized: the blocks' linears are int8 data and scales; the model outside the blocks stays float32.
    flux = read_manifest(transformed["flux"]).components["transformer"]
    assert flux.transforms["quantization"]["scope"] == "repeated blocks"
    qkv = "transformer_blocks.0.attn.to_qkv.parametrizations.weight.original0"
    assert flux.constants[qkv].dtype == "int8"
    assert "transformer_blocks.0.attn.to_q.weight" not in flux.constants
    assert flux.constants["x_embedder.weight"].dtype == "float32"
    layers = flux.transforms["quantization"]["layers"]
    shown = CliRunner().invoke(cli, ["inspect", str(transformed["flux"])])
    assert f"transforms: fuse_qkv, int8_weight_only on {layers} linear layers of the repeated blocks" in shown.output
    loaded = diffbake.load(transformed["flux"]).transformer
    assert loaded.x_embedder.weight.dtype == torch.float32
    assert not hasattr(loaded.transformer_blocks[0].attn, "to_q")


@pytest.mark.parametrize("built", ["regional", "transformed"])
def test_a_regional_artifact_rebinds_to_new_weights(built, request, saved_pipelines, tmp_path, monkeypatch):
    import diffbake.builder.build

    artifact = request.getfixturevalue(built)["sd"]  # plain, or with QKV fusion
    monkeypatch.setattr(diffbake.builder.build, "compile_package", lambda *a, **k: pytest.fail("rebind compiled"))
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pipe.save_pretrained(tmp_path / "finetune")
    out = diffbake.rebind(artifact, weights=tmp_path / "finetune", out=tmp_path / "rebound")
    old, new = read_manifest(artifact), read_manifest(out)
    assert [new.files[b.package].sha256 for b in new.components["unet"].blocks] == [
        old.files[b.package].sha256 for b in old.components["unet"].blocks
    ]
    switched = diffbake.load(artifact)
    diffbake.set_weights(switched, out)  # in place, into the tensors the blocks read (the fused ones, if fused)
    want, *got = (
        p(**CALLS["sd"], generator=torch.Generator().manual_seed(0), output_type="np").images
        for p in (_eager_with_transforms(artifact, tmp_path / "finetune", "sd"), diffbake.load(out), switched)
    )
    for image in got:
        assert np.abs(image - want).max() <= 5e-4


def _step_caches() -> dict:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return {
        # First Block Cache: the first block decides from how much its output moved since the last step.
        "first-block:0.2": FirstBlockCacheConfig(threshold=0.2),
        "first-block:100": FirstBlockCacheConfig(threshold=100.0),
        # MagCache: the first block decides from precomputed magnitude ratios, the last one records the residual.
        "mag": MagCacheConfig(threshold=100.0, num_inference_steps=6, mag_ratios=FLUX_MAG_RATIOS),
        # TaylorSeer's lite mode: whole blocks are skipped on predicted steps, proj_out's output is extrapolated.
        "taylorseer-lite": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32, use_lite_mode=True
        ),
    }


@pytest.mark.parametrize("method", ["first-block:0.2", "first-block:100", "mag", "taylorseer-lite"])
def test_step_caches_on_a_regional_artifact_match_eager_with_the_same_cache(
    regional, saved_pipelines, monkeypatch, method
):
    from diffbake.runtime.caches import enable_step_cache

    blocks: list[str] = []
    run = CompiledBlock.__call__

    def spy(self, *args, **kwargs):
        blocks.append(self.where)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(CompiledBlock, "__call__", spy)
    call = {**CALLS["flux"], "num_inference_steps": 6}
    loaded, stock = diffbake.load(regional["flux"]), DiffusionPipeline.from_pretrained(saved_pipelines("flux"))
    enable_step_cache(loaded, _step_caches()[method])
    stock.transformer.enable_cache(_step_caches()[method])
    got, want = (
        p(**call, generator=torch.Generator().manual_seed(0), output_type="np").images for p in (loaded, stock)
    )
    assert np.abs(got - want).max() <= 5e-4
    head = blocks.count("transformer: block 'transformer_blocks.0'")
    tail = blocks.count("transformer: block 'single_transformer_blocks.0'")
    if method.startswith("first-block"):
        assert head == 6  # the first block runs every step: it decides
    if method == "first-block:100":
        assert tail == 1  # only the first step runs the other block; every later step reuses its residual
    if method in ("mag", "taylorseer-lite"):
        assert 0 < tail < 6  # the last block was skipped on some steps, and ran on others
    again = loaded(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(again, got)  # the cache's state starts afresh with each call


def test_a_cache_hooking_inside_a_compiled_block_is_refused(regional):
    from diffusers import TaylorSeerCacheConfig

    loaded = diffbake.load(regional["flux"])
    call = {**CALLS["flux"], "generator": torch.Generator().manual_seed(0), "output_type": "np"}
    plain = loaded(**call).images
    with pytest.raises(InputMismatchError) as e:
        loaded.transformer.enable_cache(TaylorSeerCacheConfig())  # by default it hooks each block's attention
    assert str(e.value) == (
        "transformer: TaylorSeerCacheConfig hooks 'single_transformer_blocks.0.attn' and 1 more, inside the "
        "compiled block 'single_transformer_blocks.0', which runs as one compiled call and never calls its "
        "submodules, so the cache would do nothing; use a cache that hooks whole blocks (FirstBlockCacheConfig, "
        "MagCacheConfig, or TaylorSeerCacheConfig(use_lite_mode=True) or with cache_identifiers naming whole blocks)"
    )
    assert not loaded.transformer.is_cache_enabled  # nothing was left half on
    call["generator"] = torch.Generator().manual_seed(0)
    np.testing.assert_array_equal(loaded(**call).images, plain)


def test_a_full_graph_artifact_refuses_step_caches(artifacts, regional, tmp_path):
    from click.testing import CliRunner
    from diffusers import FirstBlockCacheConfig

    from diffbake.cli import cli

    with pytest.raises(InputMismatchError) as e:
        diffbake.load(artifacts("flux")).transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    assert str(e.value) == (
        "transformer: diffusers' step caches (First Block Cache, MagCache, TaylorSeer, FasterCache) skip or reuse "
        "the work of the model's repeated blocks, but this artifact runs the whole model as one compiled call, with "
        'no block to skip; rebuild it with mode = "regional" in its recipe section, whose blocks each run their own '
        "compiled package and take the caches as the eager model does"
    )
    runner = CliRunner()
    args = ["generate", "-p", "a cat", "--steps", "3", "--out", str(tmp_path / "x.png")]
    ok = runner.invoke(cli, [args[0], str(regional["flux"]), *args[1:], "--cache", "first-block:0.2"])
    assert ok.exit_code == 0, ok.output
    refused = runner.invoke(cli, [args[0], str(artifacts("flux")), *args[1:], "--cache", "first-block:0.2"])
    assert refused.exit_code == 1
    assert "error: transformer: diffusers' step caches (First Block Cache," in refused.output
    bad = runner.invoke(cli, [args[0], str(regional["flux"]), *args[1:], "--cache", "taylor:3"])
    assert bad.exit_code == 2
    assert "'taylor:3' is not a step cache; expected one of first-block:THRESHOLD (e.g. first-block:0.08)" in (
        " ".join(bad.output.split())
    )


def test_bench_measures_a_step_cache_on_a_regional_artifact(regional, artifacts, workdir, tmp_path):
    import json

    from click.testing import CliRunner

    from diffbake.cli import cli

    recipe = regional["flux"].parent / "flux.toml"
    args = ["bench", str(recipe), "--artifact", str(regional["flux"]), "--out", str(tmp_path / "report")]
    args += ["--paths", "artifact", "--steps", "4", "--repeats", "1", "--warmup", "0", "--image-repeats", "1"]
    result = CliRunner().invoke(cli, [*args, "--cache", "first-block:100"])
    assert result.exit_code == 0, result.output
    cache = json.loads((tmp_path / "report" / "bench.json").read_text())["cache"]
    # Two compiled blocks a step: without the cache both run on all 4 steps; with a threshold no step reaches, the
    # first block runs every step and the second only on the first step.
    assert cache["plain"]["block_calls_per_image"] == 8
    assert cache["cached"]["block_calls_per_image"] == 5
    assert cache["skipped_fraction"] == 3 / 8
    assert cache["max_abs_error"] > 1e-3  # reusing a residual changes the image
    assert cache["image_speedup"] > 0 and cache["denoiser_speedup"] > 0
    md = (tmp_path / "report" / "bench.md").read_text()
    assert "## Step cache (whole images, fresh process)" in md
    assert "Step cache first-block:100, 4 steps: 38 % of the compiled block calls skipped (5 of 8 ran)" in md
    ladder = json.loads((tmp_path / "report" / "bench.json").read_text())["ladder"]
    assert [r["step"] for r in ladder] == [
        "float32 eager",
        "+ AOT compile (regional)",
        "+ step cache first-block:100 (mean step over an image)",
    ]
    assert "(image vs no cache)" in result.output  # the terminal's ladder table

    # A full-graph artifact has no block to skip: refused before anything is built or run.
    full = CliRunner().invoke(
        cli,
        ["bench", str(workdir / "flux.toml"), "--artifact", str(artifacts("flux"))]
        + ["--paths", "artifact", "--no-ladder", "--out", str(tmp_path / "full"), "--cache", "first-block:0.1"],
    )
    assert full.exit_code == 1
    assert (
        f"error: {workdir / 'flux.toml'}: the step cache rung needs a regional transformer (diffusers' step caches "
        'skip its repeated blocks, which a full-graph build compiles into one call); set mode = "regional" in '
        "[components.transformer], or run without the cache"
    ) in " ".join(full.output.split())
    assert not (tmp_path / "full").exists()
    bad = CliRunner().invoke(cli, [*args, "--cache", "first-block:0"])
    assert bad.exit_code == 2
    assert "'first-block:0': the threshold must be a positive number" in " ".join(bad.output.split())


def test_a_recipe_turns_the_cache_on_at_load(regional, saved_pipelines, tmp_path):
    from diffusers import FirstBlockCacheConfig

    recipe = tmp_path / "flux-fbc.toml"
    text = RECIPES["flux"] + 'step_cache = {{ method = "first_block", threshold = 100.0 }}\n'
    recipe.write_text(text.format(source=saved_pipelines("flux").as_posix()))
    artifact = diffbake.build(recipe, tmp_path / "flux-fbc")  # the block packages come from the compile cache
    assert read_manifest(artifact).components["transformer"].step_cache == {"method": "first_block", "threshold": 100.0}
    loaded = diffbake.load(artifact)
    assert loaded.transformer.is_cache_enabled
    call = {**CALLS["flux"], "num_inference_steps": 4}
    got = loaded(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("flux"))
    stock.transformer.enable_cache(FirstBlockCacheConfig(threshold=100.0))
    want = stock(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(got - want).max() <= 5e-4
    # The user may turn it off, as in diffusers.
    loaded.transformer.disable_cache()
    plain = loaded(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(plain - got).max() > 1e-3


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            'mode = "full"\nstep_cache = { method = "first_block", threshold = 0.1 }',
            "r.toml: [components.transformer] step_cache: diffusers' step caches skip the model's repeated blocks, "
            "which a full-graph build compiles into one call; set mode = 'regional' in this section, or remove "
            "step_cache",
        ),
        (
            'mode = "regional"\nstep_cache = { method = "taylorseer", threshold = 0.1 }',
            "r.toml: [components.transformer] step_cache method = 'taylorseer' is not supported; expected one of: "
            "first_block",
        ),
        (
            'mode = "regional"\nstep_cache = { method = "first_block", threshold = 0 }',
            "r.toml: [components.transformer] step_cache threshold must be a positive number (e.g. 0.08), found "
            "an integer 0",
        ),
    ],
)
def test_step_cache_recipe_errors(tmp_path, section, message):
    from diffbake.builder.recipe import load_recipe
    from diffbake.errors import RecipeError

    (tmp_path / "r.toml").write_text(
        '[source]\nmodel = "tiny:flux"\n[components.transformer]\n'
        f"shapes = {{ batch = 1, height = 32, width = 48 }}\n{section}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.toml")
    assert str(e.value) == message.replace("r.toml", str(tmp_path / "r.toml"))


def test_a_regional_artifact_rebuilds_only_a_diffusers_model_that_lists_repeated_blocks():
    from diffbake.errors import ArtifactError
    from diffbake.runtime.regional import regional_class

    assert regional_class("transformer", "ZImageTransformer2DModel").__name__ == "ZImageTransformer2DModel"
    for name in ("os.system", "AutoencoderKL", "DDPMScheduler", "NoSuchModel"):
        with pytest.raises(ArtifactError) as e:
            regional_class("transformer", name)
        assert str(e.value) == (
            f"transformer: regional class {name!r} is not a diffusers model that lists repeated blocks "
            "(_repeated_blocks); rebuild the artifact with mode = 'full'"
        )
