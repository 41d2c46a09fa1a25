"""Where a pipeline comes from: a Hub id, a local ``save_pretrained`` folder, or a built-in tiny pipeline.

:func:`inspect_source` reads only configs (``model_index.json`` and the VAE's ``config.json``), so the recipe's
shapes are checked against the model before any weight is downloaded or loaded; :func:`load_pipeline` loads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbake.builder.recipe import Recipe
from diffbake.errors import SourceError, SourceNotFoundError
from diffbake.format.components import BUILTIN_MODELS, PIPELINES, denoiser_of

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
BUILTIN_KINDS = ("tiny", "random")


@dataclass(frozen=True)
class SourceInfo:
    """Where the pipeline comes from, and what its configs and its class say about how it can be called."""

    kind: str  # "tiny" | "random" (built in) | "local" | "hub"
    location: str  # built-in model name ("tiny:sd"), absolute folder, or repo id
    revision: str | None
    pipeline_class: str
    components: tuple[str, ...]  # the pipeline's modules present in its model index ("unet", "vae", ...)
    vae_scale_factor: int  # 1 without a VAE
    patch: int  # latents per token side: the pipeline's own packing times the denoiser's patch_size
    # The pipeline's __call__ parameters, and their defaults where a recipe size is filled from them.
    call_parameters: tuple[str, ...] = ()
    default_text_tokens: int | None = None  # max_sequence_length's default
    native_size: int | None = None  # the image size (pixels) of a pipeline whose __call__ takes no height

    @property
    def denoiser(self) -> str | None:
        return denoiser_of(dict.fromkeys(self.components, True))

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.patch

    @property
    def tested(self) -> bool:
        return self.pipeline_class in PIPELINES

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.location, "kind": self.kind, "revision": self.revision}


def inspect_source(recipe: Recipe) -> SourceInfo:
    """Resolve the recipe's source and read its family and VAE scale factor from configs alone.

    Raises:
        SourceNotFoundError: a local folder that does not exist, or a Hub repo that cannot be found.
        SourceError: a folder that is not a diffusers pipeline, or a pipeline class diffbake does not support.
    """
    where = str(recipe.path) if recipe.path is not None else "recipe"
    model = recipe.model
    if model in BUILTIN_MODELS:
        from diffbake.builder.tiny import builtin_configs

        index, configs = builtin_configs(model)
        return _info(model.split(":")[0], model, None, index, configs, where)

    folder = Path(model).expanduser()
    if folder.exists():
        if not (folder / MODEL_INDEX).is_file():
            raise SourceError(
                f"{where}: [source] model = {model!r} is a folder without {MODEL_INDEX}; expected a diffusers "
                "pipeline saved with save_pretrained"
            )
        index = _read_json(folder / MODEL_INDEX, where)
        configs = {
            name: _read_json(folder / name / "config.json", where)
            for name in ("vae", denoiser_of(index))
            if name and (folder / name / "config.json").is_file()
        }
        return _info("local", str(folder.resolve()), None, index, configs, where)
    if _looks_like_path(model):
        raise SourceNotFoundError(
            f"{where}: [source] model = {model!r}: no such folder; expected a folder saved with diffusers' "
            f"save_pretrained (holding {MODEL_INDEX}), a Hub id such as 'org/name', or one of "
            + ", ".join(BUILTIN_MODELS)
        )
    index = _hub_json(model, MODEL_INDEX, recipe.revision, where)
    configs = {
        name: _hub_json(model, f"{name}/config.json", recipe.revision, where, required=False)
        for name in ("vae", denoiser_of(index))
        if name and index.get(name)
    }
    return _info("hub", model, recipe.revision, index, configs, where)


def load_pipeline(info: SourceInfo, dtype: str):
    """Load the pipeline in ``dtype`` on the CPU (components are moved to the target device one at a time)."""
    import torch
    from diffusers import DiffusionPipeline

    torch_dtype = getattr(torch, dtype)
    if info.kind in BUILTIN_KINDS:
        from diffbake.builder.tiny import make_builtin_pipeline

        pipe = make_builtin_pipeline(info.location)  # built in float32
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    try:
        return DiffusionPipeline.from_pretrained(info.location, revision=info.revision, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load the pipeline from {info.location!r}: {e}") from e


def load_module(info: SourceInfo, attr: str, dtype: str):
    """Load one component (``unet``, ``transformer``, ``vae``) of the source alone, in ``dtype``.

    Used for the float32 reference of a build in another dtype, so the whole pipeline is never held twice.
    """
    import diffusers
    import torch

    torch_dtype = getattr(torch, dtype)
    if info.kind in BUILTIN_KINDS:
        from diffbake.builder.tiny import make_builtin_component

        return make_builtin_component(info.location, attr).to(dtype=torch_dtype)
    try:
        if info.kind == "local":
            index = _read_json(Path(info.location) / MODEL_INDEX, info.location)
        else:
            index = _hub_json(info.location, MODEL_INDEX, info.revision, info.location)
        cls = getattr(diffusers, index[attr][1])
        return cls.from_pretrained(info.location, subfolder=attr, revision=info.revision, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise SourceError(f"cannot load {attr!r} from {info.location!r}: {e}") from e


def _info(
    kind: str, location: str, revision: str | None, index: dict, configs: dict[str, dict], where: str
) -> SourceInfo:
    """What the model index, the VAE's and denoiser's configs and the pipeline class say, without any weight."""
    import inspect

    import diffusers

    class_name = index.get("_class_name", "")
    cls = getattr(diffusers, class_name, None) if class_name else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise SourceError(
            f"{where}: [source] model {location!r} is a {class_name or 'unknown'} pipeline, which is not a "
            "diffusers pipeline class of this diffusers"
        )
    components = tuple(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0])
    denoiser = denoiser_of(index)
    if denoiser is None:
        raise SourceError(f"{where}: [source] model {location!r}: {class_name} has no unet or transformer to compile")
    vae = configs.get("vae", {}) if "vae" in components else None
    params = inspect.signature(cls.__call__).parameters
    denoiser_config = configs.get(denoiser, {})
    patch = _latent_patch(cls) * int(denoiser_config.get("patch_size") or 1)
    scale = _vae_scale_factor(vae)
    sample = denoiser_config.get("sample_size")
    native = sample * scale if isinstance(sample, int) else None
    text = params["max_sequence_length"].default if "max_sequence_length" in params else None
    return SourceInfo(
        kind,
        location,
        revision,
        class_name,
        components,
        scale,
        patch,
        call_parameters=tuple(params),
        default_text_tokens=text if isinstance(text, int) else None,
        # An img2img pipeline without height makes images of its input image's size: any size is its own.
        native_size=native if "height" not in params and "image" not in params else None,
    )


def _latent_patch(cls: type) -> int:
    """PipelineFacts.latent_patch of a listed pipeline; for another, 2 where it packs latents as Flux does (its
    variants, Chroma, Qwen-Image: a static _pack_latents(latents, batch_size, num_channels_latents, height, width)
    that packs 2x2 latents into one token), else 1."""
    import inspect

    if cls.__name__ in PIPELINES:
        return PIPELINES[cls.__name__].latent_patch
    pack = inspect.getattr_static(cls, "_pack_latents", None)
    if isinstance(pack, staticmethod):
        names = list(inspect.signature(pack.__func__).parameters)
        if names == ["latents", "batch_size", "num_channels_latents", "height", "width"]:
            return 2
    return 1


def _vae_scale_factor(vae: dict | None) -> int:
    """The pipelines' own rule: 2 ** (number of blocks - 1) of the (encoder) blocks; 8 for a VAE without a config,
    1 without a VAE."""
    if vae is None:
        return 1
    blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else 8


def _looks_like_path(model: str) -> bool:
    # "org/name" is a Hub id; anything anchored, or deeper than one slash, is meant as a folder.
    return model.startswith(("/", ".", "~")) or model.count("/") != 1 or "\\" in model


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{where}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise SourceError(f"{where}: {path} is not a JSON object")
    return data


def _hub_json(repo: str, filename: str, revision: str | None, where: str, required: bool = True) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo, filename, revision=revision)
    except EntryNotFoundError:
        if not required:
            return {}
        raise SourceError(f"{where}: Hub repo {repo!r} has no {filename}; is it a diffusers pipeline?") from None
    except RepositoryNotFoundError as e:
        raise SourceNotFoundError(
            f"{where}: [source] model = {repo!r}: no such Hub repo (or it is private: log in with `hf auth login`)"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SourceError(f"{where}: cannot fetch {filename} of {repo!r} from the Hub: {e}") from e
    return _read_json(Path(path), where)
