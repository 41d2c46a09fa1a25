"""Shared fixtures: tiny pipelines saved to disk and artifacts built from them, once per test session.

A compile costs 20-45 s here, so every artifact is built once per session and shared, and the whole session
(its child processes included) uses one inductor cache folder and one diffbake compile cache: a test that builds
a component some other build already compiled takes its package from the cache, as a user's rebuild does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before torch is imported anywhere: one inductor cache for the session, outside the user's own cache.
_CACHE = Path(tempfile.mkdtemp(prefix="diffbake-test-inductor-"))
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_CACHE)
os.environ["DIFFBAKE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="diffbake-test-compiled-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Verification stamps of the session's artifacts go to a temporary folder, not the user's cache.
os.environ["DIFFBAKE_STAMP_DIR"] = tempfile.mkdtemp(prefix="diffbake-test-stamps-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402

from plain import PLAIN, family  # noqa: E402

# The recipes the shared artifacts are built from; {source} is the saved pipeline's folder.
RECIPES = {
    "sd": """
[source]
model = "{source}"
[components.unet]
shapes = {{ batch = 1, height = 64, width = 64 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
""",
    # Two images per call: exercises num_images_per_prompt and prompt lists.
    "sdxl": """
[source]
model = "{source}"
[target]
device = "cpu"
dtype = "float32"
[components.unet]
shapes = {{ batch = 2, height = 64, width = 64 }}
cfg = true
[components.vae_decoder]
shapes = {{ batch = 2, height = 64, width = 64 }}
""",
    # Not square, and a short text length: exercises Flux's token packing and max_sequence_length.
    "flux": """
[source]
model = "{source}"
[components.transformer]
shapes = {{ batch = 1, height = 32, width = 48, text_tokens = 32 }}
[components.vae_decoder]
shapes = {{ batch = 1, height = 32, width = 48 }}
""",
    # Variants sharing one weights file: an exact static size, a dynamic fallback (batch, height and width ranges)
    # and a no-CFG variant; the runtime picks the exact static one first. Serving merges requests on it.
    "sd-dynamic": """
[source]
model = "{source}"
[components.unet]
shapes = [
  {{ batch = 1, height = 64, width = 64 }},
  {{ batch = [1, 3], height = [32, 96], width = [32, 96] }},
  {{ batch = 1, height = 64, width = 64, cfg = false }},
]
[components.vae_decoder]
shapes = {{ batch = [1, 3], height = [32, 96], width = [32, 96] }}
""",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("diffbake")


@pytest.fixture(scope="session")
def saved_pipelines(workdir: Path):
    """family -> folder holding the tiny pipeline saved with diffusers' save_pretrained."""
    from diffbake.builder.tiny import make_tiny_pipeline

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            folder = workdir / f"saved-{family}"
            make_tiny_pipeline(family).save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return get


@pytest.fixture(scope="session")
def artifacts(workdir: Path, saved_pipelines):
    """name -> artifact built from the saved tiny pipeline (a local save_pretrained folder as the source), with
    its recipe in RECIPES or its plain recipe in PLAIN."""
    import diffbake

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            recipe = workdir / f"{name}.toml"
            text = RECIPES[name] if name in RECIPES else PLAIN[name][0]
            recipe.write_text(text.format(source=saved_pipelines(family(name)).as_posix()))
            cache[name] = diffbake.build(recipe, workdir / "artifacts" / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def ldm_artifact(workdir: Path, saved_pipelines) -> Path:
    """LDMTextToImagePipeline (which defaults to guidance_scale = 1.0) from the tiny SD parts, built at 64 pixels
    with cfg = true; its saved source beside it, at workdir / "saved-ldm"."""
    from diffusers import DiffusionPipeline, LDMTextToImagePipeline

    import diffbake
    from plain import plain_recipe

    sd = DiffusionPipeline.from_pretrained(saved_pipelines("sd"))
    parts = dict(vqvae=sd.vae, bert=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=sd.scheduler)
    source = workdir / "saved-ldm"
    LDMTextToImagePipeline(**parts).save_pretrained(source)
    recipe = workdir / "ldm.toml"
    recipe.write_text(plain_recipe(source, "unet", size=64) + "cfg = true\n")
    return diffbake.build(recipe, workdir / "ldm")


@pytest.fixture
def no_package_loaded(monkeypatch, artifacts):
    """Fails the test if torch's package loader is reached; yields the calls it refused."""
    import torch

    artifacts("sd")  # built (which loads packages) before loading is forbidden
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a package was loaded")

    # torch's loader, and the runner a frozen CPU package is opened with (diffbake.runtime.packages)
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", refuse)
    monkeypatch.setattr(torch._C._aoti, "AOTIModelContainerRunnerCpu", refuse)
    return calls
