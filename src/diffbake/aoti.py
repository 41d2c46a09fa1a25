"""AOTInductor: compile an exported program into a code-only package.

Weights stay outside the package (``package_constants_in_so = False``) and are bound at load time, so one set of
weights can serve several packages and be swapped without a recompile. Every setting is scoped to the compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BuildError

INDUCTOR_CONFIGS: dict[str, Any] = {
    # Code only: the weights go to weights.safetensors, stored once.
    "aot_inductor.package_constants_in_so": False,
    # Without this, tensors of 8 elements or fewer are baked into the code and could not be rebound.
    "always_keep_tensor_constants": True,
    # Otherwise the build host's thread count is baked into the CPU kernels, underusing a bigger server.
    "cpp.dynamic_threads": True,
    # Precompiled headers pay off only across many compiles of one process; a build compiles each package once.
    "aot_inductor.precompile_headers": False,
}


def compile_package(name: str, exported: Any, path: Path) -> Path:
    """Compile ``exported`` with AOTInductor into ``path`` (a .pt2 package).

    Raises:
        BuildError: the compile failed (for example no C++ compiler on a CPU build).
    """
    import torch._inductor

    try:
        out = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(path), inductor_configs=INDUCTOR_CONFIGS
        )
    except Exception as e:  # inductor raises many unrelated types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BuildError(
            f"{name}: AOTInductor compile failed ({type(e).__name__}: {first}); a CPU build needs a working C++ "
            "compiler (g++); set DIFFBAKE_DEBUG=1 for the traceback"
        ) from e
    return Path(out)
