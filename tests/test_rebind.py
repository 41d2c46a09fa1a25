"""New weights without a rebuild (rebind, LoRA, set_weights) and concurrent serving on one copy of the weights."""

from __future__ import annotations

import gc
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

import diffbake
import diffbake.builder.build
from diffbake.errors import ArtifactError, CompatibilityError, RebindError
from diffbake.format.manifest import read_manifest
from diffbake.runtime.serving import loaded_artifact
from helpers import edit_manifest

CALL = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np")


def _image(pipe) -> np.ndarray:
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def second_checkpoint(saved_pipelines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD pipeline fine-tuned, as far as a test can tell: every weight moved by seeded noise."""
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    folder = tmp_path_factory.mktemp("finetune") / "sd"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_file(second_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on the UNet's attention projections, with peft-style keys, saved as diffusers saves LoRAs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(second_checkpoint)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def no_compiler(artifacts):
    """Any compile during the rebinds of this module fails the test."""
    artifacts("sd"), artifacts("sdxl")  # built (compiled) before compiling is forbidden
    calls = []
    original = diffbake.builder.build.compile_package

    def refuse(*args, **kwargs):
        calls.append(args[0])
        raise AssertionError("rebind compiled")

    diffbake.builder.build.compile_package = refuse
    yield calls
    diffbake.builder.build.compile_package = original


@pytest.fixture(scope="module")
def rebound(artifacts, second_checkpoint: Path, no_compiler, tmp_path_factory) -> Path:
    return diffbake.rebind(artifacts("sd"), weights=second_checkpoint, out=tmp_path_factory.mktemp("rb") / "sd")


def test_rebind_matches_eager_on_the_new_checkpoint_without_compiling(
    artifacts, rebound: Path, second_checkpoint: Path, no_compiler
):
    assert no_compiler == []
    old, new = read_manifest(artifacts("sd")), read_manifest(rebound)
    for entry in new.components.values():
        package = entry.variants[0].package
        assert new.files[package].sha256 == old.files[package].sha256  # the very same compiled code
        assert new.files[entry.weights].sha256 != old.files[entry.weights].sha256
        assert entry.variants[0].max_abs_error <= entry.variants[0].tolerance
    assert new.source["model"] == str(second_checkpoint) and new.source["rebound_from"] == old.source
    pipe = diffbake.load(rebound, self_test=True)
    want = _image(DiffusionPipeline.from_pretrained(second_checkpoint))
    assert np.abs(_image(pipe) - want).max() <= 5e-4
    assert np.abs(_image(diffbake.load(artifacts("sd"))) - want).max() > 1e-2  # the checkpoints do differ


def test_rebind_fuses_loras_as_diffusers_does(
    artifacts, second_checkpoint: Path, lora_file: Path, no_compiler, tmp_path
):
    out = diffbake.rebind(artifacts("sd"), weights=second_checkpoint, loras=[(lora_file, 0.8)], out=tmp_path / "lora")
    assert read_manifest(out).source["loras"][0]["scale"] == 0.8
    eager = DiffusionPipeline.from_pretrained(second_checkpoint)
    plain = _image(eager)
    eager.load_lora_weights(lora_file)
    eager.fuse_lora(lora_scale=0.8)
    want = _image(eager)
    assert np.abs(want - plain).max() > 1e-2  # the LoRA changes the image
    assert np.abs(_image(diffbake.load(out)) - want).max() <= 5e-4
    assert no_compiler == []


def test_another_architecture_is_refused_with_the_differences(artifacts, saved_pipelines, tmp_path: Path):
    pipe = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    config = dict(pipe.unet.config)
    config["layers_per_block"] = 2
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(tmp_path / "other")
    with pytest.raises(RebindError) as e:
        diffbake.rebind(artifacts("sd"), weights=tmp_path / "other", out=tmp_path / "x")
    assert str(e.value) == (
        f"unet: {tmp_path / 'other'} has another architecture than {artifacts('sd')} was compiled for (1 config "
        "differences; first: layers_per_block: 2, compiled for 1); rebind only checkpoints of the same "
        "architecture, or build a new artifact"
    )
    with pytest.raises(
        RebindError, match=r"a StableDiffusionXLPipeline, but .* was compiled for a StableDiffusionPipeline"
    ):
        diffbake.rebind(artifacts("sd"), weights=saved_pipelines("sdxl"), out=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_rebind_keeps_the_compiling_hosts_facts_and_refuses_a_host_they_do_not_fit(
    artifacts, second_checkpoint: Path, no_compiler, tmp_path
):
    """The packages are copied, so the manifest must keep the facts of the host that compiled them."""
    original = Path(shutil.copytree(artifacts("sd"), tmp_path / "built-elsewhere"))
    # Facts of another build host that still fit this one: another diffusers, fewer CPU extensions required.
    features = read_manifest(original).host.cpu_features

    def elsewhere(d: dict) -> None:
        d["versions"]["diffusers"] = "0.42.0.dev-elsewhere"
        d["host"]["cpu_features"] = features[:-1]

    edit_manifest(original, elsewhere)
    out = diffbake.rebind(original, weights=second_checkpoint, out=tmp_path / "rebound")
    old, new = read_manifest(original), read_manifest(out)
    assert new.versions == old.versions and new.host == old.host
    edit_manifest(original, lambda d: d["versions"].update(torch="2.99.0"))
    with pytest.raises(CompatibilityError, match=r"^torch: this artifact was built with '2.99.0', this host has"):
        diffbake.rebind(original, weights=second_checkpoint, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_set_weights_switches_a_loaded_pipeline_and_back(
    artifacts, rebound: Path, second_checkpoint: Path, no_compiler
):
    pipe = diffbake.load(artifacts("sd"))
    twin = diffbake.replicate(pipe)
    before = _image(pipe)
    diffbake.set_weights(pipe, rebound)
    want = _image(DiffusionPipeline.from_pretrained(second_checkpoint))
    assert np.abs(_image(pipe) - want).max() <= 5e-4
    assert np.abs(_image(twin) - want).max() <= 5e-4  # replicas share the weights, so they switch too
    assert loaded_artifact(twin).root == rebound  # what a pipeline runs lives on the components it shares
    diffbake.set_weights(twin, artifacts("sd"))  # through a replica: the original pipeline switches too
    assert np.abs(_image(pipe) - before).max() == 0
    assert loaded_artifact(pipe).root == artifacts("sd")
    with pytest.raises(RebindError, match=r"not built on the compiled code of .*: other compiled code"):
        diffbake.set_weights(pipe, artifacts("sdxl"))


def test_set_weights_is_all_or_nothing(artifacts, rebound: Path, monkeypatch):
    """A failure while reading the new weights leaves every module as it was: the compiled ones included."""
    import transformers

    pipe = diffbake.load(artifacts("sd"))
    before = _image(pipe)

    def broken(*args, **kwargs):
        raise OSError("disk read error")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", broken)
    with pytest.raises(ArtifactError) as e:
        diffbake.set_weights(pipe, rebound)
    assert str(e.value) == (
        f"{rebound / 'pipeline' / 'text_encoder'}: could not load text_encoder (OSError: disk read error); nothing "
        "was changed; rebuild the artifact with `diffbake rebind`"
    )
    assert np.abs(_image(pipe) - before).max() == 0
    assert loaded_artifact(pipe).root == artifacts("sd")


def _rss() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_replicas_in_threads_match_sequential_runs_on_one_weight_copy(artifacts):
    art = artifacts("sd")
    weights = sum(f.size for rel, f in read_manifest(art).files.items() if rel.endswith(".safetensors"))
    pipe = diffbake.load(art, concurrency=2)
    start = _rss()
    replicas = [diffbake.replicate(pipe) for _ in range(3)]
    grown = _rss() - start
    # Each replica has its own tokenizer: a call sets a fast tokenizer's padding, which two threads would mix.
    assert all(r.tokenizer is not pipe.tokenizer and r.unet is pipe.unet for r in replicas)
    assert grown < weights / 4, f"3 replicas grew RSS by {grown} bytes; the weights are {weights} bytes"

    pipes = [pipe, *replicas]
    images: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        images[i] = pipes[i](**CALL, generator=torch.Generator().manual_seed(i)).images

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pipes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(pipes):
        alone = p(**CALL, generator=torch.Generator().manual_seed(i)).images
        assert np.array_equal(images[i], alone)
    assert not np.array_equal(images[0], images[1])  # other seeds, other images: the runs were independent
