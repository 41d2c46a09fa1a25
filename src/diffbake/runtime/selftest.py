"""The self-test: a seeded call recorded at build, replayed on the serving host.

The build runs each compiled variant once on seeded inputs and records a summary of the output (shape, mean,
standard deviation, largest magnitude, and values at a few fixed positions). ``diffbake.load(...,
self_test=True)`` and ``diffbake verify`` replay the call and compare, so a host that computes differently
(another CPU, a driver bug, weights bound wrong) is caught before it serves. Runtime side: no build imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffbake.errors import SelfTestError
from diffbake.format.components import COMPONENTS
from diffbake.format.manifest import Manifest, SelfTest, VariantEntry, unflatten_call
from diffbake.runtime.guards import describe
from diffbake.runtime.outputs import flatten_output
from diffbake.runtime.standins import CompiledModel

PROBES = 16
SEED = 1234


def self_test_inputs(variant: VariantEntry, test: SelfTest, device: Any) -> list[torch.Tensor]:
    """The recorded call's inputs: seeded noise, except the ``fill`` inputs, which hold the captured values."""
    g = torch.Generator().manual_seed(test.seed)
    out = []
    for spec in variant.inputs:
        shape = [test.sizes[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name in test.fill:
            t = torch.tensor(test.fill[spec.name], dtype=torch.float64).reshape(shape)
        else:
            t = torch.randn(shape, generator=g)
        out.append(t.to(device=device, dtype=getattr(torch, spec.dtype)))
    return out


def _joined(outputs: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """The shape a summary records (the one output's, or the total size of several) and the values, flat."""
    flat = torch.cat([o.detach().float().flatten().cpu() for o in outputs])
    return (list(outputs[0].shape) if len(outputs) == 1 else [flat.numel()]), flat


def summarize(outputs: list[torch.Tensor], *, seed: int, sizes: dict, fill: dict, tolerance: float) -> SelfTest:
    return _summary(*_joined(outputs), seed=seed, sizes=sizes, fill=fill, tolerance=tolerance)


def _summary(shape: list[int], flat: torch.Tensor, *, seed: int, sizes: dict, fill: dict, tolerance: float) -> SelfTest:
    return SelfTest(
        seed=seed,
        sizes=dict(sizes),
        fill=dict(fill),
        shape=shape,
        mean=flat.mean().item(),
        std=flat.std().item() if flat.numel() > 1 else 0.0,
        abs_max=flat.abs().max().item(),
        probes=[flat[i].item() for i in _probe_indices(flat.numel())],
        tolerance=tolerance,
    )


def compare(recorded: SelfTest, outputs: list[torch.Tensor]) -> str | None:
    """None if ``outputs`` match the recorded summary within its tolerance, else what differs."""
    shape, flat = _joined(outputs)
    if shape != recorded.shape:
        return f"output shape {shape}, recorded {recorded.shape}"
    got = _summary(shape, flat, seed=recorded.seed, sizes={}, fill={}, tolerance=0.0)
    tol = recorded.tolerance
    values = [
        ("mean", got.mean, recorded.mean),
        ("std", got.std, recorded.std),
        ("max |x|", got.abs_max, recorded.abs_max),
    ]
    if len(recorded.probes) != len(got.probes):
        return f"{len(recorded.probes)} recorded values, expected {len(got.probes)}"
    indices = _probe_indices(flat.numel())
    values += [(f"value {i}", a, b) for i, a, b in zip(indices, got.probes, recorded.probes, strict=True)]
    for what, have, want in values:
        if not abs(have - want) <= tol:  # also false for NaN
            return f"{what} is {have:.6g}, recorded {want:.6g} (tolerance {tol:.3g})"
    return None


def _probe_indices(n: int) -> list[int]:
    if n <= PROBES:
        return list(range(n))
    return [round(i * (n - 1) / (PROBES - 1)) for i in range(PROBES)]


def run_self_test(root: Path, manifest: Manifest, modules: dict[str, torch.nn.Module]) -> list[str]:
    """Replay every variant's recorded call on the loaded modules; returns one line per variant checked.

    Raises:
        SelfTestError: a variant's output differs from what the build recorded.
    """
    lines = []
    for name, entry in manifest.components.items():
        module = modules[COMPONENTS[name].attribute]
        for i, variant in enumerate(entry.variants):
            where = f"{name} variant {i + 1}/{len(entry.variants)} ({describe(variant)})"
            inputs = self_test_inputs(variant, variant.self_test, getattr(module, "device", manifest.device))
            with torch.no_grad():
                if isinstance(module, CompiledModel):
                    out = module.diffbake_components[name].variants[i](inputs)
                else:  # regional: the eager module with compiled blocks, called as the build called it
                    kwargs = unflatten_call([s.name for s in variant.inputs], inputs, variant.constants)
                    out = flatten_output(getattr(module, entry.method)(**kwargs, return_dict=True))[1]
            problem = compare(variant.self_test, out)
            if problem is not None:
                raise SelfTestError(
                    f"{root}: self-test of {where} failed: {problem}; this host computes differently from the build "
                    "host: rebuild the artifact on (or for) this host, and report it with DIFFBAKE_DEBUG=1 output"
                )
            lines.append(f"{where}: matches the build")
    return lines
