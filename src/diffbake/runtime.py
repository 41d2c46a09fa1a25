"""Load an artifact back into a working diffusers pipeline, with no compile step.

The compiled denoiser and VAE decoder are replaced by stand-in modules. diffusers asks more of them than an
``nn.Module`` gives (``from_pretrained(..., unet=obj)`` wants a ``ModelMixin``, Flux calls
``transformer.cache_context``, SDXL reads ``unet.add_embedding.linear_1.in_features``), so the stand-ins subclass
diffusers' mixins, carry the eager module's config, and keep its call signature and return types.

AOTInductor code checks none of its inputs: a wrong shape, dtype or memory layout runs and returns wrong numbers.
So each stand-in checks every input against the manifest before the compiled code runs.

This module imports nothing from the build side (export, inductor's compiler, click).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .archive import Package, inspect_package
from .archive import unpack_dir as resolve_unpack_dir
from .errors import ArtifactError, ArtifactNotFoundError, InputMismatchError, SelfTestError
from .families import FAMILIES, VAE_DECODER
from .hub import check_remote, fetch, is_repo_id
from .manifest import (
    BlockEntry,
    ComponentEntry,
    Manifest,
    TensorSpec,
    VariantEntry,
    flatten_call,
    read_manifest,
    unflatten_call,
)
from .selftest import compare, self_test_inputs
from .verify import check_compatibility, verify_files

logger = logging.getLogger(__name__)

__all__ = ["load", "CompiledComponent"]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in the manifest; rebuild the artifact")
    return dtype


def _fmt(size: int | list[int]) -> str:
    return f"{size[0]}..{size[1]}" if isinstance(size, list) else str(size)


def _describe(variant: VariantEntry) -> str:
    s = variant.shapes
    text = f"{_fmt(s['batch'])} image(s) per call at {_fmt(s['height'])}x{_fmt(s['width'])} pixels"
    if s.get("text_tokens"):
        text += f", {_fmt(s['text_tokens'])} text tokens"
    if variant.cfg:
        text += ", with classifier-free guidance"
    elif variant.cfg is False:
        text += ", without classifier-free guidance"
    return text


class CompiledComponent:
    """A component's compiled variants, bound to one shared copy of its weights, behind input guards.

    Args:
        artifact: the artifact folder.
        entry: the component's manifest entry.
        device: where the packages run ("cpu", "cuda", "cuda:1").
        unpack: where packages are extracted before loading (see :func:`diffbake.archive.unpack_dir`).
    """

    def __init__(
        self,
        artifact: Path,
        entry: ComponentEntry,
        device: str,
        unpack: Path | None = None,
        concurrency: int = 1,
        cuda_graphs: bool = False,
    ):
        from safetensors.torch import load_file

        self.concurrency = concurrency
        self.cuda_graphs = cuda_graphs
        self.entry = entry
        self.name = entry.name
        self.device = torch.device(device)
        self.unpack = unpack or resolve_unpack_dir()
        self.dtype = _dtype(entry.variants[0].output.dtype)
        weights = load_file(artifact / entry.weights, device=str(self.device))
        _check_weights(entry, weights)
        # user_managed: every variant's runner uses these tensors in place (one copy in memory), so they must
        # outlive the runners; we keep them here.
        self._weights = weights
        self.variants = [_CompiledVariant(self, artifact, v, weights) for v in entry.variants]
        # Exact static variants first, then dynamic ones, each in recipe order.
        self._order = sorted(self.variants, key=lambda v: v.entry.dynamic)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.entry.variants[0].inputs]

    def __call__(self, values: list[Any]) -> torch.Tensor:
        """Run the first variant (static ones first) whose shapes fit the inputs."""
        if len(self.variants) == 1:
            return self.variants[0](values)
        reasons = []
        for variant in self._order:
            try:
                tensors = variant.check(values)
            except InputMismatchError as e:
                reasons.append(f"[{_describe(variant.entry)}] {e}")
                continue
            return variant.run(tensors)
        raise InputMismatchError(f"{self.name}: no compiled variant fits this call: " + "; ".join(reasons))


class _CompiledVariant:
    """One AOTInductor package of a component, bound to the component's weights."""

    def __init__(self, component: CompiledComponent, artifact: Path, entry: VariantEntry, weights: dict):
        self.component = component
        self.name = component.name
        self.device = component.device
        self.entry = entry
        # Constants are bound before the first call: a code-only package called without them crashes the process.
        self._runner = _open(artifact / entry.package, self.device, component.unpack, component.concurrency)
        expected = set(self._runner.constant_names())
        if expected != set(weights):
            missing = sorted(expected - set(weights))[:5]
            extra = sorted(set(weights) - expected)[:5]
            raise ArtifactError(
                f"{self.name}: {entry.package} expects constants that its weights file does not match "
                f"(missing: {missing}, unexpected: {extra}); rebuild the artifact"
            )
        self._runner.bind(weights)
        # CUDA graphs replay fixed shapes; a dynamic variant's shapes change from call to call, so it runs as is.
        self._graphs = _GraphReplay(self) if component.cuda_graphs and not entry.dynamic else None
        if component.cuda_graphs and entry.dynamic:
            logger.info("%s: the dynamic-shape variant (%s) runs without CUDA graphs", self.name, _describe(entry))

    def __call__(self, values: list[Any]) -> torch.Tensor:
        return self.run(self.check(values))

    def run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self._graphs is not None:
            return self._graphs(tensors)
        return self._runner(*tensors)[0]

    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        """Bind other weights (same names, shapes and dtypes); captured graphs hold the old addresses, so they go."""
        self._runner.bind(weights)
        if self._graphs is not None:
            self._graphs = _GraphReplay(self)

    def check(self, values: list[Any]) -> list[torch.Tensor]:
        """Check every input against what was compiled; returns the inputs as the package needs them."""
        sizes: dict[str, int] = {}
        specs = self.entry.inputs
        out: list[Any] = [None] * len(specs)
        # Coerced inputs (timesteps) take their shape from the others, so check those first.
        for i in sorted(range(len(specs)), key=lambda i: specs[i].coerce):
            out[i] = self._check(specs[i], values[i], sizes)
        return out

    def _check(self, spec: TensorSpec, value: Any, sizes: dict[str, int]) -> torch.Tensor:
        where = f"{self.name}: input {spec.name!r}"
        dtype = _dtype(spec.dtype)
        if value is None:
            raise InputMismatchError(f"{where} is required by the compiled code, but the call passed none")
        if spec.coerce:
            # The eager module broadcasts and casts these itself (a scalar int64 timestep, say), so do the same.
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            if value.numel() == 1:
                value = value.reshape(()).expand([sizes.get(d, 0) if isinstance(d, str) else d for d in spec.shape])
            value = value.to(device=self.device, dtype=dtype)
        if not torch.is_tensor(value):
            raise InputMismatchError(f"{where} must be a tensor, found {type(value).__name__}")
        if not self._shape_fits(spec, value, sizes):
            expected = tuple(self._render(d) for d in spec.shape)
            shown = "(" + ", ".join(expected) + ("," if len(expected) == 1 else "") + ")"
            raise InputMismatchError(
                f"{where} has shape {tuple(value.shape)}, but this artifact was compiled for {shown} "
                f"({_describe(self.entry)}); {self._shape_hint(spec, value)}"
            )
        if value.dtype != dtype:
            raise InputMismatchError(
                f"{where} has dtype {str(value.dtype).removeprefix('torch.')}, but this artifact was compiled for "
                f"{spec.dtype}; load the pipeline with its own dtype (diffbake.load does) and do not cast it"
            )
        if value.device != self.device and not (self.device.type == value.device.type and self.device.index is None):
            raise InputMismatchError(
                f"{where} is on {value.device}, but this artifact runs on {self.device}; "
                f"keep the pipeline on {self.device}"
            )
        # A package compiled for contiguous inputs returns wrong numbers for other strides: make it what was compiled.
        return value.contiguous()

    def _shape_fits(self, spec: TensorSpec, value: torch.Tensor, sizes: dict[str, int]) -> bool:
        if value.dim() != len(spec.shape):
            return False
        for want, have in zip(spec.shape, value.shape, strict=True):
            if isinstance(want, int):
                if want != have:
                    return False
            elif want in sizes:
                if sizes[want] != have:  # one symbol, one size: the batch of every input must agree
                    return False
            elif self.entry.dims[want].admits(have):
                sizes[want] = have
            else:
                return False
        return True

    def _render(self, size: int | str) -> str:
        if isinstance(size, int):
            return str(size)
        d = self.entry.dims[size]
        return f"{d.min}..{d.max}" + (f" (multiple of {d.multiple})" if d.multiple > 1 else "")

    def _shape_hint(self, spec: TensorSpec, value: torch.Tensor) -> str:
        s = self.entry.shapes
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
        only_batch_differs = (
            fixed is not None and value.dim() == len(spec.shape) and list(value.shape[1:]) == spec.shape[1:]
        )
        if only_batch_differs and self.entry.cfg and value.shape[0] * 2 == fixed:
            return (
                f"this artifact was built with cfg = true for {_fmt(s['batch'])} image(s) per call: call with "
                f"guidance_scale > 1 (guidance_scale <= 1 turns classifier-free guidance off) and "
                f"{_fmt(s['batch'])} image(s) in all, or rebuild with [components.{self.name}] cfg = false"
            )
        if only_batch_differs and self.entry.cfg is False and value.shape[0] == fixed * 2:
            return (
                f"this artifact was built with cfg = false for {_fmt(s['batch'])} image(s) per call: call with "
                f"guidance_scale <= 1 (a larger one turns classifier-free guidance on) and {_fmt(s['batch'])} "
                f"image(s) in all, or rebuild with [components.{self.name}] cfg = true"
            )
        call = f"height={_fmt(s['height'])}, width={_fmt(s['width'])}"
        if s.get("text_tokens"):
            call += f", max_sequence_length={_fmt(s['text_tokens'])}"
        return (
            f"call the pipeline with {call} and {_fmt(s['batch'])} image(s) in all (prompts x "
            f"num_images_per_prompt), or rebuild with [components.{self.name}] shapes set for this call"
        )


