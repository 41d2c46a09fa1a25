"""Atomic builds: a build killed at any moment leaves its destination absent or valid, never half-written."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffbake.builder.cache import CACHE_ENV
from diffbake.errors import DiffbakeError
from diffbake.format.integrity import verify_files
from diffbake.format.manifest import MANIFEST_FILE, read_manifest
from diffbake.format.staging import Staging, recover

# The cheapest real build: the VAE decoder alone (its package comes from the session's compile cache once one
# build of it completed, except where a test gives the build an empty cache to see it compile).
RECIPE = """
[source]
model = "{source}"
[components.vae_decoder]
shapes = {{ batch = 1, height = 64, width = 64 }}
"""
# Stage lines the CLI prints as they start, in build order.
STAGES = [
    "load StableDiffusionPipeline",
    "vae_decoder: float32 eager reference",
    "vae_decoder: export",
    "vae_decoder: look up the compile cache",
    "vae_decoder: compile (AOTInductor)",
    "vae_decoder: compile (AOTInductor), found in the compile cache",
    "vae_decoder: save weights",
    "vae_decoder: verify against eager",
    "vae_decoder: record self-test",
    "save the eager components",
    "write manifest",
]


@pytest.fixture(scope="module")
def recipe(saved_pipelines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("atomic") / "vae.toml"
    path.write_text(RECIPE.format(source=saved_pipelines("sd").as_posix()))
    return path


def _build(recipe: Path, dest: Path, kill_at: str | None = None, delay: float = 0.0, cache: Path | None = None) -> int:
    """Run ``diffbake build`` in a child; with ``kill_at``, SIGKILL it ``delay`` s after that stage starts (the
    stage's line must be printed exactly so: a stage after the compile may start with it). ``cache``: the
    compile cache folder, if not the session's."""
    env = {**os.environ, **({CACHE_ENV: str(cache)} if cache is not None else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffbake.cli", "build", str(recipe), "--out", str(dest), "--force"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # the kill reaches the compiler it may be running too
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if kill_at is not None and line.strip().removesuffix(" ...") == kill_at:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    return proc.wait(timeout=600)


def _state(dest: Path) -> str:
    """ "absent", or the digest of the complete artifact there; anything else fails the test."""
    if not dest.exists():
        return "absent"
    try:
        manifest = read_manifest(dest)
        verify_files(dest, manifest)
    except DiffbakeError as e:
        pytest.fail(f"a killed build left {dest} neither absent nor valid: {e}")
    return (dest / MANIFEST_FILE).read_text()


def _kill_and_check(recipe: Path, dest: Path, kills: list[tuple[str, float]]) -> None:
    before = _state(dest)
    for stage, delay in kills:
        _build(recipe, dest, stage, delay)
        after = _state(dest)  # absent or valid, whatever the moment of the kill
        if before != "absent":
            assert after != "absent", f"killed at {stage!r} + {delay} s, the previous artifact is gone"
        before = after
    # The next build cleans up what the killed ones left, and completes.
    assert _build(recipe, dest) == 0
    assert _state(dest) != "absent"
    assert [p.name for p in dest.parent.iterdir() if p.name != dest.name] == []


def test_killed_builds_leave_the_destination_absent_or_valid(recipe: Path, tmp_path: Path):
    dest = tmp_path / "out" / "vae"
    # A first build killed while it compiles (an empty compile cache: it must compile) leaves nothing there.
    assert _build(recipe, dest, "vae_decoder: compile (AOTInductor)", 0.2, cache=tmp_path / "cache") == -signal.SIGKILL
    assert _state(dest) == "absent"
    assert [p.name for p in dest.parent.iterdir()][0].startswith(".vae.partial-")  # the killed build's staging
    assert _build(recipe, dest) == 0
    old = _state(dest)
    # Killed while replacing a complete artifact: the old one stays until the new one is complete.
    _kill_and_check(recipe, dest, [("vae_decoder: verify against eager", 0.0), ("write manifest", 0.0)])
    assert old != "absent"


@pytest.mark.slow
def test_twenty_kills_at_random_moments(recipe: Path, tmp_path: Path):
    rng = random.Random(20)
    kills = [(rng.choice(STAGES), rng.choice([0.0, 0.005, 0.02, 0.1, 0.5, 1.0])) for _ in range(20)]
    _kill_and_check(recipe, tmp_path / "out" / "vae", kills)


def test_commit_replaces_an_artifact_in_one_step(tmp_path: Path):
    dest = tmp_path / "art"
    for version in ("old", "new"):
        with Staging(dest) as staging:
            (staging.path / "payload").write_text(version)
            staging.commit(lambda files: _Manifest())
    assert (dest / "payload").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_an_old_artifact_left_between_two_renames_is_put_back(tmp_path: Path):
    dest = tmp_path / "art"
    dead = 4_000_000  # above Linux's default pid_max: no such process
    left = tmp_path / f".art.old-{dead}-0123abcd"
    left.mkdir()
    (left / MANIFEST_FILE).write_text("{}")
    staging = tmp_path / f".art.partial-{dead}-89abcdef"
    staging.mkdir()
    alive = tmp_path / f".art.partial-{os.getpid()}-00000000"  # this process's own: not touched
    alive.mkdir()
    recover(dest)
    assert (dest / MANIFEST_FILE).read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", alive.name])


class _Manifest:
    """Enough of a manifest for Staging.commit (which only serializes it)."""

    def to_json(self) -> str:
        return "{}\n"
