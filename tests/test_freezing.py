"""The compiler option ``freezing``: weights folded into the package and prepacked for the build host's CPU.

One build of the tiny SD pipeline (float32, so any CI CPU runs it natively) with a frozen, channels_last UNet (an
exact static variant and a dynamic one, each package with its own weights) and a plain VAE decoder; the refusals
are checked without compiling.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import diffbake
import diffbake.format.host
from diffbake.errors import CompatibilityError, RebindError, RecipeError
from diffbake.format.manifest import read_manifest

RECIPE = """
[source]
model = "{source}"
[components.unet]
shapes = [
  {{ batch = 1, height = 64, width = 64 }},
  {{ batch = [1, 2], height = [32, 96], width = [32, 96] }},
]
channels_last = true
compiler = {{ freezing = true }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
"""

ONE_SHAPE = """
[source]
model = "tiny:sd"
[components.unet]
shapes = { batch = 1, height = 64, width = 64 }
channels_last = true
compiler = { freezing = true }
[components.vae_decoder]
shapes = { batch = 1, height = 64, width = 64 }
"""

REFUSED = (
    "set_weights: unet was built with compiler freezing, which compiles the weights into the package, so no other "
    "weights can be bound to it; build the recipe with the new weights instead, or build without freezing to swap "
    "weights"
)


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, saved_pipelines) -> Path:
    folder = tmp_path_factory.mktemp("frozen")
    (folder / "recipe.toml").write_text(RECIPE.format(source=saved_pipelines("sd").as_posix()))
    return diffbake.build(folder / "recipe.toml", folder / "artifact")


def test_the_frozen_unet_holds_its_weights_in_its_package(frozen):
    m = read_manifest(frozen)
    unet, vae = m.components["unet"], m.components["vae_decoder"]
    assert unet.compiler == {"freezing": True} and unet.frozen and not vae.frozen
    assert unet.constants == {}
    with safe_open(frozen / unet.weights, "pt") as f:
        assert list(f.keys()) == []
    with safe_open(frozen / vae.weights, "pt") as f:
        assert len(list(f.keys())) == len(vae.constants) > 0
    mask = os.umask(0)
    os.umask(mask)
    for weights in (unet.weights, vae.weights):  # readable by a serving user other than the builder
        assert (frozen / weights).stat().st_mode & 0o777 == 0o666 & ~mask
    # The UNet's package carries its weights in a blob beside its library (at least all of them in float32);
    # the VAE's is code only.
    n_unet = sum(p.numel() for p in diffbake.builder.tiny.make_tiny_pipeline("sd").unet.parameters())
    with zipfile.ZipFile(frozen / unet.variants[0].package) as z:
        blobs = [i for i in z.infolist() if i.filename.endswith(".wrapper_weights.blob")]
        assert len(blobs) == 1 and blobs[0].file_size >= 4 * n_unet
    with zipfile.ZipFile(frozen / vae.variants[0].package) as z:
        assert not [n for n in z.namelist() if n.endswith(".blob")]
    assert 0 < unet.variants[0].max_abs_error <= unet.variants[0].tolerance


def test_a_frozen_artifact_generates_what_stock_diffusers_does(frozen, saved_pipelines):
    from diffusers import DiffusionPipeline

    pipe = diffbake.load(frozen)
    stock = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    call = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np")
    got = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    want = stock(**call, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert np.abs(got - want).max() < 1e-3


# Where each constant a frozen package's library reads lies, mod 64 bytes (run in a child process, below).
ALIGNMENT = """
import json, sys, torch, diffbake
out = {}
for variant in diffbake.load(sys.argv[1]).unet.diffbake_components["unet"].variants:
    for name, t in variant.runner.constants_in_use().items():
        out[name] = (torch.ops.mkldnn.data_ptr(t) if t.is_mkldnn else t.data_ptr()) % 64, t.is_mkldnn
print(json.dumps(out))
"""


def test_a_frozen_package_runs_on_its_weights_in_64_byte_aligned_memory(frozen):
    # torch's runtime copies a package's weights blob into one malloc'd buffer, which glibc starts 16 bytes past a
    # page boundary when it maps it (always, with a fixed mmap threshold: set in the child process), so every
    # weight lay off the 64-byte lines oneDNN's AVX-512 and AMX kernels load. The loaded package reads copies that
    # diffbake aligned, and computes exactly what torch's own loader does.
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    child = subprocess.run([sys.executable, "-c", ALIGNMENT, str(frozen)], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    used = json.loads(child.stdout.splitlines()[-1])
    assert any(mkldnn for _, mkldnn in used.values())  # the prepacked convolution weights among them
    assert {name: offset for name, (offset, _) in used.items() if offset} == {}
    from diffbake.runtime.selftest import self_test_inputs

    for variant in diffbake.load(frozen).unet.diffbake_components["unet"].variants:
        inputs = self_test_inputs(variant.entry, variant.entry.self_test, "cpu")
        loader = torch._C._aoti.AOTIModelPackageLoader(str(variant.runner.path), "model", False, 1, -1)
        for got, want in zip(variant.runner(*inputs), loader.boxed_run(list(inputs)), strict=True):
            assert torch.equal(got, want)


def test_a_frozen_package_whose_weights_cannot_all_be_read_out_opens_as_torch_loads_it(frozen, monkeypatch):
    # torch's runtime hands a package's constants over by original name, and inductor's max_autotune GEMM templates
    # give several packed weights one name (SD 1.5's UNet: three "constant289"): then the package opens through
    # torch's loader, its weights where that puts them, and computes as before.
    from diffbake.runtime.packages import Package
    from diffbake.runtime.selftest import self_test_inputs

    runner = torch._C._aoti.AOTIModelContainerRunnerCpu

    class SharedNames:  # the runtime of such a package: two constants under one original name
        def __init__(self, *args):
            self.inner = runner(*args)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_constant_names_to_original_fqns(self):
            fqns = self.inner.get_constant_names_to_original_fqns()
            first, second = sorted(fqns)[:2]
            return {**fqns, second: fqns[first]}

    monkeypatch.setattr(torch._C._aoti, "AOTIModelContainerRunnerCpu", SharedNames)
    entry = read_manifest(frozen).components["unet"].variants[0]
    package = Package(frozen / entry.package, "cpu", folder=frozen.parent, machine=platform.machine())
    assert package.constants_in_use() == {}
    inputs = self_test_inputs(entry, entry.self_test, "cpu")
    loader = torch._C._aoti.AOTIModelPackageLoader(str(frozen / entry.package), "model", False, 1, -1)
    for got, want in zip(package(*inputs), loader.boxed_run(list(inputs)), strict=True):
        assert torch.equal(got, want)


def test_the_dynamic_variant_matches_the_eager_unet_at_another_size(frozen, saved_pipelines):
    from diffusers import UNet2DConditionModel

    pipe = diffbake.load(frozen)
    eager = UNet2DConditionModel.from_pretrained(saved_pipelines("sd"), subfolder="unet").eval()
    g = torch.Generator().manual_seed(3)
    sample, text = torch.randn(4, 4, 24, 40, generator=g), torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        want = eager(sample, 500, encoder_hidden_states=text).sample
    got = pipe.unet(sample, 500, encoder_hidden_states=text).sample
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= read_manifest(frozen).components["unet"].variants[1].tolerance


def test_weights_cannot_be_swapped_into_a_frozen_artifact(frozen, tmp_path):
    pipe = diffbake.load(frozen)
    with pytest.raises(RebindError) as e:
        diffbake.set_weights(pipe, frozen)
    assert str(e.value) == REFUSED
    with pytest.raises(RebindError) as e:
        diffbake.rebind(frozen, out=tmp_path / "rebound")
    assert str(e.value) == REFUSED.replace("set_weights:", "rebind:", 1)
    assert not (tmp_path / "rebound").exists()


def test_a_cpu_with_other_onednn_instruction_sets_is_refused(frozen, tmp_path, monkeypatch):
    m = read_manifest(frozen)
    built = frozenset(m.host.cpu_features)
    # The same CPU: loads.
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: built)
    diffbake.format.host.check_compatibility(m, "cpu")
    # A CPU with an instruction set oneDNN would pick other kernels (and weight layouts) for: refused.
    extra = sorted(diffbake.format.host.ONEDNN_ISA - built)[:2]
    if not extra:
        pytest.skip("the build host has every instruction set oneDNN picks kernels by")
    more = built | set(extra)
    monkeypatch.setattr(diffbake.format.host, "cpu_features", lambda: more)
    with pytest.raises(CompatibilityError) as e:
        diffbake.load(frozen)
    assert str(e.value) == (
        "cpu_features: the weights of unet are prepacked (compiler freezing) in the layouts oneDNN chose for the "
        f"build host's CPU, which lacks {', '.join(extra)}; on this CPU oneDNN would reorder them on every call (a "
        "bfloat16 SD 1.5 UNet step measured 2.2x slower); rebuild the artifact on a CPU like this one, or without "
        "freezing"
    )
    # An artifact without frozen components loads there (the extra features are only more to use).
    plain = Path(shutil.copytree(frozen, tmp_path / "plain"))
    from helpers import edit_manifest

    edit_manifest(plain, lambda d: d["components"]["unet"].update(compiler={}))
    diffbake.format.host.check_compatibility(read_manifest(plain), "cpu")


def test_a_manifest_that_misstates_where_weights_are_is_refused(frozen, artifacts, tmp_path, no_package_loaded):
    from diffbake.errors import ArtifactError
    from helpers import edit_manifest

    # Unbound code run as if it held its weights, or bound over weights of its own: neither is loaded.
    unfrozen = Path(shutil.copytree(frozen, tmp_path / "unfrozen"))
    edit_manifest(unfrozen, lambda d: d["components"]["unet"].update(compiler={}))
    with pytest.raises(ArtifactError) as e:
        diffbake.load(unfrozen)
    assert str(e.value) == (
        f"{unfrozen / 'unet' / 'model.pt2'}: the package holds its own weights, but the manifest binds unet's from "
        "unet/weights.safetensors (no compiler freezing); rebuild the artifact"
    )
    refrozen = Path(shutil.copytree(artifacts("sd"), tmp_path / "refrozen"))
    edit_manifest(refrozen, lambda d: d["components"]["unet"].update(compiler={"freezing": True}))
    with pytest.raises(ArtifactError) as e:
        diffbake.load(refrozen)
    assert str(e.value) == (
        f"{refrozen / 'unet' / 'model.pt2'}: the package holds no weights, but the manifest says unet was built with "
        "compiler freezing, which puts them there; rebuild the artifact"
    )


def test_a_named_cpu_target_requires_the_build_hosts_onednn_sets_when_frozen(monkeypatch):
    import diffbake.builder.aoti as aoti

    host = frozenset(diffbake.format.host.CPU_TARGETS["avx512"][2]) | {"avx512_bf16", "avx512_vnni", "gfni"}
    monkeypatch.setattr(aoti, "cpu_features", lambda: host)
    plain = set(aoti.required_cpu_features("avx2"))
    prepacked = set(aoti.required_cpu_features("avx2", prepacked=True))
    assert "avx512f" not in plain and "gfni" not in prepacked
    assert prepacked - plain == {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            'mode = "regional"',
            "r.toml: [components.unet] compiler freezing folds the weights into the package, but a regional build "
            "binds each block instance's weights at load; remove freezing, or use mode = 'full'",
        ),
        (
            'quantization = { method = "int8_dynamic" }',
            "r.toml: [components.unet] compiler freezing is not supported with quantization (torchao's tensors are "
            "not prepacked by it); remove one of the two",
        ),
    ],
)
def test_freezing_with_what_it_cannot_serve_is_refused(extra, message):
    from diffbake.builder.recipe import parse_recipe

    text = ONE_SHAPE.replace("channels_last = true", extra)
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, path="r.toml")
    assert str(e.value) == message


def test_freezing_is_for_cpu_builds(monkeypatch):
    from diffbake.builder.recipe import parse_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))

    text = ONE_SHAPE.replace("[components.unet]", '[target]\ndevice = "cuda"\n[components.unet]')
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, path="r.toml")
    assert str(e.value) == (
        "r.toml: [components.unet] compiler freezing applies to cpu builds only (this recipe targets 'cuda'); remove it"
    )


def test_a_frozen_package_bypasses_the_compile_cache(tmp_path, monkeypatch):
    # The cache's key leaves the weights out (packages are code only), and a frozen package holds them: a rebuild
    # with other weights must compile again, never take the old package.
    import diffbake.builder.build as build
    from diffbake.builder.recipe import parse_recipe

    class Cache:
        def key(self, *args, **kwargs):
            raise AssertionError("a frozen package was looked up in the compile cache")

        store = lookup = key

    compiled = []
    monkeypatch.setattr(build, "compile_package", lambda name, exported, path, **kw: compiled.append(kw["configs"]))
    recipe = parse_recipe(ONE_SHAPE)
    build._compile(
        recipe.components["unet"], recipe, None, tmp_path / "model.pt2", "unet", build.LogReporter(), Cache()
    )
    assert compiled[0]["freezing"] is True
    assert compiled[0]["aot_inductor.package_constants_on_disk_format"] == "binary_blob"
    with pytest.raises(AssertionError, match="looked up"):  # the plain VAE decoder does use it
        build._compile(
            recipe.components["vae_decoder"], recipe, None, tmp_path / "m.pt2", "vae", build.LogReporter(), Cache()
        )


def test_inspect_says_where_a_frozen_components_weights_are(frozen):
    from click.testing import CliRunner

    from diffbake.cli import cli

    result = CliRunner().invoke(cli, ["inspect", str(frozen)])
    assert result.exit_code == 0, result.output
    unet = result.output.split("  unet (UNet2DConditionModel)")[1].split("  vae_decoder")[0]
    assert "    weights folded into each package (compiler freezing), prepacked for the build CPU\n" in unet
    assert "    compiler: freezing=True\n" in unet
    assert "tensors), shared by every variant" in result.output.split("  vae_decoder")[1]
