"""Recipe validation: every bad input is refused before any load or compile, with an exact message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import diffbake.format.host
from diffbake.builder.recipe import Shapes, Variant, check_against_source, load_recipe, parse_recipe
from diffbake.builder.sources import SourceInfo, _info
from diffbake.errors import DiffbakeError, RecipeError
from diffbake.format.host import CPU_TARGETS


def facts(pipeline: str, vae_scale_factor: int = 8) -> SourceInfo:
    """What the build reads from a source's model index and configs, for a pipeline of this class."""
    denoiser = "transformer" if pipeline.startswith("Flux") else "unet"
    index = {"_class_name": pipeline, denoiser: ["diffusers", "x"], "vae": ["diffusers", "AutoencoderKL"]}
    blocks = [0] * vae_scale_factor.bit_length()
    return _info("hub", "x/y", None, index, {"vae": {"block_out_channels": blocks}}, "r.toml")


SD, FLUX, KONTEXT = "StableDiffusionPipeline", "FluxPipeline", "FluxKontextPipeline"

GOOD = """
[source]
model = "tiny:sd"
[target]
device = "cpu"
dtype = "bfloat16"
allow_emulated = true
[components.unet]
shapes = { batch = 2, height = 64, width = 96 }
[components.vae_decoder]
shapes = { batch = 2, height = 64, width = 96 }
"""


def parse(text: str):
    return parse_recipe(textwrap.dedent(text), path="r.toml")


def test_good_recipe_parses_with_defaults():
    r = parse(GOOD)
    assert (r.model, r.revision, r.device, r.dtype) == ("tiny:sd", None, "cpu", "bfloat16")
    assert r.components["unet"].variants == (Variant(Shapes(2, 64, 96), None),)
    filled = check_against_source(r, facts(SD))
    # Whether the pipeline doubles its batch for guidance is learnt from its captured call, not assumed here.
    assert filled.components["unet"].variants[0].cfg is None
    assert filled.components["vae_decoder"].variants[0].cfg is None


def test_target_defaults_to_cpu_float32():
    r = parse('[source]\nmodel = "tiny:sd"\n[components.unet]\nshapes = { batch = 1, height = 64, width = 64 }\n')
    assert (r.device, r.dtype) == ("cpu", "float32")


