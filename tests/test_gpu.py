"""CUDA builds: the same contract as on the CPU. Skipped on hosts without a GPU (CI here has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffbake
from diffbake.manifest import read_manifest

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
