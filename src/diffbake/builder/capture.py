"""How a pipeline calls its modules, captured from real calls.

The eager pipeline runs at a variant's sizes with its required inputs only (a prompt, class labels or a batch
size, as its ``__call__`` takes them), for a step or two, with a hook on the compiled module's method. The hook
records what the pipeline really passes (bound to the method's signature, defaults applied), what the method
returns, and what the pipeline reads from the module from outside its calls (``unet.add_embedding.linear_1
.in_features``, ``transformer.cache_context``): what a stand-in must carry. The run stops as soon as every
hooked module has been called once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from diffbake.errors import BuildError, DiffbakeError, RecipeError
from diffbake.format.components import COMPONENTS, DENOISERS, area_call, bins_resolution, components_of
from diffbake.runtime.guards import bound_arguments, plain

logger = logging.getLogger(__name__)

PROMPT = "a photo of an astronaut riding a horse"
# A second call with prompts of other lengths (the negative one of a third) finds the pipelines that pass text at
# each prompt's own length rather than padded to max_sequence_length (Z-Image, Qwen-Image).
OTHER_PROMPTS = {"prompt": "a cat", "negative_prompt": "a photo of a dog"}
STEPS = 2  # enough for every scheduler; the run stops at the first call of the modules it waits for


@dataclass
class Captured:
    """One call of a module's method as the pipeline made it."""

    arguments: dict[str, Any]  # bound to the method's signature, defaults applied, without self; tensors cloned
    output: Any  # what the method returned (tensors cloned)
    reads: dict[str, Any] = field(default_factory=dict)  # attribute path -> value, read from outside the calls


def pipeline_kwargs(
    pipe: Any, sizes: dict[str, int], guidance: float | None = None, prompts: dict[str, str] | None = None
) -> dict[str, Any]:
    """The call of ``pipe`` that makes ``sizes["batch"]`` images at the given size with only what it requires
    (and ``guidance_scale = guidance`` unless it is None: the pipeline's default). ``prompts``: other prompts
    than :data:`PROMPT` (``prompt``, ``negative_prompt``), each where the pipeline takes it.

    Raises:
        BuildError: the pipeline's ``__call__`` takes neither a prompt, class labels, a batch size nor an image.
    """
    params = inspect.signature(type(pipe).__call__).parameters
    steps = STEPS
    strength = params["strength"].default if "strength" in params else None
    if isinstance(strength, float) and 0 < strength * steps < 1:
        # An img2img pipeline runs int(steps * strength) steps (SDXL's default 0.3 of 2 is none): enough for one.
        steps = math.ceil(1 / strength) + 1
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(0)}
    batch = sizes["batch"]
    prompts = prompts or {}
    if "prompt" in params:
        prompt = prompts.get("prompt", PROMPT)
        if "num_images_per_prompt" in params:
            kwargs.update(prompt=prompt, num_images_per_prompt=batch)
        else:
            kwargs["prompt"] = [prompt] * batch
        if "negative_prompt" in prompts and "negative_prompt" in params:
            negative = prompts["negative_prompt"]
            kwargs["negative_prompt"] = negative if "num_images_per_prompt" in params else [negative] * batch
    elif "class_labels" in params:
        kwargs["class_labels"] = list(range(batch))
    elif "batch_size" in params:
        kwargs["batch_size"] = batch
    elif "image" in params and "num_images_per_prompt" in params:
        kwargs["num_images_per_prompt"] = batch  # conditioned on an image alone (image variation): passed below
    else:
        raise BuildError(
            f"{type(pipe).__name__}: its __call__ takes no prompt, class_labels, batch_size or image, so diffbake "
            "cannot tell how to ask it for a number of images"
        )
    for dim in ("height", "width"):
        if dim in params:
            kwargs[dim] = sizes[dim]
    for key in IMAGE_INPUTS:
        if key in params:  # img2img, inpainting, a control image, a Kontext reference: one image at the size
            width, height = sizes["width"], sizes["height"]
            if key == "image":  # the image to edit or refer to, where the recipe gives it a size of its own
                width, height = sizes.get("image_width", width), sizes.get("image_height", height)
            kwargs[key] = example_image(width, height, mask=key in MASK_INPUTS)
    # Kontext: at a preferred resolution max_area and the auto-resize change nothing, so a default call fits.
    kwargs.update(area_call(type(pipe), sizes["height"], sizes["width"]))
    if "text_tokens" in sizes:
        kwargs["max_sequence_length"] = sizes["text_tokens"]
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return kwargs


