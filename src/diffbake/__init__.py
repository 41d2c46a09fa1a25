"""diffbake: ahead-of-time compiled diffusers pipelines.

``diffbake.build(recipe)`` writes an artifact; ``diffbake.load(path)`` turns it back into a diffusers pipeline
that runs the compiled code; ``diffbake.push(path, repo_id)`` publishes it, and
``diffbake.load(repo_id, revision=sha, trust_remote_code=True)`` loads the build that fits the host. Loading imports nothing from the build side, so ``import diffbake`` stays light and
the build modules load only when ``build`` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffbake.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    BuildError,
    CompatibilityError,
    DiffbakeError,
    HubError,
    InputMismatchError,
    IntegrityError,
    RecipeError,
    SelfTestError,
    SourceError,
    TrustError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ArtifactNotFoundError",
    "BuildError",
    "CompatibilityError",
    "DiffbakeError",
    "HubError",
    "InputMismatchError",
    "IntegrityError",
    "Recipe",
    "RecipeError",
    "SelfTestError",
    "SourceError",
    "TrustError",
    "VerificationError",
    "__version__",
    "build",
    "load",
    "load_recipe",
    "push",
    "rebind",
    "replicate",
    "set_weights",
]

if TYPE_CHECKING:
    from diffbake.builder.build import build
    from diffbake.builder.rebind import rebind
    from diffbake.builder.recipe import Recipe, load_recipe
    from diffbake.hub.push import push
    from diffbake.runtime.load import load
    from diffbake.runtime.serving import replicate, set_weights

# Public name -> the module that defines it, imported on first use (the build side only when it is used).
_LAZY = {
    "build": "diffbake.builder.build",
    "load": "diffbake.runtime.load",
    "Recipe": "diffbake.builder.recipe",
    "load_recipe": "diffbake.builder.recipe",
    "push": "diffbake.hub.push",
    "rebind": "diffbake.builder.rebind",
    "replicate": "diffbake.runtime.serving",
    "set_weights": "diffbake.runtime.serving",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffbake' has no attribute {name!r}")