def test_flux_text_tokens_default_to_512():
    r = parse(
        '[source]\nmodel = "tiny:flux"\n[components.transformer]\nshapes = { batch = 1, height = 64, width = 64 }\n'
    )
    # FluxPipeline's own max_sequence_length default
    assert check_against_source(r, facts(FLUX)).components["transformer"].variants[0].shapes.text_tokens == 512


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace('dtype = "bfloat16"', 'dtype = "bfloat16"\nprecision = 3'),
            "r.toml: unknown key 'precision' in [target]; known keys: device, dtype, cpu_isa, allow_emulated",
        ),
        (
            GOOD + "[extra]\n",
            "r.toml: unknown key 'extra' in the top level; known keys: source, target, components",
        ),
        (
            GOOD.replace(
                "shapes = { batch = 2, height = 64, width = 96 }\n[components.vae", "shape = 1\n[components.vae"
            ),
            "r.toml: unknown key 'shape' in [components.unet]; known keys: shapes, cfg, mode, fuse_qkv, channels_last, quantization, compiler, step_cache",
        ),
        (
            GOOD + "[components.image_encoder]\nshapes = { batch = 1, height = 64, width = 64 }\n",
            "r.toml: unknown component 'image_encoder' in [components]; known components: controlnet, text_encoder, "
            "text_encoder_2, text_encoder_3, transformer, unet, vae_decoder, vae_encoder",
        ),
        (
            GOOD.replace('"bfloat16"', '"float64"'),
            "r.toml: [target] dtype = 'float64' is not supported; expected one of: float32, bfloat16, float16",
        ),
        (
            GOOD.replace('"cpu"', '"tpu"'),
            "r.toml: [target] device = 'tpu' is not supported; expected one of: cpu, cuda",
        ),
        (
            GOOD.replace(
                "batch = 2, height = 64, width = 96 }\n[components.vae",
                "batch = 0, height = 64, width = 96 }\n[components.vae",
            ),
            "r.toml: [components.unet] shapes batch must be a positive integer, found an integer 0",
        ),
        (
            GOOD.replace("height = 64, width = 96 }\n[components.vae", "height = 64.0, width = 96 }\n[components.vae"),
            "r.toml: [components.unet] shapes height must be a positive integer, found a float 64.0",
        ),
        (
            GOOD.replace(
                "shapes = { batch = 2, height = 64, width = 96 }\n[components.vae",
                "shapes = { batch = 2, height = 64 }\n[components.vae",
            ),
            "r.toml: missing 'width' in [components.unet] shapes",
        ),
        (GOOD.replace('model = "tiny:sd"', ""), "r.toml: missing 'model' in [source]"),
        (
            GOOD.replace("tiny:sd", "tiny:sd9"),
            "r.toml: [source] model = 'tiny:sd9' is not a built-in pipeline; known: tiny:sd, tiny:sdxl, tiny:flux, "
            "tiny:dit, tiny:ddpm, tiny:ddim, tiny:pixart, tiny:sd3, tiny:sana, tiny:sd-img2img, tiny:sd-inpaint, "
            "tiny:sd-controlnet, tiny:sdxl-img2img, tiny:sdxl-controlnet, tiny:flux-img2img, tiny:flux-kontext, "
            "tiny:z-image, random:sd15, random:flux-small",
        ),
        (
            GOOD.replace('model = "tiny:sd"', 'model = "tiny:sd"\nrevision = "main"'),
            "r.toml: [source] revision applies to Hub ids only; remove it for 'tiny:sd'",
        ),
        (
            GOOD.replace("[components.vae_decoder]", "cfg = 1\n[components.vae_decoder]"),
            "r.toml: [components.unet] cfg must be true or false, found an integer 1",
        ),
        (
            GOOD + "cfg = false\n",
            "r.toml: [components.vae_decoder] cfg applies to the denoiser only; remove it here",
        ),
        (
            GOOD.replace("width = 96 }\n", "width = 96, image_height = 64, image_width = 64 }\n").replace(
                "[components.unet]\nshapes = { batch = 2, height = 64, width = 96, image_height = 64, image_width = 64 }",
                "[components.unet]\nshapes = { batch = 2, height = 64, width = 96 }",
            ),
            "r.toml: [components.vae_decoder] shapes image_height and image_width: the VAE decoder makes the output "
            "image, of height x width; remove them here",
        ),
        ("[source\n", "r.toml: not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
        (
            '[source]\nmodel = "tiny:sd"\n[components]\n',
            "r.toml: [components] is empty; name at least one component to compile, one of: controlnet, "
            "text_encoder, text_encoder_2, text_encoder_3, transformer, unet, vae_decoder, vae_encoder",
        ),
    ],
)
def test_bad_recipes_are_refused_with_exact_messages(text, message):
    with pytest.raises(RecipeError) as e:
        parse(text)
    assert str(e.value) == message


