"""Build the pipelines diffusers' own fast tests make, and compare each artifact with stock diffusers.

Not part of the suite (it needs a diffusers source checkout, whose tests are not in the wheel, and two test-only
packages): a check to run when diffusers or the build changes.

    git clone --depth 1 --branch v$(python -c 'import diffusers; print(diffusers.__version__)') \\
        https://github.com/huggingface/diffusers /tmp/diffusers
    .venv/bin/pip install parameterized requests_mock
    .venv/bin/python tests/diffusers_fast_tests.py /tmp/diffusers [CASE ...]

For each case: the test class's ``get_dummy_components()``, saved with ``save_pretrained``; a plain recipe that
compiles the listed components at the size the test's ``get_dummy_inputs()`` call makes; ``diffbake build``;
then the same call, same seed, on the loaded artifact and on stock diffusers. The tokenizers the tests fetch from
the Hub (hf-internal-testing's tiny CLIP, T5, Gemma, Qwen2 and BERT) are made locally, as the suite makes them,
and so are the tiny UMT5 and BERT models (from their configs). Exit status 1 if a case
does not end as listed (``ok`` within TOLERANCE, or the refusal or mismatch its note explains).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOLERANCE = 1e-4  # max abs over the whole float32 image

# name -> (test module under tests/pipelines, class, components compiled, expected: "ok" or a note of what
# refuses it and why: the case then passes only if the build or the call fails).
# fmt: off
CASES: dict[str, tuple[str, str, list[str], str]] = {
    "sd": ("stable_diffusion.test_stable_diffusion", "StableDiffusionPipelineTesterConfig", ["unet", "vae_decoder"], "ok"),
    "sd-img2img": ("stable_diffusion.test_stable_diffusion_img2img", "StableDiffusionImg2ImgPipelineTesterConfig", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sd2": ("stable_diffusion_2.test_stable_diffusion", "StableDiffusion2PipelineFastTests", ["unet", "vae_decoder"], "ok"),
    "sd2-inpaint": ("stable_diffusion_2.test_stable_diffusion_inpaint", "StableDiffusion2InpaintPipelineFastTests", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "lcm": ("latent_consistency_models.test_latent_consistency_models", "LatentConsistencyModelPipelineFastTests", ["unet", "vae_decoder"], "ok"),
    "lcm-img2img": ("latent_consistency_models.test_latent_consistency_models_img2img", "LatentConsistencyModelImg2ImgPipelineFastTests", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sdxl": ("stable_diffusion_xl.test_stable_diffusion_xl", "StableDiffusionXLPipelineFastTests", ["unet", "vae_decoder"], "ok"),
    "sdxl-img2img": ("stable_diffusion_xl.test_stable_diffusion_xl_img2img", "StableDiffusionXLImg2ImgPipelineFastTests", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sdxl-refiner": ("stable_diffusion_xl.test_stable_diffusion_xl_img2img", "StableDiffusionXLImg2ImgRefinerOnlyPipelineFastTests", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sdxl-inpaint": ("stable_diffusion_xl.test_stable_diffusion_xl_inpaint", "StableDiffusionXLInpaintPipelineFastTests", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sdxl-pix2pix": ("stable_diffusion_xl.test_stable_diffusion_xl_instruction_pix2pix", "StableDiffusionXLInstructPix2PixPipelineFastTests", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sd-adapter": ("stable_diffusion_adapter.test_stable_diffusion_adapter", "StableDiffusionFullAdapterPipelineFastTests", ["unet", "vae_decoder"], "ok"),
    "sdxl-adapter": ("stable_diffusion_xl.test_stable_diffusion_xl_adapter", "StableDiffusionXLAdapterPipelineFastTests", ["unet", "vae_decoder"], "ok"),
    "cn": ("controlnet.test_controlnet", "ControlNetPipelineFastTests", ["controlnet", "unet", "vae_decoder"], "ok"),
    "cn-img2img": ("controlnet.test_controlnet_img2img", "ControlNetImg2ImgPipelineFastTests", ["vae_encoder", "controlnet", "unet", "vae_decoder"], "ok"),
    "cn-inpaint": ("controlnet.test_controlnet_inpaint", "ControlNetInpaintPipelineFastTests", ["vae_encoder", "controlnet", "unet", "vae_decoder"], "ok"),
    "sdxl-cn": ("controlnet.test_controlnet_sdxl", "StableDiffusionXLControlNetPipelineFastTests", ["controlnet", "unet", "vae_decoder"], "ok"),
    "sdxl-cn-img2img": ("controlnet.test_controlnet_sdxl_img2img", "ControlNetPipelineSDXLImg2ImgFastTests", ["vae_encoder", "controlnet", "unet", "vae_decoder"], "ok"),
    "sdxl-cn-inpaint": ("controlnet.test_controlnet_inpaint_sdxl", "ControlNetPipelineSDXLFastTests", ["vae_encoder", "controlnet", "unet", "vae_decoder"], "ok"),
    "sd3": ("stable_diffusion_3.test_pipeline_stable_diffusion_3", "StableDiffusion3PipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "sd3-img2img": ("stable_diffusion_3.test_pipeline_stable_diffusion_3_img2img", "StableDiffusion3Img2ImgPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "sd3-inpaint": ("stable_diffusion_3.test_pipeline_stable_diffusion_3_inpaint", "StableDiffusion3InpaintPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "sd3-cn": ("controlnet_sd3.test_controlnet_sd3", "StableDiffusion3ControlNetPipelineFastTests", ["vae_encoder", "controlnet", "transformer", "vae_decoder"], "ok"),
    "sd3-cn-inpaint": ("controlnet_sd3.test_controlnet_inpaint_sd3", "StableDiffusion3ControlInpaintNetPipelineFastTests", ["vae_encoder", "controlnet", "transformer", "vae_decoder"], "ok"),
    "flux": ("flux.test_pipeline_flux", "FluxPipelineTesterConfig", ["transformer", "vae_decoder"], "ok"),
    "flux-img2img": ("flux.test_pipeline_flux_img2img", "FluxImg2ImgPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "flux-inpaint": ("flux.test_pipeline_flux_inpaint", "FluxInpaintPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "flux-fill": ("flux.test_pipeline_flux_fill", "FluxFillPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "flux-control": ("flux.test_pipeline_flux_control", "FluxControlPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "flux-cn": ("controlnet_flux.test_controlnet_flux", "FluxControlNetPipelineFastTests", ["vae_encoder", "controlnet", "transformer", "vae_decoder"], "ok"),
    "flux-cn-img2img": ("controlnet_flux.test_controlnet_flux_img2img", "FluxControlNetImg2ImgPipelineFastTests", ["vae_encoder", "controlnet", "transformer", "vae_decoder"], "ok"),
    "flux-kontext": ("flux.test_pipeline_flux_kontext", "FluxKontextPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "kontext-inpaint": ("flux.test_pipeline_flux_kontext_inpaint", "FluxKontextInpaintPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "pixart-alpha": ("pixart_alpha.test_pixart", "PixArtAlphaPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "pixart-sigma": ("pixart_sigma.test_pixart", "PixArtSigmaPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "sana": ("sana.test_sana", "SanaPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "sana-sprint": ("sana.test_sana_sprint", "SanaSprintPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "ldm": ("latent_diffusion.test_latent_diffusion", "LDMTextToImagePipelineFastTests", ["unet"], "ok"),
    "dit": ("dit.test_dit", "DiTPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "flux-control-img2img": ("flux.test_pipeline_flux_control_img2img", "FluxControlImg2ImgPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "flux-control-inpaint": ("flux.test_pipeline_flux_control_inpaint", "FluxControlInpaintPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "flux-cn-inpaint": ("controlnet_flux.test_controlnet_flux_inpaint", "FluxControlNetInpaintPipelineTests", ["vae_encoder", "controlnet", "transformer", "vae_decoder"], "ok"),
    "sana-sprint-img2img": ("sana.test_sana_sprint_img2img", "SanaSprintImg2ImgPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "sd-pix2pix": ("stable_diffusion.test_stable_diffusion_instruction_pix2pix", "StableDiffusionInstructPix2PixPipelineTesterConfig", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sd-simple-inpaint": ("stable_diffusion.test_stable_diffusion_inpaint", "StableDiffusionSimpleInpaintPipelineTesterConfig", ["vae_encoder", "unet", "vae_decoder"], "ok"),
    "sd-image-variation": ("stable_diffusion_image_variation.test_stable_diffusion_image_variation", "StableDiffusionImageVariationPipelineFastTests", ["unet", "vae_decoder"], "ok"),
    "ddim": ("ddim.test_ddim", "DDIMPipelineFastTests", ["unet"], "ok"),
    "chroma": ("chroma.test_pipeline_chroma", "ChromaPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "chroma-img2img": ("chroma.test_pipeline_chroma_img2img", "ChromaImg2ImgPipelineFastTests", ["vae_encoder", "transformer", "vae_decoder"], "ok"),
    "bria": ("bria.test_pipeline_bria", "BriaPipelineTesterConfig", ["transformer", "vae_decoder"], "ok"),

    "aura-flow": ("aura_flow.test_pipeline_aura_flow", "AuraFlowPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "z-image": ("z_image.test_z_image", "ZImagePipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "qwenimage": ("qwenimage.test_qwenimage", "QwenImagePipelineTesterConfig", ["transformer", "vae_decoder"], "ok"),
    "hunyuandit": ("hunyuandit.test_hunyuan_dit", "HunyuanDiTPipelineFastTests", ["transformer", "vae_decoder"], "ok"),
    "sd-inpaint": (
        "stable_diffusion.test_stable_diffusion_inpaint", "StableDiffusionInpaintPipelineTesterConfig", ["vae_encoder", "unet", "vae_decoder"],
        "its all-white mask gives the VAE encoder an all-zero image, whose group norms amplify rounding noise: stock "
        "diffusers' own latents for it differ by 1.2 between layouts",
    ),
    "sana-cn": (
        "sana.test_sana_controlnet", "SanaControlNetPipelineFastTests", ["vae_encoder", "controlnet", "transformer", "vae_decoder"],
        "a tensor control image sets the size unbinned; the build calls the pipeline with a PIL image, binned",
    ),
    "sd-latent-upscale": (
        "stable_diffusion_2.test_stable_diffusion_latent_upscale", "StableDiffusionLatentUpscalePipelineFastTests", ["vae_encoder", "unet", "vae_decoder"],
        "its test passes latents as the image (16x16, made 256 pixels); the capture passes a picture, which the "
        "pipeline encodes first: other shapes",
    ),
    "lumina": (
        "lumina.test_lumina_nextdit", "LuminaPipelineFastTests", ["transformer", "vae_decoder"],
        "passes the text at each prompt's own length, which its compiled code fixes: the build captures another "
        "prompt than the test calls with (the build warns of it)",
    ),
    "lumina2": (
        "lumina2.test_pipeline_lumina2", "Lumina2PipelineFastTests", ["transformer", "vae_decoder"],
        "its transformer reads the text lengths out of the attention mask's values and hashes them (set(...)): "
        "torch.export cannot trace that",
    ),
    "flux2-klein": (
        "flux2.test_pipeline_flux2_klein", "Flux2KleinPipelineTesterConfig", ["transformer", "vae_decoder"],
        "its 2-layer test text encoder has none of the layers (9, 18, 27) the pipeline's default call reads; the "
        "test passes text_encoder_out_layers=(1,), the build calls it by default",
    ),
    "kandinsky22": (
        "kandinsky2_2.test_kandinsky", "KandinskyV22PipelineFastTests", ["unet"],
        "the decoder pipeline is called with image embeddings from a prior, not a prompt: the build cannot make a "
        "call of it (and its VAE, the pipeline's movq, is not a component)",
    ),
    "sd-pag": (
        "pag.test_pag_sd", "StableDiffusionPAGPipelineFastTests", ["unet", "vae_decoder"],
        "perturbed-attention guidance swaps attention processors per call: refused at build",
    ),
    "multi-cn": (
        "controlnet.test_controlnet", "StableDiffusionMultiControlNetPipelineFastTests", ["controlnet", "unet", "vae_decoder"],
        "a MultiControlNetModel is refused as one component",
    ),
}
# fmt: on
# Cases whose pipeline is asked for another height and width than its images have: LDM text-to-image makes
# latents of height // 8 whatever its VAE (the test's VAE scales by 2), so its default height, 64, makes 16-pixel
# images. name -> the height and width the test's call asks for.
ASKED_SIZE = {"ldm": 64, "lumina": 32, "lumina2": 32}


def _bert_tokenizer():
    """hf-internal-testing's tiny BERT tokenizer, made locally: WordPiece over lowercase letters, digits and their
    continuations, [CLS] text [SEP]."""
    import string

    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {t: i for i, t in enumerate(special + list(chars) + [f"##{c}" for c in chars])}
    model = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    model.normalizer = normalizers.BertNormalizer(lowercase=True)
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    model.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    model.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def _offline_tokenizers() -> None:
    """hf-internal-testing's tiny CLIP and T5 tokenizers (and T5 config), made locally instead of fetched."""
    import torch
    import transformers

    from diffbake.builder import tiny

    t5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8, vocab_size=1103)

    def wrap(original):
        def from_pretrained(name, *args, **kwargs):
            if isinstance(name, str) and name.startswith("hf-internal-testing/"):
                if "t5" in name:
                    return tiny._t5_tokenizer()
                if "clip" in name.lower():
                    return tiny._clip_tokenizer()
                if "gemma" in name:
                    return tiny._gemma_tokenizer()
                if "qwen2" in name.lower():
                    return tiny._qwen2_tokenizer()
                if "bert" in name.lower():
                    return _bert_tokenizer()
            return original(name, *args, **kwargs)

        return staticmethod(from_pretrained)

    for cls in ("CLIPTokenizer", "CLIPTokenizerFast", "AutoTokenizer", "T5TokenizerFast", "T5Tokenizer",
                "Qwen2Tokenizer", "Qwen2TokenizerFast"):  # fmt: skip
        klass = getattr(transformers, cls)
        klass.from_pretrained = wrap(klass.from_pretrained)
    config = transformers.AutoConfig.from_pretrained

    def auto_config(name, *args, **kwargs):
        if isinstance(name, str) and name.startswith("hf-internal-testing/") and "t5" in name:
            return transformers.T5Config(**t5)
        return config(name, *args, **kwargs)

    transformers.AutoConfig.from_pretrained = staticmethod(auto_config)
    umt5 = transformers.UMT5EncoderModel.from_pretrained

    def umt5_model(name, *args, **kwargs):  # tiny-random-umt5: the T5 sizes above, made from its config
        if isinstance(name, str) and name.startswith("hf-internal-testing/"):
            return transformers.UMT5EncoderModel(transformers.UMT5Config(**t5)).eval()
        return umt5(name, *args, **kwargs)

    transformers.UMT5EncoderModel.from_pretrained = staticmethod(umt5_model)
    bert = transformers.BertModel.from_pretrained
    bert_sizes = dict(vocab_size=1124, hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=37)

    def bert_model(name, *args, **kwargs):  # tiny-random-BertModel's sizes
        if isinstance(name, str) and name.startswith("hf-internal-testing/"):
            torch.manual_seed(0)
            return transformers.BertModel(transformers.BertConfig(**bert_sizes)).eval()
        return bert(name, *args, **kwargs)

    transformers.BertModel.from_pretrained = staticmethod(bert_model)


