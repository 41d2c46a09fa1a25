"""diffusers' step caches on loaded artifacts: First Block Cache skips the later blocks of a denoising step when
the first block's output has barely changed since the step before, and reuses their residual.

They are diffusers' own hooks (``denoiser.enable_cache(config)``), which wrap each repeated block's forward. In a
regional artifact every block is still a module of the eager denoiser, running its compiled package, so the hooks
apply unchanged; a full-graph artifact runs the whole denoiser as one compiled call, with no block to skip, and
its stand-in refuses them (``CompiledModel.enable_cache``).
"""

from __future__ import annotations

from typing import Any

from diffbake.format.components import COMPONENTS, STEP_CACHES
from diffbake.runtime.serving import loaded_artifact


def step_cache_config(method: str, threshold: float) -> Any:
    """The diffusers config of a step cache method of :data:`~diffbake.format.components.STEP_CACHES`."""
    import diffusers

    return getattr(diffusers, STEP_CACHES[method])(threshold=threshold)


def parse_step_cache(spec: str) -> Any:
    """A diffusers cache config from ``METHOD:THRESHOLD`` (``first-block:0.08``: First Block Cache at 0.08).

    Raises:
        ValueError: an unknown method, or a threshold that is not a positive number.
    """
    name, colon, value = spec.partition(":")
    method = name.replace("-", "_")
    if method not in STEP_CACHES or not colon:
        known = ", ".join(f"{m.replace('_', '-')}:THRESHOLD" for m in STEP_CACHES)
        raise ValueError(f"{spec!r} is not a step cache; expected one of {known} (e.g. first-block:0.08)")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not threshold > 0:
        raise ValueError(f"{spec!r}: the threshold must be a positive number (e.g. {name}:0.08)")
    return step_cache_config(method, threshold)


def enable_step_cache(pipe: Any, config: Any) -> None:
    """Turn on a diffusers step cache on the denoiser of a pipeline loaded with :func:`diffbake.load` (replacing
    one its recipe turned on).

    Raises:
        InputMismatchError: the denoiser is compiled as one graph (build it with ``mode = "regional"``).
    """
    denoiser = getattr(pipe, loaded_artifact(pipe).manifest.denoiser)
    if getattr(denoiser, "is_cache_enabled", False):
        denoiser.disable_cache()
    denoiser.enable_cache(config)


def enable_recorded_step_cache(pipe: Any, manifest: Any) -> None:
    """Turn on the step cache the recipe asked for (a regional component's ``step_cache``), as a load does."""
    for name, entry in manifest.components.items():
        if entry.step_cache is not None:
            module = getattr(pipe, COMPONENTS[name].attribute)
            module.enable_cache(step_cache_config(entry.step_cache["method"], entry.step_cache["threshold"]))
