"""``diffbake bench``: the report's structure and the command's errors, on a tiny recipe (timings are not tested).

One full run on the session's tiny SD artifact (reused, not rebuilt): the ladder, eager, torch.compile with an
empty and a warm inductor cache, and the artifact, each in a fresh process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from diffbake.bench.bench import PATHS
from diffbake.cli import cli
from diffbake.format.manifest import read_manifest


@pytest.fixture(scope="module")
def run(artifacts, workdir, tmp_path_factory):
    artifact = artifacts("sd")
    out = tmp_path_factory.mktemp("bench") / "report"
    args = ["bench", str(workdir / "sd.toml"), "--artifact", str(artifact), "--out", str(out)]
    args += ["--steps", "2", "--repeats", "3", "--warmup", "1", "--image-repeats", "1"]
    result = CliRunner().invoke(cli, args)
    return result, out, artifact


def test_bench_writes_json_markdown_and_a_chart(run):
    result, out, artifact = run
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["report_version"] == 1
    assert report["host"]["cpu_precision"] == "float32"  # how this CPU runs the recipe's dtype
    assert list(report["paths"]) == list(PATHS)
    for name, path in report["paths"].items():
        assert path["first_image_s"] > path["load_s"] > 0, name
        assert len(path["step_s"]) == 3 and path["step_median_s"] >= path["step_min_s"] > 0
        assert path["image_median_s"] > 0 and path["peak_rss_mb"] > 0
        assert path["cuda_peak_mb"] is None  # CPU run
        assert 0 < path["percent_of_peak"] <= 100
        if name != "eager":
            # The same inputs in every process: the compiled paths reproduce eager (float32).
            assert path["step_max_abs_error_vs_eager"] < 1e-4
            assert path["image_max_abs_error_vs_eager"] < 1e-3
    assert [r["step"] for r in report["ladder"]] == ["float32 eager", "+ AOT compile (full)"]
    assert report["ladder"][1]["max_abs_error"] < 1e-4
    # What a first image costs beyond a steady one: a cold torch.compile pays its compile there, the artifact not.
    paths = report["paths"]
    assert paths["compile_cold"]["startup_overhead_s"] > paths["artifact"]["startup_overhead_s"]
    peak = report["flops"]["matmul_peak"]
    assert peak["dtype"] == "float32" and peak["flops_per_s"] > 0
    # The step's FLOPs are those of the call the pipeline makes: the UNet on a CFG batch of 2 at 32x32 latents.
    assert report["flops"]["per_step"] == _unet_step_flops(artifact)
    assert set(report["summary"]) >= {
        "first_image_compile_cold_over_artifact",
        "first_image_compile_warm_over_artifact",
        "startup_compile_cold_over_artifact",
        "step_compile_warm_over_artifact",
        "step_eager_over_artifact",
    }
    manifest = read_manifest(artifact)
    assert report["build"]["reused"] is True
    assert report["build"]["artifact_bytes"] == sum(f.size for f in manifest.files.values())
    assert report["settings"]["call"] == {"height": 64, "width": 64, "num_images_per_prompt": 1}

    md = (out / "bench.md").read_text()
    assert "## Paths (each in a fresh process)" in md and "## Ladder" in md and "![chart](bench.png)" in md
    for label in ("eager diffusers", "torch.compile, empty cache", "torch.compile, warm cache", "diffbake artifact"):
        assert f"| {label} |" in md
        assert label in result.output  # the terminal table
    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.width == 900 and png.height > 300


def _unet_step_flops(artifact: Path) -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(artifact / "unet")).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(2, 4, 32, 32), 500, encoder_hidden_states=torch.zeros(2, 77, 32))
    return counter.get_total_flops()


def test_bench_measures_openvino_beside_the_artifact(run):
    result, out, artifact = run
    report = json.loads((out / "bench.json").read_text())
    openvino = report["openvino"]
    assert openvino["openvino_version"].startswith("20")
    steps = openvino["steps"]
    assert set(steps) == {"eager", "openvino", "artifact"}
    for name, step in steps.items():
        assert len(step["step_s"]) == 3 and step["step_median_s"] > 0, name
    # A float32 recipe: eager is the reference itself, and the artifact and OpenVINO compute the same step.
    assert steps["eager"]["max_abs_error_vs_float32"] == 0.0
    assert steps["artifact"]["max_abs_error_vs_float32"] < 1e-4
    assert steps["openvino"]["max_abs_error_vs_float32"] < 1e-3
    assert steps["openvino"]["precision"] == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    assert steps["openvino"]["convert_s"] > 0
    # The UNet's inputs on the first call: the CFG batch of latents, the timestep, the text embeddings.
    assert openvino["inputs"] == [[2, 4, 32, 32], [], [2, 77, 32]]
    assert report["summary"]["step_openvino_over_artifact"] == (
        steps["openvino"]["step_median_s"] / steps["artifact"]["step_median_s"]
    )
    md = (out / "bench.md").read_text()
    assert "## Against OpenVINO (the denoiser step, one fresh process)" in md
    assert "- denoiser step, OpenVINO / artifact (one process): **" in md
    assert "Medians of 3 rounds, each timing one call of all three in turn." in md
    assert "OpenVINO " in result.output and "diffbake artifact" in result.output


def test_one_process_paths_are_timed_in_turn():
    # On a shared host whose speed drifts, paths timed one after the other would each get a different machine.
    from diffbake.bench.child import _timed_rounds

    calls = []
    runs = {name: (lambda name=name: calls.append(name) or name.upper()) for name in ("a", "b", "c")}
    timed = _timed_rounds(runs, {"warmup": 1, "repeats": 4}, "cpu")
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: (len(times), out) for name, (times, out) in timed.items()} == {
        "a": (4, "A"),
        "b": (4, "B"),
        "c": (4, "C"),
    }


def test_bench_says_why_openvino_is_skipped(artifacts, workdir, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a)
    )
    args = ["bench", str(workdir / "sd.toml"), "--artifact", str(artifacts("sd")), "--paths", "artifact"]
    args += ["--no-ladder", "--steps", "1", "--repeats", "1", "--warmup", "0", "--image-repeats", "0"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    skipped = "openvino is not installed (pip install openvino, or diffbake[openvino])"
    assert json.loads((tmp_path / "a" / "bench.json").read_text())["openvino"] == {"skipped": skipped}
    assert f"OpenVINO: skipped, {skipped}." in (tmp_path / "a" / "bench.md").read_text()
    assert "step_openvino_over_artifact" not in json.loads((tmp_path / "a" / "bench.json").read_text())["summary"]
    monkeypatch.undo()
    result = CliRunner().invoke(cli, [*args, "--no-openvino", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["openvino"] == {"skipped": "not asked for (--no-openvino)"}


def test_bench_errors(run, artifacts, workdir, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["bench", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "no such recipe file" in missing.output

    bogus = runner.invoke(cli, ["bench", str(workdir / "sd.toml"), "--paths", "eager,warp"])
    assert bogus.exit_code == 2 and "warp; choose from eager, compile_cold, compile_warm, artifact" in bogus.output
    warm = runner.invoke(cli, ["bench", str(workdir / "sd.toml"), "--paths", "compile_warm"])
    assert warm.exit_code == 2 and "compile_warm reuses the cache compile_cold fills" in warm.output

    gpu = tmp_path / "gpu.toml"
    gpu.write_text((workdir / "sd.toml").read_text() + '[target]\ndevice = "cuda"\n')
    refused = runner.invoke(cli, ["bench", str(gpu), "--out", str(tmp_path / "o")])
    assert refused.exit_code == 1 and "this host has no CUDA GPU" in refused.output
    assert not (tmp_path / "o").exists()
    graphs = runner.invoke(cli, ["bench", str(workdir / "sd.toml"), "--cuda-graphs", "--out", str(tmp_path / "o")])
    assert graphs.exit_code == 1
    assert (
        f"{workdir / 'sd.toml'}: CUDA graphs replay CUDA kernels, and this recipe targets 'cpu'; run without "
        '--cuda-graphs, or use a recipe with device = "cuda"'
    ) in " ".join(graphs.output.split())
    assert not (tmp_path / "o").exists()

    # An artifact built from another recipe is not measured in its place, nor replaced without --rebuild.
    other = tmp_path / "other.toml"
    other.write_text(
        (workdir / "sd.toml").read_text().replace("height = 64, width = 64 }", "height = 64, width = 64 }  # edited", 1)
    )
    copy = Path(shutil.copytree(artifacts("sd"), tmp_path / "copy"))
    stale = runner.invoke(cli, ["bench", str(other), "--artifact", str(copy), "--out", str(tmp_path / "o")])
    assert stale.exit_code == 1
    assert f"{copy}: it was built from another recipe; pass --rebuild to build it again from {other}" in stale.output
    assert read_manifest(copy) == read_manifest(artifacts("sd")) and not (tmp_path / "o").exists()