# The image arguments of diffusers pipelines that the capture passes one image for: the image to edit (img2img,
# inpainting, Kontext) or the control image (ControlNet's ``image``; ``control_image`` where ``image`` is edited),
# and the masks: inpainting's, and SD3 ControlNet inpainting's ``control_mask`` (which it requires).
IMAGE_INPUTS = ("image", "mask_image", "control_image", "control_mask")
MASK_INPUTS = ("mask_image", "control_mask")


def example_image(width: int, height: int, mask: bool = False) -> Any:
    """A seeded image of the given size (a mask: the right half white), as a user would pass one."""
    import numpy as np
    from PIL import Image

    if mask:
        values = np.zeros((height, width), dtype=np.uint8)
        values[:, width // 2 :] = 255
        return Image.fromarray(values, mode="L")
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


class _Done(Exception):
    """Raised from a hook once every awaited module has been called: the rest of the pipeline is not needed."""


def capture(pipe: Any, names: list[str], kwargs: dict[str, Any]) -> dict[str, Captured]:
    """Run ``pipe(**kwargs)`` until each component in ``names`` has been called once; return those calls.

    Raises:
        BuildError: the pipeline failed, or finished without calling one of the components.
    """
    _refuse_attention_swaps(pipe, names)
    calls: dict[str, Captured] = {}
    reads = _Reads()
    with contextlib.ExitStack() as stack:
        stack.callback(reads.restore)  # last out: every watched module gets its own class back
        for name in names:
            stack.enter_context(_hooked(pipe, name, calls, reads, set(names)))
        try:
            with torch.no_grad():
                try:
                    pipe(**kwargs)
                except (ValueError, RuntimeError) as e:
                    unbinned = _without_binning(pipe, kwargs)
                    if unbinned is None or calls or isinstance(e, DiffbakeError):  # a hook's refusal: not binning
                        raise
                    # PixArt's and SANA's default binning knows only the transformers of their released sizes
                    # and refuses any call of another one ("Invalid sample size"), and HunyuanDiT's rounds every
                    # size to its table of ~1024-pixel ones, which a smaller transformer fails on: such a pipeline
                    # is only ever called with binning off, and the capture calls it so too.
                    if isinstance(e, RuntimeError):
                        logger.warning(
                            "%s failed with its resolution binning on (%s: %s); the build calls it with "
                            "use_resolution_binning=False, and so must the artifact's users",
                            type(pipe).__name__,
                            type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "",
                        )
                    pipe(**unbinned)
        except _Done:
            pass
        except ValueError as e:  # the pipeline's own input checks: the recipe asks for what it cannot make
            raise RecipeError(
                f"{type(pipe).__name__} refuses the call {_describe_call(kwargs)}: {e}; give shapes it accepts"
            ) from e
        except Exception as e:
            raise BuildError(
                f"{type(pipe).__name__}: the eager pipeline failed when called as "
                f"{_describe_call(kwargs)} ({type(e).__name__}: {e}); the recipe's shapes may not suit this "
                "pipeline"
            ) from e
    missing = [n for n in names if n not in calls]
    if missing:
        raise BuildError(
            f"{type(pipe).__name__}: called as {_describe_call(kwargs)}, the pipeline never called "
            f"{', '.join(f'{COMPONENTS[n].attribute}.{COMPONENTS[n].method}' for n in missing)}; "
            "remove those components from the recipe"
        )
    for name, call in calls.items():
        call.reads = reads.of(COMPONENTS[name].attribute)
    return calls


def _refuse_attention_swaps(pipe: Any, names: list[str]) -> None:
    """Refuse to compile the denoiser of a perturbed-attention-guidance pipeline.

    Raises:
        RecipeError: ``pipe`` is a PAG pipeline and ``names`` include its denoiser.
    """
    try:
        from diffusers.pipelines.pag.pag_utils import PAGMixin
    except ImportError:  # a diffusers without PAG
        return
    if not isinstance(pipe, PAGMixin):
        return
    for name in names:
        attribute = COMPONENTS[name].attribute
        if attribute in DENOISERS:
            cls = type(pipe).__name__
            plain_cls = cls.replace("PAG", "")
            raise RecipeError(
                f"{cls}: perturbed-attention guidance swaps the attention processors of its {attribute} on every "
                f"call, which compiled code has built in; save the pipeline without PAG "
                f"({plain_cls}.from_pipe(pipe).save_pretrained(...)) and build from that, or leave "
                f"[components.{name}] out of the recipe"
            )


def save_config(module: torch.nn.Module, folder: Any) -> None:
    """The eager module's config as config.json in ``folder`` (diffusers' or transformers' own writer)."""
    if hasattr(module, "save_config"):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)


