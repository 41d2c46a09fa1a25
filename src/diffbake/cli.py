"""The ``diffbake`` command: build, rebind, generate, inspect, verify, push, pull, bench.

Only this module prints. Known errors print one line and exit 1; ``DIFFBAKE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from diffbake.errors import DiffbakeError, ServeError
from diffbake.format.manifest import VariantEntry

# The fresh-process runs of `diffbake bench` (bench.PATHS; the bench module imports the build side).
PATH_NAMES = ("eager", "compile_cold", "compile_warm", "artifact")

DEBUG_ENV = "DIFFBAKE_DEBUG"


def _quiet_dependencies() -> None:
    # Import-time notices from torchao and torch (missing optional CUDA kernels, pytree deprecations) and
    # diffusers' per-load progress bars say nothing about the user's build; keep the terminal for our stages.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*register_constant.*")


def _quiet_loading_bars() -> None:
    # Per-file load/save bars of diffusers and transformers; the denoising loop keeps its own bar.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class _TerminalReporter:
    """One line per stage with its duration; a ticking timer on a terminal while a stage runs."""

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        start = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if sys.stderr.isatty():

            def tick() -> None:
                while not stop.wait(0.5):
                    click.echo(f"\r  {title} ... {time.perf_counter() - start:.0f} s", nl=False, err=True)

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        else:
            click.echo(f"  {title} ...", err=True)
        try:
            yield
        except BaseException:
            stop.set()
            click.echo(f"\r  {title} failed after {time.perf_counter() - start:.1f} s", err=True)
            raise
        finally:
            stop.set()
            if ticker:
                ticker.join()
        click.echo(f"\r  {title} done in {time.perf_counter() - start:.1f} s", err=True)


class _Group(click.Group):
    """Turns diffbake's known errors into one line and exit code 1, for every command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DiffbakeError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            click.echo(f"error: {e}", err=True)
            click.echo(f"(set {DEBUG_ENV}=1 for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffbake")
