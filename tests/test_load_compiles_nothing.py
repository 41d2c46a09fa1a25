"""Loading an artifact compiles nothing and imports nothing from the build side.

Checked in a fresh process where every compiler (CXX, CC, and g++/gcc/cc/c++/clang on PATH) is a script that
leaves a mark and fails, and with an empty inductor cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import torch
import diffbake
pipe = diffbake.load(sys.argv[1])
image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
# The build side is everything under diffbake.builder, diffbake.bench and the CLI, and what compiles.
build_side = sorted(m for m in sys.modules if m.startswith(("diffbake.builder", "diffbake.bench", "diffbake.cli"))
    or m in {"diffbake.format.staging", "click", "torch._inductor.compile_fx", "torch._inductor.graph"})
print(json.dumps({"shape": list(image.shape), "finite": bool((image == image).all()), "build_side": build_side}))
"""


def test_load_and_generate_without_a_compiler(artifacts, tmp_path: Path):
    artifact = artifacts("sd")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "compiler-was-called"
    for tool in ("g++", "gcc", "cc", "c++", "clang", "clang++"):
        script = fake_bin / tool
        script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        script.chmod(0o755)
    cache = tmp_path / "inductor-cache"
    cache.mkdir()
    env = {
        **os.environ,
        # Every compiler torch could pick leaves a mark (torch's own package reader probes the CPU with g++ at
        # every load; diffbake's loader must not).
        "CXX": str(fake_bin / "g++"),
        "CC": str(fake_bin / "gcc"),
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(artifact)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"shape": [1, 64, 64, 3], "finite": True, "build_side": []}
    assert not marker.exists(), "a compiler was called while loading"
    assert not any(p.is_file() for p in cache.rglob("*")), "the inductor cache was written to while loading"
