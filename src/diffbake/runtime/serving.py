"""Serving: several requests at once on one copy of the weights, and other weights without a reload.

:func:`replicate` makes pipelines that share every module of a loaded one (the compiled code and its bound
weights, the text encoders) and own only their scheduler, so threads can serve requests in parallel; load with
``concurrency=N`` so N denoiser calls can run at once. :func:`set_weights` swaps the weights of a loaded pipeline
for those of another artifact built on the same compiled code (``diffbake rebind``), in place, between requests.
Runtime side: no build imports.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch

from diffbake.errors import ArtifactError, RebindError
from diffbake.format.components import VAE_DECODER
from diffbake.format.host import check_compatibility
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import read_manifest
from diffbake.runtime.compiled import LoadedArtifact, check_weights
from diffbake.runtime.load import bound_set_weights
from diffbake.runtime.standins import CompiledModel

__all__ = ["replicate", "set_weights"]


def _loaded(pipe: Any) -> LoadedArtifact:
    loaded = getattr(pipe, "_diffbake_artifact", None)
    if not isinstance(loaded, LoadedArtifact):
        raise ArtifactError(
            f"{type(pipe).__name__}: not a pipeline loaded with diffbake.load; load the artifact with it first"
        )
    return loaded


def replicate(pipe: Any) -> Any:
    """A pipeline sharing every module of ``pipe`` (no weight is copied), with its own scheduler.

    Calls on different replicas may run in different threads at once. The compiled code serves as many calls at
    once as the ``concurrency`` it was loaded with; further calls wait for a free runner.
    """
    loaded = _loaded(pipe)
    components = dict(pipe.components)
    components["scheduler"] = copy.deepcopy(pipe.scheduler)  # timesteps and step index are per request
    # Constructor options kept in the pipeline's config (requires_safety_checker, force_zeros_for_empty_prompt).
    params = inspect.signature(type(pipe).__init__).parameters
    options = {k: v for k, v in pipe.config.items() if k in params and k not in components}
    twin = type(pipe)(**components, **options)
    twin._diffbake_artifact = loaded
    twin.set_weights = bound_set_weights(twin)
    for attr in ("default_sample_size",):
        if hasattr(pipe, attr):
            setattr(twin, attr, getattr(pipe, attr))
    return twin


def set_weights(pipe: Any, artifact: str | Path, *, verify: str = "full") -> None:
    """Bind the weights of ``artifact`` (a rebind of the one ``pipe`` was loaded from) to ``pipe``, in place.

    Every module of ``pipe`` and of its replicas switches together. Call it between requests: a call running
    while the weights change would mix the two.

    Raises:
        RebindError: ``artifact`` was not built on the same compiled code.
        ArtifactError, CompatibilityError: as for :func:`diffbake.load`.
    """
    loaded = _loaded(pipe)
    root = Path(artifact)
    manifest = read_manifest(root)
    check_compatibility(manifest, torch.device(loaded.device).type)
    verify_files(root, manifest, use_stamp=verify == "stamp")
    _same_code(loaded, root, manifest)
    from safetensors.torch import load_file

    for name, entry in manifest.components.items():
        module = getattr(pipe, "vae" if name == VAE_DECODER else name)
        weights = load_file(root / entry.weights, device=str(torch.device(loaded.device)))
        check_weights(entry, weights)
        if isinstance(module, CompiledModel):
            program = module._program
            for variant in program.variants:
                variant.bind(weights)  # pointer swap: the package reads the new tensors from now on
            program._weights = weights
        else:  # regional: the blocks read the module's own parameters, so copying into them is enough
            module.load_state_dict(weights, strict=True)
    _swap_eager(pipe, root, manifest, loaded)
    pipe._diffbake_artifact = LoadedArtifact(root, manifest, loaded.device)


def _same_code(loaded: LoadedArtifact, root: Path, manifest: Any) -> None:
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


def _swap_eager(pipe: Any, root: Path, manifest: Any, loaded: LoadedArtifact) -> None:
    """Copy the other artifact's eager modules (text encoders) into this pipeline's, in place."""
    compiled = {"vae" if n == VAE_DECODER else n for n in manifest.components}
    for name, module in pipe.components.items():
        if name in compiled or not isinstance(module, torch.nn.Module):
            continue
        folder = root / manifest.pipeline / name
        new = type(module).from_pretrained(folder, dtype=module.dtype, use_safetensors=True)
        module.load_state_dict(new.state_dict(), strict=True)
