"""Call contracts captured from the pipeline: pipelines beyond text-to-image build with plain recipes and match
stock diffusers; calls that differ from the captured contract are refused; the captured call decides guidance.

Every pipeline here is a tiny one made the way diffusers' own fast tests make it, saved with save_pretrained,
and built from that folder with a plain recipe (shapes only). The reference is diffusers alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffbake
from diffbake.errors import InputMismatchError, RecipeError
from diffbake.format.manifest import read_manifest
from diffbake.runtime.load import compiled_call
from plain import PLAIN, family, plain_recipe

ATOL = 5e-4


def _images(pipe, call: dict) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_recipe_builds_and_matches_stock(name, artifacts, saved_pipelines):
    loaded = diffbake.load(artifacts(name))
    stock = DiffusionPipeline.from_pretrained(saved_pipelines(family(name)))
    for call in PLAIN[name][1]:
        got, want = _images(loaded, call), _images(stock, call)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= ATOL, f"{name} {call}"


def test_a_pipeline_whose_binning_refuses_its_transformer_is_built_and_called_without_binning(workdir, saved_pipelines):
    # diffusers' own PixArt fast tests make a transformer whose sample_size no binning table knows: the pipeline
    # refuses every call with binning on, so it is only ever called with use_resolution_binning=False.
    source = workdir / "saved-pixart-unbinned"
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines("pixart"))
    pipe.transformer.register_to_config(sample_size=16)
    pipe.save_pretrained(source)
    stock = DiffusionPipeline.from_pretrained(source)
    with pytest.raises(ValueError, match="Invalid sample size"):
        stock("a cat", num_inference_steps=1)
    recipe = workdir / "pixart-unbinned.toml"
    recipe.write_text(plain_recipe(source, "transformer", size=64))
    loaded = diffbake.load(diffbake.build(recipe, workdir / "pixart-unbinned"))
    call = dict(prompt="a cat", height=64, width=64, use_resolution_binning=False, num_inference_steps=2)
    assert np.abs(_images(loaded, call) - _images(stock, call)).max() <= ATOL


def test_a_binning_pipeline_refused_for_its_size_says_that_it_rounds_the_size(artifacts):
    # PixArt's 256-pixel table rounds a 256x512 call to 176x352 pixels (latents 22x44), and the recipe's 512x512 to
    # 256x256 (latents 32x32): the shapes in the refusal are not the call's height and width, and the message says so.
    pipe = diffbake.load(artifacts("pixart"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(InputMismatchError) as e:
        pipe("a cat", height=256, width=512, num_inference_steps=1)
    assert str(e.value) == (
        "transformer: input 'hidden_states' has shape (2, 4, 22, 44), but this artifact was compiled for "
        "(2, 4, 32, 32) (1 image(s) per call at 512x512 pixels, 300 text tokens, with classifier-free guidance); call "
        "the pipeline with height=512, width=512, max_sequence_length=300 and 1 image(s) in all (prompts x "
        "num_images_per_prompt), or rebuild with [components.transformer] shapes set for this call "
        "(PixArtSigmaPipeline rounds height and width to the nearest size of its resolution table before its models "
        "see them, unless called with use_resolution_binning=False: the shapes above are after any rounding)"
    )


def test_every_pipeline_passes_the_compiled_codes_own_input_checks(artifacts):
    # Under `diffbake verify` the compiled code checks each input's shape and every stride itself
    # (AOTI_RUNTIME_CHECK_INPUTS): a self-test input the guards leave in another layout than compiled (a timestep
    # broadcast to batch 1 has stride 0, which torch still calls contiguous) fails there. One child checks all.
    names = ["sd", "sdxl", "flux", *sorted(PLAIN)]
    script = "import sys\nfrom diffbake.runtime.selfcheck import main\nfor a in sys.argv[1:]:\n    main([a])\n"
    paths = [str(artifacts(name)) for name in names]
    proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"ok"')]
    assert len(results) == len(names), proc.stderr[-3000:]
    failed = {name: r["error"] for name, r in zip(names, results, strict=True) if not r["ok"]}
    assert failed == {}


def test_captured_contract_of_dit(artifacts):
    m = read_manifest(artifacts("dit"))
    assert m.pipeline_class == "DiTPipeline" and m.denoiser == "transformer"
    variant = m.components["transformer"].variants[0]
    # Guidance doubles the batch; class labels stay int64 labels, timesteps are compiled as float32.
    assert [(s.name, s.shape, s.dtype) for s in variant.inputs] == [
        ("hidden_states", [2, 4, 16, 16], "float32"),
        ("timestep", [2], "float32"),
        ("class_labels", [2], "int64"),
    ]
    assert variant.cfg is True
    # The self-test replays the labels the pipeline passed: label 0 for the image, 1000 (no class) for guidance.
    assert variant.self_test.fill["class_labels"] == [0.0, 1000.0]
    assert m.components["transformer"].returns == {
        "class": "diffusers.models.modeling_outputs.Transformer2DModelOutput",
        "args": {"sample": {"tensor": 0}},
    }


def test_unconditional_pipeline_has_no_height_and_no_vae(artifacts, workdir, saved_pipelines):
    m = read_manifest(artifacts("ddpm"))
    assert list(m.components) == ["unet"]
    variant = m.components["unet"].variants[0]
    assert variant.dims["batch"].min == 1 and variant.dims["batch"].max == 3
    assert compiled_call(m) == {"batch_size": 1}
    recipe = workdir / "ddpm-size.toml"
    recipe.write_text(
        f'[source]\nmodel = "{saved_pipelines("ddpm").as_posix()}"\n'
        "[components.unet]\nshapes = { batch = 1, height = 16, width = 16 }\n"
    )
    with pytest.raises(RecipeError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value) == (
        f"{recipe}: [components.unet] shapes.height = 16: DDPMPipeline takes no height; it makes 8x8 images (its "
        "denoiser's sample_size); set height = width = 8"
    )


# --- calls that differ from the captured contract ---------------------------------------------------------------


def _unet_call(pipe, **extra):
    unet = pipe.unet
    sample = torch.randn(2, 4, 32, 32)
    states = torch.randn(2, 77, 32)
    return unet(sample, 10, encoder_hidden_states=states, return_dict=False, **extra)


def test_a_call_matching_the_contract_runs(artifacts):
    pipe = diffbake.load(artifacts("sd"))
    (out,) = _unet_call(pipe)
    assert out.shape == (2, 4, 32, 32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            dict(added_cond_kwargs={"image_embeds": torch.zeros(2, 4)}),
            "unet: argument 'added_cond_kwargs.image_embeds' is not part of the compiled call (the build captured "
            "added_cond_kwargs, attention_mask, class_labels, cross_attention_kwargs, down_block_additional_residuals, "
            "down_intrablock_additional_residuals, encoder_attention_mask, encoder_hidden_states, "
            "mid_block_additional_residual, sample, timestep, timestep_cond); call without it, or run this module eager",
        ),
        (
            dict(cross_attention_kwargs={"scale": 0.5}),
            "unet: argument 'cross_attention_kwargs.scale' is not part of the compiled call (the build captured "
            "added_cond_kwargs, attention_mask, class_labels, cross_attention_kwargs, down_block_additional_residuals, "
            "down_intrablock_additional_residuals, encoder_attention_mask, encoder_hidden_states, "
            "mid_block_additional_residual, sample, timestep, timestep_cond); call without it, or run this module eager",
        ),
        (
            dict(class_labels=5),
            "unet: argument 'class_labels' is 5, but this artifact was compiled for None (what the pipeline passed "
            "when it was built); call with that value, or rebuild with a recipe whose call passes this one",
        ),
    ],
)
def test_a_call_outside_the_contract_is_refused(artifacts, extra, message):
    pipe = diffbake.load(artifacts("sd"))
    with pytest.raises(InputMismatchError) as e:
        _unet_call(pipe, **extra)
    assert str(e.value) == message


def test_a_missing_tensor_is_refused(artifacts):
    pipe = diffbake.load(artifacts("sd"))
    with pytest.raises(InputMismatchError) as e:
        pipe.unet(torch.randn(2, 4, 32, 32), 10, encoder_hidden_states=None)
    assert (
        str(e.value) == "unet: input 'encoder_hidden_states' is required by the compiled code, but the call passed none"
    )


# --- guidance, as the captured call shows it ---------------------------------------------------------------------


def test_flux_without_a_cfg_batch_is_called_with_its_own_guidance(artifacts):
    # Flux has no CFG batch; its guidance_scale feeds the guidance embedding (Flux-dev), so it is never forced.
    m = read_manifest(artifacts("flux"))
    assert m.components["transformer"].variants[0].cfg is None
    assert "guidance_scale" not in compiled_call(m)


@pytest.mark.parametrize(
    ("family", "shapes", "message"),
    [
        (
            "flux",
            "shapes = { batch = 1, height = 32, width = 32, text_tokens = 16 }\ncfg = true",
            "[components.transformer] cfg = true: called at its defaults and with guidance_scale = 7.5, FluxPipeline "
            "does not double the transformer batch for classifier-free guidance (a guidance-distilled or LCM model, "
            "say); remove the key",
        ),
        (
            "sd",
            "shapes = [{ batch = 1, height = 64, width = 64 }, { batch = 1, height = 64, width = 64, cfg = true }]",
            "[components.unet] shapes: two variants are the same once the pipeline's defaults are filled in "
            "(batch=1, height=64, width=64, cfg=true); remove one",
        ),
    ],
)
def test_guidance_recipe_errors_come_from_the_captured_call(family, shapes, message, workdir, saved_pipelines):
    denoiser = "transformer" if family == "flux" else "unet"
    recipe = workdir / f"cfg-{family}.toml"
    recipe.write_text(f'[source]\nmodel = "{saved_pipelines(family).as_posix()}"\n[components.{denoiser}]\n{shapes}\n')
    with pytest.raises(RecipeError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value) == f"{recipe}: {message}"


def test_an_lcm_unet_runs_no_cfg_batch_whatever_the_guidance(workdir):
    # A UNet with time_cond_proj_dim (LCM-distilled) embeds guidance and never doubles its batch: the captured
    # call compiles batch 1 with timestep_cond, and guidance_scale = 7.5 works as in stock diffusers.
    from diffbake.builder import tiny

    pipe = tiny.make_tiny_pipeline("sd")
    pipe.unet = tiny._unet(cross_attention_dim=32, time_cond_proj_dim=8)
    folder = workdir / "saved-lcm"
    pipe.save_pretrained(folder)
    recipe = workdir / "lcm.toml"
    recipe.write_text(
        f'[source]\nmodel = "{folder.as_posix()}"\n[components.unet]\nshapes = {{ batch = 1, height = 64, width = 64 }}\n'
    )
    artifact = diffbake.build(recipe, workdir / "artifacts" / "lcm")
    variant = read_manifest(artifact).components["unet"].variants[0]
    assert variant.cfg is None
    assert [(s.name, s.shape) for s in variant.inputs] == [
        ("sample", [1, 4, 32, 32]),
        ("timestep", []),
        ("encoder_hidden_states", [1, 77, 32]),
        ("timestep_cond", [1, 8]),
    ]
    call = dict(prompt="a cat", guidance_scale=7.5, num_inference_steps=2)
    got = _images(diffbake.load(artifact), call)
    want = _images(DiffusionPipeline.from_pretrained(folder), call)
    assert np.abs(got - want).max() <= ATOL


def test_a_unet_range_must_fit_its_downsampling(workdir):
    # A UNet that halves the latent three times needs latent sizes in steps of 8 (16 pixels with this VAE):
    # torch.export says so, and the build names the range ends that do not fit.
    from diffbake.builder import tiny

    pipe = tiny.make_tiny_pipeline("sd")
    pipe.unet = tiny._unet(
        cross_attention_dim=32,
        block_out_channels=(32, 32, 32, 64),
        down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3,
        norm_num_groups=8,
    )
    folder = workdir / "saved-deep-unet"
    pipe.save_pretrained(folder)
    recipe = workdir / "odd-range.toml"
    recipe.write_text(
        f'[source]\nmodel = "{folder.as_posix()}"\n[components.unet]\nshapes = {{ batch = 1, height = [40, 96], width = 64 }}\n'
    )
    with pytest.raises(RecipeError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value).startswith(
        f"{recipe}: [components.unet] shapes.height = [40, 96]: a dynamic range must start and end at multiples of "
        "16 pixels for this model (torch.export: Not all values of height"
    )


def test_a_module_that_cannot_be_exported_fails_the_build_naming_it(workdir, saved_pipelines, monkeypatch):
    # Data-dependent control flow, as some custom models have: torch.export cannot trace it.
    import functools

    from diffusers import UNet2DModel

    from diffbake.errors import BuildError

    forward = UNet2DModel.forward

    @functools.wraps(forward)
    def branchy(self, sample, *args, **kwargs):
        if sample.mean() > 0:  # a branch on a tensor's value
            sample = sample * 1.0
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", branchy)
    recipe = workdir / "branchy.toml"
    recipe.write_text(PLAIN["ddim"][0].format(source=saved_pipelines("ddim").as_posix()))
    with pytest.raises(BuildError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value).startswith("unet: torch.export failed (")
    assert "data-dependent" in str(e.value) and str(e.value).endswith("set DIFFBAKE_DEBUG=1 for the traceback")
    assert not (workdir / "never").exists()


def test_rebind_a_dit_to_another_checkpoint(artifacts, workdir):
    # Another DiT of the same architecture (other seeds): its weights on the compiled code, with no compile.
    from diffbake.builder import tiny

    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = tiny.make_tiny_pipeline("dit")
        for p in other.transformer.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)
    folder = workdir / "saved-dit-other"
    other.save_pretrained(folder)
    rebound = diffbake.rebind(artifacts("dit"), weights=folder, out=workdir / "artifacts" / "dit-other")
    call = PLAIN["dit"][1][0]
    got = _images(diffbake.load(rebound), call)
    want = _images(DiffusionPipeline.from_pretrained(folder), call)
    assert np.abs(got - want).max() <= ATOL
    assert np.abs(got - _images(diffbake.load(artifacts("dit")), call)).max() > 1e-3  # other weights indeed


def test_sd3_in_bfloat16_quantized_with_two_variants(workdir, saved_pipelines):
    recipe = workdir / "sd3-bf16.toml"
    recipe.write_text(
        f'[source]\nmodel = "{saved_pipelines("sd3").as_posix()}"\n[target]\ndtype = "bfloat16"\nallow_emulated = true\n'
        "[components.transformer]\n"
        "shapes = [{ batch = 1, height = 32, width = 32 }, { batch = 2, height = 32, width = 32 }]\n"
        'quantization = { method = "int8_weight_only" }\n'
        "[components.vae_decoder]\nshapes = { batch = [1, 2], height = 32, width = 32 }\n"
    )
    artifact = diffbake.build(recipe, workdir / "artifacts" / "sd3-bf16")
    m = read_manifest(artifact)
    transformer = m.components["transformer"]
    assert [v.package for v in transformer.variants] == ["transformer/model.pt2", "transformer/model-1.pt2"]
    assert transformer.transforms["quantization"]["method"] == "int8_weight_only"
    assert all(v.max_abs_error <= v.tolerance and v.cfg is True for v in transformer.variants)
    pipe = diffbake.load(artifact)
    for n in (1, 2):
        images = _images(pipe, dict(prompt="a cat", num_images_per_prompt=n, num_inference_steps=2))
        assert images.shape == (n, 32, 32, 3) and np.isfinite(images).all()


def test_half_precision_int8_weight_only_that_would_crash_is_refused(workdir, saved_pipelines):
    # torch 2.13's CPU kernel for it segfaults when in_features is not a multiple of 16 (PixArt's 24-wide layers).
    from diffbake.errors import BuildError

    recipe = workdir / "pixart-bf16-int8.toml"
    recipe.write_text(
        f'[source]\nmodel = "{saved_pipelines("pixart").as_posix()}"\n[target]\ndtype = "bfloat16"\nallow_emulated = true\n'
        "[components.transformer]\nshapes = { batch = 1, height = 256, width = 256 }\n"
        'quantization = { method = "int8_weight_only" }\n'
    )
    with pytest.raises(BuildError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value).startswith(
        "transformer: int8_weight_only in bfloat16 on the CPU crashes torch "
        f"{torch.__version__}'s compiled kernel for linear layers whose in_features is not a multiple of 16 (22 here"
    )


def test_generate_takes_the_flags_the_pipeline_takes(artifacts, tmp_path):
    from click.testing import CliRunner

    from diffbake.cli import cli

    runner = CliRunner()
    dit = str(artifacts("dit"))
    png = tmp_path / "dit.png"
    ok = runner.invoke(cli, ["generate", dit, "--class-label", "3", "--steps", "2", "--out", str(png)])
    assert ok.exit_code == 0, ok.output
    assert png.is_file()
    refused = runner.invoke(cli, ["generate", dit, "--prompt", "a cat", "--steps", "2"])
    assert refused.exit_code == 2 and "--prompt: DiTPipeline takes no prompt; leave the flag out" in refused.output
    ddpm = runner.invoke(cli, ["generate", str(artifacts("ddpm")), "--images", "3", "--steps", "2", "--out", str(png)])
    assert ddpm.exit_code == 0, ddpm.output
    written = [tmp_path / "dit.png", tmp_path / "dit-1.png", tmp_path / "dit-2.png"]  # three images, one call
    assert all(str(p) in ddpm.stdout for p in written) and all(p.is_file() for p in written)


def test_an_ignored_argument_that_changes_the_result_fails_the_build(workdir, saved_pipelines, monkeypatch):
    # A generator is left out of the compiled call only where the module gives the same result without it.
    import functools

    from diffusers import AutoencoderKL

    from diffbake.errors import BuildError

    decode = AutoencoderKL.decode

    @functools.wraps(decode)
    def noisy(self, z, return_dict=True, generator=None):
        out = decode(self, z, return_dict=False)[0]
        if generator is not None:  # a decoder that samples
            out = out + torch.randn(out.shape, generator=generator)
        return (out,) if not return_dict else DecoderOutput(sample=out)

    from diffusers.models.autoencoders.vae import DecoderOutput

    monkeypatch.setattr(AutoencoderKL, "decode", noisy)
    recipe = workdir / "noisy-vae.toml"
    recipe.write_text(
        f'[source]\nmodel = "{saved_pipelines("sd").as_posix()}"\n'
        "[components.vae_decoder]\nshapes = { batch = 1, height = 64, width = 64 }\n"
    )
    with pytest.raises(BuildError) as e:
        diffbake.build(recipe, workdir / "never")
    assert str(e.value) == (
        "vae_decoder: the pipeline passes generator, which changes what AutoencoderKL.decode returns, and compiled "
        "code cannot take it; keep this component eager"
    )


def test_a_pipeline_without_guidance_by_default_is_built_with_it_when_asked(ldm_artifact, workdir):
    # LDMTextToImagePipeline defaults to guidance_scale = 1.0 (no CFG batch): cfg = true captures its call with
    # guidance asked for, the call that fits the artifact asks for it too, and the images match stock diffusers at
    # the user's own guidance scale.
    artifact, source = ldm_artifact, workdir / "saved-ldm"
    manifest = read_manifest(artifact)
    assert manifest.components["unet"].variants[0].cfg is True
    assert manifest.components["unet"].variants[0].inputs[0].shape == [2, 4, 8, 8]  # the doubled batch
    assert compiled_call(manifest) == {"height": 64, "width": 64, "guidance_scale": 7.5}
    loaded, stock = diffbake.load(artifact), DiffusionPipeline.from_pretrained(source)
    call = dict(prompt="a cat", height=64, width=64, guidance_scale=6.0, num_inference_steps=2)
    assert np.abs(_images(loaded, call) - _images(stock, call)).max() <= ATOL


def test_a_pipeline_passing_text_at_each_prompts_length_is_warned_of(caplog):
    # Z-Image passes only a prompt's own tokens (the negative prompt's too): compiled code takes one length.
    from diffbake.builder.build import _warn_if_text_has_the_prompts_length
    from diffbake.builder.capture import Captured
    from diffbake.builder.contract import Point

    def point(*lengths: int) -> Point:
        texts = [torch.zeros(n, 16) for n in lengths]
        return Point({"batch": 1}, Captured({"x": [torch.zeros(16, 1, 4, 4)], "cap_feats": texts}, None))

    pipe = type("ZImagePipeline", (), {})()
    _warn_if_text_has_the_prompts_length("transformer", pipe, point(57, 19), point(57, 19))
    assert not caplog.records
    _warn_if_text_has_the_prompts_length("transformer", pipe, point(57, 19), point(24, 35))
    assert [r.getMessage() for r in caplog.records] == [
        "transformer: ZImagePipeline passes the text at each prompt's own length ('cap_feats.0' is (57, 16) for 'a "
        "photo of an astronaut riding a horse', (24, 16) for 'a cat'), and its compiled code takes one length: this "
        "artifact refuses the prompts (and negative prompts) whose token count after the pipeline's truncation "
        "differs from the one captured. A text_tokens of N in the recipe truncates every prompt to N tokens, so that "
        "prompts of N tokens or more fit"
    ]


def test_a_pipeline_failing_with_its_resolution_binning_is_captured_without_it(caplog):
    # HunyuanDiT rounds every size to its ~1024-pixel table, which a smaller transformer fails on (a RuntimeError
    # inside the model): the capture calls it unbinned, as the pipeline's own tests do, and says so.
    from diffbake.builder.capture import capture

    class BinningPipeline:
        def __init__(self):
            self.transformer = torch.nn.Linear(4, 4)

        def __call__(self, prompt=None, height=16, width=16, generator=None, use_resolution_binning=True):
            tokens = (1024 if use_resolution_binning else height) // 4
            if tokens != 4:
                raise RuntimeError(f"The size of tensor a ({tokens}) must match the size of tensor b (4)")
            return self.transformer(torch.ones(1, tokens))

    calls = capture(BinningPipeline(), ["transformer"], dict(prompt="a cat", height=16, width=16))
    assert calls["transformer"].arguments["input"].shape == (1, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "BinningPipeline failed with its resolution binning on (RuntimeError: The size of tensor a (256) must match "
        "the size of tensor b (4)); the build calls it with use_resolution_binning=False, and so must the "
        "artifact's users"
    ]

    # A refusal of diffbake's own inside the call (a hook's) is not the binning's: it is not retried unbinned.
    from diffbake.errors import BuildError

    class RefusingPipeline(BinningPipeline):
        def __call__(self, use_resolution_binning=True, **kwargs):
            raise BuildError("transformer: refused")

    caplog.clear()
    with pytest.raises(BuildError, match=r"\(BuildError: transformer: refused\)"):
        capture(RefusingPipeline(), ["transformer"], dict(prompt="a cat", height=16, width=16))
    assert not caplog.records
