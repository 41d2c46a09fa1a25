"""The runtime's guards: calls outside what was compiled, and artifacts that are missing, foreign or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import diffbake
from diffbake.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    CompatibilityError,
    DiffbakeError,
    InputMismatchError,
    IntegrityError,
)
from diffbake.format.manifest import seal


@pytest.fixture(scope="module")
def sd(artifacts):
    return diffbake.load(artifacts("sd"))


@pytest.fixture
def copy(artifacts, tmp_path: Path):
    def make(family: str = "sd") -> Path:
        return Path(shutil.copytree(artifacts(family), tmp_path / family))

    return make


def _edit_manifest(folder: Path, edit) -> None:
    # Sealed again, as a build that recorded these values would have sealed it.
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(seal(data)))


def test_a_size_that_was_not_compiled_is_refused(sd):
    with pytest.raises(InputMismatchError) as e:
        sd("a cat", height=72, width=64, num_inference_steps=1)
    assert str(e.value) == (
        "unet: input 'sample' has shape (2, 4, 36, 32), but this artifact was compiled for (2, 4, 32, 32) "
        "(1 image(s) per call at 64x64 pixels, with classifier-free guidance); call the pipeline with height=64, "
        "width=64 and 1 image(s) in all (prompts x num_images_per_prompt), or rebuild with [components.unet] "
        "shapes set for this call"
    )


def test_more_images_than_compiled_are_refused(sd):
    with pytest.raises(InputMismatchError, match=r"^unet: input 'sample' has shape \(4, 4, 32, 32\)"):
        sd("a cat", num_images_per_prompt=2, num_inference_steps=1)


def test_guidance_off_on_a_cfg_build_says_how_to_rebuild(sd):
    with pytest.raises(InputMismatchError) as e:
        sd("a cat", guidance_scale=1.0, num_inference_steps=1)
    assert str(e.value) == (
        "unet: input 'sample' has shape (1, 4, 32, 32), but this artifact was compiled for (2, 4, 32, 32) "
        "(1 image(s) per call at 64x64 pixels, with classifier-free guidance); this artifact was built with "
        "cfg = true for 1 image(s) per call: call with guidance_scale > 1 (guidance_scale <= 1 turns "
        "classifier-free guidance off) and 1 image(s) in all, or rebuild with [components.unet] cfg = false"
    )


def test_flux_text_length_must_match(artifacts):
    pipe = diffbake.load(artifacts("flux"))
    with pytest.raises(InputMismatchError) as e:
        pipe("a cat", height=32, width=48, num_inference_steps=1, max_sequence_length=64)
    assert str(e.value) == (
        "transformer: input 'encoder_hidden_states' has shape (1, 64, 32), but this artifact was compiled for "
        "(1, 32, 32) (1 image(s) per call at 32x48 pixels, 32 text tokens); call the pipeline with height=32, "
        "width=48, max_sequence_length=32 and 1 image(s) in all (prompts x num_images_per_prompt), or rebuild "
        "with [components.transformer] shapes set for this call"
    )


def _unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)


def test_wrong_dtype_is_refused(sd):
    sample, text = _unet_inputs()
    with pytest.raises(InputMismatchError) as e:
        sd.unet(sample.double(), 10, encoder_hidden_states=text)
    assert str(e.value) == (
        "unet: input 'sample' has dtype float64, but this artifact was compiled for float32; load the pipeline "
        "with its own dtype (diffbake.load does) and do not cast it"
    )


def test_layout_and_timestep_forms_are_normalised(sd):
    # Compiled code reads raw memory: a channels_last input or an int64 scalar timestep would silently give
    # wrong numbers, so the stand-in makes them what was compiled.
    sample, text = _unet_inputs()
    want = sd.unet(sample, torch.tensor([10.0, 10.0]), encoder_hidden_states=text).sample
    got_layout = sd.unet(sample.to(memory_format=torch.channels_last), torch.tensor(10), text).sample
    got_tuple = sd.unet(sample, 10, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(got_layout, want, rtol=0, atol=0)
    torch.testing.assert_close(got_tuple, want, rtol=0, atol=0)


def test_per_sample_timesteps_that_differ_are_refused(sd):
    # The pipeline passes one timestep for the batch, so one was compiled; equal ones per sample are that one.
    sample, text = _unet_inputs()
    with pytest.raises(InputMismatchError) as e:
        sd.unet(sample, torch.tensor([10.0, 20.0]), encoder_hidden_states=text)
    assert str(e.value).startswith(
        "unet: input 'timestep' has shape (2,), but this artifact was compiled for () (1 image(s) per call at 64x64 "
        "pixels, with classifier-free guidance)"
    )


def test_compiled_modules_do_not_move_or_cast(sd):
    with pytest.raises(InputMismatchError) as e:
        sd.to(torch.float16)
    assert str(e.value).startswith("unet: this compiled component runs in torch.float32 only; it cannot be cast")
    with pytest.raises(InputMismatchError, match="runs on cpu only; it cannot move to meta"):
        sd.unet.to("meta")
    assert sd.to("cpu") is sd


def test_vae_encode_is_not_part_of_the_artifact(sd):
    with pytest.raises(InputMismatchError) as e:
        sd.vae.encode(torch.zeros(1, 3, 64, 64))
    assert str(e.value) == (
        "vae_decoder: only AutoencoderKL.decode is compiled into this artifact, and AutoencoderKL.encode needs the "
        "eager module; name [components.vae_encoder] in the recipe to compile it too"
    )


def test_missing_folder_and_folder_without_manifest(tmp_path: Path):
    with pytest.raises(ArtifactNotFoundError) as e:
        diffbake.load(tmp_path / "nope")
    assert str(e.value) == f"{tmp_path / 'nope'}: no such artifact folder; build one with `diffbake build RECIPE`"
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactNotFoundError) as e:
        diffbake.load(tmp_path / "half")
    assert str(e.value) == (
        f"{tmp_path / 'half'}: no manifest.json in this folder, so it is not a complete diffbake artifact (the "
        "manifest is written last; an interrupted build leaves none); rebuild it with `diffbake build RECIPE`"
    )
    assert issubclass(ArtifactNotFoundError, FileNotFoundError) and issubclass(ArtifactNotFoundError, DiffbakeError)


def test_foreign_and_future_manifests_are_refused(copy):
    art = copy()
    _edit_manifest(art, lambda d: d.update(format_version=99))
    with pytest.raises(ArtifactError, match="format_version 99, but this diffbake reads version 4"):
        diffbake.load(art)
    (art / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="format is 'something-else', expected 'diffbake-artifact'"):
        diffbake.load(art)
    (art / "manifest.json").write_text('{"format": "diffbake-artifact", "format_version": NaN}')
    with pytest.raises(ArtifactError, match="NaN is not valid JSON"):
        diffbake.load(art)


def test_a_changed_file_is_refused_before_any_package_loads(copy, no_package_loaded):
    art = copy()
    weights = art / "unet" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        diffbake.load(art)
    assert str(e.value).startswith(f"{weights}: sha256 ")
    assert "the manifest records" in str(e.value)
    assert no_package_loaded == []


def test_an_unlisted_file_is_refused(copy, no_package_loaded):
    art = copy()
    (art / "unet" / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(IntegrityError) as e:
        diffbake.load(art)
    assert str(e.value) == (
        f"{art / 'unet' / 'extra.so'}: not listed in the manifest; an artifact holds only the files its manifest "
        "lists; remove it or rebuild the artifact"
    )
    assert no_package_loaded == []


def test_another_torch_or_device_is_refused(copy, no_package_loaded):
    art = copy()
    _edit_manifest(art, lambda d: d["versions"].update(torch="2.12.0"))
    with pytest.raises(CompatibilityError) as e:
        diffbake.load(art)
    assert str(e.value) == (
        f"torch: this artifact was built with '2.12.0', this host has '{torch.__version__}'; install "
        "torch==2.12.0 here, or rebuild the artifact with this torch"
    )
    with pytest.raises(CompatibilityError) as e:
        diffbake.load(art, device="cuda")
    assert str(e.value) == (
        "device: this artifact was compiled for 'cpu', but 'cuda' was asked for; load it with device='cpu', or "
        "rebuild the recipe with [target] device = 'cuda'"
    )
    assert no_package_loaded == []


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.enable_attention_slicing(),
        lambda p: p.enable_xformers_memory_efficient_attention(),
        lambda p: p.fuse_qkv_projections(),
        lambda p: p.vae.enable_slicing(),
        lambda p: p.vae.enable_tiling(),
        lambda p: p.unet.set_attn_processor(None),
        lambda p: p.unet.enable_forward_chunking(),
    ],
)
def test_eager_only_runtime_settings_fail_clearly(sd, call):
    # The pipelines' helpers would otherwise skip the compiled modules silently.
    with pytest.raises(InputMismatchError, match=r"does not apply to compiled code, whose attention, layout"):
        call(sd)


def test_attention_slicing_message(sd):
    with pytest.raises(InputMismatchError) as e:
        sd.enable_attention_slicing()
    assert str(e.value) == (
        "unet: attention slicing (enable_attention_slicing) does not apply to compiled code, whose attention, "
        "layout and memory use were fixed when the artifact was built; call the pipeline without it (set what the "
        "recipe offers, such as fuse_qkv or compiler options, and rebuild)"
    )


def test_cuda_graphs_are_refused_where_they_cannot_apply(artifacts):
    with pytest.raises(ValueError, match="cuda_graphs=True applies to CUDA artifacts; this one was built for 'cpu'"):
        diffbake.load(artifacts("sd"), cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs concurrency=1"):
        diffbake.load(artifacts("sd"), cuda_graphs=True, concurrency=2)
