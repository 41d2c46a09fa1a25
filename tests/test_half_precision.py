"""One more build that combines options that do not interact: a built-in tiny source, bfloat16, no CFG batch,
two images per call, and a non-square size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DiffusionPipeline
from PIL import Image

import diffbake
import diffbake.format.host
from diffbake.cli import cli
from diffbake.errors import InputMismatchError
from diffbake.format.manifest import read_manifest

RECIPE = """
[source]
model = "tiny:sd"
[target]
dtype = "bfloat16"
allow_emulated = true  # correctness on any CPU; speed is not what this measures
[components.unet]
shapes = { batch = 2, height = 64, width = 96 }
cfg = false
[components.vae_decoder]
shapes = { batch = 2, height = 64, width = 96 }
"""
CALL = dict(prompt="a photo of a cat", guidance_scale=1.0, num_images_per_prompt=2, height=64, width=96)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("variants")
    (folder / "sd-bf16.toml").write_text(RECIPE)
    return diffbake.build(folder / "sd-bf16.toml", folder / "sd-bf16")


def test_bfloat16_images_match_stock_diffusers(bf16, saved_pipelines):
    # tiny:sd is deterministic, so the saved tiny pipeline holds the same weights.
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd"), dtype=torch.bfloat16)
    pipe = diffbake.load(bf16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    got, want = (
        p(**CALL, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
        for p in (pipe, stock)
    )
    assert got.shape == (2, 64, 96, 3)
    assert np.abs(got - want).max() <= 5e-2  # bfloat16 keeps 8 bits of mantissa


def test_manifest_records_dtype_and_no_cfg(bf16):
    m = read_manifest(bf16)
    unet = m.components["unet"]
    assert m.dtype == "bfloat16" and m.source == {"model": "tiny:sd", "kind": "tiny", "revision": None}
    variant = unet.variants[0]
    assert variant.cfg is False
    assert [(i.name, i.shape, i.dtype) for i in variant.inputs] == [
        ("sample", [2, 4, 32, 48], "bfloat16"),
        ("timestep", [], "float32"),  # one timestep for the batch, as the pipeline passes it
        ("encoder_hidden_states", [2, 77, 32], "bfloat16"),
    ]
    assert {c.dtype for c in unet.constants.values()} == {"bfloat16"}
    assert 0 < variant.max_abs_error <= variant.tolerance


def test_guidance_on_a_build_without_cfg_says_how_to_rebuild(bf16):
    pipe = diffbake.load(bf16)
    with pytest.raises(InputMismatchError) as e:
        pipe(**{**CALL, "guidance_scale": 7.5}, num_inference_steps=1)
    assert str(e.value).endswith(
        "this artifact was built with cfg = false for 2 image(s) per call: call with guidance_scale <= 1 (a larger "
        "one turns classifier-free guidance on) and 2 image(s) in all, or rebuild with [components.unet] cfg = true"
    )


def test_generate_uses_the_compiled_batch_and_no_guidance(bf16, tmp_path: Path):
    png = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["generate", str(bf16), "--prompt", "a cat", "--steps", "2", "--out", str(png)])
    assert result.exit_code == 0, result.output
    for path in (png, tmp_path / "out-1.png"):
        with Image.open(path) as image:
            assert image.size == (96, 64)


FP16_VAE_ONLY = """
[source]
model = "tiny:sd"
[target]
dtype = "float16"
allow_emulated = true
[components.vae_decoder]
shapes = { batch = 1, height = 64, width = 64 }
"""


def test_float16_with_only_the_vae_decoder_compiled(tmp_path: Path, saved_pipelines):
    (tmp_path / "vae16.toml").write_text(FP16_VAE_ONLY)
    artifact = diffbake.build(tmp_path / "vae16.toml", tmp_path / "vae16")
    m = read_manifest(artifact)
    assert list(m.components) == ["vae_decoder"] and m.dtype == "float16"
    v = m.components["vae_decoder"].variants[0]
    assert v.inputs[0].dtype == "float16" and 0 < v.max_abs_error <= v.tolerance
    assert (artifact / "pipeline" / "unet").is_dir() and not (artifact / "pipeline" / "vae").exists()

    pipe = diffbake.load(artifact)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.dtype == torch.float16
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd"), dtype=torch.float16)
    call = dict(prompt="a photo of a cat", num_inference_steps=2, output_type="np")
    got, want = (p(**call, generator=torch.Generator().manual_seed(0)).images for p in (pipe, stock))
    assert np.abs(got - want).max() <= 2e-2


def test_a_lora_rebind_measures_its_error_against_float32_with_the_lora_fused(bf16, tmp_path):
    """error_vs_float32 of a bfloat16 rebind with a LoRA is the bfloat16 error, not the LoRA's own effect."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffbake.builder.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline("sd")
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(lora)
    pipe.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    out = diffbake.rebind(
        bf16, loras=[(tmp_path / "lora" / "pytorch_lora_weights.safetensors", 1.0)], out=tmp_path / "r"
    )
    base = read_manifest(bf16).components["unet"].variants[0]
    rebound = read_manifest(out).components["unet"].variants[0]
    # Measured against the base weights instead, it was the LoRA's effect: 0.144 against the base build's 0.018.
    assert rebound.error_vs_float32 <= 3 * base.error_vs_float32, (rebound.error_vs_float32, base.error_vs_float32)