def test_recipe_errors_are_diffbake_and_value_errors():
    assert issubclass(RecipeError, DiffbakeError) and issubclass(RecipeError, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_cuda_target_without_gpu_is_refused():
    with pytest.raises(RecipeError) as e:
        parse(GOOD.replace('"cpu"', '"cuda"'))
    assert str(e.value) == (
        "r.toml: [target] device = 'cuda' but this host has no CUDA GPU; AOTInductor generates and tunes CUDA code "
        'on the GPU itself, so build on a host with the target GPU, or set device = "cpu"'
    )


@pytest.mark.parametrize(
    ("pipeline", "scale", "text", "message"),
    [
        (
            SD,
            8,
            GOOD.replace("width = 96 }\n[components.vae", "width = 60 }\n[components.vae"),
            "r.toml: [components.unet] shapes.width = 60 is not a multiple of 8 (the VAE scale factor 8 of this "
            "StableDiffusionPipeline); use 56 or 64",
        ),
        (
            FLUX,
            8,
            '[source]\nmodel = "x/y"\n[components.transformer]\nshapes = { batch = 1, height = 1000, width = 1024 }\n',
            "r.toml: [components.transformer] shapes.height = 1000 is not a multiple of 16 (the VAE scale factor 8 "
            "times the 2x2 latent patches of one token of this FluxPipeline); use 992 or 1008",
        ),
        (
            FLUX,
            8,
            GOOD,
            "r.toml: [components.unet]: a FluxPipeline has no component 'unet'; its compilable components are: "
            "transformer, vae_decoder, vae_encoder",
        ),
        (
            "DDPMPipeline",
            1,
            '[source]\nmodel = "x/y"\n[components.unet]\nshapes = { batch = 1, height = 64, width = 64 }\ncfg = true\n',
            "r.toml: [components.unet] cfg: DDPMPipeline takes no guidance_scale, so it has no classifier-free "
            "guidance batch; remove the key",
        ),
        (
            SD,
            8,
            GOOD.replace("width = 96 }\n[components.vae", "width = 96, text_tokens = 77 }\n[components.vae"),
            "r.toml: [components.unet] shapes.text_tokens: StableDiffusionPipeline takes no max_sequence_length (its "
            "text length is the tokenizer's fixed length); remove the key",
        ),
        (
            "StableDiffusionImg2ImgPipeline",
            8,
            GOOD.replace(
                "width = 96 }\n[components.vae", "width = 96, image_height = 32, image_width = 32 }\n[components.vae"
            ),
            "r.toml: [components.unet] shapes.image_height and image_width: StableDiffusionImg2ImgPipeline takes no "
            "input image of another size than its output (it takes no image, or makes its output at the image's "
            "size); remove them and set height and width to the image's size",
        ),
        (
            KONTEXT,
            8,
            '[source]\nmodel = "x/y"\n[components.transformer]\n'
            "shapes = { batch = 1, height = 1024, width = 1024, image_height = 1000, image_width = 1024 }\n",
            "r.toml: [components.transformer] shapes.image_height = 1000 is not a multiple of 16 (the VAE scale "
            "factor 8 times the 2x2 latent patches of one token of this FluxKontextPipeline); use 992 or 1008",
        ),
    ],
)
def test_shapes_are_checked_against_the_pipeline(pipeline, scale, text, message):
    with pytest.raises(RecipeError) as e:
        check_against_source(parse(text), facts(pipeline, scale))
    assert str(e.value) == message


def test_an_input_image_may_have_a_size_of_its_own():
    # Flux Kontext refers to an image of any size while making its output at height x width.
    r = parse(
        '[source]\nmodel = "x/y"\n[components.transformer]\n'
        "shapes = { batch = 1, height = 512, width = 512, image_height = [512, 1024], image_width = 768 }\n"
    )
    shapes = check_against_source(r, facts(KONTEXT)).components["transformer"].variants[0].shapes
    assert shapes.to_dict() == {
        "batch": 1,
        "height": 512,
        "width": 512,
        "text_tokens": 512,
        "image_height": [512, 1024],
        "image_width": 768,
    }
    assert shapes.dynamic


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "nope.toml")
    assert (
        str(e.value)
        == f"{tmp_path / 'nope.toml'}: no such recipe file; pass the path of a TOML recipe such as recipes/tiny-sd.toml"
    )


def test_shipped_recipes_are_valid(monkeypatch):
    import torch

    # The CUDA recipes are checked as on an H100 (float8 needs compute capability 8.9).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    # The CPU ones as on a CPU with native bfloat16 and float16 (and AVX-512, for the targets).
    native = frozenset(CPU_TARGETS["avx512"][2]) | {"amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16"}
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: native)
    paths = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml"))
    assert {"bench-sd15-cpu.toml", "bench-flux-small-cpu.toml", "bench-sdxl-cuda.toml"} <= {p.name for p in paths}
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.components, path


