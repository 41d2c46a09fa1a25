"""One measurement of ``diffbake bench``, in a fresh process: ``python -m diffbake.bench.child SPEC.json``.

Each way of running the pipeline (eager, torch.compile, the artifact, the optimization ladder) is measured in its
own process, so that each pays its own imports, loading and compiling, and none inherits another's warm caches
or memory. The spec names the mode, the recipe, the artifact and the counts; the result is written as JSON to
the path the spec gives. Times are wall-clock ``time.time()`` stamps, so the parent can measure from the moment
it started the process to the first image.

Every mode calls the pipeline the same way (the compiled size, the same prompt, seed and step count), and the
first denoiser call of the first image is captured: its inputs are identical in every mode, so the denoiser step
is timed, and its output compared, on the very same tensors.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

T_IMPORT = time.time()

import torch  # noqa: E402

from diffbake.format.components import COMPONENTS  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"mode": spec["mode"], "t_start": T_IMPORT}
    result.update(MODES[spec["mode"]](spec))
    result["peak_rss_mb"] = _peak_rss_mb()
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


def _peak_rss_mb() -> float:
    """This process's own peak resident memory.

    ``ru_maxrss`` will not do: Linux carries the parent's resident size at fork across ``exec``, so a parent that
    built the artifact in-process would set every child's figure. ``VmHWM`` belongs to this process's own memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: the closest there is


# -- the pipeline modes: eager, torch.compile, artifact ----------------------------------------------------------


def run_eager(spec: dict) -> dict:
    recipe, info = _recipe(spec)
    pipe = _source_pipeline(recipe, info)
    return _measure(pipe, spec, info.denoiser)


def run_compile(spec: dict) -> dict:
    """The JIT path users take today: the same pipeline and transforms, then ``torch.compile`` of the denoiser and
    ``vae.decode`` (full graph, static shapes as compiled; regional components compile their repeated blocks),
    with the recipe's inductor options."""
    recipe, info = _recipe(spec)
    pipe = _source_pipeline(recipe, info)
    compile_components(pipe, recipe)
    return _measure(pipe, spec, info.denoiser)


def compile_components(pipe: Any, recipe: Any, compile_fn: Callable[..., Any] | None = None) -> None:
    """``torch.compile`` each of the recipe's components in place, as the build compiles it: with its inductor
    options, and with its own torch settings (SDPA kernel, TF32) around every call. torch.compile traces at the
    first call, so settings entered here and left before the pipeline runs would apply to none of them, and
    settings left on for the whole run would compile every component under the last one's."""
    from diffbake.builder.build import inductor_options

    compile_fn = compile_fn or torch.compile
    for comp in recipe.components.values():
        dynamic = any(v.shapes.dynamic for v in comp.variants) or len(comp.variants) > 1
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": None if dynamic else False}
        if inductor_options(comp):
            kwargs["options"] = inductor_options(comp)
        where = COMPONENTS[comp.name]
        module = where.module(pipe)
        if comp.mode == "regional":
            module.compile_repeated_blocks(**kwargs)
            call = where.call(pipe)
        else:
            call = compile_fn(where.call(pipe), **kwargs)
        setattr(module, where.method, _under_settings(comp, call))


def _under_settings(comp: Any, call: Callable[..., Any]) -> Callable[..., Any]:
    from diffbake.builder.build import compile_settings

    def scoped(*args: Any, **kwargs: Any) -> Any:
        with compile_settings(comp):
            return call(*args, **kwargs)

    return scoped


def run_artifact(spec: dict) -> dict:
    from diffbake.runtime.load import load
    from diffbake.runtime.serving import loaded_artifact

    pipe = load(spec["artifact"], device=spec.get("device"), cuda_graphs=spec.get("cuda_graphs", False))
    return _measure(pipe, spec, loaded_artifact(pipe).manifest.denoiser)


