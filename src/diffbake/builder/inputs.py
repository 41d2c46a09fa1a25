"""The compiled components' inputs, from each pipeline's real call contract and a variant's shapes.

Each builder returns the flat list of inputs the pipeline passes to a component, in a fixed order, named by their
keyword path (see ``manifest.flatten_call``), and the dynamic dimensions they use. A dimension that the recipe
gives as a range becomes a named symbol shared by every input that carries it (the batch of ``sample`` and of
``encoder_hidden_states``, say). A new family is a new builder in ``_DENOISER_INPUTS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffbake.builder.recipe import ComponentRecipe, Size, Variant
from diffbake.errors import RecipeError
from diffbake.format.components import VAE_DECODER, Family
from diffbake.format.manifest import DimSpec, TensorSpec

Dims = dict[str, DimSpec]


class _Shaper:
    """Turns recipe sizes into static sizes or named dynamic dimensions."""

    def __init__(self) -> None:
        self.dims: Dims = {}

    def size(self, symbol: str, size: Size, scale: int = 1, multiple: int = 1) -> int | str:
        """``size`` (in recipe units) times ``scale``; a range becomes the symbol, a multiple of ``multiple``."""
        if not isinstance(size, tuple):
            return size * scale
        self.dims[symbol] = DimSpec(size[0] * scale, size[1] * scale, multiple)
        return symbol


def component_inputs(
    family: Family, comp: ComponentRecipe, variant: Variant, pipe: Any, dtype: str
) -> tuple[list[TensorSpec], Dims]:
    """Input specs of one component as the pipeline calls it, and the dynamic dimensions they use."""
    shaper = _Shaper()
    latent = _latent_sizes(variant, pipe)
    if comp.name == VAE_DECODER:
        shape = [
            shaper.size("batch", variant.shapes.batch),
            pipe.vae.config.latent_channels,
            shaper.size("height", latent["height"]),
            shaper.size("width", latent["width"]),
        ]
        return [TensorSpec("z", shape, dtype)], shaper.dims
    return _DENOISER_INPUTS[family.name](shaper, variant, pipe, dtype, latent), shaper.dims


def example_inputs(
    family: Family, specs: list[TensorSpec], dims: Dims, seed: int = 0, at: str = "example"
) -> list[torch.Tensor]:
    """Seeded random inputs; dynamic dimensions at an ``example`` size (what export traces) or at their ``max``.

    Timesteps are drawn from the range the family's denoiser sees.
    """
    sizes = {name: (d.max if at == "max" else d.smallest_above_one()) for name, d in dims.items()}
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "timestep":
            t = torch.rand(shape, generator=g) * family.max_timestep
        else:
            t = torch.randn(shape, generator=g)
        out.append(t.to(getattr(torch, spec.dtype)))
    return out


def _latent_sizes(variant: Variant, pipe: Any) -> dict[str, Size]:
    f = pipe.vae_scale_factor
    out: dict[str, Size] = {}
    for dim in ("height", "width"):
        size = getattr(variant.shapes, dim)
        out[dim] = (size[0] // f, size[1] // f) if isinstance(size, tuple) else size // f
    return out


def _unet_inputs(shaper: _Shaper, variant: Variant, pipe: Any, dtype: str, latent: dict) -> list[TensorSpec]:
    unet = pipe.unet
    double = 2 if variant.cfg else 1
    batch = shaper.size("batch", variant.shapes.batch, scale=double, multiple=double)
    down = 2 ** (len(unet.config.block_out_channels) - 1)
    for dim, size in latent.items():
        # A dynamic latent size must stay a multiple of what the UNet downsamples by, or export specializes it.
        if isinstance(size, tuple) and (size[0] % down or size[1] % down):
            f = pipe.vae_scale_factor
            raise RecipeError(
                f"[components.unet] shapes.{dim} = {[size[0] * f, size[1] * f]}: a dynamic range must start and "
                f"end at multiples of {down * f} pixels for this UNet (it halves the latent "
                f"{down.bit_length() - 1} times)"
            )
    h = shaper.size("height", latent["height"], multiple=down)
    w = shaper.size("width", latent["width"], multiple=down)
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


def _flux_inputs(shaper: _Shaper, variant: Variant, pipe: Any, dtype: str, latent: dict) -> list[TensorSpec]:
    cfg = pipe.transformer.config
    batch = shaper.size("batch", variant.shapes.batch)
    tokens = shaper.size("text_tokens", variant.shapes.text_tokens)

    # 2x2 latent patches are packed into one token: the image token count is (h / 2) * (w / 2).
    def lo_hi(size: Size) -> tuple[int, int]:
        return size if isinstance(size, tuple) else (size, size)

    (h0, h1), (w0, w1) = lo_hi(latent["height"]), lo_hi(latent["width"])
    seq_range = ((h0 // 2) * (w0 // 2), (h1 // 2) * (w1 // 2))
    seq = shaper.size("image_tokens", seq_range if seq_range[0] != seq_range[1] else seq_range[0])
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
