"""Transforms applied to a component before export, in a fixed order: fuse QKV -> channels_last -> quantize.

(The dtype is applied when the pipeline is loaded.) Each transform returns what it did, for the manifest.
Quantized weights are torchao tensor subclasses; :func:`unwrap_for_export` turns them into plain tensors behind
parametrizations, so export sees plain constants (int8 data and scales under ``...parametrizations.weight.*``)
that safetensors can store and the runtime can bind, with no pickle.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch

from diffbake.builder.recipe import QUANT_METHODS, Quantization
from diffbake.builder.regional import repeated_blocks
from diffbake.errors import BuildError, RecipeError

logger = logging.getLogger(__name__)

# Max abs error allowed between the compiled and the eager quantized component: atol + rtol * max|eager|.
# Compiled int8/float8 kernels round activations differently from torchao's eager path.
QUANT_TOLERANCES: dict[str, tuple[float, float]] = {
    "int8_weight_only": (1e-2, 1e-2),
    "int8_dynamic": (5e-2, 5e-2),
    "float8_weight_only": (5e-2, 5e-2),
    "float8_dynamic": (1e-1, 1e-1),
}


def fuse_qkv(name: str, module: torch.nn.Module) -> None:
    """Fuse attention Q, K and V projections into one matmul (diffusers' fuse_qkv_projections)."""
    if not hasattr(module, "fuse_qkv_projections"):
        raise RecipeError(
            f"[components.{name}] fuse_qkv = true: {type(module).__name__} has no fuse_qkv_projections; remove the key"
        )
    module.fuse_qkv_projections()


def channels_last(module: torch.nn.Module) -> None:
    """Store 4-D weights channels_last, the layout CPU and GPU convolution kernels prefer."""
    module.to(memory_format=torch.channels_last)


def quantize(name: str, module: torch.nn.Module, q: Quantization, blocks_only: bool = False) -> dict[str, Any]:
    """Quantize the linears that match, in place. Returns what was done, for the manifest.

    ``blocks_only`` (a regional build): only linears inside the repeated blocks, whose compiled packages carry the
    quantized kernels; the rest of the model runs eager, in the plain dtype, with no torchao at run time.

    Raises:
        BuildError: no linear matched the patterns and size limit, or torchao failed.
    """
    import torchao.quantization as tq
    from torchao.core.config import config_to_dict

    # set_inductor_config=False: torchao would otherwise change global inductor settings for the whole process.
    config = getattr(tq, QUANT_METHODS[q.method])(set_inductor_config=False)
    chosen: list[str] = []
    blocks = tuple(f"{fqn}." for fqn in repeated_blocks(name, module)) if blocks_only else ("",)

    def wanted(mod: torch.nn.Module, fqn: str) -> bool:
        ok = _matches(mod, fqn, q) and fqn.startswith(blocks)
        if ok:
            chosen.append(fqn)
        return ok

    _refuse_crashing_shapes(name, module, q, blocks)
    try:
        tq.quantize_(module, config, filter_fn=wanted)
    except Exception as e:  # torchao raises many unrelated types
        raise BuildError(f"{name}: torchao {q.method} quantization failed ({type(e).__name__}: {e})") from e
    if not chosen:
        raise BuildError(
            f"{name}: quantization {q.method} matched no linear layer{' of a repeated block' if blocks_only else ''} "
            f"(include {list(q.include)}, exclude {list(q.exclude)}, min_features {q.min_features}); widen the "
            "patterns or lower min_features"
        )
    logger.info("%s: %s quantized %d linear layers", name, q.method, len(chosen))
    done = {**q.to_dict(), "layers": len(chosen), "config": _jsonable(config_to_dict(config))}
    return {**done, "scope": "repeated blocks"} if blocks_only else done


def _matches(mod: torch.nn.Module, fqn: str, q: Quantization) -> bool:
    return (
        isinstance(mod, torch.nn.Linear)
        and any(fnmatch.fnmatchcase(fqn, p) for p in q.include)
        and not any(fnmatch.fnmatchcase(fqn, p) for p in q.exclude)
        and min(mod.in_features, mod.out_features) >= q.min_features
    )


def _refuse_crashing_shapes(name: str, module: torch.nn.Module, q: Quantization, within: tuple[str, ...]) -> None:
    """int8_weight_only in half precision on the CPU: torch 2.13's AOTInductor kernel for it (``_weight_int8pack_mm``)
    crashes the process when a linear's in_features is not a multiple of 16 (measured: 16, 32, 48 run; 8, 24, 40
    segfault; float32 is not affected). Refuse such a build with the layers and the fix instead of crashing."""
    weight = next((p for p in module.parameters()), None)
    if q.method != "int8_weight_only" or weight is None:
        return
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return
    bad = [
        fqn
        for fqn, mod in module.named_modules()
        if _matches(mod, fqn, q) and fqn.startswith(within) and mod.in_features % 16
    ]
    if bad:
        raise BuildError(
            f"{name}: int8_weight_only in {str(weight.dtype).removeprefix('torch.')} on the CPU crashes torch "
            f"{torch.__version__}'s compiled kernel for linear layers whose in_features is not a multiple of 16 "
            f"({len(bad)} here, first: {', '.join(bad[:3])}); exclude them (quantization.exclude), quantize with "
            "int8_dynamic, or build in float32"
        )


def unwrap_for_export(module: torch.nn.Module) -> None:
    """Replace torchao tensor subclasses by plain tensors behind parametrizations (a no-op without any)."""
    from torchao.utils import unwrap_tensor_subclass

    unwrap_tensor_subclass(module)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
