"""Regional against full-graph builds of one denoiser, with and without QKV fusion and quantization.

    python benchmarks/regional_vs_full.py recipes/bench-flux-small-cpu-float32.toml [--quantization int8_dynamic]
        [--out DIR] [--steps 4] [--repeats 5]

From the recipe's source, target and denoiser shapes, six recipes are written (the denoiser only: full or
regional; no transform, fuse_qkv, fuse_qkv and quantization) and each is measured with ``diffbake bench`` in its
own processes (a real compile: bench never takes the compile cache): the denoiser's build time (as the manifest
records it), the denoiser step (median on the first step's inputs), the whole image and the artifact's size. One
table at the end; every bench report is kept under --out. Compare the figures as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import tomllib

VARIANTS = [
    ("full", {}),
    ("full", {"fuse_qkv": True}),
    ("full", {"fuse_qkv": True, "quantization": True}),
    ("regional", {}),
    ("regional", {"fuse_qkv": True}),
    ("regional", {"fuse_qkv": True, "quantization": True}),
]


def recipe_text(base: dict, denoiser: str, mode: str, transforms: dict, quantization: str) -> str:
    shapes = base["components"][denoiser]["shapes"]
    lines = ["[source]", f'model = "{base["source"]["model"]}"', "", "[target]"]
    lines += [f'{k} = "{v}"' for k, v in base.get("target", {}).items()]
    lines += ["", f"[components.{denoiser}]"]
    lines.append("shapes = { " + ", ".join(f"{k} = {v}" for k, v in shapes.items()) + " }")
    lines.append(f'mode = "{mode}"')
    if transforms.get("fuse_qkv"):
        lines.append("fuse_qkv = true")
    if transforms.get("quantization"):
        lines.append(f'quantization = {{ method = "{quantization}" }}')
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--quantization", default="int8_dynamic")
    parser.add_argument("--out", type=Path, default=Path("artifacts/regional-vs-full"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = tomllib.loads(args.recipe.read_text())
    denoiser = next(c for c in ("transformer", "unet") if c in base.get("components", {}))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode, transforms in VARIANTS:
        label = mode + "".join(f"+{k}" for k in transforms)
        recipe = args.out / f"{label}.toml"
        recipe.write_text(recipe_text(base, denoiser, mode, transforms, args.quantization))
        report_dir = args.out / f"{label}-bench"
        command = [sys.executable, "-m", "diffbake.cli", "bench", str(recipe), "--artifact", str(args.out / label)]
        command += ["--rebuild", "--paths", "artifact", "--no-ladder", "--no-openvino", "--out", str(report_dir)]
        command += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--image-repeats", "1"]
        print(f"== {label}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
            rows.append((label, None))
            continue
        report = json.loads((report_dir / "bench.json").read_text())
        manifest = json.loads((args.out / label / "manifest.json").read_text())
        rows.append(
            (
                label,
                {
                    "build_s": manifest["components"][denoiser]["build_seconds"],
                    "step_s": report["paths"]["artifact"]["step_median_s"],
                    "image_s": report["paths"]["artifact"]["image_median_s"],
                    "artifact_mb": report["build"]["artifact_bytes"] / 1e6,
                },
            )
        )
    full = dict(rows)["full"]
    print(f"\n{denoiser} of {base['source']['model']}, {args.steps} steps; ratios against the plain full build")
    print(f"{'build':<36}{'build s':>10}{'step ms':>10}{'x full':>8}{'image s':>9}{'MB':>8}")
    for label, r in rows:
        if r is None:
            print(f"{label:<36}  failed")
            continue
        speed = f"{full['step_s'] / r['step_s']:.2f}" if full else "-"
        print(
            f"{label:<36}{r['build_s']:>10.1f}{r['step_s'] * 1000:>10.1f}{speed:>8}{r['image_s']:>9.2f}"
            f"{r['artifact_mb']:>8.0f}"
        )
    (args.out / "summary.json").write_text(json.dumps(dict(rows), indent=2))


if __name__ == "__main__":
    main()