def run_case(name: str, work: Path) -> str:
    """ "ok: ..." or what failed."""
    import diffusers
    import numpy as np
    import PIL.Image
    import torch

    import diffbake
    from diffbake.format.components import needs_guidance_asked

    module, cls, components, _ = CASES[name]
    test = getattr(importlib.import_module(f"tests.pipelines.{module}"), cls)()
    pipeline = getattr(test, "pipeline_class", None) or getattr(diffusers, cls.replace("FastTests", ""))
    source = work / name / "model"
    pipeline(**test.get_dummy_components()).save_pretrained(source)
    takes_device = "device" in inspect.signature(test.get_dummy_inputs).parameters
    inputs = test.get_dummy_inputs("cpu") if takes_device else test.get_dummy_inputs()
    inputs.pop("generator", None)
    inputs["output_type"] = "np"

    def images(pipe):
        return pipe(**copy.deepcopy(inputs), generator=torch.Generator().manual_seed(0)).images

    stock = images(diffusers.DiffusionPipeline.from_pretrained(source))
    batch, height, width = stock.shape[:3]
    if name in ASKED_SIZE:
        height = width = ASKED_SIZE[name]
    tokens = inputs.get("max_sequence_length")
    reference = inputs.get("image")
    own_size = (  # an input image of another size than the output, which the pipeline does not resize to it
        isinstance(reference, PIL.Image.Image)
        and reference.size != (width, height)
        and {"height", "width"} <= set(inspect.signature(pipeline.__call__).parameters)
    )
    # A test that asks for guidance the pipeline's default call does not run (LDM text-to-image) compiles it.
    guided = needs_guidance_asked(pipeline) and inputs.get("guidance_scale", 0) > 1
    recipe = f'[source]\nmodel = "{source.as_posix()}"\n'
    for c in components:
        extra = f", text_tokens = {tokens}" if tokens and c in ("transformer", "controlnet") else ""
        if own_size and c != "vae_decoder":
            extra += f", image_height = {reference.size[1]}, image_width = {reference.size[0]}"
        recipe += f"[components.{c}]\nshapes = {{ batch = {batch}, height = {height}, width = {width}{extra} }}\n"
        if c in ("unet", "transformer") and guided:
            recipe += "cfg = true\n"
    (work / name / "recipe.toml").write_text(recipe)
    start = time.perf_counter()
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffbake.cli",
            "build",
            str(work / name / "recipe.toml"),
            "--out",
            str(work / name / "artifact"),
        ],
        capture_output=True,
        text=True,
    )
    if build.returncode:
        if os.environ.get("DIFFBAKE_DEBUG"):
            print(build.stderr[-20000:])
        return "build failed: " + next(
            (line for line in build.stderr.splitlines() if line.startswith("error")), build.stderr[-500:]
        )
    loaded = images(diffbake.load(work / name / "artifact"))
    error = float(np.abs(loaded - stock).max())
    verdict = "ok" if error <= TOLERANCE else "differs"
    return f"{verdict}: built in {time.perf_counter() - start:.0f} s, max error {error:.2e}, images {stock.shape}"


def main(argv: list[str]) -> int:
    if not argv or not (Path(argv[0]) / "tests" / "pipelines").is_dir():
        print(__doc__)
        return 2
    sys.path.insert(0, str(Path(argv[0]).resolve()))
    _offline_tokenizers()
    names = argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
        return 2
    failures = 0
    with tempfile.TemporaryDirectory(prefix="diffbake-diffusers-fast-") as tmp:
        for name in names:
            try:
                result = run_case(name, Path(tmp))
            except Exception as e:  # the call on the artifact refused (a mismatch), or the harness broke
                result = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if os.environ.get("DIFFBAKE_DEBUG"):
                    traceback.print_exc()
            expected = CASES[name][3]
            good = result.startswith("ok") if expected == "ok" else not result.startswith("ok")
            failures += not good
            note = "" if expected == "ok" else f"  [expected: {expected}]"
            print(f"{'PASS' if good else 'FAIL'} {name}: {result}{note}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