QUANT = GOOD.replace(
    "[components.vae_decoder]",
    'quantization = { method = "int8_dynamic", exclude = ["*proj_out*"] }\n[components.vae_decoder]',
)


def test_optimization_keys_parse():
    r = parse(
        QUANT.replace("[components.vae_decoder]", "fuse_qkv = true\nchannels_last = true\n[components.vae_decoder]")
    )
    unet = r.components["unet"]
    assert unet.fuse_qkv and unet.channels_last and unet.transformed
    assert unet.quantization.to_dict() == {
        "method": "int8_dynamic",
        "include": ["*"],
        "exclude": ["*proj_out*"],
        "min_features": 0,
    }
    assert not r.components["vae_decoder"].transformed


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '"int8_dynamic"',
            '"int4"',
            "r.toml: [components.unet] quantization method = 'int4' is not supported; expected one of: "
            "int8_weight_only, int8_dynamic, float8_weight_only, float8_dynamic",
        ),
        (
            'method = "int8_dynamic", ',
            "",
            "r.toml: missing 'method' in [components.unet] quantization; one of: int8_weight_only, int8_dynamic, "
            "float8_weight_only, float8_dynamic",
        ),
        (
            'exclude = ["*proj_out*"]',
            'exclude = "*proj_out*"',
            'r.toml: [components.unet] quantization exclude must be an array of name patterns such as ["*attn*"]',
        ),
        (
            'exclude = ["*proj_out*"]',
            "min_features = -1",
            "r.toml: [components.unet] quantization min_features must be a non-negative integer, found -1",
        ),
        (
            'exclude = ["*proj_out*"]',
            "bits = 4",
            "r.toml: unknown key 'bits' in [components.unet] quantization; known keys: method, include, exclude, "
            "min_features",
        ),
        (
            "quantization = {",
            "fuse_qkv = 1\nquantization = {",
            "r.toml: [components.unet] fuse_qkv must be true or false, found an integer 1",
        ),
    ],
)
def test_bad_optimization_keys(old, new, message):
    with pytest.raises(RecipeError) as e:
        parse(QUANT.replace(old, new))
    assert str(e.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_float8_dynamic_needs_a_recent_gpu():
    with pytest.raises(RecipeError) as e:
        parse(QUANT.replace('"int8_dynamic"', '"float8_dynamic"'))
    assert str(e.value) == (
        "r.toml: [components.unet] quantization method = 'float8_dynamic' needs a CUDA GPU of compute capability "
        "8.9 or newer (found device = 'cpu'); use float8_weight_only or int8_dynamic instead"
    )


def test_ranges_and_variants_parse():
    r = parse(
        GOOD.replace(
            "shapes = { batch = 2, height = 64, width = 96 }\n[components.vae",
            "cfg = false\nshapes = [{ batch = 1, height = 64, width = 64 }, "
            "{ batch = [1, 4], height = [64, 128], width = 64, cfg = true }]\n[components.vae",
        )
    )
    assert r.components["unet"].variants == (
        Variant(Shapes(1, 64, 64), False),
        Variant(Shapes((1, 4), (64, 128), 64), True),
    )
    assert r.components["unet"].variants[1].shapes.to_dict() == {"batch": [1, 4], "height": [64, 128], "width": 64}
    assert r.components["unet"].variants[1].shapes.dynamic


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (
            "{ batch = [4, 1], height = 64, width = 64 }",
            "r.toml: [components.unet] shapes batch = [4, 1]: a range is [min, max] of positive integers with min <= max",
        ),
        (
            "{ batch = 1, height = [64], width = 64 }",
            "r.toml: [components.unet] shapes height = [64]: a range is [min, max] of positive integers with min <= max",
        ),
        ("[]", "r.toml: [components.unet] shapes is an empty array; give at least one shapes table"),
        (
            "[{ batch = 1, height = 64, width = 64 }, { batch = 1, height = 64, width = 64 }]",
            "r.toml: [components.unet] shapes[1] repeats an earlier variant; remove one",
        ),
        (
            "[{ batch = 1, height = 64, width = 64, steps = 2 }]",
            "r.toml: unknown key 'steps' in [components.unet] shapes[0]; known keys: batch, height, width, "
            "text_tokens, image_height, image_width, cfg",
        ),
        (
            "{ batch = 1, height = 64, width = 64, image_width = 32 }",
            "r.toml: [components.unet] shapes has image_width but no image_height; give both (the input image's "
            "size) or neither (an input image of the output's size)",
        ),
    ],
)
def test_bad_ranges_and_variants(shapes, message):
    with pytest.raises(RecipeError) as e:
        parse(
            GOOD.replace(
                "shapes = { batch = 2, height = 64, width = 96 }\n[components.vae",
                f"shapes = {shapes}\n[components.vae",
            )
        )
    assert str(e.value) == message