def _recipe(spec: dict) -> tuple[Any, Any]:
    from dataclasses import replace

    from diffbake.builder.recipe import check_against_source, load_recipe
    from diffbake.builder.sources import inspect_source

    recipe = load_recipe(spec["recipe"])
    info = inspect_source(recipe)
    if spec.get("source_folder"):
        # A built-in source, saved once by the parent: loaded from disk as a deployed model would be, not made
        # from random initialization (which takes longer than loading).
        info = replace(info, kind="local", location=spec["source_folder"])
    return check_against_source(recipe, info), info


def run_save(spec: dict) -> dict:
    """Save a built-in source pipeline, in the recipe's dtype, for the eager and torch.compile runs to load."""
    from diffbake.builder.sources import load_pipeline

    recipe, info = _recipe({**spec, "source_folder": None})
    load_pipeline(info, recipe.dtype).save_pretrained(spec["save_to"])
    return {}


def _source_pipeline(recipe: Any, info: Any) -> Any:
    """The source pipeline in the recipe's dtype with the recipe's transforms, as the build applies them."""
    from diffbake.builder.build import LogReporter, apply_transforms
    from diffbake.builder.sources import load_pipeline

    pipe = load_pipeline(info, recipe.dtype)
    pipe.to(recipe.device)
    for comp in recipe.components.values():
        module = COMPONENTS[comp.name].module(pipe)
        apply_transforms(comp, module.eval(), LogReporter())
    return pipe


def _measure(pipe: Any, spec: dict, denoiser: str) -> dict:
    """First image, then the denoiser step on the first call's inputs, then whole images."""
    t_loaded = time.time()
    captured: dict[str, Any] = {}
    module = getattr(pipe, denoiser)
    hook = module.register_forward_pre_hook(_capture(captured), with_kwargs=True)
    first = _image(pipe, spec)
    t_first = time.time()
    hook.remove()
    np_save(spec["image"], first)

    args, kwargs = captured["args"], captured["kwargs"]
    steps, out = _timed(lambda: module(*args, **kwargs), spec, pipe.device)
    torch.save(_first_tensor(out).detach().float().cpu(), spec["step_output"])
    images = []
    for _ in range(spec["image_repeats"]):
        start = _now(pipe.device)
        _image(pipe, spec)
        images.append(_now(pipe.device) - start)
    return {
        "t_loaded": t_loaded,
        "t_first_image": t_first,
        "step_s": steps,
        "image_s": images,
        "step_median_s": statistics.median(steps),
        "step_min_s": min(steps),
        "image_median_s": statistics.median(images) if images else None,
    }


def _timed(run: Callable[[], Any], spec: dict, device: Any) -> tuple[list[float], Any]:
    """``spec["warmup"]`` untimed calls, then ``spec["repeats"]`` timed ones; the times and the last output."""
    times, out = [], None
    with torch.no_grad():
        for i in range(spec["warmup"] + spec["repeats"]):
            start = _now(device)
            out = run()
            if i >= spec["warmup"]:
                times.append(_now(device) - start)
    return times, out


