"""What a compiled method returns: a tree recorded at build, rebuilt around the package's output tensors.

A package returns a flat list of tensors. The build records how they sat in what the eager method returned
(``ComponentEntry.returns``), as JSON:

- ``{"tensor": i}``: the package's output ``i``;
- ``{"tuple": [...]}`` / ``{"list": [...]}``: a sequence of nodes (ControlNet's down-block residuals);
- ``{"class": "diffusers.....ControlNetOutput", "args": {field: node}}``: an output class of diffusers or
  transformers, or one of the distributions in ``format.components.DISTRIBUTIONS`` (the VAE encoder's
  ``latent_dist``), rebuilt as ``cls(**args)``; an argument that is not a node is a plain JSON value.

So ``vae.encode`` compiles what produces the distribution's parameters, and the loader rebuilds the
``DiagonalGaussianDistribution`` from them: ``sample(generator)`` and ``mode()`` then run as in eager.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from diffbake.errors import ArtifactError
from diffbake.format.components import DISTRIBUTIONS


def flatten_output(value: Any) -> tuple[Any, list[torch.Tensor]]:
    """``value`` (what an eager method returned) as (its tree, its tensors in order).

    Raises:
        ValueError: ``value`` holds something that is neither a tensor, a sequence, an output class, a known
            distribution nor a plain value.
    """
    tensors: list[torch.Tensor] = []

    def walk(v: Any) -> Any:
        if torch.is_tensor(v):
            tensors.append(v)
            return {"tensor": len(tensors) - 1}
        name = f"{type(v).__module__}.{type(v).__qualname__}"
        if name in DISTRIBUTIONS:
            return {"class": name, "args": {k: walk(getattr(v, k)) for k in DISTRIBUTIONS[name]}}
        if _is_output_class(type(v)):
            # An output class: its non-None fields, in order (what to_tuple() gives with return_dict=False).
            return {"class": name, "args": {k: walk(x) for k, x in v.items() if x is not None}}
        if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return {"tuple" if isinstance(v, tuple) else "list": [walk(x) for x in v]}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise ValueError(f"a {type(v).__name__}")

    return walk(value), tensors


def rebuild_output(component: str, tree: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`flatten_output`, for a tree read from a manifest.

    Raises:
        ArtifactError: the tree names a class that is not an output class of diffusers or transformers, nor a
            known distribution.
    """
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "tuple" in tree:
        return tuple(rebuild_output(component, n, tensors) for n in tree["tuple"])
    if "list" in tree:
        return [rebuild_output(component, n, tensors) for n in tree["list"]]
    cls = output_class(component, tree["class"])
    return cls(**{k: rebuild_output(component, n, tensors) for k, n in tree["args"].items()})


def as_tuple(value: Any) -> Any:
    """What the eager method returns with ``return_dict=False``: an output class as its tuple of fields."""
    return value.to_tuple() if hasattr(value, "to_tuple") else value


def library_class(component: str, name: str, base: type, what: str | None = None) -> type:
    """A class a manifest names, a subclass of ``base``: looked up in diffusers (a bare name, or a diffusers
    module) or a transformers module, never imported from elsewhere. ``what`` names it in the error.

    Raises:
        ArtifactError: no such class there, or not a ``base``.
    """
    module_name, _, attr = name.rpartition(".")
    try:
        if not module_name:
            import diffusers

            cls = getattr(diffusers, attr)
        elif module_name.split(".")[0] in ("diffusers", "transformers"):
            cls = getattr(importlib.import_module(module_name), attr)
        else:
            raise AttributeError(name)
    except (AttributeError, ImportError):
        cls = None
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise _foreign(component, name, what or f"a {base.__name__} class")
    return cls


@functools.cache
def output_class(component: str, name: str) -> type:
    """An output class or a listed distribution a manifest names (looked up once: rebuilt on every call)."""
    cls = library_class(component, name, object, "an output class")
    if not (name in DISTRIBUTIONS or _is_output_class(cls)):
        raise _foreign(component, name, "an output class")
    return cls


def check_returns(component: str, tree: Any) -> None:
    """Look up every class ``tree`` names, so that a foreign one is refused at load, not at the first call."""
    if not isinstance(tree, dict):
        return
    if "class" in tree:
        output_class(component, tree["class"])
        children = list(tree["args"].values())
    else:
        children = tree.get("tuple") or tree.get("list") or []
    for node in children:
        check_returns(component, node)


def _foreign(component: str, name: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{component}: {name!r} is not {what} of this diffusers or transformers; rebuild the artifact with them"
    )


def _is_output_class(cls: type) -> bool:
    from diffusers.utils import BaseOutput

    if issubclass(cls, BaseOutput):
        return True
    try:
        from transformers.utils import ModelOutput
    except ImportError:
        return False
    return issubclass(cls, ModelOutput)


__all__ = ["as_tuple", "check_returns", "flatten_output", "library_class", "output_class", "rebuild_output"]
