"""End to end: a loaded artifact makes the same images as stock diffusers on the same saved pipeline.

The reference is diffusers alone (``DiffusionPipeline.from_pretrained`` of the folder the artifact was built
from), never diffbake code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import diffbake
from diffbake.format.manifest import read_manifest
from diffbake.runtime.standins import CompiledModel

ATOL = 5e-4  # max abs over the whole float32 image

CALLS = {
    "sd": [
        dict(prompt="a photo of a cat", num_inference_steps=3),
        dict(prompt="a red dog", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0),
    ],
    "sdxl": [
        dict(prompt="a photo of an astronaut", num_images_per_prompt=2, num_inference_steps=3),
        dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "bad quality"], num_inference_steps=2),
    ],
    "flux": [
        dict(prompt="a photo of a cat", num_inference_steps=3, height=32, width=48, max_sequence_length=32),
        dict(
            prompt="a blue horse",
            prompt_2="a green horse",
            num_inference_steps=2,
            height=32,
            width=48,
            max_sequence_length=32,
        ),
    ],
}
STAND_IN_TYPES = {
    "sd": ("unet", "CompiledUNet2DConditionModel"),
    "sdxl": ("unet", "CompiledUNet2DConditionModel"),
    "flux": ("transformer", "CompiledFluxTransformer2DModel"),
}


def _images(pipe, call: dict, seed: int = 0) -> np.ndarray:
    return pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.fixture(scope="module", params=["sd", "sdxl", "flux"])
def pair(request, artifacts, saved_pipelines):
    family = request.param
    loaded = diffbake.load(artifacts(family))
    stock = DiffusionPipeline.from_pretrained(saved_pipelines(family))
    return family, loaded, stock


def test_images_match_stock_diffusers(pair):
    family, loaded, stock = pair
    for call in CALLS[family]:
        got, want = _images(loaded, call), _images(stock, call)
        assert got.shape == want.shape
        assert np.isfinite(got).all()
        err = np.abs(got - want).max()
        assert err <= ATOL, f"{family} {call}: max abs {err:.3g}"


def test_loaded_pipeline_holds_no_eager_denoiser_or_decoder(pair):
    family, loaded, _ = pair
    attr, cls = STAND_IN_TYPES[family]
    assert (
        type(loaded).__name__
        == {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}[family]
    )
    # One stand-in class per eager class, made from what the build captured.
    assert isinstance(getattr(loaded, attr), CompiledModel) and type(getattr(loaded, attr)).__name__ == cls
    assert isinstance(loaded.vae, CompiledModel) and type(loaded.vae).__name__ == "CompiledAutoencoderKL"
    for module in (getattr(loaded, attr), loaded.vae):
        assert sum(p.numel() for p in module.parameters()) == 0
        assert sum(b.numel() for b in module.buffers()) == 0
    eager_classes = {"UNet2DConditionModel", "FluxTransformer2DModel", "AutoencoderKL"}
    assert not [n for n, c in loaded.components.items() if type(c).__name__ in eager_classes]


def test_scheduler_swap_matches_stock(pair):
    family, loaded, stock = pair
    call = dict(CALLS[family][0], num_inference_steps=4)
    before = _images(loaded, call)
    for pipe in (loaded, stock):
        if family == "flux":  # flow matching: same scheduler class, another sigma schedule
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
        else:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    after = _images(loaded, call)
    assert np.abs(after - before).max() > 1e-4  # the swap really changed the sampling
    assert np.abs(after - _images(stock, call)).max() <= ATOL


def test_bare_call_uses_the_compiled_size(artifacts):
    pipe = diffbake.load(artifacts("sd"))
    image = pipe("a cat", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_manifest_records_what_was_built(artifacts):
    m = read_manifest(artifacts("sdxl"))
    assert m.format == "diffbake-artifact" and m.format_version == 4
    assert m.pipeline_class == "StableDiffusionXLPipeline" and m.denoiser == "unet"
    assert m.host.device == "cpu" and m.host.dtype == "float32" and m.host.cpu_isa == "native"
    assert m.versions["torch"] == torch.__version__
    unet = m.components["unet"]
    variant = unet.variants[0]
    assert [(i.name, i.shape) for i in variant.inputs] == [
        ("sample", [4, 4, 32, 32]),  # batch 2 doubled by CFG; 64 px / VAE scale factor 2
        ("timestep", []),  # as the pipeline passes it: one timestep for the batch
        ("encoder_hidden_states", [4, 77, 64]),
        ("added_cond_kwargs.text_embeds", [4, 32]),
        ("added_cond_kwargs.time_ids", [4, 6]),
    ]
    assert 0 <= variant.max_abs_error <= variant.tolerance
    assert variant.shapes == {"batch": 2, "height": 64, "width": 64} and variant.cfg is True
    assert variant.package == "unet/model.pt2" and variant.dims == {}
    # Every file is listed with its size; the weights hold exactly the constants the package names.
    for rel, f in m.files.items():
        assert (artifacts("sdxl") / rel).stat().st_size == f.size
    from safetensors import safe_open

    with safe_open(artifacts("sdxl") / unet.weights, "pt") as f:
        assert set(f.keys()) == set(unet.constants)
    assert not (artifacts("sdxl") / "pipeline" / "unet").exists()
    assert not (artifacts("sdxl") / "pipeline" / "vae").exists()
    assert (artifacts("sdxl") / "pipeline" / "text_encoder_2").is_dir()
