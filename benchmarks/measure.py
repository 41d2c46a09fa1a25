"""Measure an artifact against eager diffusers: build time, size, load time, each compiled component's call and
image latency (an img2img, inpainting or ControlNet pipeline gets seeded input images at the compiled size).

    python benchmarks/measure.py recipes/tiny-sd.toml [--out DIR] [--reuse] [--repeats 20] [--steps 10]

All figures come from one run on one machine; compare them as ratios. Latencies are medians after warm-up.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import diffbake
from diffbake.builder.capture import IMAGE_INPUTS, example_image
from diffbake.builder.recipe import check_against_source, load_recipe
from diffbake.builder.sources import inspect_source, load_pipeline
from diffbake.format.components import COMPONENTS
from diffbake.format.manifest import read_manifest, unflatten_call
from diffbake.runtime.selftest import self_test_inputs

LOAD_SCRIPT = "import sys, time; t = time.perf_counter(); import diffbake; diffbake.load(sys.argv[1]); print(time.perf_counter() - t)"


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reuse", action="store_true", help="measure an existing artifact instead of rebuilding")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the timed image (0: none)")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    out = args.out or Path("artifacts") / recipe.name
    report: dict = {"recipe": str(args.recipe), "threads": torch.get_num_threads()}
    if not (args.reuse and out.exists()):
        start = time.perf_counter()
        diffbake.build(recipe, out, force=True, cache=False)  # a real compile, not the compile cache
        report["build_seconds"] = round(time.perf_counter() - start, 2)
    manifest = read_manifest(out)
    report["build_seconds_per_component"] = {n: c.build_seconds for n, c in manifest.components.items()}
    report["artifact_mb"] = round(sum(f.size for f in manifest.files.values()) / 1e6, 2)
    report["max_abs_error"] = {n: c.variants[0].max_abs_error for n, c in manifest.components.items()}

    fresh = [
        float(
            subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(out)], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(3)
    ]
    report["load_seconds_fresh_process_incl_imports"] = round(min(fresh), 3)
    diffbake.load(out)  # first load pays the imports (measured above); time a load with imports warm
    start = time.perf_counter()
    compiled = diffbake.load(out)
    report["load_seconds_in_process"] = round(time.perf_counter() - start, 3)

    info = inspect_source(recipe)
    recipe = check_against_source(recipe, info)
    eager = load_pipeline(info, recipe.dtype)

    with torch.inference_mode():
        for name, entry in manifest.components.items():
            variant = entry.variants[0]
            # The call recorded at build: its captured small inputs and Python values, seeded noise for the rest.
            inputs = self_test_inputs(variant, variant.self_test, recipe.device)
            kwargs = unflatten_call([spec.name for spec in variant.inputs], inputs, variant.constants)
            attr, method = COMPONENTS[name].attribute, COMPONENTS[name].method
            eager_fn = partial(getattr(getattr(eager, attr), method), **kwargs, return_dict=False)
            compiled_fn = partial(getattr(getattr(compiled, attr), method), **kwargs, return_dict=False)
            e = median_seconds(eager_fn, args.repeats)
            c = median_seconds(compiled_fn, args.repeats)
            report[f"{name}_ms"] = {
                "eager": round(e * 1e3, 3),
                "artifact": round(c * 1e3, 3),
                "speedup": round(e / c, 2),
            }

        denoiser = manifest.components.get(manifest.denoiser or "") or next(iter(manifest.components.values()))
        s = {k: (v[0] if isinstance(v, list) else v) for k, v in denoiser.variants[0].shapes.items()}
        params = inspect.signature(type(eager).__call__).parameters
        call = dict(prompt="a photo of a cat", num_inference_steps=args.steps, output_type="np")
        call["num_images_per_prompt"] = s["batch"]
        for dim in ("height", "width"):
            if dim in params:
                call[dim] = s[dim]
        for key in IMAGE_INPUTS:
            if key in params:
                call[key] = example_image(s["width"], s["height"], mask=key == "mask_image")
        if s.get("text_tokens") and "max_sequence_length" in params:
            call["max_sequence_length"] = s["text_tokens"]
        for pipe in (eager, compiled):
            pipe.set_progress_bar_config(disable=True)
        if args.steps:
            e = median_seconds(lambda: eager(**call), max(3, args.repeats // 4), warmup=1)
            c = median_seconds(lambda: compiled(**call), max(3, args.repeats // 4), warmup=1)
            report[f"image_{args.steps}_steps_ms"] = {
                "eager": round(e * 1e3, 1),
                "artifact": round(c * 1e3, 1),
                "speedup": round(e / c, 2),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