class _GraphReplay:
    """CUDA graphs of one static-shape variant: launch overhead paid once per shape, not once per kernel and step.

    The first call at a shape runs as is (lazy initialization, allocator warm-up); the second captures a graph
    after a warm-up on a side stream and checks that the graph's output equals an uncaptured run's on the same
    inputs; every later call copies its inputs into the graph's buffers, replays it, and returns a copy of its
    output buffer (the next replay overwrites it). A capture that fails or disagrees turns graphs off for the
    variant, with a warning, rather than serving different numbers.
    """

    def __init__(self, variant: _CompiledVariant):
        self.variant = variant
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, Any]] = {}
        self.off: str | None = None
        # Replicas share this object; a graph has one set of buffers, so replays take turns.
        self.lock = threading.Lock()

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        with self.lock:
            return self._call(tensors)

    def _call(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        run = self.variant._runner
        if self.off is not None:
            return run(*tensors)[0]
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:
                self.seen.add(key)
                return run(*tensors)[0]
            graph = self._capture(key, tensors)
            if graph is None:
                return run(*tensors)[0]
        inputs, output, cuda_graph = graph
        for buffer, t in zip(inputs, tensors, strict=True):
            buffer.copy_(t)
        cuda_graph.replay()
        return output.clone()

    def _capture(self, key: tuple, tensors: list[torch.Tensor]) -> tuple | None:
        run, device = self.variant._runner, self.variant.device
        inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    expected = run(*inputs)[0].clone()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = run(*inputs)[0]
            graph.replay()
            torch.cuda.synchronize(device)
        except Exception as e:  # capture is refused for many reasons (a host sync, an unsupported op)
            return self._turn_off(f"capture failed ({type(e).__name__}: {e})")
        error = (output.float() - expected.float()).abs().max().item()
        bound = 1e-3 * expected.float().abs().max().item() + 1e-5
        if not error <= bound:
            return self._turn_off(f"the captured graph's output differs from an uncaptured run by {error:.3g}")
        self.graphs[key] = (inputs, output, graph)
        return self.graphs[key]

    def _turn_off(self, why: str) -> None:
        self.off = why
        logger.warning("%s: CUDA graphs off for %s: %s", self.variant.name, _describe(self.variant.entry), why)
        return None


def _bind_call(
    where: str, signature: inspect.Signature, owner: Any, names: list[str], args: tuple, kwargs: dict
) -> dict[str, Any]:
    """Bind a call to the eager signature; refuse arguments that change the result but were not compiled."""
    bound = signature.bind(owner, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    compiled = {name.split(".")[0] for name in names}
    for name, value in arguments.items():
        default = signature.parameters[name].default
        # None, the default, or an empty kwargs dict (Flux passes joint_attention_kwargs={}) change nothing.
        unused = value is None or value is default or (isinstance(value, dict) and not value) or value == default
        if name not in compiled and name != "return_dict" and not unused:
            raise InputMismatchError(
                f"{where}: argument {name!r} is not part of the compiled code (it was compiled for "
                f"{', '.join(names)}); call without it"
            )
    return arguments


def _open(path: Path, device: torch.device, unpack: Path, runners: int = 1) -> Package:
    return Package(
        path,
        device.type,
        folder=unpack,
        machine=platform.machine(),
        device_index=device.index if device.index is not None else -1,
        runners=runners,
    )


def _check_weights(entry: ComponentEntry, weights: dict[str, torch.Tensor]) -> None:
    """Check loaded weights against the manifest's constants, and restore each one's recorded layout in place.

    load_constants checks no shape, dtype or stride: a mismatch would compute garbage, so check them here.
    """
    specs = entry.constants
    if set(weights) != set(specs):
        missing = sorted(set(specs) - set(weights))[:5]
        extra = sorted(set(weights) - set(specs))[:5]
        raise ArtifactError(
            f"{entry.name}: {entry.weights} does not hold the constants the manifest lists "
            f"(missing: {missing}, unexpected: {extra}); rebuild the artifact"
        )
    for key, spec in specs.items():
        t = weights[key]
        if list(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise ArtifactError(
                f"{entry.name}: constant {key!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                f"but the package was compiled for {spec.dtype} {spec.shape}; rebuild the artifact"
            )
        if list(t.stride()) != spec.stride:
            # safetensors stores tensors contiguous; restore the layout the package was compiled with.
            weights[key] = _restride(t, spec.stride)


def _restride(t: torch.Tensor, stride: list[int]) -> torch.Tensor:
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


class _CompiledModel(ModelMixin, ConfigMixin):
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
        self._program = program
        self._signature = inspect.signature(getattr(self._stands_for, self._method))

    @property
    def device(self) -> torch.device:
        return self._program.device

    @property
    def dtype(self) -> torch.dtype:
        return self._program.dtype

    def to(self, *args: Any, **kwargs: Any) -> _CompiledModel:
        # Compiled code runs on one device in one dtype; moving it is not possible, so only a no-op move passes.
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != self.device.type:
            raise InputMismatchError(
                f"{self._program.name}: this compiled component runs on {self.device} only; it cannot move to "
                f"{device}; rebuild the recipe with [target] device = {torch.device(device).type!r}"
            )
        if dtype is not None and dtype != self.dtype:
            raise InputMismatchError(
                f"{self._program.name}: this compiled component runs in {self.dtype} only; it cannot be cast to "
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
            f"{self._program.name}: {what} does not apply to compiled code, whose attention, layout and memory "
            "use were fixed when the artifact was built; call the pipeline without it (set what the recipe "
            "offers, such as fuse_qkv or compiler options, and rebuild)"
        )

    def _invoke(self, args: tuple, kwargs: dict) -> Any:
        """Call the compiled code as the eager method would be called, and return what it would return."""
        names = self._program.input_names
        for name in self._ignored:
            kwargs.pop(name, None)
        arguments = _bind_call(self._program.name, self._signature, self, names, args, kwargs)
        sample = self._program(flatten_call(names, arguments))
        return self._output(sample=sample) if arguments.get("return_dict", True) else (sample,)


class CompiledUNet2DConditionModel(_CompiledModel):
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


class CompiledFluxTransformer2DModel(_CompiledModel, CacheMixin):
    """Stands in for ``FluxTransformer2DModel``; ``cache_context`` comes from diffusers' CacheMixin."""

    _stands_for = FluxTransformer2DModel
    _output = Transformer2DModelOutput

    def forward(self, *args: Any, **kwargs: Any):
        return self._invoke(args, kwargs)


class CompiledAutoencoderKL(_CompiledModel):
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
STAND_INS: dict[str, type[_CompiledModel]] = {
    "UNet2DConditionModel": CompiledUNet2DConditionModel,
    "FluxTransformer2DModel": CompiledFluxTransformer2DModel,
    "AutoencoderKL": CompiledAutoencoderKL,
}


class _CompiledBlock:
    """Replaces one block instance's ``forward``: checks the inputs, runs the group's package on its weights."""

    def __init__(self, component: str, fqn: str, block: torch.nn.Module, entry: BlockEntry, runner: Any, built: str):
        self.where = f"{component}: block {fqn!r}"
        self.built = built
        self.entry = entry
        self.signature = inspect.signature(type(block).forward)
        self.block = block
        self.runner = runner
        self.device = next(iter(block.parameters())).device
        self.names = [spec.name for spec in entry.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = self.names
        arguments = _bind_call(self.where, self.signature, self.block, names, args, kwargs)
        tensors = []
        for spec, value in zip(self.entry.inputs, flatten_call(names, arguments), strict=True):
            if (
                not torch.is_tensor(value)
                or list(value.shape) != spec.shape
                or str(value.dtype) != f"torch.{spec.dtype}"
            ):
                found = (
                    f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
                    if torch.is_tensor(value)
                    else repr(value)
                )
                raise InputMismatchError(
                    f"{self.where}: input {spec.name!r} is {found}, but it was compiled for {spec.dtype} "
                    f"{tuple(spec.shape)} ({self.built}); a regional build runs exactly these shapes: call the "
                    "pipeline with them, or rebuild with the shapes of this call"
                )
            tensors.append(value.to(self.device).contiguous())
        out = self.runner(*tensors)
        return tuple(out) if self.entry.outputs else out[0]


# Eager classes a regional artifact may rebuild from its config (never a class named by the artifact alone).
REGIONAL_CLASSES = ("UNet2DConditionModel", "FluxTransformer2DModel")


def load_regional(
    artifact: str | Path, entry: ComponentEntry, device: str, unpack: Path | None = None, concurrency: int = 1
) -> torch.nn.Module:
    """Rebuild a regionally compiled component: the eager module from its config and weights, each repeated
    block's forward replaced by its group's compiled package bound to that block's own weights (no copy)."""
    import diffusers
    from safetensors.torch import load_file

    artifact = Path(artifact)
    if entry.class_name not in REGIONAL_CLASSES:
        raise ArtifactError(f"{entry.name}: regional class {entry.class_name!r} is not one of {REGIONAL_CLASSES}")
    config = json.loads((artifact / entry.config).read_text(encoding="utf-8"))
    with torch.device("meta"):
        module = getattr(diffusers, entry.class_name).from_config(config)
    weights = load_file(artifact / entry.weights, device=str(torch.device(device)))
    _check_weights(entry, weights)
    expected = set(module.state_dict())
    if set(weights) != expected:
        raise ArtifactError(
            f"{entry.name}: {entry.weights} does not hold the state dict of {entry.class_name} with this config "
            f"(missing: {sorted(expected - set(weights))[:5]}); rebuild the artifact"
        )
    module.load_state_dict(weights, strict=True, assign=True)
    module.eval().requires_grad_(False)
    unpack = unpack or resolve_unpack_dir()
    for block_entry in entry.blocks:
        for fqn in block_entry.instances:
            try:
                block = module.get_submodule(fqn)
            except AttributeError:
                raise ArtifactError(
                    f"{entry.name}: block {fqn!r} is not part of {entry.class_name}; rebuild the artifact"
                ) from None
            runner = _open(artifact / block_entry.package, torch.device(device), unpack, concurrency)
            names = runner.constant_names()
            state = {f"block.{k}": v for k, v in block.state_dict(keep_vars=True).items()}
            if not set(names) <= set(state):
                raise ArtifactError(
                    f"{entry.name}: {block_entry.package} does not fit block {fqn!r}; rebuild the artifact"
                )
            # user_managed: the package reads the block's own parameters in place; nothing is copied.
            runner.bind({n: state[n].detach() for n in names})
            block.forward = _CompiledBlock(entry.name, fqn, block, block_entry, runner, _describe(entry.variants[0]))
    return module


def load_component(
    artifact: str | Path,
    manifest: Manifest,
    name: str,
    device: str | None = None,
    unpack: Path | None = None,
    concurrency: int = 1,
    cuda_graphs: bool = False,
) -> torch.nn.Module:
    """Build the stand-in module of one compiled component (no checks of files or host; :func:`load` does those)."""
    artifact = Path(artifact)
    entry = manifest.components[name]
    if entry.mode == "regional":
        if cuda_graphs:
            logger.info("%s: regional blocks run without CUDA graphs", name)
        return load_regional(artifact, entry, device or manifest.device, unpack, concurrency)
    cls = STAND_INS.get(entry.class_name)
    if cls is None:
        raise ArtifactError(
            f"{name}: compiled class {entry.class_name!r} has no stand-in in this diffbake; "
            f"known: {', '.join(STAND_INS)}; upgrade diffbake"
        )
    program = CompiledComponent(artifact, entry, device or manifest.device, unpack, concurrency, cuda_graphs)
    return cls(program, _read_config(artifact / entry.config))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: not a JSON config ({type(e).__name__}); rebuild the artifact") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: not a JSON object; rebuild the artifact")
    return config


def run_self_test(root: Path, manifest: Manifest, modules: dict[str, torch.nn.Module]) -> list[str]:
    """Replay every variant's recorded call on the loaded modules; returns one line per variant checked.

    Raises:
        SelfTestError: a variant's output differs from what the build recorded.
    """
    lines = []
    for name, module in modules.items():
        entry = manifest.components[name]
        for i, variant in enumerate(entry.variants):
            where = f"{name} variant {i + 1}/{len(entry.variants)} ({_describe(variant)})"
            inputs = self_test_inputs(variant, variant.self_test, getattr(module, "device", manifest.device))
            with torch.no_grad():
                if isinstance(module, _CompiledModel):
                    out = module._program.variants[i](inputs)
                else:
                    kwargs = unflatten_call([s.name for s in variant.inputs], inputs)
                    out = module(**kwargs, return_dict=False)[0]
            problem = compare(variant.self_test, out)
            if problem is not None:
                raise SelfTestError(
                    f"{root}: self-test of {where} failed: {problem}; this host computes differently from the build "
                    "host: rebuild the artifact on (or for) this host, and report it with DIFFBAKE_DEBUG=1 output"
                )
            lines.append(f"{where}: matches the build")
    return lines


def load(
    artifact: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    build: str | None = None,
    device: str | None = None,
    verify: str | None = None,
    self_test: bool = False,
    unpack_dir: str | Path | None = None,
    progress: Callable[[str, str], None] | None = None,
    concurrency: int = 1,
    cuda_graphs: bool = False,
):
    """Load an artifact as a diffusers pipeline whose denoiser and VAE decoder run the compiled code.

    Everything that can be checked is checked before the first compiled library is loaded, in this order: the
    manifest (strict schema), the host (torch, device, CUDA, GPU, CPU instruction sets, platform), every file
    (size and sha256, nothing unlisted) and every package (an allow-list of entries: no sources, no pickles).

    Args:
        artifact: the artifact folder written by ``diffbake build``, or a Hub repo id ("org/name") that
            ``diffbake push`` wrote to; a local folder of that name wins.
        revision: for a Hub repo, the commit sha to load (a branch or tag is refused: it can move).
        trust_remote_code: must be True for a Hub repo: its builds are native code that runs in this process.
        build: for a Hub repo, the build folder to use; by default the one that fits this host (a GPU build
            first, then the CPU build using most of this CPU's instruction sets).
        device: where to run; defaults to the device the artifact was built for ("cpu" or "cuda[:N]").
        verify: "full" hashes every file; "stamp" skips the hashing if a stamp recorded by an earlier full
            verification on this host still matches every file's size, mtime, ctime and inode. The default is
            "full" for a local folder and "stamp" for a Hub build, whose files are hashed once, when fetched.
        self_test: replay the call recorded at build on each compiled variant and compare the output.
        unpack_dir: where packages are extracted before loading; default $DIFFBAKE_UNPACK_DIR, else the
            temporary folder. It must allow executing programs (not mounted noexec).
        progress: called with (stage, detail) as each check passes; by default they are logged.
        concurrency: how many denoiser (and VAE) calls may run at once, from pipelines made with
            :func:`replicate`; each extra runner costs activation memory only, never a weight copy.
        cuda_graphs: on a CUDA artifact, replay each static-shape variant as a CUDA graph (captured on the
            second call at a shape, checked against an uncaptured run); dynamic-shape variants and regional
            blocks run as they are. Needs ``concurrency=1``: a graph replays into one set of buffers.

    Returns:
        A ``diffusers.DiffusionPipeline`` (e.g. ``StableDiffusionPipeline``), used as usual:
        ``pipe(prompt, num_inference_steps=..., generator=...)``.

    Raises:
        TrustError: a Hub repo without ``trust_remote_code=True`` or without a pinned commit sha; nothing was
            requested from the Hub.
        ArtifactNotFoundError: no artifact at that path, no such repo or commit, or (HF_HUB_OFFLINE=1) not cached.
        HubError: the Hub failed a request.
        ArtifactError: the artifact is malformed, a file differs from its manifest (IntegrityError), or the
            self-test failed (SelfTestError).
        CompatibilityError: the artifact (for a Hub repo: every build, each listed with its reason) was built
            for another device, torch, platform or CPU, or the unpack folder cannot hold executable code.
    """
    import diffusers

    start = time.perf_counter()
    root = Path(artifact)
    report = progress or (lambda stage, detail: logger.info("%s: %s", stage, detail))
    if verify not in (None, "full", "stamp"):
        raise ValueError(f"verify must be 'full' or 'stamp', not {verify!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, not {concurrency!r}")
    if cuda_graphs and concurrency != 1:
        raise ValueError(
            f"cuda_graphs=True needs concurrency=1 (found {concurrency}): a captured graph replays into one set of "
            "buffers, so concurrent calls would overwrite each other's results"
        )
    if is_repo_id(artifact):
        check_remote(str(artifact), revision, trust_remote_code=trust_remote_code)
        root, _ = fetch(str(artifact), revision, device=device, build=build, progress=report)
        verify = verify or "stamp"
    elif revision is not None or build is not None:
        raise ValueError(
            f"{artifact}: revision= and build= apply to Hub repo ids; this is a local path, loaded as it is"
        )
    verify = verify or "full"
    if not root.exists():
        raise ArtifactNotFoundError(f"{root}: no such artifact folder; build one with `diffbake build RECIPE`")
    manifest = read_manifest(root)
    report("manifest", f"format {manifest.format_version}, {manifest.pipeline_class}, {len(manifest.files)} files")
    device = device or manifest.device
    check_compatibility(manifest, torch.device(device).type)
    if cuda_graphs and manifest.device != "cuda":
        raise ValueError(
            f"{root}: cuda_graphs=True applies to CUDA artifacts; this one was built for {manifest.device!r}"
        )
    unpack = resolve_unpack_dir(unpack_dir)
    report("host", f"{device}, torch {torch.__version__}, cpu_isa {manifest.host.cpu_isa}, unpack into {unpack}")
    how = verify_files(root, manifest, use_stamp=verify == "stamp")
    total = sum(f.size for f in manifest.files.values())
    report(
        "files",
        f"{len(manifest.files)} files, {total / 1e6:.1f} MB, "
        + ("stamp matched" if how == "stamp" else "sha256 checked"),
    )
    packages = package_paths(manifest)
    for package in packages:
        inspect_package(root / package, manifest.device, platform.machine())
    report("packages", f"{len(packages)} inspected: one library each, no sources, no pickles")

    family = FAMILIES[manifest.source["family"]]
    modules = {
        name: load_component(root, manifest, name, device, unpack, concurrency, cuda_graphs)
        for name in manifest.components
    }
    report("weights", f"{sum(len(c.constants) for c in manifest.components.values())} tensors bound and checked")
    if self_test:
        for line in run_self_test(root, manifest, modules):
            report("self-test", line)
    overrides = {("vae" if name == VAE_DECODER else name): module for name, module in modules.items()}
    pipeline_cls = getattr(diffusers, manifest.pipeline_class)
    with _stand_ins_accepted():
        # use_safetensors: the eager components load from safetensors only, never from pickled checkpoints.
        pipe = pipeline_cls.from_pretrained(
            root / manifest.pipeline, dtype=_dtype(manifest.dtype), use_safetensors=True, **overrides
        )
    pipe.to(device)
    _set_default_size(pipe, family.denoiser, manifest)
    # What set_weights and replicate need to know about the artifact this pipeline runs.
    pipe._diffbake_artifact = LoadedArtifact(root, manifest, device)
    pipe.set_weights = bound_set_weights(pipe)
    report("pipeline", f"{manifest.pipeline_class} loaded in {time.perf_counter() - start:.2f} s")
    return pipe


def compiled_call(manifest: Manifest) -> dict[str, Any]:
    """Pipeline-call keyword arguments that fit what was compiled: the size and images per call of the
    denoiser's first variant (the VAE's if only it is compiled), at the low end of a dynamic range, and no
    guidance where no CFG batch was compiled."""
    family = FAMILIES[manifest.source["family"]]
    entry = manifest.components.get(family.denoiser) or manifest.components[VAE_DECODER]
    variant = entry.variants[0]
    low = {k: (v[0] if isinstance(v, list) else v) for k, v in variant.shapes.items()}
    kwargs: dict[str, Any] = {"height": low["height"], "width": low["width"], "num_images_per_prompt": low["batch"]}
    if low.get("text_tokens"):
        kwargs["max_sequence_length"] = low["text_tokens"]
    if variant.cfg is False:
        kwargs["guidance_scale"] = 1.0  # built without a CFG batch: the pipeline must not ask for guidance
    return kwargs


def bound_set_weights(pipe: Any) -> Callable[..., None]:
    """``pipe.set_weights(artifact)``: :func:`diffbake.set_weights` as a method of the loaded pipeline."""

    def set_weights(artifact: str | Path, *, verify: str = "full") -> None:
        from .serving import set_weights as swap

        swap(pipe, artifact, verify=verify)

    return set_weights


@dataclass(frozen=True)
class LoadedArtifact:
    root: Path
    manifest: Manifest
    device: str


def package_paths(manifest: Manifest) -> list[str]:
    """Every compiled package an artifact holds, relative to its folder."""
    return [package for entry in manifest.components.values() for package in entry.packages]


class _DropStandInTypeWarnings(logging.Filter):
    # The pipeline's constructor warns that a stand-in is not the annotated eager class; that is the point of it.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for") and "diffbake.runtime.Compiled" in message)


@contextlib.contextmanager
def _stand_ins_accepted() -> Iterator[None]:
    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    quiet = _DropStandInTypeWarnings()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _set_default_size(pipe: Any, denoiser: str, manifest: Manifest) -> None:
    # A bare pipe(prompt) should ask for the compiled size, not the model's native one.
    entry = manifest.components.get(denoiser)
    shapes = entry.variants[0].shapes if entry is not None else {}
    if not isinstance(shapes.get("height"), int) or shapes["height"] != shapes["width"]:
        return
    latent = shapes["height"] // pipe.vae_scale_factor
    if hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = latent
    module = getattr(pipe, denoiser)
    if isinstance(module, _CompiledModel) and "sample_size" in module.config:
        module.register_to_config(sample_size=latent)
