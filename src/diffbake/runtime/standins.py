"""The stand-in module: what the diffusers pipeline holds where an eager module stood. One class for every
compiled module, made per eager class from what the build recorded.

diffusers asks more of a module than an ``nn.Module`` gives (``from_pretrained(..., unet=obj)`` wants a
``ModelMixin``, Flux calls ``transformer.cache_context``, SDXL reads ``unet.add_embedding.linear_1.in_features``).
The build captured what the pipeline reads (``ComponentEntry.attributes``) and which diffusers mixins' methods it
calls (``mixins``), so a stand-in carries the eager module's config, those values and mixins, and the eager
method's signature and output class; the call itself goes to a :class:`~diffbake.runtime.compiled.CompiledComponent`.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

from diffbake.errors import InputMismatchError
from diffbake.format.components import COMPONENTS, components_of
from diffbake.format.manifest import ComponentEntry, flatten_call
from diffbake.runtime.guards import bound_arguments
from diffbake.runtime.outputs import as_tuple, check_returns, library_class, rebuild_output

if TYPE_CHECKING:
    from diffbake.runtime.compiled import CompiledComponent


class CompiledModel(ModelMixin, ConfigMixin):
    """Base of the stand-ins: a config, a device and dtype, and compiled programs in place of parameters, one per
    compiled method (the VAE's ``decode`` and ``encode`` are two components of one module)."""

    config_name = "config.json"
    _stands_for: type[torch.nn.Module]

    def __init__(self, programs: dict[str, CompiledComponent], config: dict[str, Any], entries: list[ComponentEntry]):
        super().__init__()
        self.programs = programs
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if "force_upcast" in config:
            # The dtype is fixed at build time, so the pipelines' upcast-the-VAE-to-float32 path must not run.
            config["force_upcast"] = False
        self.register_to_config(**config)
        # method -> (its component, the eager signature, the tree it returns in)
        self._calls = {
            e.method: (programs[e.name], inspect.signature(getattr(self._stands_for, e.method)), e.returns)
            for e in entries
        }
        for e in entries:
            check_returns(e.name, e.returns)
        self._attributes = _tree({k: v for e in entries for k, v in e.attributes.items()})
        self._first = programs[entries[0].name]

    def __getattr__(self, name: str) -> Any:
        attributes = self.__dict__.get("_attributes")
        if attributes is not None and name in attributes:
            return attributes[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            if callable(getattr(self._stands_for, name, None)) and not name.startswith("_"):
                return functools.partial(self._not_compiled, name)
            raise

    def __repr__(self) -> str:
        return f"Compiled{self._stands_for.__name__}({', '.join(self.programs)})"

    @property
    def diffbake_components(self) -> dict[str, CompiledComponent]:
        """The compiled components behind this module, by name (what ``diffbake.set_weights`` rebinds)."""
        return self.programs

    @property
    def device(self) -> torch.device:
        return self._first.device

    @property
    def dtype(self) -> torch.dtype:
        return self._first.dtype

    def to(self, *args: Any, **kwargs: Any) -> CompiledModel:
        # Compiled code runs on one device in one dtype; moving it is not possible, so only a no-op move passes.
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != self.device.type:
            raise InputMismatchError(
                f"{self._label}: this compiled component runs on {self.device} only; it cannot move to "
                f"{device}; rebuild the recipe with [target] device = {torch.device(device).type!r}"
            )
        if dtype is not None and dtype != self.dtype:
            raise InputMismatchError(
                f"{self._label}: this compiled component runs in {self.dtype} only; it cannot be cast to "
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

    def enable_slicing(self) -> None:
        self._not_applicable("VAE slicing (enable_vae_slicing)")

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("VAE tiling (enable_vae_tiling)")

    def enable_cache(self, *args: Any, **kwargs: Any) -> None:
        # diffusers' CacheMixin would look for the model's block lists, find none in a stand-in, and do nothing.
        raise InputMismatchError(
            f"{self._label}: diffusers' step caches (First Block Cache, MagCache, TaylorSeer, FasterCache) skip or "
            "reuse the work of the model's repeated blocks, but this artifact runs the whole model as one compiled "
            'call, with no block to skip; rebuild it with mode = "regional" in its recipe section, whose blocks '
            "each run their own compiled package and take the caches as the eager model does"
        )

    @property
    def _label(self) -> str:
        return " and ".join(self.programs)

    def _not_applicable(self, what: str) -> None:
        raise InputMismatchError(
            f"{self._label}: {what} does not apply to compiled code, whose attention, layout and memory "
            "use were fixed when the artifact was built; call the pipeline without it (set what the recipe "
            "offers, such as fuse_qkv or compiler options, and rebuild)"
        )

    def _not_compiled(self, method: str, *args: Any, **kwargs: Any) -> None:
        eager = self._stands_for.__name__
        compiled = ", ".join(f"{eager}.{m}" for m in self._calls)
        attribute = COMPONENTS[next(iter(self.programs))].attribute
        other = next((n for n in components_of(attribute) if COMPONENTS[n].method == method), None)
        fix = f"; name [components.{other}] in the recipe to compile it too" if other else ""
        raise InputMismatchError(
            f"{self._label}: only {compiled} is compiled into this artifact, and {eager}.{method} needs the eager "
            f"module{fix}"
        )

    def _invoke(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the compiled code as the eager method would be called, and return what it would return."""
        program, signature, returns = self._calls[method]
        arguments = bound_arguments(signature, self, args, kwargs)
        outputs = program(flatten_call(program.input_names, arguments), arguments)
        value = rebuild_output(program.name, returns, outputs) if returns is not None else outputs[0]
        return as_tuple(value) if arguments.get("return_dict", True) is False else value


def _compiled(method: str) -> Any:
    def call(self: CompiledModel, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(method, *args, **kwargs)

    call.__name__ = method
    return call


@functools.cache
def stand_in_class(eager: type, methods: tuple[str, ...], mixins: tuple[type, ...]) -> type[CompiledModel]:
    """The stand-in class for ``eager`` whose ``methods`` run compiled code (one class per eager class).

    ``isinstance(stand_in, eager)`` holds, as pipelines check it (``isinstance(self.controlnet, ControlNetModel)``,
    and ``from_pretrained`` of a transformers text encoder): ``__class__`` names the eager class, as
    ``unittest.mock`` does for a spec; ``type()`` still tells the stand-in.
    """
    namespace: dict[str, Any] = {"_stands_for": eager, "__module__": __name__}
    namespace.update({m: _compiled(m) for m in methods})
    namespace["__class__"] = property(lambda self: eager)
    if "forward" not in methods:
        namespace["forward"] = functools.partialmethod(CompiledModel._not_compiled, "forward")
    return type(f"Compiled{eager.__name__}", (CompiledModel, *mixins), namespace)


def make_stand_in(
    programs: dict[str, CompiledComponent], config: dict[str, Any], entries: list[ComponentEntry]
) -> CompiledModel:
    """The stand-in of one pipeline module whose compiled components are ``entries`` (all of one attribute), from
    their manifest entries and the eager module's config.

    Raises:
        ArtifactError: an entry names an eager class or mixin that is not part of diffusers or transformers.
    """
    first = entries[0]
    eager = library_class(first.name, first.class_name, torch.nn.Module)
    mixins = tuple(sorted({library_class(e.name, m, object) for e in entries for m in e.mixins}, key=str))
    return stand_in_class(eager, tuple(e.method for e in entries), mixins)(programs, config, entries)


def _tree(attributes: dict[str, Any]) -> dict[str, Any]:
    """Dotted attribute paths as nested namespaces: {"add_embedding.linear_1.in_features": 32} ->
    {"add_embedding": namespace(linear_1=namespace(in_features=32))}."""
    root: dict[str, Any] = {}
    for path, value in attributes.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def build(node: Any) -> Any:
        return SimpleNamespace(**{k: build(v) for k, v in node.items()}) if isinstance(node, dict) else node

    return {k: build(v) for k, v in root.items()}
