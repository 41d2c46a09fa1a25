"""CUDA builds: the same contract as on the CPU. Skipped on hosts without a GPU (CI here has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffbake
from diffbake.format.manifest import read_manifest

pytestmark = pytest.mark.gpu

RECIPE = """
[source]
model = "{source}"
[target]
device = "cuda"
[components.unet]
shapes = {{ batch = 1, height = 64, width = 64 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
"""


def test_cuda_artifact_matches_stock_on_cuda(tmp_path: Path, saved_pipelines):
    (tmp_path / "cuda.toml").write_text(RECIPE.format(source=saved_pipelines("sd").as_posix()))
    artifact = diffbake.build(tmp_path / "cuda.toml", tmp_path / "cuda")
    host = read_manifest(artifact).host
    assert host.device == "cuda" and host.gpu and host.compute_capability and host.cuda
    pipe = diffbake.load(artifact)
    assert pipe.unet.device.type == "cuda"
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd")).to("cuda")
    call = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np")
    got, want = (p(**call, generator=torch.Generator("cuda").manual_seed(0)).images for p in (pipe, stock))
    # TF32 and kernel choice differ between compiled and eager CUDA code; allow a little more than on the CPU.
    assert np.abs(got - want).max() <= 5e-3


@pytest.fixture(scope="module")
def cuda_artifacts(tmp_path_factory, saved_pipelines) -> dict[str, Path]:
    """A static CUDA artifact with two shape variants, and a dynamic one."""
    folder = tmp_path_factory.mktemp("cuda-graphs")
    source = saved_pipelines("sd").as_posix()
    two = "[{ batch = 1, height = 64, width = 64 }, { batch = 1, height = 64, width = 96 }]"
    static = f'[source]\nmodel = "{source}"\n[target]\ndevice = "cuda"\n'
    static += f"[components.unet]\nshapes = {two}\n[components.vae_decoder]\nshapes = {two}\n"
    dynamic = f'[source]\nmodel = "{source}"\n[target]\ndevice = "cuda"\n'
    dynamic += "[components.unet]\nshapes = { batch = [1, 2], height = 64, width = 64 }\n"
    dynamic += "[components.vae_decoder]\nshapes = [{ batch = 1, height = 64, width = 64 }, { batch = 2, height = 64, width = 64 }]\n"
    out = {}
    for name, text in (("static", static), ("dynamic", dynamic)):
        (folder / f"{name}.toml").write_text(text)
        out[name] = diffbake.build(folder / f"{name}.toml", folder / name)
    return out


def _images(pipe, **call) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator("cuda").manual_seed(0),
        **call,
    ).images


def test_cuda_graphs_replay_equals_plain_runs_and_eager_across_shapes(cuda_artifacts, saved_pipelines):
    plain = diffbake.load(cuda_artifacts["static"])
    graphed = diffbake.load(cuda_artifacts["static"], cuda_graphs=True)
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd")).to("cuda")
    for call in ({}, {"width": 96}, {}):  # a shape change, and back: one graph per shape
        got = _images(graphed, **call)
        np.testing.assert_allclose(got, _images(plain, **call), atol=1e-3)
        assert np.abs(got - _images(stock, **call)).max() <= 5e-3  # TF32 and kernel choice, as above
    replay = [v.replay for v in graphed.unet.diffbake_components["unet"].variants]
    assert all(r is not None and r.off is None and len(r.graphs) == 1 for r in replay)


def test_cuda_graphs_fall_back_for_dynamic_shapes(cuda_artifacts):
    plain = diffbake.load(cuda_artifacts["dynamic"])
    graphed = diffbake.load(cuda_artifacts["dynamic"], cuda_graphs=True)
    assert graphed.unet.diffbake_components["unet"].variants[0].replay is None  # dynamic: runs as is
    assert (
        graphed.vae.diffbake_components["vae_decoder"].variants[0].replay is not None
    )  # the static VAE decoder still replays
    for images in (1, 2):
        np.testing.assert_allclose(
            _images(graphed, num_images_per_prompt=images), _images(plain, num_images_per_prompt=images), atol=1e-3
        )


def test_compiled_denoiser_step_makes_no_device_sync(cuda_artifacts):
    """Scheduler tensors stay where diffusers keeps them; the stand-in's input checks read no device value."""
    pipe = diffbake.load(cuda_artifacts["static"], cuda_graphs=True)
    _images(pipe)  # the graphs are captured (capture itself synchronizes); from here on, only replays
    forward = pipe.unet.forward

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    pipe.unet.forward = strict
    _images(pipe)
