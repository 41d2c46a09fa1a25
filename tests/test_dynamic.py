"""Several variants of one component sharing one weights file: an exact static size, a dynamic fallback (batch,
height and width ranges) and a no-CFG variant; the runtime picks the exact static one first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffbake
from diffbake.errors import InputMismatchError
from diffbake.format.manifest import DimSpec, read_manifest
from diffbake.runtime.compiled import CompiledVariant


@pytest.fixture(scope="module")
def dynamic(artifacts) -> Path:
    """Several variants of the UNet: exact 64x64, a dynamic fallback (batch 1..3, 32..96 pixels), no CFG."""
    return artifacts("sd-dynamic")


@pytest.fixture(scope="module")
def pipes(dynamic, saved_pipelines):
    return diffbake.load(dynamic), DiffusionPipeline.from_pretrained(saved_pipelines("sd"))


@pytest.fixture
def used(monkeypatch):
    packages: list[str] = []
    run = CompiledVariant.run

    def spy(self, tensors):
        packages.append(f"{self.name}:{self.entry.package}")
        return run(self, tensors)

    monkeypatch.setattr(CompiledVariant, "run", spy)
    return packages


def test_manifest_records_variants_sharing_one_weights_file(dynamic):
    unet = read_manifest(dynamic).components["unet"]
    assert [v.package for v in unet.variants] == ["unet/model.pt2", "unet/model-1.pt2", "unet/model-2.pt2"]
    assert unet.weights == "unet/weights.safetensors"
    assert sorted(p.name for p in (dynamic / "unet").iterdir()) == [
        "config.json",
        "model-1.pt2",
        "model-2.pt2",
        "model.pt2",
        "weights.safetensors",
    ]
    fallback = unet.variants[1]
    assert fallback.shapes == {"batch": [1, 3], "height": [32, 96], "width": [32, 96]}
    # CFG doubles the batch; the tiny UNet halves the latent once, so latent sizes stay even.
    assert fallback.dims == {
        "batch": DimSpec(2, 6, 2),
        "height": DimSpec(16, 48, 2),
        "width": DimSpec(16, 48, 2),
    }
    assert fallback.inputs[0].shape == ["batch", 4, "height", "width"]
    for v in unet.variants:
        assert v.max_abs_error <= v.tolerance


@pytest.mark.parametrize(
    ("call", "package"),
    [
        (dict(), "unet/model.pt2"),  # exactly the static variant
        (dict(height=32, width=96, num_images_per_prompt=3), "unet/model-1.pt2"),
        (dict(height=48, width=64, num_images_per_prompt=2), "unet/model-1.pt2"),
        (dict(guidance_scale=1.0), "unet/model-2.pt2"),
    ],
)
def test_each_call_runs_the_right_variant_and_matches_stock(pipes, used, call, package):
    loaded, stock = pipes
    call = {"prompt": "a photo of a cat", "num_inference_steps": 2, "output_type": "np", **call}
    got = loaded(**call, generator=torch.Generator().manual_seed(0)).images
    want = stock(**{"height": 64, "width": 64, **call}, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 5e-4
    assert set(used) == {f"unet:{package}", "vae_decoder:vae_decoder/model.pt2"}


def test_a_call_outside_every_variant_lists_them_all(pipes):
    loaded, _ = pipes
    with pytest.raises(InputMismatchError) as e:
        loaded("a cat", height=128, width=64, num_inference_steps=1)
    message = str(e.value)
    assert message.startswith("unet: no compiled variant fits this call: [1 image(s) per call at 64x64 pixels, with ")
    assert (
        "[1..3 image(s) per call at 32..96x32..96 pixels, with classifier-free guidance] unet: input 'sample' has "
        "shape (2, 4, 64, 32), but this artifact was compiled for (2..6 (multiple of 2), 4, 16..48 (multiple of 2), "
        "16..48 (multiple of 2))"
    ) in message
    assert "without classifier-free guidance]" in message


def test_a_dynamic_only_component_refuses_out_of_range(pipes):
    loaded, _ = pipes
    with pytest.raises(InputMismatchError) as e:
        loaded.vae.decode(torch.randn(4, 4, 32, 32))
    assert str(e.value) == (
        "vae_decoder: input 'z' has shape (4, 4, 32, 32), but this artifact was compiled for (1..3, 4, 16..48, "
        "16..48) (1..3 image(s) per call at 32..96x32..96 pixels); call the pipeline with height=32..96, "
        "width=32..96 and 1..3 image(s) in all (prompts x num_images_per_prompt), or rebuild with "
        "[components.vae_decoder] shapes set for this call"
    )
