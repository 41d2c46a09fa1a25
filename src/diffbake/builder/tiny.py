"""Tiny, deterministic diffusers pipelines built entirely offline.

Each family mirrors the structure of its real counterpart (same pipeline
class, same component classes, real BPE / Unigram tokenizers) but with
hidden sizes around 32, so a whole pipeline builds and runs on CPU in
seconds. Every weight-bearing component is created right after
``torch.manual_seed(0)``, as diffusers' own fast tests do, so two builds give
bitwise-identical state dicts. The caller's global RNG state is preserved.

All three families use a VAE with two blocks, i.e. ``vae_scale_factor == 2``.
SD / SDXL need height and width divisible by 8; Flux packs 2x2 latent patches
and needs multiples of 4.
"""

from __future__ import annotations

import inspect
import json
import os
import string
import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import diffusers

from diffbake.format.components import BUILTIN_MODELS

TINY_FAMILIES = tuple(m.removeprefix("tiny:") for m in BUILTIN_MODELS if m.startswith("tiny:"))

# A few common prompt words: each becomes a single CLIP BPE token and a single
# T5 piece, while any other text still tokenizes (characters / bytes / <unk>).
_WORDS = (
    "a an the of in on with and photo picture painting portrait cat dog man "
    "woman red blue green bad quality blurry astronaut riding horse"
).split()


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable character per byte value."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    shifted = 0
    for b in range(256):
        if b not in bs:  # control / whitespace bytes map past U+00FF
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in cs]


def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP byte-level BPE tokenizer from vocab.json / merges.txt written to a temp dir.

    Layout follows the real CLIP vocab: 256 byte characters, the same with the
    ``</w>`` end-of-word suffix, merged tokens, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the last two ids.
    """
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    # Merge chains that assemble each word left to right, e.g. "c a", "ca t</w>".
    merges: list[str] = []
    for word in _WORDS:
        left, *rest = [*word[:-1], word[-1] + "</w>"]
        for right in rest:
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
                vocab.append(left + right)
            left += right
    vocab += ["<|startoftext|>", "<|endoftext|>"]

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # The files are read at construction; the tokenizer keeps no reference to them.
        return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=77)


def _unigram(pieces: dict[str, float], unk_id: int, templates: tuple[str, str], special: tuple[str, int]):
    """A ``tokenizers`` Unigram model over ``pieces`` (special tokens first) and the prompt words, with the
    whitespace and metaspace handling that T5 and Gemma share; ``templates`` put a text and a pair in tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    # Piece -> log-probability; whole words score far above character spellings.
    # setdefault keeps pieces unique (e.g. the word "a" and the character "a").
    pieces = {**pieces, "▁": -2.0}
    for word in _WORDS:
        pieces.setdefault("▁" + word, -5.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault("▁" + char, -8.0)
        pieces.setdefault(char, -9.0)
    backend = Tokenizer(Unigram(list(pieces.items()), unk_id=unk_id, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    single, pair = templates
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[special])
    return backend


def _t5_tokenizer():
    """T5 tokenizer over an in-code ``tokenizers`` Unigram model.

    Ids follow T5: <pad>=0, </s>=1, <unk>=2. The pre-tokenizer, decoder and
    ``$A </s>`` post-processor match what ``T5Tokenizer`` itself builds, so the
    tokenizer.json written by ``save_pretrained`` reloads to the same behaviour.
    """
    from transformers import T5TokenizerFast

    backend = _unigram({"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}, 2, ("$A </s>", "$A </s> $B </s>"), ("</s>", 1))
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,  # no <extra_id_*> sentinels: only needed for span-corruption training
        model_max_length=512,
    )


def _clip_text_config(tokenizer, **sizes):
    """CLIP text config whose vocab, positions and special ids match ``tokenizer``; small unless ``sizes`` say.

    ``eos_token_id`` matters: the pooled output is taken at the first EOS
    position, so it must be the tokenizer's real ``<|endoftext|>`` id.
    """
    from transformers import CLIPTextConfig

    small = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**small, **sizes},
    )


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # the pipeline warns about and rewrites any other value
    )


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _seeded(build, *args, **kwargs):
    """Construct a component from a fixed seed so its weights are reproducible."""
    torch.manual_seed(0)
    return build(*args, **kwargs)