def cli() -> None:
    """Ahead-of-time compiled diffusers pipelines: build an artifact from a recipe, load it with no compile step.

    \b
    diffbake build recipes/tiny-sd.toml          # compile into artifacts/tiny-sd
    diffbake generate artifacts/tiny-sd --prompt "a photo of a cat"
    diffbake inspect artifacts/tiny-sd
    diffbake verify artifacts/tiny-sd            # every check, in a child process; exit 0 or 1
    diffbake rebind artifacts/tiny-sd --weights /models/finetune --lora style.safetensors
    diffbake push artifacts/tiny-sd org/tiny-sd  # one Hub commit; prints the sha to pin
    diffbake pull org/tiny-sd --revision SHA     # fetch the build that fits this host
    diffbake bench recipes/bench-sd15-cpu.toml   # vs eager and torch.compile, the ladder, % of peak

    Set DIFFBAKE_DEBUG=1 to see the full traceback of an error.
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Artifact folder [default: artifacts/<recipe name>].",
)
@click.option("--force", is_flag=True, help="Replace an existing artifact (only once the new one is complete).")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Compile every package, neither reusing nor keeping compiled packages "
    "[cache: $DIFFBAKE_COMPILE_CACHE, else ~/.cache/diffbake/compiled].",
)
def build(recipe: Path, out: Path | None, force: bool, no_cache: bool) -> None:
    """Compile the pipeline a RECIPE (TOML) names into an artifact folder.

    A package compiled before from the same exported program, for the same target and with the same settings, is
    taken from the compile cache instead of compiled again: a rebuild compiles only the components that changed.
    """
    from diffbake.builder.build import build as run_build

    _quiet_loading_bars()
    start = time.perf_counter()
    click.echo(f"building {recipe}", err=True)
    dest = run_build(recipe, out, force=force, reporter=_TerminalReporter(), cache=not no_cache)
    from diffbake.format.manifest import read_manifest

    manifest = read_manifest(dest)
    size = sum(f.size for f in manifest.files.values())
    click.echo(f"built {dest} ({_mb(size)}) in {time.perf_counter() - start:.1f} s", err=True)
    for name, c in manifest.components.items():
        for v in c.variants:
            click.echo(
                f"  {name} [{_shapes(v)}]: max abs error vs eager {v.max_abs_error:.2e} (tolerance "
                f"{v.tolerance:.2e}), vs float32 eager {v.error_vs_float32:.2e}",
                err=True,
            )
    click.echo(str(dest))


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--weights",
    "-w",
    default=None,
    help="Checkpoint of the same architecture: a save_pretrained folder or Hub id [default: the artifact's source].",
)
@click.option("--revision", default=None, help="Hub revision of --weights.")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="A LoRA (.safetensors) to fuse into the weights; repeatable.",
)
@click.option(
    "--scale",
    "scales",
    multiple=True,
    type=float,
    help="Scale of each --lora, in order [default: 1.0 each].",
)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), help="[default: ARTIFACT-rebound].")
@click.option(
    "--force", is_flag=True, help="Replace an existing artifact at --out (only once the new one is complete)."
)
def rebind(
    artifact: Path,
    weights: str | None,
    revision: str | None,
    loras: tuple[Path, ...],
    scales: tuple[float, ...],
    out: Path | None,
    force: bool,
) -> None:
    """Bind other weights (a fine-tune, LoRAs) to an ARTIFACT's compiled code: a new artifact, no compile."""
    from diffbake.builder.rebind import rebind as run_rebind

    if len(scales) > len(loras):
        raise click.UsageError(f"{len(scales)} --scale values for {len(loras)} --lora files")
    pairs = [(path, scales[i] if i < len(scales) else 1.0) for i, path in enumerate(loras)]
    _quiet_loading_bars()
    start = time.perf_counter()
    dest = run_rebind(
        artifact, weights=weights, revision=revision, loras=pairs, out=out, force=force, reporter=_TerminalReporter()
    )
    click.echo(f"rebound {artifact} -> {dest} in {time.perf_counter() - start:.1f} s (no compile)", err=True)
    click.echo(str(dest))


def _pipeline_flags(pipeline: type, given: dict, images: int | None, compiled: dict) -> dict:
    """The call arguments the generate flags ask for, each refused with the reason where the pipeline's __call__
    does not take it (a prompt for DDPM, class labels for SD)."""
    import inspect

    params = inspect.signature(pipeline.__call__).parameters
    flags = {("class-label" if k == "class_labels" else k.replace("_", "-")): k for k in given}
    out = {}
    for flag, name in flags.items():
        if given.get(name) is None:
            continue
        if name not in params:
            raise click.UsageError(f"--{flag}: {pipeline.__name__} takes no {name}; leave the flag out")
        out[name] = given[name]
    if "prompt" in params and "prompt" not in out:
        raise click.UsageError(f"{pipeline.__name__} needs a prompt: give --prompt")
    if images:
        count = next((k for k in ("num_images_per_prompt", "batch_size") if k in params), None)
        if count is None and "class_labels" not in params:
            raise click.UsageError(f"--images: {pipeline.__name__} takes no number of images; leave the flag out")
        if count is not None:
            out[count] = images
    if "class_labels" in params and "class_labels" not in out:
        batch = images or compiled.pop("num_images_per_prompt", None) or 1
        out["class_labels"] = [0] * batch
    return out


