"""What each diffusers pipeline reads from the stand-ins, recorded during real calls.

The stand-ins answer what diffusers asks of the eager modules. This test pins the set of attributes and config
keys each pipeline reads; a diffusers upgrade that reads something new fails here, loudly, naming it, rather than
somewhere inside a pipeline call.
"""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict

import diffbake
from diffbake.format.components import COMPONENTS
from diffbake.runtime.standins import CompiledModel

# diffusers' own machinery (hooks, offload checks, DiffusionPipeline.to) reads these of every component.
MACHINERY = [
    "_diffusers_hook",
    "_hf_hook",
    "_internal_dict",
    "_reset_stateful_cache",
    "config",
    "config_name",
    "device",
    "dtype",
    "is_loaded_in_4bit",
    "is_loaded_in_8bit",
    "modules",
    "to",
]
EXPECTED = {
    "sd": {
        "unet": MACHINERY,
        "unet.config": ["in_channels", "items", "sample_size", "time_cond_proj_dim"],
        "vae": sorted(MACHINERY + ["decode"]),
        "vae.config": ["block_out_channels", "items", "scaling_factor"],
    },
    "sdxl": {
        "unet": sorted(MACHINERY + ["add_embedding"]),
        "unet.config": ["addition_time_embed_dim", "in_channels", "items", "sample_size", "time_cond_proj_dim"],
        "vae": sorted(MACHINERY + ["decode"]),
        "vae.config": ["block_out_channels", "items", "latents_mean", "latents_std", "scaling_factor"],
    },
    "flux": {
        "transformer": sorted(MACHINERY + ["cache_context", "named_modules"]),
        "transformer.config": ["guidance_embeds", "in_channels", "items"],
        "vae": sorted(MACHINERY + ["decode"]),
        "vae.config": ["block_out_channels", "items", "scaling_factor", "shift_factor"],
    },
}

CALLS = {
    "sd": dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=2),
    "sdxl": dict(prompt="a cat", negative_prompt="blurry", num_images_per_prompt=2, num_inference_steps=2),
    "flux": dict(prompt="a cat", num_inference_steps=2, height=32, width=48, max_sequence_length=32),
}


def _from_diffusers() -> bool:
    return sys._getframe(2).f_globals.get("__name__", "").startswith("diffusers")


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_pipelines_read_only_what_the_stand_ins_are_known_to_answer(family, artifacts, monkeypatch):
    artifact = artifacts(family)  # built before recording starts
    reads: dict[str, set[str]] = {}

    def role(self) -> str | None:  # the pipeline attribute this stand-in replaces (None while it is made)
        programs = object.__getattribute__(self, "__dict__").get("programs")
        return COMPONENTS[next(iter(programs))].attribute if programs else None

    get_attribute = CompiledModel.__getattribute__
    get_config = ConfigMixin.config.fget

    def record(self, attr):
        if not attr.startswith("__") and _from_diffusers() and role(self) is not None:
            reads.setdefault(role(self), set()).add(attr)
        return get_attribute(self, attr)

    def config(self):
        name = role(self)

        class RecordingConfig(FrozenDict):
            def __getattribute__(self, attr):
                if not attr.startswith("_") and _from_diffusers():
                    reads.setdefault(f"{name}.config", set()).add(attr)
                return super().__getattribute__(attr)

        return RecordingConfig(get_config(self))

    monkeypatch.setattr(CompiledModel, "__getattribute__", record)
    monkeypatch.setattr(CompiledModel, "config", property(config))
    pipe = diffbake.load(artifact)
    pipe(**CALLS[family], generator=torch.Generator().manual_seed(0), output_type="np")
    assert {k: sorted(v) for k, v in reads.items()} == EXPECTED[family]
