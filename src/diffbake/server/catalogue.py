"""What an artifact serves, read from its manifest: image sizes, images per call, and guidance.

A call is served when every compiled component has a variant that admits its image count and size, and the
denoiser's variant was compiled for the call's guidance (classifier-free guidance doubles the denoiser's batch).
This is checked before a request is queued, so a client hears at once what it asked for that the artifact does
not run; the runtime's input guards remain the authority on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffbake.format.manifest import Manifest, VariantEntry


def _admits(value: int | list[int] | None, x: int) -> bool:
    if value is None:
        return True
    if isinstance(value, list):
        return value[0] <= x <= value[1]
    return value == x


def _describe(value: int | list[int]) -> str:
    return f"{value[0]}..{value[1]}" if isinstance(value, list) else str(value)


def _lowest(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


@dataclass(frozen=True)
class Catalogue:
    """The calls an artifact runs, for request checks and ``GET /v1/models``."""

    name: str
    pipeline: str
    dtype: str
    device: str
    denoiser: str | None
    # component name -> its variants' recipe shapes ("batch": images per call, "height"/"width": pixels) and cfg
    variants: dict[str, list[tuple[dict[str, Any], bool | None]]]

    @classmethod
    def from_manifest(cls, manifest: Manifest, name: str) -> Catalogue:
        return cls(
            name=name,
            pipeline=manifest.pipeline_class,
            dtype=manifest.dtype,
            device=manifest.device,
            denoiser=manifest.denoiser,
            variants={
                c: [(dict(v.shapes), v.cfg) for v in entry.variants if _has_sizes(v)]
                for c, entry in manifest.components.items()
            },
        )

    @property
    def guided(self) -> list[bool | None]:
        """The guidance modes the denoiser was compiled for: True (classifier-free guidance), False (none), None
        (guidance is an input of the model, as in Flux, or there is no denoiser variant to say)."""
        return sorted({cfg for _, cfg in self.variants.get(self.denoiser or "", [])}, key=str) or [None]

    def default_size(self) -> tuple[int, int]:
        """(width, height) of the denoiser's first variant (the lower end of a range)."""
        for shapes, _ in self.variants.get(self.denoiser or "", []) or next(iter(self.variants.values()), []):
            if "height" in shapes and "width" in shapes:
                return _lowest(shapes["width"]), _lowest(shapes["height"])
        raise ValueError(f"{self.name}: no compiled component records an image size")

    def text_tokens(self) -> int | None:
        """The text length the denoiser was compiled for (``max_sequence_length``; the top of a range), or None
        where the recipe left it to the pipeline."""
        for shapes, _ in self.variants.get(self.denoiser or "", []):
            if "text_tokens" in shapes:
                value = shapes["text_tokens"]
                return value[1] if isinstance(value, list) else value
        return None

    def default_count(self, width: int, height: int, guidance: bool | None) -> int:
        """The fewest images per call served at this size (1 where a variant admits it)."""
        counts = self.counts(width, height, guidance)
        return counts[0] if counts else 1

    def serves(self, width: int, height: int, n: int, guidance: bool | None) -> bool:
        """Whether a call of ``n`` images of ``width`` x ``height`` runs; ``guidance``: whether the call uses
        classifier-free guidance (None: unknown, any variant will do)."""
        for component, variants in self.variants.items():
            fits = [
                cfg
                for shapes, cfg in variants
                if _admits(shapes.get("batch"), n)
                and _admits(shapes.get("height"), height)
                and _admits(shapes.get("width"), width)
            ]
            if component == self.denoiser and guidance is not None:
                fits = [cfg for cfg in fits if cfg is None or cfg == guidance]
            if variants and not fits:
                return False
        return True

    def counts(self, width: int, height: int, guidance: bool | None) -> list[int]:
        """Every image count served at this size, up to 64."""
        return [n for n in range(1, 65) if self.serves(width, height, n, guidance)]

    def describe(self) -> list[str]:
        """The denoiser's variants, as ``WxH, n=N[, guidance]`` lines (ranges as lo..hi)."""
        out = []
        for shapes, cfg in self.variants.get(self.denoiser or "", []):
            text = f"{_describe(shapes['width'])}x{_describe(shapes['height'])} with n={_describe(shapes['batch'])}"
            if cfg is not None:
                text += " (with guidance)" if cfg else " (guidance_scale <= 1, no negative prompt)"
            out.append(text)
        return out

    def as_model(self) -> dict[str, Any]:
        """The entry of ``GET /v1/models``."""
        return {
            "id": self.name,
            "object": "model",
            "owned_by": "diffbake",
            "pipeline": self.pipeline,
            "dtype": self.dtype,
            "device": self.device,
            "sizes": self.describe(),
        }


def _has_sizes(variant: VariantEntry) -> bool:
    return all(k in variant.shapes for k in ("batch", "height", "width"))