def _vae(**overrides):
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),  # two blocks -> vae_scale_factor 2
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    return _seeded(AutoencoderKL, **{**config, **overrides})


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=32,  # default output is sample_size * vae_scale_factor = 64 px
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    return _seeded(UNet2DConditionModel, **{**config, **overrides})


def _sd():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_seeded(CLIPTextModel, _clip_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=32),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer(pad_token="!")  # as in SDXL's second (OpenCLIP) tokenizer
    text_encoder_2 = _seeded(CLIPTextModelWithProjection, _clip_text_config(tokenizer_2))
    time_embed_dim = 8
    return StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=_seeded(CLIPTextModel, _clip_text_config(tokenizer)),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(
            # Cross attention sees both encoders' hidden states concatenated.
            cross_attention_dim=2 * text_encoder_2.config.hidden_size,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 micro-conditioning ids (original size, crop, target size) + pooled text embeds.
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        ),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )


def _flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _seeded(CLIPTextModel, _clip_text_config(tokenizer))
    text_encoder_2 = _t5(tokenizer_2, feed_forward_proj="gated-gelu")  # T5 v1.1, as used by Flux
    # Flux-style VAE: 16 latent channels, no quant convs, shift + scale normalisation.
    vae = _vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    transformer = _seeded(
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # latents are packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        axes_dims_rope=(4, 4, 8),  # must sum to attention_head_dim
    )
    return FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _from(base, class_name: str, **changes):
    """Another pipeline class over a family's components (img2img, inpainting, ControlNet), some replaced."""
    import diffusers

    cls = getattr(diffusers, class_name)
    components = {**base().components, **changes}
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in components.items() if k in accepted})


def _controlnet(unet, **overrides):
    """A ControlNet shaped like ``unet`` (its residuals must fit the UNet's blocks), as diffusers' fast tests make
    one; its conditioning embedding downsamples the control image by 2, the tiny VAE's scale factor."""
    from diffusers import ControlNetModel

    config = dict(
        block_out_channels=unet.config.block_out_channels,
        layers_per_block=unet.config.layers_per_block,
        in_channels=unet.config.in_channels,
        down_block_types=unet.config.down_block_types,
        cross_attention_dim=unet.config.cross_attention_dim,
        conditioning_embedding_out_channels=(16, 32),
    )
    controlnet = _seeded(ControlNetModel, **{**config, **overrides})

    # ControlNet's output convolutions start at zero (its residuals would change nothing); diffusers' fast tests
    # give them weights, and so does this, from the same seed.
    def init(m: torch.nn.Module) -> None:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight)
            m.bias.data.fill_(1.0)

    torch.manual_seed(0)
    controlnet.controlnet_down_blocks.apply(init)
    controlnet.controlnet_mid_block.apply(init)
    return controlnet


def _sd_img2img():
    return _from(_sd, "StableDiffusionImg2ImgPipeline")


def _sd_inpaint():
    # The inpainting UNet takes 9 channels: the latents, the mask and the masked image's latents.
    return _from(_sd, "StableDiffusionInpaintPipeline", unet=_unet(cross_attention_dim=32, in_channels=9))


def _sd_controlnet():
    unet = _unet(cross_attention_dim=32)
    return _from(_sd, "StableDiffusionControlNetPipeline", unet=unet, controlnet=_controlnet(unet))


def _sdxl_img2img():
    return _from(_sdxl, "StableDiffusionXLImg2ImgPipeline")


def _sdxl_controlnet():
    unet = _sdxl().unet
    extra = dict(
        use_linear_projection=True,
        attention_head_dim=unet.config.attention_head_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=unet.config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=unet.config.projection_class_embeddings_input_dim,
    )
    return _from(_sdxl, "StableDiffusionXLControlNetPipeline", controlnet=_controlnet(unet, **extra))


def _flux_img2img():
    return _from(_flux, "FluxImg2ImgPipeline")


def _flux_kontext():
    return _from(_flux, "FluxKontextPipeline")


