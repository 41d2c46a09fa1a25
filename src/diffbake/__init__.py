"""diffbake: ahead-of-time compiled diffusers pipelines.

``diffbake.build(recipe)`` writes an artifact; ``diffbake.load(path)`` turns it back into a diffusers pipeline
that runs the compiled code; ``diffbake.push(path, repo_id)`` publishes it, and
``diffbake.load(repo_id, revision=sha, trust_remote_code=True)`` loads the build that fits the host. Loading imports nothing from the build side, so ``import diffbake`` stays light and
the build modules load only when ``build`` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
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
    from .builder import build
    from .publish import push
    from .rebinding import rebind
    from .recipe import Recipe, load_recipe
    from .runtime import load
    from .serving import replicate, set_weights

_LAZY = {
    "build": "builder",
    "load": "runtime",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "push": "publish",
    "rebind": "rebinding",
    "replicate": "serving",
    "set_weights": "serving",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffbake' has no attribute {name!r}")
