"""Serving: several requests at once on one copy of the weights, and other weights without a reload.

:func:`replicate` makes pipelines that share every module of a loaded one (the compiled code and its bound
weights, the text encoders) and own only their scheduler, so threads can serve requests in parallel; load with
``concurrency=N`` so N denoiser calls can run at once. :func:`set_weights` swaps the weights of a loaded pipeline
for those of another artifact built on the same compiled code (``diffbake rebind``), in place, between requests.

What a pipeline was loaded from lives on its compiled components (``module.diffbake_components``), which replicas
share: a swap through any of them is seen by all.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch

from diffbake.errors import ArtifactError, RebindError
from diffbake.format.components import COMPONENTS
from diffbake.format.host import check_compatibility
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import Manifest, read_manifest
from diffbake.runtime.compiled import LoadedArtifact, check_weights

__all__ = ["loaded_artifact", "replicate", "set_weights"]


def compiled_components(pipe: Any) -> dict[str, Any]:
    """The compiled components of a pipeline loaded with :func:`diffbake.load`, by component name.

    Raises:
        ArtifactError: ``pipe`` holds no compiled component.
    """
    found = {}
    for attribute in dict.fromkeys(spec.attribute for spec in COMPONENTS.values()):
        found.update(getattr(getattr(pipe, attribute, None), "diffbake_components", {}))
    if not found:
        raise ArtifactError(
            f"{type(pipe).__name__}: not a pipeline loaded with diffbake.load (it holds no compiled component); "
            "load the artifact with it first"
        )
    return found


def loaded_artifact(pipe: Any) -> LoadedArtifact:
    """The artifact whose weights ``pipe`` (or any replica of it) runs now."""
    records = {id(c.loaded_from): c.loaded_from for c in compiled_components(pipe).values()}
    record = next(iter(records.values()))
    if len(records) != 1:
        raise ArtifactError(
            f"{type(pipe).__name__}: its compiled components come from different diffbake.load calls; use the "
            "pipeline one load returned, or replicas of it"
        )
    if record is None:
        raise ArtifactError(f"{type(pipe).__name__}: its compiled components were not loaded with diffbake.load")
    return record


def replicate(pipe: Any) -> Any:
    """A pipeline sharing every module of ``pipe`` (no weight is copied), with its own scheduler.

    Calls on different replicas may run in different threads at once. The compiled code serves as many calls at
    once as the ``concurrency`` it was loaded with; further calls wait for a free runner.
    """
    compiled_components(pipe)  # refuses a pipeline that diffbake did not load
    components = dict(pipe.components)
    for name, value in components.items():
        if value is not None and not isinstance(value, torch.nn.Module):
            # Small and stateful, so per replica: a scheduler's timesteps and step index, and a fast tokenizer's
            # padding and truncation settings, which each call sets (a pipeline tokenizes with padding to the
            # longest prompt, then to max_length: two threads on one tokenizer mix the two).
            components[name] = copy.deepcopy(value)
    # Constructor options kept in the pipeline's config (requires_safety_checker, force_zeros_for_empty_prompt).
    params = inspect.signature(type(pipe).__init__).parameters
    options = {k: v for k, v in pipe.config.items() if k in params and k not in components}
    twin = type(pipe)(**components, **options)
    for attr in ("default_sample_size",):
        if hasattr(pipe, attr):
            setattr(twin, attr, getattr(pipe, attr))
    return twin


def set_weights(pipe: Any, artifact: str | Path, *, verify: str = "full") -> None:
    """Bind the weights of ``artifact`` (a rebind of the one ``pipe`` was loaded from) to ``pipe``, in place.

    Every module of ``pipe`` and of its replicas switches together, or none does: every new weight is read and
    checked before the first one is bound. Call it between requests: a call running while the weights change
    would mix the two.

    Raises:
        RebindError: ``artifact`` was not built on the same compiled code.
        ArtifactError, CompatibilityError: as for :func:`diffbake.load`; nothing was changed.
    """
    loaded = loaded_artifact(pipe)
    loaded.manifest.require_rebindable("set_weights")
    root = Path(artifact)
    manifest = read_manifest(root)
    check_compatibility(manifest, torch.device(loaded.device).type)
    verify_files(root, manifest, use_stamp=verify == "stamp")
    _same_code(loaded, root, manifest)
    components = compiled_components(pipe)
    compiled = _read_compiled(root, manifest, components, loaded.device)
    eager = _read_eager(pipe, root, manifest)
    # Everything is read and checked: from here on nothing can fail halfway.
    record = LoadedArtifact(root, manifest, loaded.device)
    for name, weights in compiled.items():
        components[name].bind(weights, record)
    for module, state in eager:
        module.load_state_dict(state, strict=True)


def _read_compiled(root: Path, manifest: Manifest, components: dict[str, Any], device: str) -> dict[str, dict]:
    from safetensors.torch import load_file

    out = {}
    for name, entry in manifest.components.items():
        weights = load_file(root / entry.weights, device=str(torch.device(device)))
        check_weights(entry, weights)  # the names, shapes and dtypes _same_code found equal to the loaded ones
        out[name] = weights
    return out


def _read_eager(pipe: Any, root: Path, manifest: Manifest) -> list[tuple[torch.nn.Module, dict]]:
    """The other artifact's eager modules (text encoders), read and checked against this pipeline's."""
    compiled = {COMPONENTS[n].attribute for n in manifest.components}
    out = []
    for name, module in pipe.components.items():
        if name in compiled or not isinstance(module, torch.nn.Module):
            continue
        folder = root / manifest.pipeline / name
        try:
            state = type(module).from_pretrained(folder, dtype=module.dtype, use_safetensors=True).state_dict()
        except Exception as e:  # any loader failure: report it and change nothing
            raise ArtifactError(
                f"{folder}: could not load {name} ({type(e).__name__}: {e}); nothing was changed; rebuild the "
                "artifact with `diffbake rebind`"
            ) from e
        mine = module.state_dict()
        shapes = {k: tuple(v.shape) for k, v in mine.items()}
        if {k: tuple(v.shape) for k, v in state.items()} != shapes:
            raise RebindError(
                f"{folder}: {name} is not the architecture of the loaded pipeline's {name} (other names or shapes); "
                "nothing was changed; set_weights takes an artifact made with `diffbake rebind` from the loaded one"
            )
        out.append((module, state))
    return out


def _same_code(loaded: LoadedArtifact, root: Path, manifest: Manifest) -> None:
    old = loaded.manifest
    problems = []
    if set(manifest.components) != set(old.components):
        problems.append(f"components {sorted(manifest.components)}, loaded {sorted(old.components)}")
    for name in set(manifest.components) & set(old.components):
        a, b = old.components[name], manifest.components[name]
        packages = b.packages
        if packages != a.packages or any(manifest.files[p].sha256 != old.files[p].sha256 for p in packages):
            problems.append(f"{name}: other compiled code")
        elif a.constants != b.constants:
            problems.append(f"{name}: other constants")
    if problems:
        raise RebindError(
            f"{root}: not built on the compiled code of {loaded.root} ({'; '.join(problems)}); set_weights takes "
            "an artifact made from it with `diffbake rebind`; load this one with diffbake.load instead"
        )
