"""``diffbake bench RECIPE``: the artifact against eager diffusers and torch.compile, and the optimization ladder.

Every figure comes from one run, with the same inputs (the compiled size, one prompt, one seed, one step count):

- the time from process start to the first image, each path in a fresh process: eager, ``torch.compile`` with an
  empty inductor cache (what a new server pays), ``torch.compile`` with the cache that run left (a restart on the
  same host), and the artifact;
- the denoiser step latency (median of repeated calls on the first step's inputs, after warm-up), the whole-image
  latency, and the peak memory (RSS; CUDA peak allocated on a GPU) of each path;
- the ladder: float32 eager, then each of the recipe's optimizations added in turn (dtype, QKV fusion,
  channels_last, quantization, AOT compile), each rung's latency and error against float32 eager;
- how close to the hardware: the denoiser step's FLOPs (``torch.utils.flop_counter``) per second, against the
  device's measured matmul peak in the recipe's dtype;
- the artifact's size and build time;
- on a CPU, OpenVINO (what a CPU user would pick instead) where it is installed: the eager denoiser converted
  with ``openvino.convert_model``, its step against eager and the artifact's in the same process;
- with ``cache``, the step cache rung: whole images from the regional artifact without and with a diffusers step
  cache (First Block Cache at a threshold), the fraction of compiled block calls it skipped, the speedup, and the
  cached images' error against the uncached ones.

Results go to a folder: ``bench.json`` (everything), ``bench.md`` (a report), ``bench.png`` (a chart).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diffbake.builder.build import LogReporter, Reporter, build
from diffbake.builder.recipe import load_recipe
from diffbake.errors import BenchError, DiffbakeError
from diffbake.format.host import cpu_features, half_precision_path
from diffbake.format.manifest import RECIPE_FILE, read_manifest

REPORT_VERSION = 1
PROMPT = "a photo of an astronaut riding a horse"
# The fresh-process runs, in order; "compile_warm" reuses the inductor cache "compile_cold" filled.
PATHS = ("eager", "compile_cold", "compile_warm", "artifact")
LABELS = {
    "eager": "eager diffusers",
    "compile_cold": "torch.compile, empty cache",
    "compile_warm": "torch.compile, warm cache",
    "artifact": "diffbake artifact",
}


def bench(
    recipe_path: str | Path,
    *,
    out: str | Path | None = None,
    artifact: str | Path | None = None,
    rebuild: bool = False,
    steps: int = 4,
    repeats: int = 5,
    warmup: int = 2,
    image_repeats: int = 2,
    paths: tuple[str, ...] = PATHS,
    ladder: bool = True,
    prompt: str = PROMPT,
    cache: str | None = None,
    cuda_graphs: bool = False,
    openvino: bool = True,
    timeout: float = 3600,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the benchmark of a recipe and write its report; returns the report (what bench.json holds).

    Args:
        recipe_path: the TOML recipe.
        out: the report folder [default: artifacts/<recipe name>-bench].
        artifact: the artifact to measure [default: artifacts/<recipe name>]; reused if it was built from this
            very recipe on a host like this one, else built (an explicit ``artifact`` is rebuilt only with
            ``rebuild``).
        steps: denoising steps per image. repeats, warmup: timed and untimed denoiser calls.
        image_repeats: timed whole images after the first.
        paths: which fresh-process runs to make, from :data:`PATHS`.
        ladder: also run the optimization ladder.
        cache: a step cache (``first-block:0.08``) to measure on the artifact, whose denoiser must be regional.
        cuda_graphs: load the artifact with ``cuda_graphs=True`` (a CUDA recipe's static shapes replay as graphs).
        openvino: on a CPU recipe, also measure OpenVINO's step where ``openvino`` is installed.

    Raises:
        RecipeError: the recipe is invalid, or targets a device this host lacks.
        BuildError: the build failed. BenchError: a measurement process failed.
    """
    rep = reporter or LogReporter()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"paths: {', '.join(unknown) or 'none'}; choose from {', '.join(PATHS)}")
    if "compile_warm" in paths and "compile_cold" not in paths:
        raise ValueError("paths: compile_warm reuses the cache compile_cold fills; ask for both")
    for name, n, least in (
        ("steps", steps, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("image_repeats", image_repeats, 0),
    ):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ValueError(f"{name} must be an integer of at least {least}, not {n!r}")
    if cache is not None:
        _check_cache(recipe, recipe_path, cache)
    if cuda_graphs and recipe.device != "cuda":
        raise BenchError(
            f"{recipe_path}: CUDA graphs replay CUDA kernels, and this recipe targets {recipe.device!r}; "
            'run without --cuda-graphs, or use a recipe with device = "cuda"'
        )
    out_dir = Path(out) if out is not None else Path("artifacts") / f"{recipe.name}-bench"
    dest = Path(artifact) if artifact is not None else Path("artifacts") / recipe.name

    build_info = _artifact(recipe, recipe_path, dest, explicit=artifact is not None, rebuild=rebuild, rep=rep)
    manifest = read_manifest(dest)
    scratch = Path(tempfile.mkdtemp(prefix="diffbake-bench-"))
    try:
        common = {
            "recipe": str(recipe_path.resolve()),
            "artifact": str(dest.resolve()),
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "image_repeats": image_repeats,
            "prompt": prompt,
            "seed": 0,
            "cuda_graphs": cuda_graphs,
        }
        runs: dict[str, dict] = {}
        if recipe.is_builtin and any(p != "artifact" for p in paths):
            with rep.stage(f"save {recipe.model} ({recipe.dtype}) for the eager and torch.compile runs to load"):
                _child("save", {**common, "save_to": str(scratch / "source")}, scratch, timeout, env={})
            common = {**common, "source_folder": str(scratch / "source")}
        if ladder:
            with rep.stage("ladder: float32 eager, each optimization in turn, then the artifact (fresh process)"):
                runs["ladder"] = _child("ladder", common, scratch, timeout, env={})
        openvino_run = _openvino_plan(recipe) if openvino else {"skipped": "not asked for (--no-openvino)"}
        if openvino_run is None:
            with rep.stage("OpenVINO: convert the eager denoiser, its step against eager and the artifact's"):
                runs["openvino"] = _child("openvino", common, scratch, timeout, env={})
        else:
            runs["openvino"] = openvino_run
        if cache is not None:
            with rep.stage(f"step cache {cache}: whole images without and with it (fresh process)"):
                runs["cache"] = _child("cache", {**common, "cache": cache}, scratch, timeout, env={})
        inductor_cache = scratch / "inductor-cache"
        for path in paths:
            env = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)} if path.startswith("compile") else {}
            mode = "compile" if path.startswith("compile") else path
            with rep.stage(f"{LABELS[path]} (fresh process)"):
                runs[path] = _child(mode, common, scratch, timeout, env=env)
        report = _report(recipe, recipe_path, dest, manifest, build_info, runs, common, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(report, out_dir)
    report["out"] = str(out_dir)
    return report


def _openvino_plan(recipe: Any) -> dict | None:
    """None where the OpenVINO run applies; else why it is skipped, for the report."""
    import importlib.util

    if recipe.device != "cpu":
        return {"skipped": f"OpenVINO is measured on CPU recipes; this one targets {recipe.device}"}
    if importlib.util.find_spec("openvino") is None:
        return {"skipped": "openvino is not installed (pip install openvino, or diffbake[openvino])"}
    return None


def _check_cache(recipe: Any, recipe_path: Path, cache: str) -> None:
    """Refuse a step cache the recipe's artifact could not take, before anything is built."""
    from diffbake.builder.sources import inspect_source
    from diffbake.runtime.caches import parse_step_cache

    parse_step_cache(cache)  # ValueError: not a step cache
    denoiser = inspect_source(recipe).denoiser
    comp = recipe.components.get(denoiser)
    if comp is None or comp.mode != "regional":
        raise BenchError(
            f"{recipe_path}: the step cache rung needs a regional {denoiser} (diffusers' step caches skip its "
            f'repeated blocks, which a full-graph build compiles into one call); set mode = "regional" in '
            f"[components.{denoiser}], or run without the cache"
        )


def _artifact(recipe: Any, recipe_path: Path, dest: Path, *, explicit: bool, rebuild: bool, rep: Reporter) -> dict:
    """Reuse the artifact if it was built from this very recipe and fits this host; else build it."""
    reason = None if not rebuild else "--rebuild asked for"
    if reason is None:
        reason = _not_reusable(dest, recipe)
    if reason is None:
        seconds = sum(c.build_seconds for c in read_manifest(dest).components.values())
        return {"reused": True, "seconds": seconds, "seconds_note": "compile time recorded at build"}
    if explicit and dest.exists() and not rebuild:
        raise BenchError(
            f"{dest}: {reason}; pass --rebuild to build it again from {recipe_path}, or omit --artifact to use "
            f"artifacts/{recipe.name}"
        )
    start = time.perf_counter()
    with rep.stage(f"build {dest} ({reason})"):
        build(recipe, dest, force=True, reporter=rep, cache=False)  # the build time measured is a real compile
    return {"reused": False, "seconds": time.perf_counter() - start, "seconds_note": "wall time of the build"}


def _not_reusable(dest: Path, recipe: Any) -> str | None:
    from diffbake.format.host import check_compatibility
    from diffbake.format.integrity import verify_files

    if not dest.exists():
        return "no artifact yet"
    try:
        manifest = read_manifest(dest)
        if (dest / RECIPE_FILE).read_text(encoding="utf-8") != recipe.text:
            return "it was built from another recipe"
        check_compatibility(manifest, manifest.device)
        verify_files(dest, manifest, use_stamp=True)
    except (DiffbakeError, OSError) as e:
        return f"it cannot be used here ({e})"
    return None


def _child(mode: str, common: dict, scratch: Path, timeout: float, env: dict[str, str]) -> dict:
    spec = {
        **common,
        "mode": mode,
        "result": str(scratch / f"{mode}-{time.time_ns()}.json"),
        "image": str(scratch / f"{mode}-{time.time_ns()}.npy"),
        "step_output": str(scratch / f"{mode}-{time.time_ns()}.pt"),
    }
    spec_path = scratch / f"spec-{time.time_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    child_env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
        **env,
    }
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "diffbake.bench.child", str(spec_path)],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"the {mode} run took longer than {timeout:.0f} s; raise --timeout") from None
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"the {mode} measurement failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["t_spawn"] = t0
    result["files"] = {"image": spec["image"], "step_output": spec["step_output"]}
    return result


