"""Plain recipes (shapes only) of the tiny pipelines made as diffusers' fast tests make them, and the calls each
is compared with stock diffusers on."""

from pathlib import Path

import numpy as np
from PIL import Image


def image(size: int, seed: int, width: int | None = None, height: int | None = None) -> Image.Image:
    """A seeded RGB image, size x size pixels unless width or height say otherwise (not the one the build
    captures with)."""
    shape = (height or size, width or size, 3)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def mask(size: int) -> Image.Image:
    """A mask whose left third is white (repainted)."""
    values = np.zeros((size, size), dtype=np.uint8)
    values[:, : size // 3] = 255
    return Image.fromarray(values, mode="L")


# Artifacts built from another family's saved pipeline: name -> family.
FAMILY_OF = {"flux-text-encoders": "flux", "sd-dynamic": "sd"}


def family(name: str) -> str:
    """The tiny family whose saved pipeline the artifact ``name`` is built from."""
    return FAMILY_OF.get(name, name)


def _plain(*components: str, size: int) -> str:
    """A plain recipe compiling ``components`` at one size."""
    sections = "".join(
        f"[components.{c}]\nshapes = {{{{ batch = 1, height = {size}, width = {size} }}}}\n" for c in components
    )
    return '\n[source]\nmodel = "{source}"\n' + sections


def plain_recipe(source: Path, *components: str, size: int) -> str:
    """The plain recipe compiling ``components`` of the pipeline saved in ``source`` at one size."""
    return _plain(*components, size=size).format(source=source.as_posix())


# pipeline -> (plain recipe, calls compared with stock). DDPM compiles a dynamic batch; DiT has class labels and
# guidance; DDIM an unconditional UNet with eta.
PLAIN = {
    "dit": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 16, width = 16 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 16, width = 16 }}
""",
        [
            dict(class_labels=[7], num_inference_steps=3),
            dict(class_labels=[0], guidance_scale=2.0, num_inference_steps=2),
        ],
    ),
    "ddpm": (
        """
[source]
model = "{source}"
[components.unet]
shapes = {{ batch = [1, 3], height = 8, width = 8 }}
""",
        [dict(batch_size=1, num_inference_steps=3), dict(batch_size=3, num_inference_steps=2)],
    ),
    "ddim": (
        """
[source]
model = "{source}"
[components.unet]
shapes = {{ batch = 2, height = 8, width = 8 }}
""",
        [dict(batch_size=2, num_inference_steps=3, eta=0.5)],
    ),
    # Three text encoders and joint attention (77 CLIP + 256 T5 tokens); a dynamic batch and height, and QKV
    # fusion, which diffusers has for SD3.
    "sd3": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = [1, 2], height = [32, 64], width = 32 }}
fuse_qkv = true
[components.vae_decoder]
shapes = {{ batch = [1, 2], height = [32, 64], width = 32 }}
""",
        [
            dict(prompt="a photo of a cat", num_inference_steps=2),
            dict(prompt="a red dog", num_images_per_prompt=2, height=64, num_inference_steps=2),
        ],
    ),
    # T5 only, added_cond_kwargs with None values, the pipeline's own resolution binning: its transformer's
    # sample_size (32) picks the 256-pixel table, so a 512-pixel call runs at 256 and is resized back. The loaded
    # pipeline must keep that sample_size (a bare call: 256 pixels), not the one of the size the recipe names.
    "pixart": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 512, width = 512 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 512, width = 512 }}
