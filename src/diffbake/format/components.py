"""What diffbake compiles, in two small tables: the components (what a recipe can name, and where the pipeline
holds each one) and the facts about pipelines that cannot be read from a pipeline's own configs.

Everything else about how a pipeline calls its modules (argument names, shapes, dtypes, Python values, the
output type, which dimensions follow the image size) is captured at build from real calls of the pipeline
(``builder/capture.py``). Build and runtime both read these tables; this module imports nothing heavy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"


@dataclass(frozen=True)
class Component:
    """Where the pipeline holds a compilable component, and which of its methods the compiled code replaces."""

    attribute: str  # the pipeline attribute ("unet", "vae")
    method: str = "forward"  # the method the pipeline calls ("decode" for the VAE decoder)

    def module(self, pipe: object) -> object:
        return getattr(pipe, self.attribute)

    def call(self, pipe: object) -> object:
        """The bound method of ``pipe``'s module that the pipeline calls."""
        return getattr(self.module(pipe), self.method)


# Component name (as a recipe and the manifest name it) -> where it lives; a new component is a row here.
COMPONENTS: dict[str, Component] = {
    "unet": Component("unet"),
    "transformer": Component("transformer"),
    VAE_DECODER: Component("vae", "decode"),
    VAE_ENCODER: Component("vae", "encode"),
    "controlnet": Component("controlnet"),
    "text_encoder": Component("text_encoder"),
    "text_encoder_2": Component("text_encoder_2"),
    "text_encoder_3": Component("text_encoder_3"),
}
KNOWN_COMPONENTS: tuple[str, ...] = tuple(sorted(COMPONENTS))
DENOISERS = ("transformer", "unet")  # pipeline attributes that hold a denoiser, in the order they are looked for

# Distributions an eager method may return (the VAE encoder's latent_dist): class -> the constructor arguments
# that rebuild it, read from the instance's attributes of the same names. The tensors among them are compiled;
# the distribution's own methods (sample with a generator, mode) then run eager, exactly as in diffusers.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "diffusers.models.autoencoders.vae.DiagonalGaussianDistribution": ("parameters", "deterministic"),
}


def components_of(attribute: str) -> list[str]:
    """The component names that live in one pipeline attribute ("vae": the decoder and the encoder)."""
    return [name for name, c in COMPONENTS.items() if c.attribute == attribute]


@dataclass(frozen=True)
class PipelineFacts:
    """What a pipeline class does in its own code, not in a config: read by the build's shape checks."""

    # The pipeline packs latent_patch x latent_patch latents into one token itself (Flux), on top of any
    # patch_size of the denoiser's config: height and width must be multiples of vae_scale_factor * patch.
    latent_patch: int = 1


# Pipelines tested with diffbake, by class name. A pipeline not listed is built the same way (its calls are
# captured like any other) and the build says that it is untested; a row is needed only for a fact above.
PIPELINES: dict[str, PipelineFacts] = {
    "StableDiffusionPipeline": PipelineFacts(),
    "StableDiffusionXLPipeline": PipelineFacts(),
    "StableDiffusion3Pipeline": PipelineFacts(),
    "FluxPipeline": PipelineFacts(latent_patch=2),
    "PixArtSigmaPipeline": PipelineFacts(),
    "SanaPipeline": PipelineFacts(),
    "DiTPipeline": PipelineFacts(),
    "DDPMPipeline": PipelineFacts(),
    "DDIMPipeline": PipelineFacts(),
    "StableDiffusionImg2ImgPipeline": PipelineFacts(),
    "StableDiffusionInpaintPipeline": PipelineFacts(),
    "StableDiffusionControlNetPipeline": PipelineFacts(),
    "StableDiffusionXLImg2ImgPipeline": PipelineFacts(),
    "StableDiffusionXLControlNetPipeline": PipelineFacts(),
    "FluxImg2ImgPipeline": PipelineFacts(latent_patch=2),
    "FluxKontextPipeline": PipelineFacts(latent_patch=2),
}

# Pipelines diffbake makes locally, with no download: "tiny:*" have hidden sizes around 32 (tests and the demo);
# "random:*" have the real architectures with random weights (benchmarks).
BUILTIN_MODELS: tuple[str, ...] = (
    "tiny:sd",
    "tiny:sdxl",
    "tiny:flux",
    "tiny:dit",
    "tiny:ddpm",
    "tiny:ddim",
    "tiny:pixart",
    "tiny:sd3",
    "tiny:sana",
    "tiny:sd-img2img",
    "tiny:sd-inpaint",
    "tiny:sd-controlnet",
    "tiny:sdxl-img2img",
    "tiny:sdxl-controlnet",
    "tiny:flux-img2img",
    "tiny:flux-kontext",
    "tiny:z-image",
    "random:sd15",
    "random:flux-small",
)
BUILTIN_PREFIXES = ("tiny:", "random:")


def bins_resolution(pipeline: type) -> bool:
    """Whether the pipeline class rounds height and width to a table of sizes before its denoiser sees them
    (PixArt's and SANA's ``use_resolution_binning``); its denoiser's ``sample_size`` picks the table."""
    return "use_resolution_binning" in inspect.signature(pipeline.__call__).parameters


def area_call(pipeline: type, height: int, width: int) -> dict[str, Any]:
    """What a call of height x width pixels adds for a pipeline class that rescales its output to ``max_area``
    (Flux Kontext: 1024 ** 2 by default) and auto-resizes its reference image to one of its preferred
    resolutions: asked so, it makes height x width from an image of the size compiled for."""
    params = inspect.signature(pipeline.__call__).parameters
    if "max_area" not in params:
        return {}
    return {"max_area": height * width, **({"_auto_resize": False} if "_auto_resize" in params else {})}


# The guidance scale asked for where a variant compiles classifier-free guidance that the pipeline's default call
# does not use (LDMTextToImagePipeline defaults to guidance_scale = 1.0): at the build's capture, and in the call
# that fits what was compiled (a bare ``diffbake generate``, say).
CFG_GUIDANCE = 7.5


def needs_guidance_asked(pipeline: type) -> bool:
    """Whether the pipeline class's default call runs no classifier-free guidance (guidance_scale <= 1)."""
    default = inspect.signature(pipeline.__call__).parameters.get("guidance_scale")
    value = None if default is None else default.default
    return isinstance(value, (int, float)) and value <= 1


def fitting_guidance(modes: list[bool | None], pipeline: type) -> float | None:
    """The guidance scale a call must ask for to fit a denoiser compiled for ``modes`` (each variant's cfg), where
    the pipeline's default would need a batch that was not compiled; None keeps the pipeline's default."""
    if modes == [False]:
        return 1.0  # compiled without a CFG batch: the pipeline must not ask for guidance
    if modes == [True] and needs_guidance_asked(pipeline):
        return CFG_GUIDANCE  # compiled with one that the pipeline's default call would not run (LDM)
    return None


def denoiser_of(components: dict[str, object]) -> str | None:
    """The attribute of a pipeline's denoiser, from the names of its components (a pipeline's model index)."""
    return next((name for name in DENOISERS if components.get(name) is not None), None)


# diffusers' step caches an artifact may turn on (a recipe's step_cache, ``diffbake generate --cache``), each set by
# a threshold: method -> its config class in diffusers. The command line spells the method with "-".
STEP_CACHES = {"first_block": "FirstBlockCacheConfig"}