def _timed_rounds(runs: dict[str, Callable[[], Any]], spec: dict, device: Any) -> dict[str, tuple[list[float], Any]]:
    """Several ways to make one call, timed in turn: ``spec["warmup"]`` untimed calls of each, then
    ``spec["repeats"]`` rounds of one timed call each, the order rotated every round so that none always follows
    another. Each one's times and last output."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    outs: dict[str, Any] = {}
    with torch.no_grad():
        for name in names:
            for _ in range(spec["warmup"]):
                outs[name] = runs[name]()
        for i in range(spec["repeats"]):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = _now(device)
                outs[name] = runs[name]()
                times[name].append(_now(device) - start)
    return {name: (times[name], outs[name]) for name in names}


def _image(pipe: Any, spec: dict) -> Any:
    kwargs = _call_kwargs(spec["artifact"])
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(spec["seed"])
    with torch.no_grad():
        out = pipe(spec["prompt"], num_inference_steps=spec["steps"], generator=generator, output_type="np", **kwargs)
    _sync(pipe.device)
    return out.images


@functools.cache
def _call_kwargs(artifact: str) -> dict[str, Any]:
    from diffbake.format.manifest import read_manifest
    from diffbake.runtime.load import compiled_call

    return compiled_call(read_manifest(artifact))


def _capture(into: dict) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if "args" not in into:
            into["args"] = _clone(args)
            into["kwargs"] = _clone(kwargs)

    return hook


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return _first_tensor(out[0] if hasattr(out, "__getitem__") else out.sample)


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: Any) -> float:
    _sync(device)
    return time.perf_counter()


def np_save(path: str, array: Any) -> None:
    import numpy as np

    np.save(path, array)


# -- OpenVINO: what a CPU user would pick instead ----------------------------------------------------------------


OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def run_openvino(spec: dict) -> dict:
    """The denoiser step three ways in one process, on the first call's inputs: eager in the recipe's dtype,
    OpenVINO (``openvino.convert_model`` of the float32 eager denoiser, compiled for the CPU with the latency hint
    and the recipe's dtype as inference precision), and the artifact's compiled denoiser; each one's error against
    float32 eager. One process, so the three share the same CPU state (clocks, caches, threads), and timed in
    rounds of one call each: a shared host whose speed drifts (2x from one second to the next has been seen)
    slows all three alike instead of whichever ran during a slow spell."""
    import numpy as np
    import openvino
    from torch.utils._pytree import tree_flatten

    from diffbake.builder.sources import load_pipeline

    recipe, info = _recipe({**spec, "source_folder": None})
    name = info.denoiser
    pipe = load_pipeline(info, "float32")
    module = getattr(pipe, name).eval()
    args, kwargs = _first_call(pipe, module, spec)
    del pipe
    device = torch.device("cpu")
    with torch.no_grad():
        reference = _first_tensor(module(*args, **kwargs)).float()
        start = time.perf_counter()
        flat = _TensorCall(module, args, kwargs)
        converted = openvino.convert_model(flat, example_input=tuple(flat.inputs))
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[recipe.dtype]}
        compiled_ov = openvino.Core().compile_model(converted, "CPU", config)
        convert_s = time.perf_counter() - start
    inputs = [t.numpy() for t in flat.inputs]
    converted = flat = None  # the compiled model holds its own weights, in its inference precision
    dtype = getattr(torch, recipe.dtype)
    module.to(dtype)
    cast_args, cast_kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    compiled = _compiled_denoiser(spec, name)
    timed = _timed_rounds(
        {
            "openvino": lambda: torch.from_numpy(np.asarray(compiled_ov(inputs)[0])),
            "eager": lambda: _first_tensor(module(*cast_args, **cast_kwargs)),
            "artifact": lambda: _first_tensor(compiled(*cast_args, **cast_kwargs)),
        },
        spec,
        device,
    )
    paths = {}
    for key, (times, out) in timed.items():
        paths[key] = {
            "step_s": times,
            "step_median_s": statistics.median(times),
            "max_abs_error_vs_float32": (out.float() - reference).abs().max().item(),
        }
    paths["openvino"].update(convert_s=convert_s, precision=config)
    leaves = tree_flatten((args, kwargs))[0]
    return {
        "openvino_version": openvino.__version__,
        "inputs": [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)],
        "steps": paths,
    }


class _TensorCall(torch.nn.Module):
    """``module(*args, **kwargs)`` with every tensor of the call as a positional input (the rest fixed), returning
    its first output tensor: the plain signature a converter takes."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        from torch.utils._pytree import tree_flatten

        super().__init__()
        self.module = module
        self.leaves, self.spec = tree_flatten((args, kwargs))
        self.where = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]
        self.inputs = [self.leaves[i] for i in self.where]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        from torch.utils._pytree import tree_unflatten

        leaves = list(self.leaves)
        for i, tensor in zip(self.where, tensors, strict=True):
            leaves[i] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        return _first_tensor(self.module(*args, **kwargs))


