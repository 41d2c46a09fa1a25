"""One build combining options that do not interact: int8 dynamic quantization with QKV fusion and channels_last
on the UNet, channels_last with float8 weight-only quantization on the VAE decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import diffbake
from diffbake.builder.tiny import make_tiny_pipeline
from diffbake.format.manifest import read_manifest
from diffbake.runtime.load import compiled_call

RECIPE = """
[source]
model = "tiny:sd"
[components.unet]
shapes = { batch = 1, height = 64, width = 64 }
fuse_qkv = true
channels_last = true
quantization = { method = "int8_dynamic", exclude = ["*proj_out*"], min_features = 32 }
[components.vae_decoder]
shapes = { batch = 1, height = 64, width = 64 }
channels_last = true
quantization = { method = "float8_weight_only" }
"""


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("optimized")
    (folder / "sd-int8.toml").write_text(RECIPE)
    return diffbake.build(folder / "sd-int8.toml", folder / "sd-int8")


def test_manifest_records_each_transform_and_both_errors(optimized):
    m = read_manifest(optimized)
    unet, vae = m.components["unet"], m.components["vae_decoder"]
    assert unet.transforms["fuse_qkv"] is True and unet.transforms["channels_last"] is True
    q = unet.transforms["quantization"]
    assert (q["method"], q["exclude"], q["min_features"]) == ("int8_dynamic", ["*proj_out*"], 32)
    assert q["layers"] > 0 and q["config"]["_type"] == "Int8DynamicActivationInt8WeightConfig"
    assert q["config"]["_data"]["set_inductor_config"] is False
    assert vae.transforms["quantization"]["method"] == "float8_weight_only" and vae.transforms["fuse_qkv"] is False
    for c in (unet.variants[0], vae.variants[0]):
        assert 0 < c.max_abs_error <= c.tolerance
        assert c.error_vs_float32 > 0  # quantization moves the output away from float32 eager


def test_quantized_weights_are_plain_tensors_with_recorded_layouts(optimized):
    m = read_manifest(optimized)
    unet = m.components["unet"]
    fused = [k for k in unet.constants if ".to_qkv.parametrizations.weight." in k]
    assert fused and {unet.constants[k].dtype for k in fused} >= {"int8"}
    assert not [k for k in unet.constants if k.endswith(("to_q.weight", "attn1.to_k.weight"))]
    # channels_last conv weights: stored contiguous (safetensors needs it), their strides recorded to restore.
    conv = unet.constants["model.conv_in.weight"]
    c_out, c_in, kh, kw = conv.shape
    assert conv.stride == [c_in * kh * kw, 1, kw * c_in, c_in]
    with safe_open(optimized / unet.weights, "pt") as f:
        assert f.get_tensor("model.conv_in.weight").is_contiguous()
        assert f.get_tensor(fused[0]).dtype in (torch.int8, torch.float32)


def _quantized_eager_unet():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    unet = make_tiny_pipeline("sd").unet.eval()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)

    def wanted(mod, fqn):
        return (
            isinstance(mod, torch.nn.Linear) and "proj_out" not in fqn and min(mod.in_features, mod.out_features) >= 32
        )

    quantize_(unet, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=wanted)
    return unet


def test_loaded_unet_matches_eager_with_the_same_transforms(optimized):
    pipe = diffbake.load(optimized)
    eager = _quantized_eager_unet()
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = eager(sample, 500, encoder_hidden_states=text).sample
    got = pipe.unet(sample, 500, encoder_hidden_states=text).sample
    tolerance = read_manifest(optimized).components["unet"].variants[0].tolerance
    assert (got - want).abs().max().item() <= tolerance


def test_optimized_pipeline_generates_close_to_float32(optimized, saved_pipelines):
    from diffusers import DiffusionPipeline

    pipe = diffbake.load(optimized)
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    call = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np")
    got = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    want = stock(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(got).all()
    assert np.abs(got - want).mean() < 2e-2  # int8/float8 change the image a little, not wholesale


def test_int8_weight_only(tmp_path: Path):
    (tmp_path / "w8.toml").write_text(
        '[source]\nmodel = "tiny:sd"\n[components.vae_decoder]\nshapes = { batch = 1, height = 64, width = 64 }\n'
        'quantization = { method = "int8_weight_only", include = ["decoder.*"] }\n'
    )
    artifact = diffbake.build(tmp_path / "w8.toml", tmp_path / "w8")
    vae = read_manifest(artifact).components["vae_decoder"]
    q = vae.transforms["quantization"]
    assert q["method"] == "int8_weight_only" and q["include"] == ["decoder.*"]
    assert q["layers"] == 4  # the decoder's mid-block attention: q, k, v, out; the encoder's are left alone
    assert {c.dtype for k, c in vae.constants.items() if "parametrizations" in k} >= {"int8"}
    v = vae.variants[0]
    assert 0 < v.max_abs_error <= v.tolerance
    image = diffbake.load(artifact)("a cat", num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()


FLUX_DYNAMIC = """
[source]
model = "tiny:flux"
[components.transformer]
fuse_qkv = true
quantization = { method = "int8_dynamic" }
shapes = { batch = [1, 2], height = [32, 64], width = [32, 64], text_tokens = [16, 32] }
cfg = false
[components.vae_decoder]
shapes = { batch = [1, 2], height = [32, 64], width = [32, 64] }
"""


def test_flux_quantized_fused_and_dynamic(tmp_path: Path):
    (tmp_path / "flux.toml").write_text(FLUX_DYNAMIC)
    artifact = diffbake.build(tmp_path / "flux.toml", tmp_path / "flux")
    manifest = read_manifest(artifact)
    v = manifest.components["transformer"].variants[0]
    # cfg = false on a pipeline without a CFG batch: nothing to switch off, and the guidance value is the
    # caller's (Flux-dev feeds it to its guidance embedding), never forced to 1.
    assert v.cfg is None and "guidance_scale" not in compiled_call(manifest)
    # Flux's image tokens follow height and width at once ((h / 16) * (w / 16)): a dimension of their own.
    assert v.inputs[0].shape == ["batch", "height_x_width", 64]
    assert (v.dims["height_x_width"].min, v.dims["height_x_width"].max) == (64, 256)
    assert (v.dims["text_tokens"].min, v.dims["text_tokens"].max) == (16, 32)
    assert v.max_abs_error <= v.tolerance  # checked at the traced size and at the top of every range
    pipe = diffbake.load(artifact)
    for call, shape in (
        (dict(height=32, width=64, max_sequence_length=16), (1, 32, 64, 3)),
        (dict(height=64, width=48, max_sequence_length=32, num_images_per_prompt=2), (2, 64, 48, 3)),
    ):
        image = pipe("a cat", num_inference_steps=2, output_type="np", **call).images
        assert image.shape == shape and np.isfinite(image).all()


def test_bench_ladder_adds_each_optimization_in_turn(optimized, tmp_path):
    from diffbake.bench.bench import bench

    report = bench(
        optimized.parent / "sd-int8.toml",
        artifact=optimized,
        out=tmp_path / "bench",
        paths=("artifact",),
        steps=2,
        repeats=2,
        warmup=1,
        image_repeats=0,
    )
    assert report["build"]["reused"] is True
    ladder = report["ladder"]
    assert [r["step"] for r in ladder] == [
        "float32 eager",
        "+ QKV fusion",
        "+ channels_last",
        "+ int8_dynamic (torchao)",
        "+ AOT compile (full)",
    ]
    # Fusion and layout change no math to speak of; int8 does, and the compiled step stays close to it.
    # (The float32 rung is the reference itself: nothing to assert about its error.)
    assert ladder[1]["max_abs_error"] < 1e-4 and ladder[2]["max_abs_error"] < 1e-4
    assert 0 < ladder[3]["relative_error"] < 0.1
    assert 0 < ladder[4]["max_abs_error"] and abs(ladder[4]["max_abs_error"] - ladder[3]["max_abs_error"]) < 0.05
    assert all(len(r["step_s"]) == 2 and r["step_median_s"] > 0 for r in ladder)