""",
        [
            dict(prompt="a photo of a cat", height=512, width=512, num_inference_steps=2),
            dict(prompt="a dog", guidance_scale=2.0, num_inference_steps=2),
        ],
    ),
    # AutoencoderDC (scale factor 32 from its encoder blocks); a bare call asks for 1024 pixels, which the
    # pipeline bins to the 512 compiled here.
    "sana": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 512, width = 512 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 512, width = 512 }}
""",
        [
            dict(prompt="a photo of a cat", height=512, width=512, num_inference_steps=2),
            dict(prompt="a cat", num_inference_steps=2),
        ],
    ),
    # Image inputs: the VAE encoder's latent distribution is rebuilt from its compiled parameters, sampled with the
    # call's generator; strength changes the steps, not the shapes. At the "sd" artifact's size, so that the UNet
    # and the decoder come from the compile cache (the same tiny models, called the same way), and the inpainting
    # recipe's encoder and decoder too.
    "sd-img2img": (
        _plain("vae_encoder", "unet", "vae_decoder", size=64),
        [
            dict(prompt="a photo of a cat", image=image(64, 1), num_inference_steps=3),
            dict(prompt="a red dog", negative_prompt="blurry", image=image(64, 2), strength=0.5, num_inference_steps=4),
        ],
    ),
    # The 9-channel inpainting UNet: latents, the mask and the masked image's latents (a second encoder call).
    # The pipeline makes its UNet's sample_size unless told (stock: 64 px; the artifact: what it was compiled for).
    "sd-inpaint": (
        _plain("vae_encoder", "unet", "vae_decoder", size=64),
        [
            dict(prompt="a cat", image=image(64, 1), mask_image=mask(64), height=64, width=64, num_inference_steps=3),
            dict(
                prompt="a dog",
                image=image(64, 3),
                mask_image=mask(64),
                height=64,
                width=64,
                strength=0.6,
                num_inference_steps=3,
            ),
        ],
    ),
    # ControlNet's residuals feed the UNet; its conditioning scale is a tensor input, so each call has its own
    # (control_guidance_end turns it to 0 for the last steps). The decoder stays eager (compiled elsewhere).
    "sd-controlnet": (
        _plain("controlnet", "unet", size=32),
        [
            dict(prompt="a photo of a cat", image=image(32, 1), num_inference_steps=3),
            dict(
                prompt="a cat",
                image=image(32, 4),
                controlnet_conditioning_scale=0.4,
                control_guidance_end=0.5,
                num_inference_steps=4,
            ),
        ],
    ),
    # SDXL's two text encoders' embeddings and its time ids with an input image; its default strength of 0.3.
    "sdxl-img2img": (
        _plain("vae_encoder", "unet", "vae_decoder", size=32),
        [
            dict(prompt="a photo of a cat", image=image(32, 1), num_inference_steps=4),
            dict(prompt="a dog", negative_prompt="blurry", image=image(32, 2), strength=0.5, num_inference_steps=4),
        ],
    ),
    # The SDXL ControlNet takes the UNet's added_cond_kwargs (text embeddings and time ids) too.
    "sdxl-controlnet": (
        _plain("controlnet", "unet", size=32),
        [
            dict(prompt="a photo of a cat", image=image(32, 1), num_inference_steps=3),
            dict(prompt="a dog", image=image(32, 2), controlnet_conditioning_scale=0.3, num_inference_steps=3),
        ],
    ),
    # Flux packs the encoded image's latents into tokens; its default size is its transformer's (256 px stock).
    "flux-img2img": (
        _plain("vae_encoder", "transformer", "vae_decoder", size=32),
        [
            dict(prompt="a photo of a cat", image=image(32, 1), height=32, width=32, num_inference_steps=3),
            dict(prompt="a dog", image=image(32, 2), height=32, width=32, strength=0.5, num_inference_steps=4),
        ],
    ),
    # Kontext appends the reference image's tokens to the latents'; at a size other than its preferred ~1024 px
    # ones, a call says max_area and no auto-resize, as diffusers' tests do. The reference image here is of
    # another size than the output (image_height x image_width: 48x64 pixels, 192 tokens beside the output's 64).
    # Only the transformer is compiled: the VAE's encoder and decoder are tested compiled with flux-img2img.
    "flux-kontext": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 32, width = 32, image_height = 48, image_width = 64 }}
""",
        [
            dict(
                prompt="a photo of a cat",
                image=image(32, 1, width=64, height=48),
                height=32,
                width=32,
                max_area=32 * 32,
                _auto_resize=False,
                num_inference_steps=3,
            ),
        ],
    ),
    # Text-to-image with both text encoders compiled (CLIP's 77 tokens, T5 at the pipeline's default 512), the
    # rest eager.
    "flux-text-encoders": (
        _plain("text_encoder", "text_encoder_2", size=32),
        [dict(prompt="a photo of a cat", height=32, width=32, num_inference_steps=3)],
    ),
    # A transformer that creates tensors in its code (lifted by export as constants), keeps complex rotary
    # frequencies, runs ops on complex tensors through torch's dispatcher, and takes lists of tensors. It passes
    # each prompt's own tokens, so the recipe's 16 tokens (every prompt and negative prompt reaches 16 with the
    # chat template, in a tokenizer of one token per character) make any prompt fit.
    "z-image": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 32, width = 32, text_tokens = 16 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 32, width = 32 }}
""",
        [
            dict(prompt="dance monkey", height=32, width=32, max_sequence_length=16, num_inference_steps=2),
            dict(
                prompt="a red dog",
                negative_prompt="bad quality",
                guidance_scale=3.0,
                height=32,
                width=32,
                max_sequence_length=16,
                num_inference_steps=3,
            ),
        ],
    ),
}
