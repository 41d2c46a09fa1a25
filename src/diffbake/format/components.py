"""What diffbake compiles, in two tables: the components (what a recipe can name, and where the pipeline holds
each one) and the pipeline families.

A family ties a diffusers pipeline class to its denoiser attribute, whether its denoiser batch is doubled for
classifier-free guidance, and the pixel multiple its height and width need. Build and runtime both read this
table; it imports nothing heavy. Adding a pipeline family is a row here, an input builder in ``builder/inputs.py`` and,
if its denoiser returns another output type, a stand-in in ``runtime/standins.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

VAE_DECODER = "vae_decoder"


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
}


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]
    denoiser: str  # the pipeline attribute that holds the denoiser ("unet" or "transformer")
    has_cfg_batch: bool  # classifier-free guidance doubles the denoiser batch
    # Height and width must be multiples of vae_scale_factor * pixel_multiple_of_latent. Flux packs 2x2 latent
    # patches into one token, so it needs twice the VAE scale factor (16 for the real model).
    pixel_multiple_of_latent: int = 1
    has_text_tokens: bool = False  # the denoiser's text length is a recipe choice (Flux's max_sequence_length)
    default_text_tokens: int | None = None
    max_timestep: float = 1000.0  # the range of timesteps the denoiser is called with (Flux: sigmas in [0, 1])

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, VAE_DECODER)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", ("StableDiffusionPipeline",), "unet", has_cfg_batch=True),
        Family("sdxl", ("StableDiffusionXLPipeline",), "unet", has_cfg_batch=True),
        Family(
            "flux",
            ("FluxPipeline",),
            "transformer",
            has_cfg_batch=False,
            pixel_multiple_of_latent=2,
            has_text_tokens=True,
            default_text_tokens=512,
            max_timestep=1.0,
        ),
    )
}

# Pipelines diffbake makes locally, with no download (model -> family): "tiny:*" have hidden sizes around 32
# (tests and the demo); "random:*" have the real architectures with random weights (benchmarks).
BUILTIN_MODELS: dict[str, str] = {
    "tiny:sd": "sd",
    "tiny:sdxl": "sdxl",
    "tiny:flux": "flux",
    "random:sd15": "sd",
    "random:flux-small": "flux",
}
BUILTIN_PREFIXES = ("tiny:", "random:")

KNOWN_COMPONENTS: tuple[str, ...] = tuple(sorted({c for f in FAMILIES.values() for c in f.components}))
assert set(KNOWN_COMPONENTS) <= set(COMPONENTS), "every family's component needs a row in COMPONENTS"


def family_for_pipeline_class(class_name: str) -> Family | None:
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    return None


def supported_pipeline_classes() -> list[str]:
    return sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