def test_range_ends_must_fit_the_family():
    r = parse(
        GOOD.replace("height = 64, width = 96 }\n[components.vae", "height = [60, 128], width = 96 }\n[components.vae")
    )
    with pytest.raises(RecipeError) as e:
        check_against_source(r, facts(SD))
    assert str(e.value) == (
        "r.toml: [components.unet] shapes.height = 60 is not a multiple of 8 (the VAE scale factor 8 of this "
        "StableDiffusionPipeline); use 56 or 64"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'mode = "partial"',
            "r.toml: [components.unet] mode = 'partial' is not supported; expected one of: full, regional",
        ),
    ],
)
def test_bad_modes(extra, message):
    with pytest.raises(RecipeError) as e:
        parse(GOOD.replace("[components.vae_decoder]", f"{extra}\n[components.vae_decoder]"))
    assert str(e.value) == message


def test_regional_needs_one_static_shape_and_a_denoiser():
    dynamic = GOOD.replace(
        "batch = 2, height = 64, width = 96 }\n[components.vae",
        'batch = [1, 2], height = 64, width = 96 }\nmode = "regional"\n[components.vae',
    )
    with pytest.raises(RecipeError) as e:
        parse(dynamic)
    assert str(e.value) == (
        "r.toml: [components.unet] mode = 'regional' compiles one static shape; give one shapes table without "
        "ranges, or use mode = 'full'"
    )
    with pytest.raises(RecipeError) as e:
        parse(GOOD + 'mode = "regional"\n')
    assert (
        str(e.value)
        == "r.toml: [components.vae_decoder] mode = 'regional': the VAE has no repeated blocks; remove the key"
    )
    assert (
        parse(GOOD.replace("[components.vae_decoder]", 'mode = "regional"\n[components.vae_decoder]'))
        .components["unet"]
        .mode
        == "regional"
    )


def test_cpu_isa_parses_and_is_checked_against_the_build_host(monkeypatch):
    assert parse(GOOD).cpu_isa == "native"
    assert parse(GOOD.replace('dtype = "bfloat16"', 'cpu_isa = "avx2"')).cpu_isa == "avx2"
    with pytest.raises(RecipeError) as e:
        parse(GOOD.replace('dtype = "bfloat16"', 'cpu_isa = "sse2"'))
    assert str(e.value) == "r.toml: [target] cpu_isa = 'sse2' is not supported; expected one of: native, avx2, avx512"
    # A build host without AVX-512 could not run (and so verify) code built for it.
    import diffbake.format.host

    monkeypatch.setattr(
        diffbake.format.host, "cpu_features", lambda: frozenset(diffbake.format.host.CPU_TARGETS["avx2"][2])
    )
    with pytest.raises(RecipeError) as e:
        parse(GOOD.replace('dtype = "bfloat16"', 'cpu_isa = "avx512"'))
    assert str(e.value) == (
        "r.toml: [target] cpu_isa = 'avx512' needs avx512bw, avx512cd, avx512dq, avx512f, avx512vl, which this build "
        "host lacks; the build runs the compiled code to verify it: build on a CPU that has them, or choose a lower "
        "cpu_isa"
    )
