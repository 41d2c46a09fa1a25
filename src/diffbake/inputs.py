"""The compiled components' inputs, from each pipeline's real call contract and the recipe's shapes.

Each builder returns the flat list of inputs the pipeline passes to a component, in a fixed order, named by their
keyword path (see ``manifest.flatten_call``). A new family is a new builder in ``_DENOISER_INPUTS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .families import VAE_DECODER, Family
from .manifest import TensorSpec
from .recipe import ComponentRecipe


def component_inputs(family: Family, comp: ComponentRecipe, pipe: Any, dtype: str) -> list[TensorSpec]:
    """Input specs of one component, as the pipeline calls it at the recipe's shapes."""
    latent_h = comp.shapes.height // pipe.vae_scale_factor
    latent_w = comp.shapes.width // pipe.vae_scale_factor
    if comp.name == VAE_DECODER:
        return [TensorSpec("z", [comp.shapes.batch, pipe.vae.config.latent_channels, latent_h, latent_w], dtype)]
    return _DENOISER_INPUTS[family.name](comp, pipe, dtype, latent_h, latent_w)


def example_inputs(family: Family, specs: list[TensorSpec], seed: int = 0) -> list[torch.Tensor]:
    """Seeded random inputs of the given specs; timesteps in the range the family's denoiser sees."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        if spec.name == "timestep":
            t = torch.rand(spec.shape, generator=g) * family.max_timestep
        else:
            t = torch.randn(spec.shape, generator=g)
        out.append(t.to(dtype))
    return out


def _unet_inputs(comp: ComponentRecipe, pipe: Any, dtype: str, h: int, w: int) -> list[TensorSpec]:
    unet = pipe.unet
    batch = comp.shapes.batch * (2 if comp.cfg else 1)
    specs = [
        TensorSpec("sample", [batch, unet.config.in_channels, h, w], dtype),
        # Schedulers hand out int64 or float timesteps, 0-d or per sample; the UNet broadcasts and casts them to
        # float itself, so the stand-in does the same and the package sees one layout.
        TensorSpec("timestep", [batch], "float32", coerce=True),
        TensorSpec(
            "encoder_hidden_states", [batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim], dtype
        ),
    ]
    if unet.config.time_cond_proj_dim is not None:
        specs.append(TensorSpec("timestep_cond", [batch, unet.config.time_cond_proj_dim], dtype))
    if unet.config.addition_embed_type == "text_time":
        text_dim = pipe.text_encoder_2.config.projection_dim
        n_ids = (unet.config.projection_class_embeddings_input_dim - text_dim) // unet.config.addition_time_embed_dim
        specs += [
            TensorSpec("added_cond_kwargs.text_embeds", [batch, text_dim], dtype),
            TensorSpec("added_cond_kwargs.time_ids", [batch, n_ids], dtype),
        ]
    return specs


def _flux_inputs(comp: ComponentRecipe, pipe: Any, dtype: str, h: int, w: int) -> list[TensorSpec]:
    cfg = pipe.transformer.config
    batch, tokens = comp.shapes.batch, comp.shapes.text_tokens
    seq = (h // 2) * (w // 2)  # 2x2 latent patches packed into one token
    specs = [
        TensorSpec("hidden_states", [batch, seq, cfg.in_channels], dtype),
        TensorSpec("encoder_hidden_states", [batch, tokens, cfg.joint_attention_dim], dtype),
        TensorSpec("pooled_projections", [batch, cfg.pooled_projection_dim], dtype),
        # FluxPipeline passes t / 1000 expanded to the batch, in the latents' dtype.
        TensorSpec("timestep", [batch], dtype, coerce=True),
        TensorSpec("img_ids", [seq, 3], dtype),
        TensorSpec("txt_ids", [tokens, 3], dtype),
    ]
    if cfg.guidance_embeds:
        specs.append(TensorSpec("guidance", [batch], "float32", coerce=True))
    return specs


_DENOISER_INPUTS: dict[str, Callable[..., list[TensorSpec]]] = {
    "sd": _unet_inputs,
    "sdxl": _unet_inputs,
    "flux": _flux_inputs,
}
