"""Plain recipes (shapes only) of the tiny pipelines made as diffusers' fast tests make them, and the calls each
is compared with stock diffusers on."""

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
    # T5 only, added_cond_kwargs with None values, the pipeline's own resolution binning.
    "pixart": (
        """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 256, width = 256 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 256, width = 256 }}
""",
        [
            dict(prompt="a photo of a cat", num_inference_steps=2),
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
}
