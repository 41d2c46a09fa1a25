"""A component's call contract, derived from captured calls: its tensor inputs and their dynamic dimensions,
the Python values it is compiled for, and the example inputs export and the checks use.

A variant with ranges is captured at several points: an example (each range at its second step, since export
specializes a size it traces at 1), then each range alone at its other end, then all at their minimum and all at
their maximum. A tensor dimension that no range moves is static. One that follows a single recipe size is an
affine function of it (``2 * batch`` with guidance, ``height / 8`` for a latent, ``77 + text_tokens`` for SD3's
joint text), and all of them share one ``torch.export.Dim`` per recipe size. One that follows several sizes at
once (Flux's image tokens, ``(h / 16) * (w / 16)``) becomes a dimension of its own, over the range captured.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from diffbake.builder.capture import Captured
from diffbake.errors import BuildError
from diffbake.format.manifest import DimSpec, TensorSpec
from diffbake.runtime.guards import call_leaves, plain

_SMALL = 64  # inputs with at most this many elements are replayed by the self-test as captured


@dataclass(frozen=True)
class Range:
    """One recipe size that is a range: ``min..max`` in steps of ``step`` (pixels, images or tokens)."""

    min: int
    max: int
    step: int

    @property
    def example(self) -> int:
        """The second step of the range where it has one (export specializes a dimension traced at 1)."""
        k = max(2, -(-self.min // self.step))
        return min(k * self.step, self.max // self.step * self.step)


@dataclass
class Point:
    """Recipe sizes at which the pipeline was called, and the call captured there."""

    sizes: dict[str, int]
    call: Captured


def points_for(static: dict[str, int], ranges: dict[str, Range]) -> list[dict[str, int]]:
    """The sizes to capture at: the example, each range alone at its other end, then all at min and all at max."""
    example = {**static, **{d: r.example for d, r in ranges.items()}}
    points = [example]
    for d, r in ranges.items():
        points.append({**example, d: r.max if r.max != example[d] else r.min})
    if ranges:
        points.append({**static, **{d: r.min for d, r in ranges.items()}})
        points.append({**static, **{d: r.max for d, r in ranges.items()}})
    unique: list[dict[str, int]] = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


@dataclass
class Contract:
    specs: list[TensorSpec]
    dims: dict[str, DimSpec]
    constants: dict[str, Any]
    ignored: list[str]
    example: list[torch.Tensor]  # the inputs at the example point
    largest: list[torch.Tensor] | None  # the inputs with every range at its maximum (None: static)
    example_sizes: dict[str, int]  # each dynamic dimension's size at the example point
    fill: dict[str, list[float]]  # small inputs at the example point, flattened, for the self-test
    doubled_batch: bool  # the leading dimension is twice the images per call (classifier-free guidance)
    # Arguments the pipeline passed as lists, which the eager module may consume (the UNet pops T2I-Adapter's
    # down_intrablock_additional_residuals): the build calls it with lists there, not the tuples a flat call
    # rebuilds.
    lists: frozenset[str] = frozenset()


def derive(
    name: str,
    points: list[Point],
    ranges: dict[str, Range],
    promote: set[str] = frozenset(),
    scalars: set[str] = frozenset(),
) -> Contract:
    """The contract of one variant from its captures (``points[0]`` the example).

    ``promote``: integer inputs the build found to give the same result as float32 (timesteps), compiled as
    float32 so that any scheduler's timesteps fit. ``scalars``: float arguments compiled as 0-d float32 tensor
    inputs (ControlNet's ``conditioning_scale``), so that each call may pass its own.

    Raises:
        BuildError: the calls differ in a way no dynamic dimension can express, or pass what cannot be compiled.
    """
    # return_dict is the stand-in's to honour (it returns what the eager method would), not part of the call.
    leaves = [dict(call_leaves({k: v for k, v in p.call.arguments.items() if k != "return_dict"})) for p in points]
    for leaf in leaves:
        leaf.update({path: torch.tensor(float(leaf[path])) for path in scalars})
    paths = list(leaves[0])
    for p, found in zip(points[1:], leaves[1:], strict=True):
        if list(found) != paths:
            raise BuildError(
                f"{name}: the pipeline passes other arguments at {_sizes(p.sizes)} than at {_sizes(points[0].sizes)} "
                f"({', '.join(sorted(set(found) ^ set(paths)))}); give static shapes for this component"
            )
    tensors, constants, ignored = [], {}, []
    for path in paths:
        values = [leaf[path] for leaf in leaves]
        if torch.is_tensor(values[0]):
            _same_kind(name, path, values)
            tensors.append(path)
        elif _is_generator(values[0]):
            ignored.append(path)
        else:
            constants[path] = _constant(name, path, values, points)
    symbols = _Dimensions(name, points, ranges)
    specs = []
    for path in tensors:
        t = leaves[0][path]
        shape = [symbols.of(path, axis, [leaf[path].shape[axis] for leaf in leaves]) for axis in range(t.dim())]
        dtype = "float32" if path in promote else str(t.dtype).removeprefix("torch.")
        # Timesteps, guidance and other per-sample scalars: the eager module broadcasts and casts them, and the
        # scheduler decides their form, so the stand-in does the same (see guards.check_inputs).
        coerce = t.dim() <= 1 and (t.is_floating_point() or path in promote)
        specs.append(TensorSpec(path, shape, dtype, coerce=coerce))
    dims = symbols.finish()
    largest_at = next((i for i, p in enumerate(points) if all(p.sizes[d] == r.max for d, r in ranges.items())), None)

    def inputs(i: int) -> list[torch.Tensor]:
        return [leaves[i][s.name].to(getattr(torch, s.dtype)) for s in specs]

    example = inputs(0)
    # Small inputs and integer ones are replayed as captured; complex ones (Lumina's rotary embeddings) are seeded
    # noise in the self-test, as large float ones are.
    fill = {
        s.name: t.flatten().tolist()
        for s, t in zip(specs, example, strict=True)
        if not t.is_complex() and (t.numel() <= _SMALL or not t.is_floating_point())
    }
    batch = points[0].sizes["batch"]
    leading = [t.shape[0] for t in example if t.dim() >= 1]
    return Contract(
        specs=specs,
        dims=dims,
        constants=constants,
        ignored=ignored,
        example=example,
        largest=inputs(largest_at) if ranges and largest_at is not None else None,
        example_sizes={d: symbols.sizes[d][0] for d in dims},
        fill={k: [float(x) for x in v] for k, v in fill.items()},
        doubled_batch=2 * batch in leading and batch not in leading,
        lists=frozenset(k for k, v in points[0].call.arguments.items() if isinstance(v, list)),
    )


def _sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _same_kind(name: str, path: str, values: list[torch.Tensor]) -> None:
    first = values[0]
    if first.layout != torch.strided:
        raise BuildError(f"{name}: input {path!r} is a {first.layout} tensor; only dense tensors can be compiled")
    for v in values[1:]:
        if not torch.is_tensor(v) or v.dim() != first.dim() or v.dtype != first.dtype:
            raise BuildError(
                f"{name}: input {path!r} changes rank or dtype between the captured calls ({first.dtype} "
                f"{tuple(first.shape)} and {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}); "
                "give static shapes for this component"
            )


def _is_generator(value: Any) -> bool:
    return isinstance(value, torch.Generator) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(g, torch.Generator) for g in value)
    )


def _constant(name: str, path: str, values: list[Any], points: list[Point]) -> Any:
    try:
        recorded = plain(values[0])
    except ValueError as e:
        raise BuildError(
            f"{name}: the pipeline passes argument {path!r} as {e}, which is neither a tensor nor a plain value; "
            "it cannot be compiled"
        ) from None
    for p, v in zip(points[1:], values[1:], strict=True):
        if plain(v) != recorded:
            raise BuildError(
                f"{name}: argument {path!r} is the Python value {recorded!r} at {_sizes(points[0].sizes)} but "
                f"{plain(v)!r} at {_sizes(p.sizes)}; compiled code fixes Python values, so give static shapes for "
                "this component"
            )
    return recorded


class _Dimensions:
    """Groups the captured tensor dimensions into static sizes and named dynamic dimensions."""

    def __init__(self, name: str, points: list[Point], ranges: dict[str, Range]):
        self.name, self.points, self.ranges = name, points, ranges
        # the point where only recipe size d moved from the example
        self.moved = {
            d: next(i for i, p in enumerate(points) if p.sizes[d] != points[0].sizes[d] and _only(p, points[0], d))
            for d in ranges
        }
        self.groups: dict[Any, str] = {}  # group key -> symbol
        self.sizes: dict[str, list[int]] = {}  # symbol -> its size at each point
        self.fits: dict[str, tuple[str, Fraction, Fraction]] = {}  # symbol -> (recipe size, slope, intercept)

    def of(self, path: str, axis: int, sizes: list[int]) -> int | str:
        deps = [d for d, i in self.moved.items() if sizes[i] != sizes[0]]
        if not deps:
            if len(set(sizes)) != 1:
                raise BuildError(
                    f"{self.name}: dimension {axis} of input {path!r} changes between captured calls "
                    f"({sizes}) in a way that follows no single recipe size; give static shapes for this component"
                )
            return sizes[0]
        if len(deps) > 1:
            key: Any = ("joint", tuple(sizes))
            if key not in self.groups:
                symbol = "_x_".join(deps)
                symbol = symbol if symbol not in self.sizes else f"{symbol}_{len(self.sizes)}"
                self.groups[key] = symbol
                self.sizes[symbol] = sizes
            return self.groups[key]
        d = deps[0]
        xs = [p.sizes[d] for p in self.points]
        i = self.moved[d]
        slope = Fraction(sizes[i] - sizes[0], xs[i] - xs[0])
        intercept = sizes[0] - slope * xs[0]
        if slope <= 0 or any(s != slope * x + intercept for s, x in zip(sizes, xs, strict=True)):
            raise BuildError(
                f"{self.name}: dimension {axis} of input {path!r} follows {d} ({dict(zip(xs, sizes, strict=True))}) "
                "but not as a * size + b; it cannot be expressed as a torch.export dimension: give a static "
                f"{d} for this component"
            )
        key = (d, slope, intercept)
        if key not in self.groups:
            symbol = d if d not in self.sizes else f"{d}_{len([s for s in self.fits if self.fits[s][0] == d])}"
            self.groups[key] = symbol
            self.sizes[symbol] = sizes
            self.fits[symbol] = (d, slope, intercept)
        return self.groups[key]

    def finish(self) -> dict[str, DimSpec]:
        dims = {}
        for symbol, sizes in self.sizes.items():
            if symbol not in self.fits:
                dims[symbol] = DimSpec(min(sizes), max(sizes))
                continue
            d, slope, intercept = self.fits[symbol]
            r = self.ranges[d]
            multiple = slope * r.step
            if multiple.denominator != 1 or intercept.denominator != 1:
                raise BuildError(
                    f"{self.name}: a dimension is {slope} * {d} + {intercept}, which is not a whole number for every "
                    f"{d} in steps of {r.step}; it cannot be expressed as a torch.export dimension: give a static {d}"
                )
            lo, hi = slope * r.min + intercept, slope * r.max + intercept
            # A dimension named after its recipe size is that size's own index; others name it as their base.
            dims[symbol] = DimSpec(int(lo), int(hi), int(multiple), int(intercept), base="" if symbol == d else d)
        return dims


def _only(p: Point, example: Point, d: str) -> bool:
    return all(p.sizes[k] == example.sizes[k] for k in p.sizes if k != d)
