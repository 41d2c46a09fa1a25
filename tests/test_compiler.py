"""[components.X.compiler]: inductor options from an allow-list, passed to the compile only, recorded."""

from __future__ import annotations

import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiffusionPipeline

import diffbake
from diffbake.builder.recipe import parse_recipe
from diffbake.errors import RecipeError
from diffbake.format.manifest import read_manifest

RECIPE = """
[source]
model = "{source}"
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
compiler = {{ conv_1x1_as_mm = true, epilogue_fusion = false, shape_padding = false, layout_optimization = false, \
attention_backend = "math" }}
"""


def parse(compiler: str, device: str = "cpu"):
    text = f"""
    [source]
    model = "tiny:sd"
    [components.unet]
    shapes = {{ batch = 1, height = 64, width = 64 }}
    compiler = {compiler}
    """
    return parse_recipe(textwrap.dedent(text), path="r.toml")


def test_presets_and_options_parse():
    assert parse("{ conv_1x1_as_mm = true }").components["unet"].compiler == (("conv_1x1_as_mm", True),)
    # On a CPU target the preset keeps what applies to the CPU; an explicit option overrides the preset.
    assert dict(parse('{ preset = "max-autotune", epilogue_fusion = true }').components["unet"].compiler) == {
        "conv_1x1_as_mm": True,
        "epilogue_fusion": True,
        "max_autotune": True,
    }
    assert parse('{ preset = "default" }').components["unet"].compiler == ()


@pytest.mark.parametrize(
    ("compiler", "message"),
    [
        (
            "{ cpp_wrapper = true }",
            "r.toml: [components.unet] compiler: unknown option 'cpp_wrapper'; known: preset, conv_1x1_as_mm, "
            "epilogue_fusion, shape_padding, aggressive_fusion, max_autotune, layout_optimization, freezing, "
            "coordinate_descent_tuning, coordinate_descent_check_all_directions, triton.unique_kernel_names, tf32, "
            "attention_backend",
        ),
        (
            "{ coordinate_descent_tuning = true }",
            "r.toml: [components.unet] compiler coordinate_descent_tuning applies to cuda builds only (this recipe "
            "targets 'cpu'); remove it",
        ),
        ("{ max_autotune = 1 }", "r.toml: [components.unet] compiler max_autotune must be a boolean, found an integer"),
        (
            "{ tf32 = true }",
            "r.toml: [components.unet] compiler tf32 applies to cuda builds only (this recipe targets 'cpu'); remove it",
        ),
        (
            '{ attention_backend = "efficient" }',
            "r.toml: [components.unet] compiler attention_backend = 'efficient' is not available for 'cpu' builds; "
            "expected one of: math, flash",
        ),
        (
            '{ preset = "fast" }',
            "r.toml: [components.unet] compiler preset = 'fast' is not a preset; expected one of: default, max-autotune",
        ),
    ],
)
def test_bad_compiler_options(compiler: str, message: str):
    with pytest.raises(RecipeError) as e:
        parse(compiler)
    assert str(e.value) == message


def test_options_reach_the_compile_are_recorded_and_still_match_eager(
    saved_pipelines, artifacts, tmp_path: Path, monkeypatch
):
    import torch._inductor

    seen = []
    real = torch._inductor.aoti_compile_and_package

    def spy(*args, inductor_configs=None, **kwargs):
        seen.append(dict(inductor_configs))
        return real(*args, inductor_configs=inductor_configs, **kwargs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", spy)
    (tmp_path / "r.toml").write_text(RECIPE.format(source=saved_pipelines("sd").as_posix()))
    art = diffbake.build(tmp_path / "r.toml", tmp_path / "art")
    assert len(seen) == 1
    assert {k: seen[0][k] for k in ("conv_1x1_as_mm", "epilogue_fusion", "shape_padding", "layout_optimization")} == {
        "conv_1x1_as_mm": True,
        "epilogue_fusion": False,
        "shape_padding": False,
        "layout_optimization": False,
    }
    assert seen[0]["aot_inductor.package_constants_in_so"] is False  # diffbake's own settings stay
    # Scoped to the compile: the process-wide config is untouched.
    assert torch._inductor.config.conv_1x1_as_mm is False and torch._inductor.config.epilogue_fusion is True
    assert "attention_backend" not in seen[0]  # applied as a torch setting, not an inductor option
    entry = read_manifest(art).components["vae_decoder"]
    assert entry.compiler == {
        "attention_backend": "math",
        "conv_1x1_as_mm": True,
        "epilogue_fusion": False,
        "layout_optimization": False,
        "shape_padding": False,
    }
    # The attention backend decides the compiled kernel: the VAE's attention is one fused kernel by default on the
    # CPU, and matmuls and a softmax with "math".
    flash = b"_scaled_dot_product_flash_attention_for_cpu"
    assert flash in _library(artifacts("sd") / "vae_decoder" / "model.pt2")
    assert flash not in _library(art / "vae_decoder" / "model.pt2")
    call = dict(prompt="a cat", num_inference_steps=2, output_type="np", height=64, width=64)
    got, want = (
        p(**call, generator=torch.Generator().manual_seed(0)).images
        for p in (diffbake.load(art), DiffusionPipeline.from_pretrained(saved_pipelines("sd")))
    )
    assert np.abs(got - want).max() <= 5e-4


def _library(package: Path) -> bytes:
    with zipfile.ZipFile(package) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".so")]
        return z.read(name)


def test_the_torch_compile_benchmark_runs_each_component_under_its_own_attention_backend():
    """torch.compile traces at the first call: each component's calls must see its own SDPA setting, not the last
    component's (no compile here: the compile function is a pass-through that records what a trace would see)."""
    from types import SimpleNamespace

    import torch

    from diffbake.bench.child import compile_components

    recipe = parse_recipe(
        textwrap.dedent("""
        [source]
        model = "tiny:sd"
        [components.unet]
        shapes = { batch = 1, height = 64, width = 64 }
        compiler = { attention_backend = "math" }
        [components.vae_decoder]
        shapes = { batch = 1, height = 64, width = 64 }
        compiler = { attention_backend = "flash" }
        """),
        path="r.toml",
    )
    seen = {}

    def recording(name):
        def call(*args, **kwargs):
            seen[name] = (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())

        return call

    unet = torch.nn.Module()
    unet.forward = recording("unet")
    vae = torch.nn.Module()
    vae.decode = recording("vae_decoder")
    pipe = SimpleNamespace(unet=unet, vae=vae)
    compile_components(pipe, recipe, compile_fn=lambda fn, **kwargs: fn)
    outside = (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    pipe.unet()
    pipe.vae.decode()
    assert seen == {"unet": (True, False), "vae_decoder": (False, True)}
    assert (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == outside