def _first_call(pipe: Any, module: torch.nn.Module, spec: dict) -> tuple[tuple, dict]:
    """The inputs of the pipeline's first call of ``module`` (the pipeline is stopped there)."""
    captured: dict[str, Any] = {}
    capture = _capture(captured)

    def capture_and_stop(module: Any, args: tuple, kwargs: dict) -> None:
        capture(module, args, kwargs)
        raise _Captured  # the first call's inputs are all that is needed of the pipeline

    hook = module.register_forward_pre_hook(capture_and_stop, with_kwargs=True)
    try:
        _image(pipe, spec)
    except _Captured:
        pass
    finally:
        hook.remove()
    return captured["args"], captured["kwargs"]


# -- the step cache rung: the regional artifact with and without a diffusers step cache ---------------------------


def run_cache(spec: dict) -> dict:
    """Whole images from the artifact without and with the step cache ``spec["cache"]`` (``first-block:0.08``):
    each image's latency, the denoiser's time within it, how many compiled block calls ran, and the cached images'
    error against the uncached ones (same seed). A cache helps only across steps, so it is measured over whole
    images, not on one denoiser call; and in rounds of one image each way, so that a shared host whose speed
    drifts slows both alike (as OpenVINO's step is timed beside the others)."""
    from diffbake.runtime.caches import enable_step_cache, parse_step_cache
    from diffbake.runtime.load import load
    from diffbake.runtime.regional import CompiledBlock
    from diffbake.runtime.serving import loaded_artifact

    pipe = load(spec["artifact"], device=spec.get("device"), cuda_graphs=spec.get("cuda_graphs", False))
    denoiser = getattr(pipe, loaded_artifact(pipe).manifest.denoiser)
    config = parse_step_cache(spec["cache"])
    calls = [0]
    for block in denoiser.modules():
        if isinstance(block.forward, CompiledBlock):
            block.forward = _counted(block.forward, calls)
    spent = [0.0]
    started: list[float] = []
    denoiser.register_forward_pre_hook(lambda *_: started.append(_now(pipe.device)))
    denoiser.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + _now(pipe.device) - started.pop()))

    def image(cached: bool) -> tuple[tuple[float, float, int], Any]:
        if cached:
            enable_step_cache(pipe, config)
        elif getattr(denoiser, "is_cache_enabled", False):
            denoiser.disable_cache()  # the recipe's own cache too: these images are the artifact without one
        calls[0], spent[0] = 0, 0.0
        start = _now(pipe.device)
        out = _image(pipe, spec)
        return (_now(pipe.device) - start, spent[0], calls[0]), out

    image(False), image(True)  # warm-up: the first images pay one-time costs (allocations, the cache's set-up)
    runs: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    images: dict[bool, Any] = {}
    for _ in range(max(spec["image_repeats"], 1)):
        for cached in (False, True):
            run, images[cached] = image(cached)
            runs[cached].append(run)

    def summary(cached: bool) -> dict:
        return {
            "image_median_s": statistics.median(r[0] for r in runs[cached]),
            "denoiser_s_per_image": statistics.median(r[1] for r in runs[cached]),
            "block_calls_per_image": runs[cached][-1][2],
        }

    plain, cached = summary(False), summary(True)
    plain_image, cached_image = images[False], images[True]
    error = abs(cached_image - plain_image)
    return {
        "cache": spec["cache"],
        "steps": spec["steps"],
        "plain": plain,
        "cached": cached,
        "skipped_fraction": 1 - cached["block_calls_per_image"] / max(plain["block_calls_per_image"], 1),
        "image_speedup": plain["image_median_s"] / cached["image_median_s"],
        "denoiser_speedup": plain["denoiser_s_per_image"] / cached["denoiser_s_per_image"],
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
    }