# --- half precision where the CPU has it ------------------------------------------------------------------------

AVX2_ONLY = frozenset(diffbake.format.host.CPU_TARGETS["avx2"][2])  # an AVX2-only CPU: no native half precision
AMX = AVX2_ONLY | frozenset(diffbake.format.host.CPU_TARGETS["avx512"][2]) | {"amx_bf16", "avx512_bf16", "amx_fp16"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cpu_half_precision_without_native_support_is_refused_with_the_fix(dtype, monkeypatch):
    from diffbake.builder.recipe import parse_recipe
    from diffbake.errors import RecipeError

    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: AVX2_ONLY)
    text = RECIPE.replace('dtype = "bfloat16"', f'dtype = "{dtype}"').replace("allow_emulated = true", "")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, path="r.toml")
    names = {"bfloat16": "AVX512_BF16 or AMX_BF16", "float16": "AVX512_FP16 or AMX_FP16"}[dtype]
    assert str(e.value) == (
        f"r.toml: [target] dtype = {dtype!r}: this build host's CPU has no native {dtype} ({names}), so torch "
        "emulates it: a 3x3 convolution ran 190x slower than in float32 on such a CPU, and the build's eager "
        f'reference alone can take hours; build on a CPU that has {names}, use dtype = "float32" (with int8 '
        "quantization for speed), or set allow_emulated = true to build anyway"
    )
    assert parse_recipe(text.replace("[target]", "[target]\nallow_emulated = true")).dtype == dtype
    assert parse_recipe(text.replace(f'dtype = "{dtype}"', 'dtype = "float32"')).dtype == "float32"


def test_a_half_precision_target_without_it_is_refused_even_on_a_host_that_has_it(monkeypatch):
    from diffbake.builder.recipe import parse_recipe
    from diffbake.errors import RecipeError

    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: AMX)
    text = RECIPE.replace("allow_emulated = true", 'cpu_isa = "avx2"')
    with pytest.raises(RecipeError, match=r"dtype = 'bfloat16' with cpu_isa = 'avx2': that target does not include "):
        parse_recipe(text)
    assert parse_recipe(RECIPE.replace("allow_emulated = true", "")).dtype == "bfloat16"  # native here


def test_loading_where_half_precision_is_emulated_warns(bf16, tmp_path, monkeypatch, caplog):
    import logging
    import shutil

    from helpers import edit_manifest

    # As if built for cpu_isa = "avx2" (allowed to be emulated), then loaded on an AVX2-only CPU.
    art = Path(shutil.copytree(bf16, tmp_path / "avx2-bf16"))
    edit_manifest(art, lambda m: m["host"].update(cpu_isa="avx2", cpu_features=sorted(AVX2_ONLY)))
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="diffbake.runtime.load"):
        diffbake.load(art)
    assert (
        f"{art}: this CPU has no native bfloat16 (avx512_bf16 or amx_bf16): torch emulates it, often many times "
        "slower than float32; rebuild the artifact in float32 (or float32 with int8 quantization) for this CPU"
    ) in caplog.messages