# The real architectures with random weights, for benchmarks that need real-sized compute without a download:
# Stable Diffusion 1.5 (UNet 860 M parameters, its VAE, a CLIP ViT-L/14-sized text encoder with the small
# vocabulary above) and a reduced-width Flux (the real block structure at 768 wide, 4 + 8 blocks).


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    # runwayml/stable-diffusion-v1-5's unet/config.json (the rest are diffusers' defaults, equal to it).
    return _seeded(
        UNet2DConditionModel,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _sd_vae(**overrides):
    # The SD 1.x / SDXL / Flux VAE layout: four blocks (vae_scale_factor 8), two layers each.
    return _vae(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
        **overrides,
    )


def _clip_l(tokenizer):
    from transformers import CLIPTextModel

    # CLIP ViT-L/14's text tower (SD 1.x), with the small vocabulary above.
    sizes = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    return _seeded(CLIPTextModel, _clip_text_config(tokenizer, **sizes))


def _sd15_components(only: str | None = None) -> dict:
    tokenizer = _clip_tokenizer()
    makers = {
        "unet": _sd15_unet,
        "vae": lambda: _sd_vae(scaling_factor=0.18215),
        "text_encoder": lambda: _clip_l(tokenizer),
    }
    return {name: make() for name, make in makers.items() if only in (None, name)} | {"tokenizer": tokenizer}


def _sd15():
    from diffusers import StableDiffusionPipeline

    parts = _sd15_components()
    return StableDiffusionPipeline(
        **parts,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _flux_small_components(only: str | None = None) -> dict:
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()

    def t5():
        config = T5Config(
            vocab_size=len(tokenizer_2),
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
            d_model=768,
            d_kv=64,
            d_ff=2048,
            num_layers=4,
            num_heads=12,
            feed_forward_proj="gated-gelu",
        )
        return _seeded(T5EncoderModel, config)

    makers = {
        # black-forest-labs/FLUX.1-dev's transformer config, at 6 heads instead of 24 and 4 + 8 blocks
        # instead of 19 + 38.
        "transformer": lambda: _seeded(
            FluxTransformer2DModel,
            patch_size=1,
            in_channels=64,
            num_layers=4,
            num_single_layers=8,
            attention_head_dim=128,
            num_attention_heads=6,
            joint_attention_dim=768,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        "vae": lambda: _sd_vae(
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ),
        "text_encoder": lambda: _clip_l(tokenizer),
        "text_encoder_2": t5,
    }
    parts = {name: make() for name, make in makers.items() if only in (None, name)}
    return parts | {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}


def _flux_small():
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=_flux_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        **_flux_small_components(),
    )


def _dit():
    # diffusers' tests/pipelines/dit/test_dit.py: class labels, no text, a one-block VAE (scale factor 1).
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = _seeded(
        DiTTransformer2DModel,
        sample_size=16,
        num_layers=2,
        patch_size=4,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return DiTPipeline(transformer=transformer, vae=_seeded(AutoencoderKL), scheduler=DDIMScheduler())


def _t5(tokenizer, **sizes):
    """A T5 encoder as small as diffusers' tests' hf-internal-testing/tiny-random-t5, with ``tokenizer``'s ids."""
    from transformers import T5Config, T5EncoderModel

    config = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
    return _seeded(
        T5EncoderModel,
        T5Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **{**config, **sizes},
        ),
    )


def _pixart():
    # diffusers' tests/pipelines/pixart_sigma/test_pixart.py (a T5 the same size, the local tokenizer), but with
    # sample_size 32 and a 4-block VAE (scale factor 8): the pipeline's default resolution binning knows the
    # 256-pixel table only, and a plain recipe calls the pipeline as it is by default.
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = _seeded(
        PixArtTransformer2DModel,
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    tokenizer = _t5_tokenizer()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer),
        vae=_vae(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=4,
        ),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def _sd3():
    # diffusers' tests/pipelines/stable_diffusion_3: two CLIP encoders with projection and a T5, joint attention.
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    transformer = _seeded(
        SD3Transformer2DModel,
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    tokenizer = _clip_tokenizer()
    clip = _clip_text_config(
        tokenizer, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32
    )
    tokenizer_3 = _t5_tokenizer()
    vae = _seeded(
        AutoencoderKL,
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_seeded(CLIPTextModelWithProjection, clip),
        text_encoder_2=_seeded(CLIPTextModelWithProjection, clip),
        text_encoder_3=_t5(tokenizer_3),
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        tokenizer_3=tokenizer_3,
        transformer=transformer,
        vae=vae,
        image_encoder=None,
        feature_extractor=None,
    )


def _gemma_tokenizer():
    """A Gemma-like tokenizer, as _t5_tokenizer: <pad>=0, <eos>=1, <bos>=2, <unk>=3, and <bos> in front of every
    text, as Gemma's own. A plain PreTrainedTokenizerFast: GemmaTokenizerFast rebuilds its model from a vocabulary
    when reloaded, and would not read back the one saved."""
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": 0.0, "<eos>": 0.0, "<bos>": 0.0, "<unk>": 0.0}
    return PreTrainedTokenizerFast(
        tokenizer_object=_unigram(specials, 3, ("<bos> $A", "<bos> $A $B"), ("<bos>", 2)),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=8192,
    )


def _sana():
    # diffusers' tests/pipelines/sana/test_sana.py, but with a 6-block AutoencoderDC (scale factor 32, as the
    # real one) and sample_size 16: the pipeline's default resolution binning then asks for 512-pixel images.
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _gemma_tokenizer()
    text_encoder = _seeded(
        Gemma2Model,
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            initializer_range=0.02,
            intermediate_size=64,
            max_position_embeddings=8192,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            attn_implementation="eager",
        ),
    )
    blocks = 6
    multiscales = ((),) * 3 + ((5,),) * 3
    vae = _seeded(
        AutoencoderDC,
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales,
        encoder_layers_per_block=(1,) * blocks,
        decoder_layers_per_block=[1] * blocks,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    transformer = _seeded(
        SanaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=16,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _unconditional_unet():
    # diffusers' tests/pipelines/ddpm/test_ddpm.py: an unconditional UNet2DModel on 8x8 pixels, no VAE, no text.
    from diffusers import UNet2DModel

    return _seeded(
        UNet2DModel,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def _ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler

    return DDPMPipeline(unet=_unconditional_unet(), scheduler=DDPMScheduler())


def _ddim():
    from diffusers import DDIMPipeline, DDIMScheduler

    return DDIMPipeline(unet=_unconditional_unet(), scheduler=DDIMScheduler())


# Qwen's chat template, cut to what the pipelines use: the user turns, the generation prompt, and Qwen3's empty
# thinking block when thinking is off.
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen2_tokenizer():
    """A Qwen2-like tokenizer: byte-level BPE over the 256 bytes (no merges, so a character is a token), Qwen's
    special tokens after them, <|endoftext|> as padding, and Qwen's chat template (cut to what pipelines use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=special
    )
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _z_image():
    # diffusers' tests/pipelines/z_image/test_z_image.py. Its transformer makes tensors in its code (lifted by
    # export as constants), keeps complex rotary frequencies and calls ops on complex tensors that AOTInductor
    # hands back to torch's dispatcher; it takes lists of tensors (one per image, text of each prompt's length).
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = _seeded(
        ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # made with torch.empty, as in diffusers' test
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = _vae(latent_channels=16, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer = _qwen2_tokenizer()
    config = Qwen3Config(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
    )
    return ZImagePipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_seeded(Qwen3Model, config).eval(),
        tokenizer=tokenizer,
    )


# model -> (builder, pipeline class, vae_scale_factor, one-component builder or None: build the whole pipeline,
# denoiser attribute)
_BUILDERS = {
    "tiny:sd": (_sd, "StableDiffusionPipeline", 2, None, "unet"),
    "tiny:sdxl": (_sdxl, "StableDiffusionXLPipeline", 2, None, "unet"),
    "tiny:flux": (_flux, "FluxPipeline", 2, None, "transformer"),
    "random:sd15": (_sd15, "StableDiffusionPipeline", 8, _sd15_components, "unet"),
    "random:flux-small": (_flux_small, "FluxPipeline", 8, _flux_small_components, "transformer"),
    "tiny:dit": (_dit, "DiTPipeline", 1, None, "transformer"),
    "tiny:ddpm": (_ddpm, "DDPMPipeline", 1, None, "unet"),
    "tiny:ddim": (_ddim, "DDIMPipeline", 1, None, "unet"),
    "tiny:pixart": (_pixart, "PixArtSigmaPipeline", 1, None, "transformer"),
    "tiny:sd3": (_sd3, "StableDiffusion3Pipeline", 1, None, "transformer"),
    "tiny:sana": (_sana, "SanaPipeline", 32, None, "transformer"),
    "tiny:sd-img2img": (_sd_img2img, "StableDiffusionImg2ImgPipeline", 2, None, "unet"),
    "tiny:sd-inpaint": (_sd_inpaint, "StableDiffusionInpaintPipeline", 2, None, "unet"),
    "tiny:sd-controlnet": (_sd_controlnet, "StableDiffusionControlNetPipeline", 2, None, "unet"),
    "tiny:sdxl-img2img": (_sdxl_img2img, "StableDiffusionXLImg2ImgPipeline", 2, None, "unet"),
    "tiny:sdxl-controlnet": (_sdxl_controlnet, "StableDiffusionXLControlNetPipeline", 2, None, "unet"),
    "tiny:flux-img2img": (_flux_img2img, "FluxImg2ImgPipeline", 2, None, "transformer"),
    "tiny:flux-kontext": (_flux_kontext, "FluxKontextPipeline", 2, None, "transformer"),
    "tiny:z-image": (_z_image, "ZImagePipeline", 2, None, "transformer"),
}


def builtin_configs(model: str) -> tuple[dict, dict[str, dict]]:
    """What a built-in model's model index and its VAE's and denoiser's configs say. A tiny pipeline is made to
    read them (it takes a fraction of a second); a random:* one, the real architectures, is described without
    building it (its denoisers have no patch_size)."""
    _, class_name, vae_scale_factor, _, denoiser = _builder(model)
    if model.startswith("tiny:"):
        pipe = make_builtin_pipeline(model)
        modules = {k: v for k, v in pipe.components.items()}
        index = {"_class_name": class_name}
        index |= {k: ["diffusers", type(v).__name__] if v is not None else [None, None] for k, v in modules.items()}
        return index, {k: dict(modules[k].config) for k in ("vae", denoiser) if modules.get(k) is not None}
    import diffusers

    index = {"_class_name": class_name, denoiser: ["diffusers", "model"], "vae": ["diffusers", "AutoencoderKL"]}
    cls = getattr(diffusers, class_name)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # what the pipeline class requires
        if name in inspect.signature(cls.__init__).parameters and name not in cls._optional_components:
            index[name] = ["transformers", "model"]
    blocks = [0] * (vae_scale_factor.bit_length())  # 2 ** (len - 1) == vae_scale_factor
    return index, {"vae": {"block_out_channels": blocks}, denoiser: {}}


def make_builtin_pipeline(model: str) -> diffusers.DiffusionPipeline:
    """Build a built-in float32 pipeline ("tiny:sd", "random:sd15", ...: see ``families.BUILTIN_MODELS``)."""
    build = _builder(model)[0]
    with torch.random.fork_rng(devices=[]):
        pipe = build()
    # Match from_pretrained, which returns modules in eval mode (T5 has dropout).
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def make_builtin_component(model: str, attr: str) -> torch.nn.Module:
    """One component of a built-in pipeline, with the same weights as in :func:`make_builtin_pipeline` (each is
    made from its own seed), without building the others: a float32 reference of a big model is then one model."""
    one = _builder(model)[3]
    if one is None:
        return getattr(make_builtin_pipeline(model), attr)
    with torch.random.fork_rng(devices=[]):
        return one(attr)[attr].eval()


def make_tiny_pipeline(family: str) -> diffusers.DiffusionPipeline:
    """Build the tiny float32 pipeline for ``family`` (one of ``TINY_FAMILIES``)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny pipeline family {family!r}; known families: {', '.join(TINY_FAMILIES)}")
    return make_builtin_pipeline(f"tiny:{family}")


def _builder(model: str) -> tuple:
    if model not in _BUILDERS:
        raise ValueError(f"unknown built-in pipeline {model!r}; known: {', '.join(_BUILDERS)}")
    return _BUILDERS[model]
