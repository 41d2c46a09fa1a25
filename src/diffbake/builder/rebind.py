"""rebind(artifact, weights=..., loras=...): a new artifact from an existing one's compiled code and other weights.

Weights live outside the compiled packages, so any checkpoint of the same architecture (a fine-tune, or the base
with LoRAs fused in) can be bound to the same code. A rebind is a build that copies the packages instead of
compiling them: the new weights pass through the recipe's transforms (fusion, quantization, layout), must match
what the code was compiled for name by name (shape, dtype, stride), and are verified against eager and given a
new self-test, as in a build. It runs no compiler.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffbake.builder.build import LogReporter, Reporter, Reuse, check_destination, write_artifact
from diffbake.builder.recipe import check_against_source, parse_recipe
from diffbake.builder.sources import inspect_source, load_pipeline
from diffbake.errors import RebindError, SourceError
from diffbake.format.components import COMPONENTS
from diffbake.format.host import check_compatibility
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import RECIPE_FILE, read_manifest, sha256_file


def rebind(
    artifact: str | Path,
    *,
    weights: str | Path | None = None,
    revision: str | None = None,
    loras: list[tuple[str | Path, float]] | tuple = (),
    out: str | Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Bind other weights to an artifact's compiled code, into a new artifact.

    Args:
        artifact: the artifact whose compiled code is reused.
        weights: a local ``save_pretrained`` folder or Hub id of the same architecture; defaults to the
            artifact's own source (useful with ``loras``).
        revision: the Hub revision of ``weights``.
        loras: (LoRA file, scale) pairs fused into the weights (diffusers' ``load_lora_weights`` and
            ``fuse_lora``) before the recipe's transforms.
        out: the new artifact's folder; defaults to ``<artifact>-rebound`` beside it.
        force: replace an existing artifact at ``out``.

    Raises:
        RebindError: the weights do not fit the compiled code (the first differences are listed).
        SourceError: the weights or a LoRA cannot be loaded.
        ArtifactError: the artifact is damaged.
    """
    rep = reporter or LogReporter()
    src = Path(artifact)
    with rep.stage(f"check {src}"):
        manifest = read_manifest(src)
        manifest.require_rebindable("rebind")
        verify_files(src, manifest)  # the compiled code to reuse must be exactly what was built
        # The rebind runs that code to check the new weights, and its manifest keeps the compiling host's facts:
        # both hold only where the code fits this host.
        check_compatibility(manifest, manifest.device)
    dest = Path(out) if out is not None else src.with_name(src.name + "-rebound")
    check_destination(dest, force)
    recipe = parse_recipe((src / RECIPE_FILE).read_text(encoding="utf-8"), path=src / RECIPE_FILE)
    if weights is None:
        weights, revision = manifest.source["model"], manifest.source.get("revision")
    recipe = replace(recipe, model=str(weights), revision=revision)

    with rep.stage("read source"):
        info = inspect_source(recipe)
        if info.pipeline_class != manifest.pipeline_class:
            raise RebindError(
                f"{weights}: a {info.pipeline_class}, but {src} was compiled for a {manifest.pipeline_class}; "
                "rebind only checkpoints of the same architecture, or build a new artifact"
            )
        recipe = check_against_source(recipe, info)
    with rep.stage(f"load {info.pipeline_class} ({recipe.dtype})"):
        pipe = load_pipeline(info, recipe.dtype)
    _check_configs(src, manifest, pipe, weights)
    fused, float32 = [], None
    if loras:
        with rep.stage(f"fuse {len(loras)} LoRA(s)"):
            fused = _fuse_loras(pipe, loras)
        if recipe.dtype != "float32" or any(c.transformed for c in recipe.components.values()):
            # Errors against float32 are measured against these weights: the base ones would count the LoRA.
            with rep.stage("float32 reference with the LoRA(s) fused"):
                float32 = load_pipeline(info, "float32")
                _fuse_loras(float32, loras)
    text = f"# rebound from {src.name}: weights from {weights}" + "".join(
        f", LoRA {f['file']} x {f['scale']}" for f in fused
    )
    recipe = replace(recipe, text=text + "\n" + recipe.text)
    extra = {"rebound_from": dict(manifest.source), "loras": fused}
    return write_artifact(recipe, info, pipe, dest, rep, reuse=Reuse(src, manifest, float32), source_extra=extra)


def _check_configs(src: Path, manifest: Any, pipe: Any, weights: Any) -> None:
    """The new modules must have the compiled ones' configs: list the first differences otherwise."""
    for name, entry in manifest.components.items():
        module = COMPONENTS[name].module(pipe)
        compiled = json.loads((src / entry.config).read_text(encoding="utf-8"))
        new = dict(module.config)
        keys = sorted(k for k in set(compiled) | set(new) if not k.startswith("_"))
        differences = [
            f"{k}: {_json(new.get(k))}, compiled for {_json(compiled.get(k))}"
            for k in keys
            if _json(new.get(k)) != _json(compiled.get(k))
        ]
        if differences:
            raise RebindError(
                f"{name}: {weights} has another architecture than {src} was compiled for "
                f"({len(differences)} config differences; first: {'; '.join(differences[:5])}); rebind only "
                "checkpoints of the same architecture, or build a new artifact"
            )


def _json(value: Any) -> str:
    # Configs round-trip through JSON (tuples become lists): compare them in that form.
    return json.dumps(value, sort_keys=True, default=str)


def _fuse_loras(pipe: Any, loras: list[tuple[str | Path, float]] | tuple) -> list[dict[str, Any]]:
    names, scales, record = [], [], []
    for i, (path, scale) in enumerate(loras):
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: no such LoRA file; pass a .safetensors LoRA (or its folder)")
        name = f"rebind_{i}"
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as e:  # diffusers raises ValueError, KeyError, ImportError (no peft) for bad input
            raise SourceError(f"{path}: cannot load this LoRA ({type(e).__name__}: {e})") from e
        names.append(name)
        scales.append(float(scale))
        digest = sha256_file(path) if path.is_file() else None
        record.append({"file": path.name, "sha256": digest, "scale": float(scale)})
    pipe.set_adapters(names, adapter_weights=scales)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return record
