"""Image inputs and control: img2img, inpainting and ControlNet artifacts (built from their plain recipes in
plain.py, shared with test_contracts' comparison with stock diffusers), what their stand-ins return, and what
they refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

import diffbake
from diffbake.errors import InputMismatchError, RecipeError
from diffbake.format.manifest import read_manifest
from diffbake.runtime.standins import CompiledModel
from plain import image, mask, plain_recipe


@pytest.fixture(scope="module")
def img2img(artifacts):
    return diffbake.load(artifacts("sd-img2img"))


def test_the_vae_encoder_rebuilds_the_latent_distribution(img2img, saved_pipelines):
    eager = AutoencoderKL.from_pretrained(saved_pipelines("sd-img2img") / "vae")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    got = img2img.vae.encode(x).latent_dist
    with torch.no_grad():
        want = eager.encode(x).latent_dist
    assert type(got) is DiagonalGaussianDistribution
    assert torch.allclose(got.mode(), want.mode(), atol=1e-5)
    sampled = got.sample(torch.Generator().manual_seed(7)), want.sample(torch.Generator().manual_seed(7))
    assert torch.allclose(*sampled, atol=1e-5)
    (posterior,) = img2img.vae.encode(x, return_dict=False)
    assert torch.equal(posterior.mean, got.mean)


def test_one_stand_in_compiles_both_vae_methods(artifacts, img2img):
    assert isinstance(img2img.vae, CompiledModel) and set(img2img.vae.diffbake_components) == {
        "vae_encoder",
        "vae_decoder",
    }
    assert not (artifacts("sd-img2img") / "pipeline" / "vae").exists()  # no eager VAE weights shipped


def test_an_input_image_of_another_size_is_refused(img2img):
    with pytest.raises(InputMismatchError) as e:
        img2img("a cat", image=image(48, 1), num_inference_steps=2)
    assert str(e.value) == (
        "vae_encoder: input 'x' has shape (1, 3, 48, 48), but this artifact was compiled for (1, 3, 64, 64) "
        "(1 image(s) per call at 64x64 pixels); pass an input image of 64x64 pixels (or height and width of 64x64 "
        "where the pipeline takes them and resizes it), or rebuild with [components.vae_encoder] shapes set for "
        "this size"
    )


def test_the_controlnet_is_compiled_with_its_scale_as_an_input(artifacts):
    pipe = diffbake.load(artifacts("sd-controlnet"))
    assert isinstance(pipe.controlnet, ControlNetModel) and isinstance(pipe.controlnet, CompiledModel)
    variant = read_manifest(artifacts("sd-controlnet")).components["controlnet"].variants[0]
    assert "conditioning_scale" in [s.name for s in variant.inputs]
    assert len(variant.outputs) == 5  # four down-block residuals and the mid-block one
    call = dict(prompt="a cat", image=image(32, 4), num_inference_steps=2, output_type="np")
    off, on = (
        pipe(**call, controlnet_conditioning_scale=s, generator=torch.Generator().manual_seed(0)).images
        for s in (0.0, 1.0)
    )
    assert np.abs(off - on).max() > 1e-3  # the per-call scale reaches the compiled code
    with pytest.raises(InputMismatchError) as e:
        pipe("a cat", image=image(48, 4), num_inference_steps=2)
    assert str(e.value).startswith(
        "controlnet: input 'controlnet_cond' has shape (2, 3, 48, 48), but this artifact was compiled for "
        "(2, 3, 32, 32)"
    )
    assert "pass a control image of 32x32 pixels" in str(e.value)


def test_inpainting_resizes_an_image_and_a_mask_of_other_sizes(artifacts, saved_pipelines):
    # The 9-channel UNet; the pipeline resizes the image and the mask to height x width (by default the size the
    # artifact was compiled for) before anything compiled sees them, so other sizes fit, as in stock diffusers.
    variant = read_manifest(artifacts("sd-inpaint")).components["unet"].variants[0]
    assert variant.inputs[0].name == "sample" and variant.inputs[0].shape[1] == 9
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd-inpaint"))
    pipe = diffbake.load(artifacts("sd-inpaint"))
    call = dict(prompt="a cat", image=image(48, 5), mask_image=mask(40), num_inference_steps=2, output_type="np")
    got = pipe(**call, generator=torch.Generator().manual_seed(1)).images
    want = stock(**call, height=64, width=64, generator=torch.Generator().manual_seed(1)).images
    assert got.shape == (1, 64, 64, 3) and np.abs(got - want).max() <= 5e-4


def test_a_decoder_only_recipe_for_img2img_names_the_encoder(workdir, saved_pipelines):
    recipe = workdir / "img2img-decoder-only.toml"
    source = saved_pipelines("sd-img2img").as_posix()
    recipe.write_text(
        f'[source]\nmodel = "{source}"\n[components.vae_decoder]\nshapes = {{ batch = 1, height = 32, width = 32 }}\n'
    )
    with pytest.raises(RecipeError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value) == (
        "vae_decoder: the pipeline calls vae.encode() too, which the stand-in of a compiled vae cannot run eager; "
        "add [components.vae_encoder] to the recipe to compile it as well"
    )
    assert not (workdir / "never").exists()


def test_generate_takes_image_flags(artifacts, tmp_path):
    from click.testing import CliRunner

    from diffbake.cli import cli

    runner = CliRunner()
    source, mask_file, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    image(64, 1).save(source)
    mask(64).save(mask_file)
    inpaint = str(artifacts("sd-inpaint"))
    args = ["generate", inpaint, "-p", "a cat", "--image", str(source), "--mask", str(mask_file), "--steps", "2"]
    ok = runner.invoke(cli, [*args, "--strength", "0.7", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert out.is_file()
    control = runner.invoke(
        cli,
        ["generate", str(artifacts("sd-controlnet")), "-p", "a cat", "--control", str(source), "--control-scale"]
        + ["0.5", "--steps", "2", "--out", str(out)],
    )
    assert control.exit_code == 0, control.output
    refused = runner.invoke(cli, ["generate", inpaint, "-p", "a cat", "--control", str(source)])
    assert refused.exit_code == 2
    assert (
        "--control: StableDiffusionInpaintPipeline takes no control image (it has no ControlNet); leave it out"
    ) in refused.output
    wrong = runner.invoke(cli, ["generate", str(artifacts("sd-controlnet")), "-p", "a", "--image", str(source)])
    assert wrong.exit_code == 2
    assert (
        "--image: StableDiffusionControlNetPipeline takes no image to edit; its image is the control image: give "
        "--control"
    ) in wrong.output


def test_a_list_of_controlnets_is_refused_by_name(workdir):
    from diffusers import MultiControlNetModel

    from diffbake.builder.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline("sd-controlnet")
    pipe.register_modules(controlnet=MultiControlNetModel([pipe.controlnet, pipe.controlnet]))
    source = workdir / "saved-sd-multicontrolnet"
    pipe.save_pretrained(source)
    recipe = workdir / "multicontrolnet.toml"
    recipe.write_text(
        f'[source]\nmodel = "{source.as_posix()}"\n'
        "[components.controlnet]\nshapes = { batch = 1, height = 32, width = 32 }\n"
    )
    with pytest.raises(RecipeError) as e:
        diffbake.build(recipe, workdir / "never-multi")
    assert str(e.value) == (
        f"{recipe}: [components.controlnet]: the pipeline's controlnet is a MultiControlNetModel of 2 models, which "
        "diffbake does not compile as one call; build from a pipeline with a single ControlNetModel, or leave "
        "[components.controlnet] out (the list then runs eager, and the denoiser is still compiled with its "
        "residuals as inputs)"
    )
    assert not (workdir / "never-multi").exists()


def test_compiled_text_encoders_stand_in_for_the_eager_classes(artifacts):
    from transformers import CLIPTextModel, T5EncoderModel

    artifact = artifacts("flux-text-encoders")
    pipe = diffbake.load(artifact)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder, CompiledModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert not (artifact / "pipeline" / "text_encoder").exists()  # no eager weights shipped
    assert not (artifact / "pipeline" / "text_encoder_2").exists()
    with pytest.raises(InputMismatchError) as e:
        pipe("a cat", height=32, width=32, max_sequence_length=64, num_inference_steps=2)
    assert str(e.value) == (
        "text_encoder_2: input 'input_ids' has shape (1, 64), but this artifact was compiled for (1, 512) (1 image(s) "
        "per call at 32x32 pixels, 512 text tokens); call the pipeline with height=32, width=32, "
        "max_sequence_length=512 and 1 image(s) in all (prompts x num_images_per_prompt), or rebuild with "
        "[components.text_encoder_2] shapes set for this call"
    )


def test_sd3_controlnet_inpainting_gets_its_control_mask_at_build_and_from_mask(tmp_path):
    # The pipeline requires control_mask beside control_image: the capture must pass one (a mask, as for
    # mask_image), and `diffbake generate --mask` must reach it.
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline as Pipeline

    from diffbake.builder.capture import pipeline_kwargs
    from diffbake.cli import _image_flags

    kwargs = pipeline_kwargs(Pipeline.__new__(Pipeline), {"batch": 1, "height": 32, "width": 48})
    assert (kwargs["control_image"].mode, kwargs["control_image"].size) == ("RGB", (48, 32))
    assert (kwargs["control_mask"].mode, kwargs["control_mask"].size) == ("L", (48, 32))
    mask_file = tmp_path / "mask.png"
    mask(32).save(mask_file)
    flags = _image_flags(Pipeline, {"mask": mask_file, "control": mask_file}, {})
    assert set(flags) == {"control_mask", "control_image"} and flags["control_mask"].mode == "L"


def test_a_pipeline_conditioned_on_an_image_alone_is_asked_for_images_per_image():
    # StableDiffusionImageVariationPipeline takes no prompt, class labels or batch size: the capture asks for
    # num_images_per_prompt images of one input image at the recipe's size (it refused the pipeline before).
    from diffusers import StableDiffusionImageVariationPipeline as Pipeline

    from diffbake.builder.capture import pipeline_kwargs

    kwargs = pipeline_kwargs(Pipeline.__new__(Pipeline), {"batch": 2, "height": 32, "width": 48})
    assert (kwargs["num_images_per_prompt"], kwargs["height"], kwargs["width"]) == (2, 32, 48)
    assert (kwargs["image"].mode, kwargs["image"].size) == ("RGB", (48, 32))
    assert not {"prompt", "class_labels", "batch_size"} & set(kwargs)


def test_a_t2i_adapter_pipeline_builds_and_matches_stock(workdir, saved_pipelines):
    # The UNet pops the adapter's residuals from the list the pipeline passes it
    # (down_intrablock_additional_residuals): the build must capture them before the call, and call the eager UNet
    # with a list, as the pipeline does.
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter, UNet2DConditionModel

    sd = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    torch.manual_seed(0)
    # As diffusers' adapter tests make them: the adapter's features meet a cross-attention block first.
    unet = UNet2DConditionModel.from_config(
        {**sd.unet.config, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}
    )
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2)
    parts = ("vae", "text_encoder", "tokenizer", "scheduler")
    pipe = StableDiffusionAdapterPipeline(
        **{k: getattr(sd, k) for k in parts}, unet=unet, adapter=adapter, safety_checker=None, feature_extractor=None
    )
    source = workdir / "saved-sd-adapter"
    pipe.save_pretrained(source)
    recipe = workdir / "sd-adapter.toml"
    recipe.write_text(plain_recipe(source, "unet", size=64))
    loaded = diffbake.load(diffbake.build(recipe, workdir / "sd-adapter"))
    stock = DiffusionPipeline.from_pretrained(source)
    call = dict(prompt="a cat", image=image(64, 4), num_inference_steps=2)
    got, want = (
        p(**call, generator=torch.Generator().manual_seed(0), output_type="np").images for p in (loaded, stock)
    )
    assert np.abs(got - want).max() <= 5e-4


def test_a_perturbed_attention_guidance_pipeline_is_refused_with_the_fix(workdir, saved_pipelines):
    from diffusers import StableDiffusionPAGPipeline

    pag = StableDiffusionPAGPipeline.from_pipe(DiffusionPipeline.from_pretrained(saved_pipelines("sd")))
    source = workdir / "saved-sd-pag"
    pag.save_pretrained(source)
    recipe = workdir / "sd-pag.toml"
    recipe.write_text(plain_recipe(source, "unet", size=64))
    with pytest.raises(RecipeError) as e:
        diffbake.build(recipe, workdir / "never-pag")
    assert str(e.value) == (
        "StableDiffusionPAGPipeline: perturbed-attention guidance swaps the attention processors of its unet on "
        "every call, which compiled code has built in; save the pipeline without PAG "
        "(StableDiffusionPipeline.from_pipe(pipe).save_pretrained(...)) and build from that, or leave "
        "[components.unet] out of the recipe"
    )
    assert not (workdir / "never-pag").exists()


def test_what_a_stand_in_cannot_carry_is_refused_with_the_fix():
    # What a pipeline reads of its denoiser beyond plain values (here the attention processors, which
    # perturbed-attention guidance reads and swaps) cannot follow it into compiled code: keep it eager.
    from diffbake.builder.capture import stand_in_needs
    from diffbake.builder.tiny import make_tiny_pipeline
    from diffbake.errors import BuildError

    unet = make_tiny_pipeline("sd").unet
    with pytest.raises(BuildError) as e:
        stand_in_needs("unet", unet, {"attn_processors": unet.attn_processors})
    assert str(e.value) == (
        "unet: the pipeline reads attn_processors of UNet2DConditionModel (dict), which a compiled module does not "
        "carry; keep the unet eager: leave [components.unet] out of the recipe"
    )


def test_a_kontext_reference_image_has_a_size_of_its_own(artifacts, tmp_path):
    # The flux-kontext plain recipe gives the reference image 48x64 pixels for a 32x32 output (its comparison with
    # stock diffusers is in test_contracts): the build captures with such an image, the default call asks for that
    # output, and an image of another size is refused with the size compiled.
    from diffusers import FluxKontextPipeline

    from diffbake.builder.capture import pipeline_kwargs
    from diffbake.runtime.load import compiled_call

    sizes = {"batch": 1, "height": 32, "width": 32, "image_height": 48, "image_width": 64}
    kwargs = pipeline_kwargs(FluxKontextPipeline.__new__(FluxKontextPipeline), sizes)
    assert (kwargs["image"].size, kwargs["height"], kwargs["width"]) == ((64, 48), 32, 32)
    assert (kwargs["max_area"], kwargs["_auto_resize"]) == (32 * 32, False)
    manifest = read_manifest(artifacts("flux-kontext"))
    assert manifest.components["transformer"].variants[0].shapes == {**sizes, "text_tokens": 512}
    assert compiled_call(manifest) == {
        "height": 32,
        "width": 32,
        "num_images_per_prompt": 1,
        "max_sequence_length": 512,
        "max_area": 32 * 32,
        "_auto_resize": False,
    }
    pipe = diffbake.load(artifacts("flux-kontext"))
    with pytest.raises(InputMismatchError) as e:
        pipe(prompt="a cat", image=image(32, 1), **compiled_call(manifest), num_inference_steps=1)
    # The reference image's tokens follow the output's: 64 + 64 for a 32x32 image, 64 + 192 compiled.
    assert str(e.value) == (
        "transformer: input 'hidden_states' has shape (1, 128, 64), but this artifact was compiled for (1, 256, 64) "
        "(1 image(s) per call at 32x32 pixels, 512 text tokens, from an input image of 48x64 pixels); call the "
        "pipeline with height=32, width=32, max_sequence_length=512, an image of 48x64 pixels and 1 image(s) in all "
        "(prompts x num_images_per_prompt), or rebuild with [components.transformer] shapes set for this call"
    )
    # diffbake generate calls it so: a 32x32 image from the 48x64 reference.
    from click.testing import CliRunner

    from diffbake.cli import cli

    source, out = tmp_path / "in.png", tmp_path / "out.png"
    image(32, 1, width=64, height=48).save(source)
    args = ["generate", str(artifacts("flux-kontext")), "-p", "a cat", "--image", str(source), "--steps", "2"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 32)
