"""``POST /v1/images/generations``: OpenAI's request fields, the extensions other diffusion servers accept, and
every check a request gets before it is queued. A client's mistake is a :class:`RequestError` with its HTTP status
and a message that says what was wrong, what is accepted, and how to fix it."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from diffbake.server.catalogue import Catalogue

# OpenAI's fields, then the extensions (negative_prompt, seed, num_inference_steps, guidance_scale).
FIELDS = (
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "model",
    "user",
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
)
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_PROMPT_CHARS = 32000  # OpenAI's limit for gpt-image models
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    """A request the server does not run: its HTTP status, OpenAI's error ``type`` and ``code``, and the field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImageRequest:
    """One validated request: ``n`` images of ``width`` x ``height``; image ``j`` is made with seed ``seed + j``."""

    prompt: str
    n: int
    width: int
    height: int
    output_format: str
    output_compression: int
    seed: int
    num_inference_steps: int | None
    guidance_scale: float | None
    negative_prompt: str | None
    # Whether the call runs classifier-free guidance, where the artifact compiled that choice (see _guidance).
    guidance: bool | None = None

    @property
    def batch_key(self) -> tuple:
        """Requests with the same key may run as one pipeline call (micro-batching)."""
        return (self.width, self.height, self.num_inference_steps, self.guidance_scale, self.negative_prompt is None)


def _typed(body: dict, name: str, kind: type | tuple[type, ...], label: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    # JSON true/false are not numbers, whatever Python's bool thinks.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"'{name}' must be {label}, not {value!r}", param=name, code="invalid_type")
    return value


def parse(body: Any, catalogue: Catalogue, *, max_steps: int) -> ImageRequest:
    """Check a request body against the API and against what the artifact serves.

    Raises:
        RequestError: 400 for a malformed or unserved request, 404 for another model name.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with at least 'prompt'", code="invalid_body")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes {', '.join(FIELDS)}",
            param=unknown[0],
            code="unknown_parameter",
        )
    model = _typed(body, "model", str, "a string")
    if model is not None and model != catalogue.name:
        raise RequestError(
            f"model {model!r} is not served here; this server serves {catalogue.name!r} (GET /v1/models)",
            status=404,
            param="model",
            code="model_not_found",
        )
    _typed(body, "user", str, "a string")
    prompt = _typed(body, "prompt", str, "a string")
    if prompt is None:
        raise RequestError("'prompt' is required: the text of the image to make", param="prompt", code="missing")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}", param="prompt")
    response_format = _typed(body, "response_format", str, "a string") or "b64_json"
    if response_format == "url":
        raise RequestError(
            "response_format 'url' is not supported: this server keeps no images to link to; ask for 'b64_json' "
            "(the default), which returns the image in the response",
            param="response_format",
            code="unsupported_value",
        )
    if response_format != "b64_json":
        raise RequestError(
            f"response_format {response_format!r} is not one of 'b64_json', 'url'", param="response_format"
        )
    output_format = _typed(body, "output_format", str, "a string") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise RequestError(
            f"output_format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}", param="output_format"
        )
    compression = _typed(body, "output_compression", int, "an integer from 0 to 100")
    if compression is not None and not 0 <= compression <= 100:
        raise RequestError(f"'output_compression' must be 0 to 100, not {compression}", param="output_compression")
    negative = _typed(body, "negative_prompt", str, "a string")
    guidance_scale = _typed(body, "guidance_scale", (int, float), "a number")
    steps = _typed(body, "num_inference_steps", int, "an integer")
    if steps is not None and not 1 <= steps <= max_steps:
        raise RequestError(
            f"'num_inference_steps' must be 1 to {max_steps} on this server, not {steps}", param="num_inference_steps"
        )
    seed = _typed(body, "seed", int, "an integer")
    if seed is not None and not 0 <= seed <= MAX_SEED - 64:
        raise RequestError(f"'seed' must be 0 to {MAX_SEED - 64}, not {seed}", param="seed")
    guidance = _guidance(catalogue, negative, guidance_scale)
    width, height = _size(body, catalogue)
    n = _typed(body, "n", int, "an integer")
    if n is None:
        n = catalogue.default_count(width, height, guidance)
    _check_call(catalogue, width, height, n, guidance)
    return ImageRequest(
        prompt=prompt,
        n=n,
        width=width,
        height=height,
        output_format=output_format,
        output_compression=100 if compression is None else compression,
        seed=random.randrange(MAX_SEED - 64) if seed is None else seed,
        num_inference_steps=steps,
        guidance_scale=None if guidance_scale is None else float(guidance_scale),
        negative_prompt=negative,
        guidance=guidance,
    )


def _guidance(catalogue: Catalogue, negative: str | None, guidance_scale: float | None) -> bool | None:
    """Whether the call uses classifier-free guidance, as diffusers decides it (guidance_scale > 1), where the
    artifact compiled that choice; None where guidance is an input of the model (Flux) or the default is kept."""
    modes = catalogue.guided
    if negative is not None and True not in modes:
        raise RequestError(
            "'negative_prompt' needs classifier-free guidance, which this artifact was built without; drop it, or "
            "rebuild with a guided variant (cfg = true)",
            param="negative_prompt",
            code="unsupported_parameter",
        )
    if guidance_scale is None or modes == [None]:
        return None
    return guidance_scale > 1


def _size(body: dict, catalogue: Catalogue) -> tuple[int, int]:
    size = _typed(body, "size", str, "a string 'WIDTHxHEIGHT'")
    if size is None or size == "auto":
        return catalogue.default_size()
    match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", size)
    if match is None:
        raise RequestError(f"'size' must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512'), not {size!r}", param="size")
    return int(match[1]), int(match[2])


def _check_call(catalogue: Catalogue, width: int, height: int, n: int, guidance: bool | None) -> None:
    if catalogue.serves(width, height, n, guidance):
        return
    served = "; ".join(catalogue.describe())
    if n < 1:
        raise RequestError(f"'n' must be at least 1, not {n}", param="n")
    counts = catalogue.counts(width, height, guidance)
    if counts:
        raise RequestError(
            f"n={n} images at {width}x{height} is not what this artifact was compiled for; at that size it makes "
            f"n in {counts} per request (it serves {served})",
            param="n",
            code="unsupported_value",
        )
    if catalogue.counts(width, height, None):
        raise RequestError(
            f"size {width}x{height} is served only {'without' if guidance else 'with'} classifier-free guidance "
            f"(guidance_scale {'<= 1' if guidance else '> 1'}); it serves {served}",
            param="guidance_scale",
            code="unsupported_value",
        )
    raise RequestError(
        f"size {width}x{height} is not what this artifact was compiled for; it serves {served}; ask for one of "
        "those sizes, or rebuild the artifact with [components.*] shapes for this size",
        param="size",
        code="unsupported_value",
    )