def _report(
    recipe: Any,
    recipe_path: Path,
    dest: Path,
    manifest: Any,
    build_info: dict,
    runs: dict[str, dict],
    common: dict,
    scratch: Path,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from diffbake.runtime.load import compiled_call

    ladder_run = runs.get("ladder")
    flops = ladder_run["flops_per_step"] if ladder_run else None
    peak = ladder_run["matmul_peak"] if ladder_run else None
    reference_image = np.load(runs["eager"]["files"]["image"]) if "eager" in runs else None
    reference_step = torch.load(runs["eager"]["files"]["step_output"]) if "eager" in runs else None
    paths: dict[str, dict] = {}
    for name in PATHS:
        run = runs.get(name)
        if run is None:
            continue
        entry = {
            "label": LABELS[name],
            "first_image_s": run["t_first_image"] - run["t_spawn"],
            "load_s": run["t_loaded"] - run["t_spawn"],
            "first_call_s": run["t_first_image"] - run["t_loaded"],
            "step_median_s": run["step_median_s"],
            "step_min_s": run["step_min_s"],
            "step_s": run["step_s"],
            "image_median_s": run["image_median_s"],
            "peak_rss_mb": run["peak_rss_mb"],
            "cuda_peak_mb": run.get("cuda_peak_mb"),
        }
        if run["image_median_s"]:
            # What the process spent before it could serve at full speed: the first image less a steady image.
            entry["startup_overhead_s"] = entry["first_image_s"] - run["image_median_s"]
        if flops and peak:
            achieved = flops / run["step_median_s"]
            entry["flops_per_s"] = achieved
            entry["percent_of_peak"] = 100 * achieved / peak["flops_per_s"]
        if reference_image is not None and name != "eager":
            entry["image_max_abs_error_vs_eager"] = float(
                np.abs(np.load(run["files"]["image"]) - reference_image).max()
            )
            step = torch.load(run["files"]["step_output"])
            entry["step_max_abs_error_vs_eager"] = (step - reference_step).abs().max().item()
        paths[name] = entry

    ladder = []
    if ladder_run:
        base = ladder_run["ladder"][0]["step_median_s"]
        for rung in ladder_run["ladder"]:
            ladder.append({**rung, "speedup_vs_float32": base / rung["step_median_s"]})
    cache = runs.get("cache")
    if cache:
        cache = _measured(cache)
        cache["peak_rss_mb"] = runs["cache"]["peak_rss_mb"]
        if ladder:
            # The cache acts across steps: its rung is the mean denoiser step over a whole image, and its error is
            # the image's against the artifact's without the cache (the first step, all the ladder compares, is
            # never skipped).
            mean_step = cache["cached"]["denoiser_s_per_image"] / cache["steps"]
            ladder.append(
                {
                    "step": f"+ step cache {cache['cache']} (mean step over an image)",
                    "step_median_s": mean_step,
                    "step_s": [mean_step],
                    "speedup_vs_float32": base / mean_step,
                    "max_abs_error": None,
                    "relative_error": None,
                    "image_max_abs_error_vs_no_cache": cache["max_abs_error"],
                }
            )

    summary: dict[str, float] = {}
    art = paths.get("artifact")
    if art:
        for other in ("compile_cold", "compile_warm", "eager"):
            if other in paths:
                summary[f"first_image_{other}_over_artifact"] = paths[other]["first_image_s"] / art["first_image_s"]
                if "startup_overhead_s" in paths[other] and "startup_overhead_s" in art:
                    summary[f"startup_{other}_over_artifact"] = (
                        paths[other]["startup_overhead_s"] / art["startup_overhead_s"]
                    )
        for other in ("compile_warm", "compile_cold", "eager"):
            if other in paths:
                summary[f"step_{other}_over_artifact"] = paths[other]["step_median_s"] / art["step_median_s"]
                if paths[other]["image_median_s"] and art["image_median_s"]:
                    summary[f"image_{other}_over_artifact"] = paths[other]["image_median_s"] / art["image_median_s"]

    openvino = runs.get("openvino")
    if openvino and "steps" in openvino:
        openvino = _measured(openvino)
        steps = openvino["steps"]
        summary["step_openvino_over_artifact"] = steps["openvino"]["step_median_s"] / steps["artifact"]["step_median_s"]
        summary["step_eager_over_openvino"] = steps["eager"]["step_median_s"] / steps["openvino"]["step_median_s"]

    files = manifest.files
    import diffusers

    return {
        "report_version": REPORT_VERSION,
        "recipe": str(recipe_path),
        "recipe_text": recipe.text,
        "artifact": str(dest),
        "host": {
            "device": recipe.device,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            # How this CPU runs the recipe's dtype: native (which extensions), emulated, or float32.
            "cpu_precision": half_precision_path(recipe.dtype, cpu_features()) if recipe.device == "cpu" else None,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if recipe.device == "cuda" and torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "model": recipe.model,
            "dtype": recipe.dtype,
            "call": compiled_call(manifest),
            **{k: common[k] for k in ("steps", "repeats", "warmup", "image_repeats", "prompt", "seed", "cuda_graphs")},
        },
        "build": {
            **build_info,
            "artifact_bytes": sum(f.size for f in files.values()),
            "package_bytes": sum(f.size for rel, f in files.items() if rel.endswith(".pt2")),
            "weights_bytes": sum(f.size for rel, f in files.items() if rel.endswith(".safetensors")),
        },
        "paths": paths,
        "ladder": ladder,
        "openvino": openvino,
        "cache": cache,
        "flops": {"per_step": flops, "matmul_peak": peak},
        "summary": summary,
    }


def _measured(run: dict) -> dict:
    """A child's result without its bookkeeping (time stamps, mode, scratch files), for the report."""
    return {k: v for k, v in run.items() if not k.startswith("t_") and k not in ("mode", "files")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- outputs -----------------------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """bench.json, bench.md and bench.png into ``out_dir``, each written whole (a temp file, then a rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "bench.json", (json.dumps(report, indent=2) + "\n").encode())
    _write(out_dir / "bench.md", markdown(report).encode())
    _write(out_dir / "bench.png", chart(report))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def table(report: dict[str, Any]) -> list[str]:
    """The paths and the ladder as plain-text table lines, for the terminal."""
    rows = [("path", "to 1st image", "step", "image", "peak RSS", "% of peak", "error vs eager")]
    for p in report["paths"].values():
        rows.append(
            (
                p["label"],
                f"{p['first_image_s']:.1f} s",
                _ms(p["step_median_s"]),
                f"{p['image_median_s']:.2f} s" if p["image_median_s"] else "-",
                f"{p['peak_rss_mb']:.0f} MB",
                f"{p['percent_of_peak']:.1f} %" if "percent_of_peak" in p else "-",
                f"{p['step_max_abs_error_vs_eager']:.1e}" if "step_max_abs_error_vs_eager" in p else "-",
            )
        )
    lines = _columns(rows)
    if report["ladder"]:
        lines.append("")
        rows = [("ladder (denoiser step)", "latency", "speedup", "error vs float32")]
        for r in report["ladder"]:
            rows.append((r["step"], _ms(r["step_median_s"]), f"{r['speedup_vs_float32']:.2f}x", _error(r)))
        lines += _columns(rows)
    if report.get("openvino"):
        lines += ["", *_openvino_lines(report["openvino"])]
    if report.get("cache"):
        lines += ["", *_cache_lines(report["cache"])]
    return lines


OPENVINO_LABELS = {"eager": "eager (recipe dtype)", "openvino": "OpenVINO", "artifact": "diffbake artifact"}


def _openvino_lines(o: dict[str, Any]) -> list[str]:
    if "skipped" in o:
        return [f"OpenVINO: skipped, {o['skipped']}."]
    steps = o["steps"]
    rows = [("denoiser step, one process", "latency", "error vs float32")]
    for key, label in OPENVINO_LABELS.items():
        rows.append((label, _ms(steps[key]["step_median_s"]), f"{steps[key]['max_abs_error_vs_float32']:.1e}"))
    return [
        *_columns(rows),
        f"OpenVINO {o['openvino_version'].split('-')[0]}: convert_model of the float32 eager denoiser, "
        f"{steps['openvino']['precision']['INFERENCE_PRECISION_HINT']} inference precision, latency hint; converted "
        f"and compiled in {steps['openvino']['convert_s']:.1f} s. Medians of {len(steps['openvino']['step_s'])} "
        "rounds, each timing one call of all three in turn.",
    ]


def _error(rung: dict[str, Any]) -> str:
    if rung["max_abs_error"] is None:  # the cache rung: its image against the artifact's without the cache
        return f"{rung['image_max_abs_error_vs_no_cache']:.1e} (image vs no cache)"
    return f"{rung['max_abs_error']:.1e}"


def _cache_lines(c: dict[str, Any]) -> list[str]:
    plain, cached = c["plain"], c["cached"]
    return [
        f"Step cache {c['cache']}, {c['steps']} steps: {100 * c['skipped_fraction']:.0f} % of the compiled block "
        f"calls skipped ({cached['block_calls_per_image']} of {plain['block_calls_per_image']} ran); whole image "
        f"{plain['image_median_s']:.3f} s -> {cached['image_median_s']:.3f} s ({c['image_speedup']:.2f}x), "
        f"denoiser per image {plain['denoiser_s_per_image']:.3f} s -> {cached['denoiser_s_per_image']:.3f} s "
        f"({c['denoiser_speedup']:.2f}x); image error against the artifact without the cache: max "
        f"{c['max_abs_error']:.2e}, mean {c['mean_abs_error']:.2e} (pixels in [0, 1]).",
        "How much a cache skips depends on the weights: random weights change differently from step to step than "
        "trained ones, so read a random:* model's figures as the mechanism's cost and reach, not as a trained "
        "model's speedup.",
    ]


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def markdown(report: dict[str, Any]) -> str:
    s, h, b = report["settings"], report["host"], report["build"]
    lines = [
        f"# diffbake bench: {Path(report['recipe']).name}",
        "",
        f"`{s['model']}`, {s['dtype']}"
        + (f" ({h['cpu_precision']} on this CPU)" if h.get("cpu_precision") not in (None, s["dtype"]) else "")
        + f", {h['device']} ({h['gpu'] or h['cpu']}, {h['threads']} threads), "
        f"torch {h['torch']}, diffusers {h['diffusers']}.",
        f"Each call: {json.dumps(s['call'])}, {s['steps']} steps, seed {s['seed']}, prompt {s['prompt']!r}"
        + ("; the artifact replays CUDA graphs." if s.get("cuda_graphs") else "."),
        f"Denoiser step: median (and fastest) of {s['repeats']} calls after {s['warmup']} warm-up, on the first "
        f"step's inputs; whole image: median of {s['image_repeats']}. Start-up overhead: the first image less a "
        "steady one (imports, loading, compiling, warm-up).",
        "",
        "## Paths (each in a fresh process)",
        "",
        "| path | process start to first image | start-up overhead | denoiser step (median / min) | whole image | "
        "peak RSS | CUDA peak | FLOP/s (% of peak) | step error vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["paths"].values():
        flops = f"{p['flops_per_s'] / 1e9:.1f} G ({p['percent_of_peak']:.1f} %)" if "flops_per_s" in p else "-"
        cuda = "-" if p["cuda_peak_mb"] is None else f"{p['cuda_peak_mb']:.0f} MB"
        image = "-" if p["image_median_s"] is None else f"{p['image_median_s']:.3f} s"
        overhead = f"{p['startup_overhead_s']:.2f} s" if "startup_overhead_s" in p else "-"
        lines.append(
            f"| {p['label']} | {p['first_image_s']:.2f} s | {overhead} | {_ms(p['step_median_s'])} / "
            f"{_ms(p['step_min_s'])} | {image} | {p['peak_rss_mb']:.0f} MB | {cuda} | {flops} | "
            f"{p.get('step_max_abs_error_vs_eager', 0.0):.1e} |"
        )
    if report["summary"]:
        lines += ["", "## Ratios (from this run)", ""]
        lines += [f"- {_describe_ratio(k)}: **{v:.2f}x**" for k, v in report["summary"].items()]
    if report["ladder"]:
        lines += [
            "",
            "## Ladder: the denoiser step, one optimization added at a time",
            "",
            "| step | latency | speedup vs float32 | max abs error vs float32 | relative |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in report["ladder"]:
            if r["max_abs_error"] is None:
                errors = f"{_error(r)} | - |"
            else:
                errors = f"{r['max_abs_error']:.2e} | {r['relative_error']:.2e} |"
            lines.append(f"| {r['step']} | {_ms(r['step_median_s'])} | {r['speedup_vs_float32']:.2f}x | {errors}")
    if report.get("openvino"):
        lines += ["", "## Against OpenVINO (the denoiser step, one fresh process)", ""]
        if "skipped" in report["openvino"]:
            lines += _openvino_lines(report["openvino"])
        else:
            lines += ["```", *_openvino_lines(report["openvino"]), "```"]
    if report.get("cache"):
        lines += ["", "## Step cache (whole images, fresh process)", "", *_cache_lines(report["cache"])]
    f = report["flops"]
    if f["per_step"]:
        peak = f["matmul_peak"]
        lines += [
            "",
            f"Denoiser step: {f['per_step'] / 1e9:.1f} GFLOP (torch.utils.flop_counter). Matmul peak measured here: "
            f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, {peak['n']}x{peak['n']}).",
        ]
    lines += [
        "",
        "## Artifact",
        "",
        f"- Size: {b['artifact_bytes'] / 1e6:.1f} MB (packages {b['package_bytes'] / 1e6:.1f} MB, weights "
        f"{b['weights_bytes'] / 1e6:.1f} MB)",
        f"- Build: {b['seconds']:.1f} s ({b['seconds_note']}{', reused' if b['reused'] else ''})",
        "",
        "![chart](bench.png)",
        "",
    ]
    return "\n".join(lines)


def _describe_ratio(key: str) -> str:
    what, rest = key.split("_", 1)
    other = rest.removesuffix("_over_artifact")
    if what == "first":  # first_image_<other>
        other = other.removeprefix("image_")
        return f"process start to first image, {LABELS[other]} / artifact"
    if what == "startup":
        return f"start-up overhead (first image less a steady image), {LABELS[other]} / artifact"
    noun = {"step": "denoiser step", "image": "whole image"}[what]
    if other == "eager_over_openvino":
        return "denoiser step, eager (recipe dtype) / OpenVINO (one process)"
    if other == "openvino":
        return "denoiser step, OpenVINO / artifact (one process)"
    return f"{noun}, {LABELS[other]} / artifact"


def chart(report: dict[str, Any]) -> bytes:
    """A PNG of horizontal bar panels: first image, denoiser step, and the ladder."""
    import io

    from PIL import Image, ImageDraw

    panels = [
        ("Process start to first image (s)", [(p["label"], p["first_image_s"]) for p in report["paths"].values()]),
        ("Denoiser step (ms)", [(p["label"], p["step_median_s"] * 1000) for p in report["paths"].values()]),
    ]
    if report["ladder"]:
        panels.append(
            ("Ladder: denoiser step (ms)", [(r["step"], r["step_median_s"] * 1000) for r in report["ladder"]])
        )
    width, row, label_w, pad = 900, 26, 300, 16
    height = pad + sum(40 + row * len(items) + pad for _, items in panels) + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y = pad
    colors = [(66, 133, 244), (219, 68, 55), (244, 160, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]
    for title, items in panels:
        draw.text((pad, y), title, fill="black")
        y += 24
        top = max((v for _, v in items), default=1.0) or 1.0
        for i, (label, value) in enumerate(items):
            draw.text((pad, y + 6), label[:44], fill="black")
            length = int((width - label_w - 110) * value / top)
            draw.rectangle([label_w, y + 3, label_w + max(length, 1), y + row - 5], fill=colors[i % len(colors)])
            draw.text((label_w + length + 8, y + 6), f"{value:.3g}", fill="black")
            y += row
        y += 16 + pad
    draw.text(
        (pad, height - 20),
        f"{report['settings']['model']} {report['settings']['dtype']} on "
        f"{report['host']['gpu'] or report['host']['cpu']}",
        fill=(90, 90, 90),
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["bench", "PATHS", "table", "markdown", "chart", "write_report"]