def _counted(forward: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(*args, **kwargs)

    return counted


# -- the ladder: float32 eager, then each optimization added in turn --------------------------------------------


def run_ladder(spec: dict) -> dict:
    """The denoiser on the first call's inputs: float32 eager, then the recipe's dtype, QKV fusion,
    channels_last and quantization added in the order the build applies them, then the compiled artifact; each
    rung's step latency and its error against float32 eager. Also counts the step's FLOPs and measures the
    device's matmul peak in the recipe's dtype."""
    from diffbake.builder.sources import load_pipeline
    from diffbake.builder.transforms import channels_last, fuse_qkv, quantize

    # The source itself, not the copy saved in the recipe's dtype: float32 means the original weights.
    recipe, info = _recipe({**spec, "source_folder": None})
    name = info.denoiser
    comp = recipe.components.get(name)
    pipe = load_pipeline(info, "float32")
    pipe.to(recipe.device)
    module = getattr(pipe, name).eval()
    args, kwargs = _first_call(pipe, module, spec)
    del pipe  # the rest of the float32 pipeline
    device = torch.device(recipe.device)
    rungs: list[dict] = []

    def rung(label: str, run: Callable[[], Any]) -> torch.Tensor:
        times, out = _timed(run, spec, device)
        got = _first_tensor(out).detach().float()
        rungs.append({"step": label, "step_median_s": statistics.median(times), "step_s": times, "_out": got})
        return got

    reference = rung("float32 eager", lambda: module(*args, **kwargs))
    flops = _count_flops(lambda: module(*args, **kwargs))
    dtype = getattr(torch, recipe.dtype)
    if recipe.dtype != "float32":
        module.to(dtype)
        args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        rung(f"+ {recipe.dtype}", lambda: module(*args, **kwargs))
    if comp is not None and comp.fuse_qkv:
        fuse_qkv(name, module)
        rung("+ QKV fusion", lambda: module(*args, **kwargs))
    if comp is not None and comp.channels_last:
        channels_last(module)
        rung("+ channels_last", lambda: module(*args, **kwargs))
    if comp is not None and comp.quantization is not None:
        quantize(name, module, comp.quantization, blocks_only=comp.mode == "regional")
        rung(f"+ {comp.quantization.method} (torchao)", lambda: module(*args, **kwargs))
    module = None  # free the eager weights before the compiled component binds its own
    if comp is not None:
        compiled = _compiled_denoiser(spec, name)
        rung(f"+ AOT compile ({comp.mode})", lambda: compiled(*args, **kwargs))
    for r in rungs:
        out = r.pop("_out")
        r["max_abs_error"] = (out - reference).abs().max().item()
        r["relative_error"] = r["max_abs_error"] / max(reference.abs().max().item(), 1e-12)
    return {"ladder": rungs, "flops_per_step": flops, "matmul_peak": _matmul_peak(device, dtype)}


class _Captured(Exception):
    """Raised by a hook to stop the pipeline at its first denoiser call."""


def _compiled_denoiser(spec: dict, name: str) -> Any:
    from diffbake.format.manifest import read_manifest
    from diffbake.runtime.load import load_component
    from diffbake.runtime.packages import unpack_dir

    manifest = read_manifest(spec["artifact"])
    device = spec.get("device") or manifest.device
    return load_component(
        spec["artifact"], manifest, name, device, unpack_dir(None), cuda_graphs=spec.get("cuda_graphs", False)
    )


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _count_flops(run: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return int(counter.get_total_flops())


def _matmul_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """The best FLOP/s of a large square matmul on this device in this dtype: what the hardware delivers to the
    densest kernel there is, as the yardstick for the denoiser step."""
    best: dict[str, Any] = {"flops_per_s": 0.0}
    for n in (4096, 8192) if device.type == "cuda" else (2048, 4096):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        fastest = float("inf")
        with torch.no_grad():
            for i in range(6):
                start = _now(device)
                torch.mm(a, b)
                elapsed = _now(device) - start
                if i >= 2:
                    fastest = min(fastest, elapsed)
        if 2 * n**3 / fastest > best["flops_per_s"]:
            best = {"n": n, "seconds": fastest, "flops_per_s": 2 * n**3 / fastest}
    return {**best, "dtype": str(dtype).removeprefix("torch.")}


MODES: dict[str, Callable[[dict], dict]] = {
    "eager": run_eager,
    "compile": run_compile,
    "artifact": run_artifact,
    "ladder": run_ladder,
    "cache": run_cache,
    "openvino": run_openvino,
    "save": run_save,
}


if __name__ == "__main__":
    main(sys.argv[1])