def _step_cache_option(help: str) -> Callable:
    """``--cache METHOD:THRESHOLD``, checked when the command line is parsed (a usage error, exit 2)."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from diffbake.runtime.caches import parse_step_cache

        if value is not None:
            try:
                parse_step_cache(value)
            except ValueError as e:
                raise click.BadParameter(str(e)) from None
        return value

    return click.option("--cache", "step_cache", default=None, callback=check, help=help)


def _image_file(flag: str, help: str) -> Callable:
    """An image file option of generate (``--image`` arrives as ``image_file``)."""
    path = click.Path(exists=True, dir_okay=False, path_type=Path)
    return click.option(flag, f"{flag.removeprefix('--')}_file", type=path, help=help)


def _image_flags(pipeline: type, files: dict[str, Path | None], values: dict[str, float | None]) -> dict:
    """The call arguments of --image, --mask, --control, --strength and --control-scale, each refused with the
    reason where the pipeline takes no such input. A ControlNet pipeline's ``image`` is its control image; one
    that also edits an image (ControlNet img2img) names the control image ``control_image``."""
    import inspect

    from PIL import Image

    params = inspect.signature(pipeline.__call__).parameters
    controlled = "controlnet_conditioning_scale" in params
    control = "control_image" if "control_image" in params else ("image" if controlled else None)
    targets = {
        "image": ("image" if "image" in params and control != "image" else None, "image to edit"),
        "mask": (next((m for m in ("mask_image", "control_mask") if m in params), None), "mask"),
        "control": (control, "control image (it has no ControlNet)"),
        "strength": ("strength" if "strength" in params else None, "strength (it edits no image)"),
        "control-scale": ("controlnet_conditioning_scale" if controlled else None, "ControlNet scale"),
    }
    given = {**files, **values}
    out: dict = {}
    for flag, value in given.items():
        if value is None:
            continue
        name, what = targets[flag]
        if name is None:
            fix = "its image is the control image: give --control" if flag == "image" and controlled else "leave it out"
            raise click.UsageError(f"--{flag}: {pipeline.__name__} takes no {what}; {fix}")
        out[name] = Image.open(value).convert("L" if flag == "mask" else "RGB") if flag in files else value
    return out


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="What to draw (pipelines that take a prompt).")
@click.option(
    "--class-label",
    "class_labels",
    type=click.IntRange(min=0),
    multiple=True,
    help="A class to draw, once per image (class-conditional pipelines such as DiT) [default: 0].",
)
@click.option("--negative-prompt", default=None, help="What to avoid (needs a CFG build for SD/SDXL).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--guidance-scale", type=float, default=None, help="Guidance scale [default: the pipeline's].")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--height", type=click.IntRange(min=1), help="Pixels [default: the compiled height].")
@click.option("--width", type=click.IntRange(min=1), help="Pixels [default: the compiled width].")
@click.option("--images", type=click.IntRange(min=1), help="Images per call [default: the compiled batch].")
@_image_file("--image", "The image to edit (img2img, inpainting, Kontext).")
@_image_file("--mask", "Inpainting: white where to repaint.")
@_image_file("--control", "The ControlNet's control image (edges, depth, pose).")
@click.option(
    "--strength", type=click.FloatRange(0, 1), help="How much of the image to repaint [default: the pipeline's]."
)
@click.option("--control-scale", type=float, help="ControlNet conditioning scale [default: the pipeline's].")
@_step_cache_option(
    "A diffusers step cache on the denoiser, e.g. first-block:0.08 (First Block Cache at that threshold); needs a "
    "regional build."
)
@click.option("--revision", default=None, help="For a Hub repo id: the commit sha to load.")
@click.option(
    "--trust-remote-code", is_flag=True, help="For a Hub repo id: run its native code (needed, with --revision)."
)
@click.option(
    "--out",
    "-o",
    default="image.png",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG to write; with several images, -1, -2, ... are added.",
)
def generate(
    artifact: Path,
    prompt: str | None,
    class_labels: tuple[int, ...],
    negative_prompt: str | None,
    steps: int,
    guidance_scale: float | None,
    seed: int,
    height: int | None,
    width: int | None,
    images: int | None,
    image_file: Path | None,
    mask_file: Path | None,
    control_file: Path | None,
    strength: float | None,
    control_scale: float | None,
    step_cache: str | None,
    revision: str | None,
    trust_remote_code: bool,
    out: Path,
) -> None:
    """Generate images with a built ARTIFACT (a folder, or a Hub repo id), at the size it was compiled for.

    Image pipelines take --image (img2img, inpainting with --mask, Kontext) or --control (ControlNet); each
    flag is refused where the artifact's pipeline takes no such input."""
    import torch

    from diffbake.format.components import area_call
    from diffbake.runtime.caches import enable_step_cache, parse_step_cache
    from diffbake.runtime.load import compiled_call, load
    from diffbake.runtime.serving import loaded_artifact

    cache_config = parse_step_cache(step_cache) if step_cache is not None else None  # checked by the option
    _quiet_loading_bars()
    start = time.perf_counter()
    source = str(artifact) if not artifact.exists() else artifact  # a repo id is not a path
    pipe = load(source, revision=revision, trust_remote_code=trust_remote_code)
    click.echo(f"loaded {artifact} in {time.perf_counter() - start:.2f} s", err=True)
    kwargs = compiled_call(loaded_artifact(pipe).manifest)
    kwargs["num_inference_steps"] = steps
    given = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "class_labels": list(class_labels) or None,
    }
    kwargs.update(_pipeline_flags(type(pipe), given, images, kwargs))
    if "height" in kwargs:  # Kontext's max_area follows the size asked for
        kwargs.update(area_call(type(pipe), kwargs["height"], kwargs["width"]))
    files = {"image": image_file, "mask": mask_file, "control": control_file}
    kwargs.update(_image_flags(type(pipe), files, {"strength": strength, "control-scale": control_scale}))
    if cache_config is not None:
        enable_step_cache(pipe, cache_config)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    start = time.perf_counter()
    images = pipe(generator=generator, **kwargs).images
    click.echo(f"generated {len(images)} image(s) in {time.perf_counter() - start:.2f} s", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        click.echo(str(path))


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what an ARTIFACT holds: components, shapes, sizes, versions, measured errors."""
    from diffbake.format.manifest import read_manifest

    m = read_manifest(artifact)
    if as_json:
        click.echo(m.to_json(), nl=False)
        return
    total = sum(f.size for f in m.files.values())
    click.echo(f"{artifact}: {m.pipeline_class} (denoiser: {m.denoiser}) from {m.source['model']}")
    h = m.host
    click.echo(
        f"  target: {h.device} {m.dtype}, cpu_isa {h.cpu_isa} ({len(h.cpu_features)} required CPU extensions), "
        f"{h.platform}-{h.machine}" + (f", gpu {h.gpu} (sm {h.compute_capability}, CUDA {h.cuda})" if h.gpu else "")
    )
    click.echo("  built with: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    click.echo(f"  size: {_mb(total)} in {len(m.files)} files")
    for name, c in m.components.items():
        weights = m.files[c.weights].size
        if c.mode == "regional":
            click.echo(f"  {name} ({c.class_name}): regional, built in {c.build_seconds:.1f} s")
            click.echo(f"    weights {_mb(weights)} ({len(c.constants)} tensors), the whole state dict, run eager")
            for b in c.blocks:
                click.echo(
                    f"    block {b.class_name} x{len(b.instances)}: package {_mb(m.files[b.package].size)} "
                    f"({b.package}), each instance bound to its own weights"
                )
        else:
            click.echo(f"  {name} ({c.class_name}): {len(c.variants)} variant(s), built in {c.build_seconds:.1f} s")
            if c.frozen:
                click.echo("    weights folded into each package (compiler freezing), prepacked for the build CPU")
            else:
                click.echo(f"    weights {_mb(weights)} ({len(c.constants)} tensors), shared by every variant")
        click.echo(f"    transforms: {_describe_transforms(c.transforms)}")
        if c.compiler:
            click.echo("    compiler: " + ", ".join(f"{k}={v}" for k, v in c.compiler.items()))
        for v in c.variants:
            package = f" package {_mb(m.files[v.package].size)}" if v.package else ""
            click.echo(f"    [{_shapes(v)}]{package}")
            click.echo(
                f"      max abs error vs eager {v.max_abs_error:.2e} (tolerance {v.tolerance:.2e}), "
                f"vs float32 eager {v.error_vs_float32:.2e}"
            )
            for spec in v.inputs:
                dims = [d if isinstance(d, int) else f"{d}={v.dims[d].min}..{v.dims[d].max}" for d in spec.shape]
                coerced = " (cast and broadcast)" if spec.coerce else ""
                click.echo(f"      input {spec.name}: {spec.dtype}[{', '.join(map(str, dims))}]{coerced}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--device", default=None, help="Device to check on [default: the artifact's].")
@click.option(
    "--unpack-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where packages are extracted before loading [default: $DIFFBAKE_UNPACK_DIR, else the temp folder].",
)
@click.option("--timeout", default=600, show_default=True, type=click.IntRange(min=1), help="Seconds to allow.")
def verify(artifact: Path, device: str | None, unpack_dir: Path | None, timeout: int) -> None:
    """Check that an ARTIFACT is whole and runs correctly on this host; exit 0 if so, 1 with the reason if not.

    \b
    Runs every check a load runs, in a child process, so a crash is reported rather than suffered:
    manifest schema, host compatibility, sha256 of every file, package contents, weights binding, and
    the self-test recorded at build (compared against the build host's output).
    """
    import collections
    import json
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "diffbake.runtime.selfcheck", str(artifact), device or "", str(unpack_dir or "")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    # stderr is drained alongside stdout: a child blocked on a full stderr pipe would stall until the timeout.
    stderr_tail: collections.deque[str] = collections.deque(maxlen=2)
    assert proc.stdout is not None and proc.stderr is not None
    drain = threading.Thread(target=stderr_tail.extend, args=(iter(lambda: proc.stderr.read(1 << 16), ""),))
    drain.start()
    stage, result = "start", None
    try:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "stage" in msg:
                stage = msg["stage"]
                if stage != "start":
                    click.echo(f"  ok  {stage}: {msg['detail']}", err=True)
            elif "ok" in msg:
                result = msg
        code = proc.wait()
    finally:
        timer.cancel()
        drain.join()
    stderr = "".join(stderr_tail)
    if result is not None and result["ok"] and code == 0:
        click.echo(f"ok: {artifact} passed every check")
        return
    if result is not None and not result["ok"]:
        reason = f"{result['error']}"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        killed = " (timed out)" if name == "SIGKILL" else ""
        reason = (
            f"the check crashed with {name}{killed} after the {stage!r} stage; loading this artifact on this host "
            "would crash the serving process: do not deploy it here"
        )
    else:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        reason = f"the check failed after the {stage!r} stage (exit {code}): {tail}"
    raise CheckFailed(f"{artifact}: {reason}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option(
    "--build",
    "build_name",
    default=None,
    help="Folder of the repo for this build [default: device, hardware, dtype and a digest of what the host needs, e.g. cpu-x86_64-avx2-float32-1a2b3c4d].",
)
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--branch", default=None, help="Commit to this branch (created from main if new) [default: main].")
@click.option("--message", "-m", default=None, help="Commit message [default: diffbake: build BUILD].")
@click.option("--replace", is_flag=True, help="Replace a build of that name even if it was made for another host.")
def push(
    artifact: Path,
    repo_id: str,
    build_name: str | None,
    private: bool,
    branch: str | None,
    message: str | None,
    replace: bool,
) -> None:
    """Publish an ARTIFACT to the Hub repo REPO_ID as one commit, and print the commit sha to pin.

    \b
    Each build goes into its own folder, so one repo can hold builds for several
    devices, GPUs and CPU instruction sets; loaders pick the one that fits. The
    model card (README.md) is regenerated to describe every build. A push that
    fails midway commits nothing. Log in first (`hf auth login` or HF_TOKEN).
    """
    from diffbake.hub.push import push as run_push

    start = time.perf_counter()
    result = run_push(
        artifact,
        repo_id,
        build=build_name,
        private=private,
        branch=branch,
        message=message,
        progress=lambda stage, detail: click.echo(f"  {stage}: {detail}", err=True),
        replace=replace,
    )
    click.echo(
        f"pushed {artifact} to {result.repo_id} as build {result.build} ({result.files} files, "
        f"{_mb(result.bytes)}) in {time.perf_counter() - start:.1f} s",
        err=True,
    )
    click.echo("load it with (pin this commit):", err=True)
    click.echo(f'  diffbake.load("{result.repo_id}", revision="{result.commit}", trust_remote_code=True)', err=True)
    click.echo(result.commit)


@cli.command()
@click.argument("repo_id")
@click.option("--revision", required=True, help="The commit sha to fetch (what `diffbake push` printed).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), help="[default: artifacts/<repo name>].")
@click.option(
    "--build",
    "build_name",
    default=None,
    help="Build folder to fetch, even one for another host [default: the one that fits this host].",
)
@click.option("--device", default=None, help="Fit the build to this device [default: each build's own].")
@click.option("--force", is_flag=True, help="Replace what is at --out (only once the new copy is verified).")
def pull(
    repo_id: str, revision: str, out: Path | None, build_name: str | None, device: str | None, force: bool
) -> None:
    """Fetch a build of the Hub repo REPO_ID at a pinned commit into a local artifact folder, checked.

    \b
    For hosts that stage artifacts before serving: the build that fits this host
    (or --build) is downloaded, every file is checked against its manifest's sha256,
    and the folder appears only once complete. Nothing is loaded or executed; load
    the folder with diffbake.load(OUT) or `diffbake generate OUT`.
    """
    from diffbake.hub.fetch import fetch

    start = time.perf_counter()
    dest = out or Path("artifacts") / repo_id.split("/")[-1]
    folder, chosen = fetch(
        repo_id,
        revision,
        device=device,
        build=build_name,
        out=dest,
        force=force,
        must_fit=build_name is None,  # a named build may be staged here for another host
        progress=lambda stage, detail: click.echo(f"  {detail}", err=True),
    )
    click.echo(f"pulled {repo_id}@{revision[:12]} build {chosen.name} in {time.perf_counter() - start:.1f} s", err=True)
    click.echo(str(folder))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder [default: artifacts/<recipe name>-bench].",
)
@click.option(
    "--artifact",
    type=click.Path(file_okay=False, path_type=Path),
    help="Artifact to measure [default: artifacts/<recipe name>, built if missing or from another recipe].",
)
@click.option("--rebuild", is_flag=True, help="Build the artifact again even if it could be reused.")
@click.option("--steps", default=4, show_default=True, type=click.IntRange(min=1), help="Denoising steps per image.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed denoiser calls.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed calls first.")
@click.option("--image-repeats", default=2, show_default=True, type=click.IntRange(min=0), help="Timed whole images.")
@click.option(
    "--paths",
    default=",".join(PATH_NAMES),
    show_default=True,
    help="Fresh-process runs to make, comma-separated.",
)
@click.option("--no-ladder", is_flag=True, help="Skip the optimization ladder.")
@_step_cache_option(
    "Also measure whole images with a diffusers step cache, e.g. first-block:0.08: blocks skipped, speedup and "
    "error against the artifact without it (needs a regional denoiser)."
)
@click.option("--cuda-graphs", is_flag=True, help="Load the artifact with CUDA graphs (CUDA recipes).")
@click.option(
    "--no-openvino",
    is_flag=True,
    help="Skip OpenVINO's denoiser step (measured on CPU recipes where openvino is installed).",
)
@click.option("--timeout", default=3600, show_default=True, type=click.IntRange(min=1), help="Seconds per run.")
def bench(
    recipe: Path,
    out: Path | None,
    artifact: Path | None,
    rebuild: bool,
    steps: int,
    repeats: int,
    warmup: int,
    image_repeats: int,
    paths: str,
    no_ladder: bool,
    step_cache: str | None,
    cuda_graphs: bool,
    no_openvino: bool,
    timeout: int,
) -> None:
    """Measure a RECIPE's artifact against eager diffusers and torch.compile, with the optimization ladder.

    \b
    Same inputs everywhere. Each path runs in a fresh process and reports the time
    from process start to the first image (torch.compile twice: with an empty
    inductor cache, then with the cache that run filled), the denoiser step
    latency, the whole-image latency and peak memory. The ladder adds the recipe's
    optimizations one at a time (float32 eager, dtype, QKV fusion, channels_last,
    quantization, AOT compile) with each one's latency and error against float32.
    The denoiser step's FLOP/s is compared with the measured matmul peak. On a CPU
    with openvino installed, OpenVINO's step is measured beside eager's and the
    artifact's in one process, the three timed in turn. With --cache, the
    regional artifact's whole images are measured without and with a diffusers
    step cache (blocks skipped, speedup, error). Writes bench.json,
    bench.md and bench.png into --out.
    """
    from diffbake.bench.bench import bench as run_bench
    from diffbake.bench.bench import table

    chosen = tuple(p.strip() for p in paths.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PATH_NAMES]
    if unknown or not chosen:
        raise click.BadParameter(
            f"{', '.join(unknown) or 'none'}; choose from {', '.join(PATH_NAMES)}", param_hint="--paths"
        )
    if "compile_warm" in chosen and "compile_cold" not in chosen:
        raise click.BadParameter("compile_warm reuses the cache compile_cold fills; ask for both", param_hint="--paths")
    _quiet_loading_bars()
    start = time.perf_counter()
    click.echo(f"benchmarking {recipe}", err=True)
    report = run_bench(
        recipe,
        out=out,
        artifact=artifact,
        rebuild=rebuild,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        image_repeats=image_repeats,
        paths=chosen,
        ladder=not no_ladder,
        cache=step_cache,
        cuda_graphs=cuda_graphs,
        openvino=not no_openvino,
        timeout=timeout,
        reporter=_TerminalReporter(),
    )
    click.echo("", err=True)
    for line in table(report):
        click.echo(line)
    for key, value in report["summary"].items():
        click.echo(f"  {key}: {value:.2f}x")
    click.echo(f"report in {report['out']} ({time.perf_counter() - start:.0f} s)", err=True)


class CheckFailed(DiffbakeError):
    """``diffbake verify`` found a problem (reported as one line, exit 1)."""


@cli.command()
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--revision", default=None, help="Hub commit sha, when ARTIFACT is a repo id.")
@click.option("--trust-remote-code", is_flag=True, help="Allow loading a Hub build (native code) into this process.")
@click.option("--device", default=None, help="Device to run on [default: the artifact's].")
@click.option("--name", default=None, help="Model name clients send [default: the artifact's folder name or repo id].")
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Pipeline calls in flight at once, on one copy of the weights.",
)
@click.option(
    "--queue-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait; beyond them a 429 with Retry-After.",
)
@click.option(
    "--max-batch",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per merged call (micro-batching); 1 turns merging off.",
)
@click.option(
    "--max-wait-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long a request may wait for others to merge with.",
)
@click.option(
    "--max-steps", default=100, show_default=True, type=click.IntRange(min=1), help="Largest num_inference_steps."
)
@click.option(
    "--ray", "on_ray", is_flag=True, help="Run replicas on Ray Serve (a local Ray instance, or $RAY_ADDRESS)."
)
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="Ray Serve replicas.")
@click.option(
    "--max-replicas",
    default=None,
    type=click.IntRange(min=1),
    help="Autoscale between --replicas and this many replicas (Ray Serve).",
)
@click.option("--num-cpus", default=1.0, show_default=True, type=click.FloatRange(min=0), help="CPUs per Ray replica.")
@click.option("--num-gpus", default=0.0, show_default=True, type=click.FloatRange(min=0), help="GPUs per Ray replica.")
def serve(
    artifact: str,
    host: str,
    port: int,
    revision: str | None,
    trust_remote_code: bool,
    device: str | None,
    name: str | None,
    concurrency: int,
    queue_size: int,
    max_batch: int,
    max_wait_ms: float,
    max_steps: int,
    on_ray: bool,
    replicas: int,
    max_replicas: int | None,
    num_cpus: float,
    num_gpus: float,
) -> None:
    """Serve an ARTIFACT (a folder, or a Hub repo id with --revision) over HTTP with OpenAI's images API.

    \b
    POST /v1/images/generations  prompt, n, size "WxH", response_format (b64_json), output_format
                                 (png, jpeg, webp), model, user; and negative_prompt, seed,
                                 num_inference_steps, guidance_scale
    GET  /v1/models              the artifact: pipeline, sizes, dtype, device
    GET  /healthz, /readyz       alive; ready once loaded, checked and warmed up
    GET  /metrics                Prometheus metrics
    SIGTERM stops taking requests, finishes those queued and running, and exits 0. Needs the serve
    extra: pip install 'diffbake[serve]'.

    \b
    With --ray, the same API runs as a Ray Serve application: --replicas replicas (each loading the
    artifact once; --max-replicas to autoscale), each reserving --num-cpus and --num-gpus. Needs the
    ray extra: pip install 'diffbake[ray]'. For an existing cluster, see diffbake.server.rayserve.
    """
    try:
        from diffbake.server.app import run
        from diffbake.server.engine import EngineOptions
    except ImportError as e:
        raise ServeError(f"diffbake serve needs the serve extra ({e}); pip install 'diffbake[serve]'") from e

    options = EngineOptions(
        artifact=artifact,
        revision=revision,
        trust_remote_code=trust_remote_code,
        device=device,
        name=name,
        concurrency=concurrency,
        queue_size=queue_size,
        max_batch=max_batch,
        max_wait=max_wait_ms / 1000,
        max_steps=max_steps,
    )
    if on_ray:
        try:
            from diffbake.server import rayserve
        except ImportError as e:
            raise ServeError(f"diffbake serve --ray needs the ray extra ({e}); pip install 'diffbake[ray]'") from e
        placement = dict(replicas=replicas, max_replicas=max_replicas, num_cpus=num_cpus, num_gpus=num_gpus)
        rayserve.run(options, host, port, report=lambda line: click.echo(line, err=True), **placement)
        return
    _quiet_loading_bars()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("diffbake.server").addHandler(handler)
    logging.getLogger("diffbake.server").setLevel(logging.INFO)
    click.echo(f"serving {artifact} on http://{host}:{port} (loading; GET /readyz says when ready)", err=True)
    run(options, host, port)


def _shapes(variant: VariantEntry) -> str:
    text = ", ".join(f"{k}={v}" for k, v in variant.shapes.items())
    return text + (f", cfg={str(variant.cfg).lower()}" if variant.cfg is not None else "")


def _describe_transforms(t: dict) -> str:
    done = [k for k in ("fuse_qkv", "channels_last") if t.get(k)]
    q = t.get("quantization")
    if q:
        where = f" of the {q['scope']}" if q.get("scope") else ""
        done.append(f"{q['method']} on {q['layers']} linear layers{where}")
    return ", ".join(done) or "none"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    """Entry point of the ``diffbake`` command."""
    _quiet_dependencies()
    cli(prog_name="diffbake")


if __name__ == "__main__":
    main()