def config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def class_name(cls: type) -> str:
    """How the manifest names an eager class: bare for a class diffusers exports, else by module path."""
    import diffusers

    if getattr(diffusers, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def _without_binning(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``kwargs`` with the pipeline's resolution binning off (a fresh generator), or None if it has none to turn
    off."""
    if not bins_resolution(type(pipe)) or kwargs.get("use_resolution_binning", True) is False:
        return None
    return {**kwargs, "use_resolution_binning": False, "generator": torch.Generator().manual_seed(0)}


def _describe_call(kwargs: dict[str, Any]) -> str:
    shown = {k: v for k, v in kwargs.items() if k != "generator"}
    return "pipe(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@contextlib.contextmanager
def _hooked(pipe: Any, name: str, calls: dict[str, Captured], reads: _Reads, awaited: set[str]) -> Iterator[None]:
    component = COMPONENTS[name]
    module = getattr(pipe, component.attribute, None)
    if module is None:
        raise BuildError(f"{type(pipe).__name__} has no {component.attribute}; remove [components.{name}]")
    original = getattr(module, component.method)
    signature = inspect.signature(getattr(type(module), component.method))

    def hook(*args: Any, **kwargs: Any) -> Any:
        # The arguments as passed, before the call: the UNet pops T2I-Adapter's
        # down_intrablock_additional_residuals from the list it is given.
        first = name not in calls
        arguments = _cloned(bound_arguments(signature, module, args, kwargs)) if first else None
        with reads.inside():
            out = original(*args, **kwargs)
        if first:
            calls[name] = Captured(arguments, _cloned(out))
            if awaited <= set(calls):
                raise _Done
        return out

    reads.watch(module, component.attribute + ".", ignore={component.method})
    setattr(module, component.method, hook)
    try:
        yield
    finally:
        delattr(module, component.method)  # the instance attribute: the class's method shows through again


def _cloned(value: Any) -> Any:
    if torch.is_tensor(value):
        # In the standard contiguous layout, which the loader gives every input (runtime.guards.check_tensor): the
        # compiled code assumes the example's strides, and diffusers' image processor makes channels-last views.
        return value.detach().clone(memory_format=torch.contiguous_format)
    if hasattr(value, "to_tuple"):  # a diffusers output (a dict too): the same class, its tensors cloned
        return type(value)(**{k: _cloned(v) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value) if not hasattr(value, "_fields") else value
    return value


class _Reads:
    """Records attribute reads on watched modules made from outside the modules' own code.

    A watched module's class is swapped for a subclass whose ``__getattribute__`` notes each public name read at
    depth 0 (reads made while a property or the hooked method runs are the module's own), and watches any
    submodule so read, so that ``unet.add_embedding.linear_1.in_features`` is recorded as one path.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.values: dict[str, Any] = {}
        self.swapped: list[tuple[torch.nn.Module, type]] = []

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def calling(self, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.inside():
                return method(*args, **kwargs)

        return call

    def watch(self, module: torch.nn.Module, prefix: str, ignore: set[str] = frozenset()) -> None:
        if any(m is module for m, _ in self.swapped):
            return
        reads, cls = self, type(module)

        class Watched(cls):  # type: ignore[misc, valid-type]
            def __getattribute__(self, name: str) -> Any:
                if reads.depth or name.startswith("_") or name in ignore:
                    return super().__getattribute__(name)
                with reads.inside():
                    try:
                        value = super().__getattribute__(name)
                    except AttributeError:  # submodules, parameters, buffers: nn.Module.__getattr__ finds them
                        value = cls.__getattr__(self, name)
                reads.seen(prefix + name, value)
                if inspect.ismethod(value) and value.__self__ is self:
                    return reads.calling(value)  # what the method reads itself is its own
                return value

        Watched.__name__, Watched.__qualname__, Watched.__module__ = cls.__name__, cls.__qualname__, cls.__module__
        module.__class__ = Watched
        self.swapped.append((module, cls))

    def seen(self, path: str, value: Any) -> None:
        if isinstance(value, torch.nn.Module):
            self.watch(value, path + ".")
        else:
            self.values.setdefault(path, value)

    def of(self, attribute: str) -> dict[str, Any]:
        prefix = attribute + "."
        return {k.removeprefix(prefix): v for k, v in self.values.items() if k.startswith(prefix)}

    def restore(self) -> None:
        while self.swapped:
            module, cls = self.swapped.pop()
            module.__class__ = cls


def stand_in_needs(
    name: str, module: torch.nn.Module, reads: dict[str, Any], compiled: set[str] = frozenset()
) -> tuple[dict[str, Any], list[str]]:
    """What a stand-in must carry beyond config, dtype and device, from what the pipeline read: plain values by
    attribute path, and the diffusers mixins whose methods it called. ``compiled``: the module's methods the
    recipe compiles (the stand-in has those).

    Raises:
        BuildError: the pipeline used something of the module that a compiled module cannot provide.
    """
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    provided = {"config", "dtype", "device", *config_dict(module)}
    attributes: dict[str, Any] = {}
    mixins: list[str] = []
    for path, value in sorted(reads.items()):
        if path.split(".")[0] in provided:
            continue
        if inspect.ismethod(value) and "." not in path:
            if path in compiled:
                continue
            attribute = COMPONENTS[name].attribute
            sibling = next((n for n in components_of(attribute) if COMPONENTS[n].method == path), None)
            if sibling is not None:
                raise RecipeError(
                    f"{name}: the pipeline calls {attribute}.{path}() too, which the stand-in of a compiled "
                    f"{attribute} cannot run eager; add [components.{sibling}] to the recipe to compile it as well"
                )
            owner = next(k for k in type(module).__mro__ if path in vars(k))
            if owner in (ModelMixin, ConfigMixin, torch.nn.Module, object):
                continue  # the stand-in is a ModelMixin too
            if owner is not type(module) and owner.__module__.startswith("diffusers."):
                mixins.append(f"{owner.__module__}.{owner.__qualname__}")
                continue
            raise BuildError(
                f"{name}: the pipeline calls {type(module).__name__}.{path}(), which a compiled module cannot "
                f"provide; {_keep_eager(name)}"
            )
        try:
            attributes[path] = plain(value)
        except ValueError:
            raise BuildError(
                f"{name}: the pipeline reads {path} of {type(module).__name__} ({type(value).__name__}), which a "
                f"compiled module does not carry; {_keep_eager(name)}"
            ) from None
    return attributes, sorted(set(mixins))


def _keep_eager(name: str) -> str:
    return f"keep the {COMPONENTS[name].attribute} eager: leave [components.{name}] out of the recipe"
