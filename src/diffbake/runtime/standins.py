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
import importlib
import inspect
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

from diffbake.errors import ArtifactError, InputMismatchError
from diffbake.format.manifest import ComponentEntry, flatten_call

if TYPE_CHECKING:
    from diffbake.runtime.compiled import CompiledComponent


class CompiledModel(ModelMixin, ConfigMixin):
    """Base of the stand-ins: a config, a device and dtype, and a compiled program in place of parameters."""

    config_name = "config.json"
    _stands_for: type[torch.nn.Module]
    _method = "forward"

    def __init__(self, program: CompiledComponent, config: dict[str, Any], entry: ComponentEntry):
        super().__init__()
        self.component = program
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if "force_upcast" in config:
            # The dtype is fixed at build time, so the pipelines' upcast-the-VAE-to-float32 path must not run.
            config["force_upcast"] = False
        self.register_to_config(**config)
        self._signature = inspect.signature(getattr(self._stands_for, self._method))
        self._output = _output_class(entry)
        self._attributes = _tree(entry.attributes)

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

    def enable_slicing(self) -> None:
        self._not_applicable("VAE slicing (enable_vae_slicing)")

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        self._not_applicable("VAE tiling (enable_vae_tiling)")

    def _not_applicable(self, what: str) -> None:
        raise InputMismatchError(
            f"{self.component.name}: {what} does not apply to compiled code, whose attention, layout and memory "
            "use were fixed when the artifact was built; call the pipeline without it (set what the recipe "
            "offers, such as fuse_qkv or compiler options, and rebuild)"
        )

    def _not_compiled(self, method: str, *args: Any, **kwargs: Any) -> None:
        eager = self._stands_for.__name__
        raise InputMismatchError(
            f"{self.component.name}: only {eager}.{self._method} is compiled into this artifact; {eager}.{method} "
            "needs the eager module (img2img and inpainting call vae.encode, for one)"
        )

    def _invoke(self, *args: Any, **kwargs: Any) -> Any:
        """Call the compiled code as the eager method would be called, and return what it would return."""
        bound = self._signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self._signature.parameters)))  # self
        sample = self.component(flatten_call(self.component.input_names, arguments), arguments)
        if not arguments.get("return_dict", True):
            return (sample,)
        if self._output is None:
            raise InputMismatchError(
                f"{self.component.name}: the build did not record what {self._method} returns with "
                "return_dict=True; call it with return_dict=False"
            )
        cls, field = self._output
        return cls(**{field: sample})

    def _only_method(self, *args: Any, **kwargs: Any) -> Any:
        self._not_compiled("forward")


@functools.cache
def stand_in_class(eager: type, method: str, mixins: tuple[type, ...]) -> type[CompiledModel]:
    """The stand-in class for ``eager`` whose ``method`` runs compiled code (one class per eager class)."""
    namespace: dict[str, Any] = {"_stands_for": eager, "_method": method, "__module__": __name__}
    namespace[method] = CompiledModel._invoke
    if method != "forward":
        namespace["forward"] = CompiledModel._only_method
    return type(f"Compiled{eager.__name__}", (CompiledModel, *mixins), namespace)


def make_stand_in(program: CompiledComponent, config: dict[str, Any], entry: ComponentEntry) -> CompiledModel:
    """The stand-in of one compiled component, from its manifest entry and the eager module's config.

    Raises:
        ArtifactError: the entry names an eager class or mixin that is not part of diffusers.
    """
    eager = _diffusers_class(entry.name, entry.class_name, ModelMixin)
    mixins = tuple(_diffusers_class(entry.name, m, object) for m in entry.mixins)
    return stand_in_class(eager, entry.method, mixins)(program, config, entry)


def _diffusers_class(component: str, name: str, base: type) -> type:
    """A class of diffusers named by the manifest: looked up in diffusers only, never imported from elsewhere."""
    module_name, _, attr = name.rpartition(".")
    try:
        if not module_name:
            import diffusers

            cls = getattr(diffusers, attr)
        elif module_name == "diffusers" or module_name.startswith("diffusers."):
            cls = getattr(importlib.import_module(module_name), attr)
        else:
            raise AttributeError(name)
    except (AttributeError, ImportError):
        cls = None
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise ArtifactError(
            f"{component}: {name!r} is not a {base.__name__} class of this diffusers; rebuild the artifact with it"
        )
    return cls


def _output_class(entry: ComponentEntry) -> tuple[type, str] | None:
    if entry.output_class is None:
        return None
    from diffusers.utils import BaseOutput

    return _diffusers_class(entry.name, entry.output_class.class_name, BaseOutput), entry.output_class.field


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
