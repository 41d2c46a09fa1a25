"""benchmarks/gpu_check.sh, the GPU check, run here without a GPU: its guard, and every command it would run
parsed by the real CLI and pytest (a stand-in python says CUDA is there and turns each run into a parse)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the script runs for real")

# Stands in for python: CUDA "is available", and each diffbake or pytest command only parses its arguments
# (--help after every other argument: an unknown option is still an error), so a wrong flag fails here.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
    -c) exit 0 ;;
    -) cat > /dev/null; echo "a stand-in python"; exit 0 ;;
esac
if [[ "$1 $2" == "-m diffbake.cli" ]]; then exec {real} "$@" --help; fi
if [[ "$1 $2" == "-m pytest" ]]; then exec {real} "$@" --collect-only; fi
echo "unexpected call: $*" >&2
exit 3
"""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_usage_and_no_gpu(tmp_path):
    bad = _run()
    assert bad.returncode == 2 and bad.stderr.startswith("usage: ")
    out = tmp_path / "check"
    none = _run(str(out), env={"PYTHON": sys.executable})
    assert none.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "cuda available: False" in summary
    assert f"no CUDA device visible to {sys.executable} (see environment.txt): nothing to check" in summary


def test_every_command_of_the_check_parses(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "check"
    result = _run(str(out), "600", env={"PYTHON": str(fake)})
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    steps = ["gpu-tests", "sd15-build", "sd15-bench", "flux-small-build", "flux-small-bench", "sd15-bench-compile"]
    for name in steps:
        assert f"\n{name} " in summary and (out / f"{name}.log").is_file(), name
    assert "FAILED" not in summary and "SKIPPED" not in summary and "TIMED OUT" not in summary, summary
    assert "Usage: diffbake bench [OPTIONS] RECIPE" in (out / "sd15-bench.log").read_text()
    assert "test_cuda_graphs_replay_equals_plain_runs_and_eager_across_shapes" in (out / "gpu-tests.log").read_text()
    # Every step has a bound: with no time left, each is skipped and says so.
    late = _run(str(tmp_path / "late"), "0", env={"PYTHON": str(fake)})
    assert late.returncode == 0
    assert "gpu-tests                    SKIPPED (0 s left, needs 60 s)" in late.stdout
