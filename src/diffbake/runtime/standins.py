"""Stand-in modules: what the diffusers pipeline holds where the eager module stood.

diffusers asks more of them than an ``nn.Module`` gives (``from_pretrained(..., unet=obj)`` wants a
``ModelMixin``, Flux calls ``transformer.cache_context``, SDXL reads ``unet.add_embedding.linear_1.in_features``),
so the stand-ins subclass diffusers' mixins, carry the eager module's config, and keep its call signature and
return types; the call itself goes to a :class:`~diffbake.runtime.compiled.CompiledComponent`.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffbake.errors import InputMismatchError
from diffbake.format.manifest import (
    flatten_call,
)
from diffbake.runtime.guards import bind_call

if TYPE_CHECKING:
    from diffbake.runtime.compiled import CompiledComponent


class CompiledModel(ModelMixin, ConfigMixin):
    """Base of the stand-ins: a config, a device and dtype, and a compiled program in place of parameters.

    A subclass names the eager class it stands for, the method the compiled code replaces, that method's
    return_dict output type, and the arguments the eager method accepts but ignores.
    """

    config_name = "config.json"
    _stands_for: type[torch.nn.Module]
    _method = "forward"
    _output: type
    _ignored: tuple[str, ...] = ()

    def __init__(self, program: CompiledComponent, config: dict[str, Any]):
        super().__init__()
        self.register_to_config(**{k: v for k, v in config.items() if not k.startswith("_")})
        self.component = program
        self._signature = inspect.signature(getattr(self._stands_for, self._method))

    @property
    def diffbake_component(self) -> CompiledComponent:
        """The compiled component behind this module (what ``diffbake.set_weights`` rebinds)."""
        return self.component

    @property
    def device(self) -> torch.device:
        return self.component.device

    @property
    def dtype(self) -> torch.dtype:
        return self.component.dtype

    def to(self, *args: Any, **kwargs: Any) -> CompiledModel:
        # Compiled code runs on one device in one dtype; moving it is not possible, so only a no-op move passes.
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != self.device.type:
            raise InputMismatchError(
                f"{self.component.name}: this compiled component runs on {self.device} only; it cannot move to "
                f"{device}; rebuild the recipe with [target] device = {torch.device(device).type!r}"
            )
        if dtype is not None and dtype != self.dtype:
            raise InputMismatchError(
                f"{self.component.name}: this compiled component runs in {self.dtype} only; it cannot be cast to "
                f"{dtype}; rebuild the recipe with [target] dtype = {str(dtype).removeprefix('torch.')!r}"
            )
        return self

    # Runtime settings of the diffusers guides that change an eager module's attention or memory use. Compiled
    # code fixed them at build time; refusing them clearly beats a silent no-op (the pipelines' enable_* helpers
    # skip modules that lack the method, or walk a stand-in's zero children and do nothing).
    def set_attention_slice(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("attention slicing (enable_attention_slicing)")

    def set_use_memory_efficient_attention_xformers(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("xformers attention (enable_xformers_memory_efficient_attention)")

    def set_attn_processor(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("attention processors (set_attn_processor)")

    def set_default_attn_processor(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("attention processors (set_default_attn_processor)")

    def fuse_qkv_projections(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("fuse_qkv_projections (set fuse_qkv = true in the recipe)")

    def enable_forward_chunking(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("feed-forward chunking (enable_forward_chunking)")

    def _not_applicable(self, what: str) -> None:
        raise InputMismatchError(
            f"{self.component.name}: {what} does not apply to compiled code, whose attention, layout and memory "
            "use were fixed when the artifact was built; call the pipeline without it (set what the recipe "
            "offers, such as fuse_qkv or compiler options, and rebuild)"
        )

    def _invoke(self, args: tuple, kwargs: dict) -> Any:
        """Call the compiled code as the eager method would be called, and return what it would return."""
        names = self.component.input_names
        for name in self._ignored:
            kwargs.pop(name, None)
        arguments = bind_call(self.component.name, self._signature, self, names, args, kwargs)
        sample = self.component(flatten_call(names, arguments))
        return self._output(sample=sample) if arguments.get("return_dict", True) else (sample,)


class CompiledUNet2DConditionModel(CompiledModel):
    """Stands in for ``UNet2DConditionModel``."""

    _stands_for = UNet2DConditionModel
    _output = UNet2DConditionOutput

    def forward(self, *args: Any, **kwargs: Any):
        return self._invoke(args, kwargs)

    @property
    def add_embedding(self) -> SimpleNamespace:
        # SDXL reads add_embedding.linear_1.in_features to check its added time ids; answer from the config.
        if self.config.get("addition_embed_type") != "text_time":
            raise AttributeError("add_embedding")
        return SimpleNamespace(
            linear_1=SimpleNamespace(in_features=self.config["projection_class_embeddings_input_dim"])
        )


class CompiledFluxTransformer2DModel(CompiledModel, CacheMixin):
    """Stands in for ``FluxTransformer2DModel``; ``cache_context`` comes from diffusers' CacheMixin."""

    _stands_for = FluxTransformer2DModel
    _output = Transformer2DModelOutput

    def forward(self, *args: Any, **kwargs: Any):
        return self._invoke(args, kwargs)


class CompiledAutoencoderKL(CompiledModel):
    """Stands in for ``AutoencoderKL``: ``decode`` runs compiled code; encoding is not part of the artifact."""

    _stands_for = AutoencoderKL
    _method = "decode"
    _output = DecoderOutput
    _ignored = ("generator",)  # AutoencoderKL.decode accepts a generator and does not use it

    def __init__(self, program: CompiledComponent, config: dict[str, Any]):
        # The decoder's dtype is fixed at build time, so the pipelines' upcast-to-float32 path must not run.
        super().__init__(program, {**config, "force_upcast": False})

    def decode(self, *args: Any, **kwargs: Any):
        return self._invoke(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any):
        raise InputMismatchError(
            "vae_decoder: only vae.decode is compiled into this artifact; encoding images (img2img, inpainting) "
            "needs the eager VAE"
        )

    def encode(self, *args: Any, **kwargs: Any):
        return self.forward()

    def enable_slicing(self) -> None:
        self._not_applicable("VAE slicing (enable_vae_slicing)")

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("VAE tiling (enable_vae_tiling)")


# Which stand-in replaces which eager class; a new denoiser class is a row here.
STAND_INS: dict[str, type[CompiledModel]] = {
    "UNet2DConditionModel": CompiledUNet2DConditionModel,
    "FluxTransformer2DModel": CompiledFluxTransformer2DModel,
    "AutoencoderKL": CompiledAutoencoderKL,
}
