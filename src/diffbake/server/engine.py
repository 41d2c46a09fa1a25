"""The engine behind the HTTP API: one loaded artifact, a bounded queue, micro-batching, and worker threads.

Requests wait in a bounded queue (beyond it: :class:`QueueFull`, a 429). One dispatcher thread takes the oldest
request when a worker is free; with micro-batching it waits up to ``max_wait`` for more requests of the same size,
steps, guidance and negative-prompt use, and merges as many as fit an image count the artifact was compiled for
(at most ``max_batch`` images) into one pipeline call. Each worker owns a replica of the pipeline
(:func:`diffbake.replicate`: shared weights and compiled code, its own scheduler), so ``concurrency`` calls run at
once on one copy of the weights.

Every image has its own generator: image ``j`` of a request with seed ``s`` is drawn with seed ``s + j``, so a
request gets the same images alone or merged with others.
"""

from __future__ import annotations

import base64
import inspect
import io
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffbake.errors import InputMismatchError, ServeError
from diffbake.format.components import fitting_guidance
from diffbake.server.catalogue import Catalogue
from diffbake.server.metrics import Metrics
from diffbake.server.request import ImageRequest, RequestError

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds as many requests as it may; ``retry_after`` is an estimate in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class NotReady(Exception):
    """The engine is loading, stopping, or failed to load (``reason``)."""


@dataclass
class EngineOptions:
    """How ``diffbake serve`` runs an artifact (see ``diffbake serve --help``)."""

    artifact: str
    revision: str | None = None
    trust_remote_code: bool = False
    device: str | None = None
    name: str | None = None  # the model name clients send; default: the artifact's folder name or repo id
    concurrency: int = 1
    queue_size: int = 16
    max_batch: int = 1  # images per merged call; 1: no micro-batching
    max_wait: float = 0.0  # seconds a request may wait for others to merge with
    max_steps: int = 100
    warmup: bool = True


@dataclass
class Job:
    request: ImageRequest
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    taken: bool = False


class Engine:
    """Loads an artifact and runs image requests on it; thread-safe."""

    def __init__(self, options: EngineOptions, metrics: Metrics | None = None):
        self.options = options
        self.metrics = metrics or Metrics()
        self.catalogue: Catalogue | None = None
        self.failure: str | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._lock = threading.Condition()
        self._waiting: list[Job] = []
        self._replicas: list[Any] = []
        self._running = 0
        self._seconds_per_call = 1.0  # a running estimate, for Retry-After
        self._text_tokens: int | None = None
        self._default_guidance: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Load the artifact (with every check ``diffbake.load`` makes), warm up, then take requests.

        Raises:
            DiffbakeError: the artifact cannot be served here (recorded in ``failure`` too).
        """
        from diffusers.utils import logging as diffusers_logging

        from diffbake.runtime.load import load
        from diffbake.runtime.serving import loaded_artifact, replicate

        diffusers_logging.disable_progress_bar()  # a server's log is not a terminal
        o = self.options
        try:
            start = time.perf_counter()
            pipe = load(
                o.artifact,
                revision=o.revision,
                trust_remote_code=o.trust_remote_code,
                device=o.device,
                concurrency=o.concurrency,
            )
            manifest = loaded_artifact(pipe).manifest
            self.catalogue = Catalogue.from_manifest(manifest, o.name or _default_name(o.artifact))
            _check_servable(pipe, self.catalogue)
            takes_length = "max_sequence_length" in inspect.signature(type(pipe).__call__).parameters
            self._text_tokens = self.catalogue.text_tokens() if takes_length else None
            # A request that names no scale gets what the artifact runs where the pipeline's default would not fit it.
            self._default_guidance = fitting_guidance(self.catalogue.guided, type(pipe))
            self._replicas = [pipe] + [replicate(pipe) for _ in range(o.concurrency - 1)]
            for replica in self._replicas:
                replica.set_progress_bar_config(disable=True)
            if o.warmup:
                self._warm_up()
            logger.info("%s ready in %.1f s", self.catalogue.name, time.perf_counter() - start)
        except Exception as e:
            self.failure = f"{type(e).__name__}: {e}"
            raise
        self._free = threading.Semaphore(o.concurrency)
        threading.Thread(target=self._dispatch, name="diffbake-dispatch", daemon=True).start()
        self._ready.set()
        self.metrics.ready.set(1)

    def stop(self, timeout: float | None = None) -> None:
        """Take no more requests; finish those queued and running (up to ``timeout`` seconds)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self.metrics.ready.set(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._waiting or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._lock.wait(remaining if remaining is not None else 0.5)

    def _warm_up(self) -> None:
        """One call per replica at the default size: the first call's one-time costs are paid before /readyz says
        ready, and a call that cannot run stops the start."""
        assert self.catalogue is not None
        width, height = self.catalogue.default_size()
        request = ImageRequest(
            prompt="warm-up",
            n=self.catalogue.default_count(width, height, None),
            width=width,
            height=height,
            output_format="png",
            output_compression=100,
            seed=0,
            num_inference_steps=2,
            guidance_scale=None,
            negative_prompt=None,
        )
        for replica in self._replicas:
            job = Job(request)
            self._call(replica, [job])
            if job.future.exception() is not None:
                raise ServeError(f"{self.catalogue.name}: the warm-up call failed: {job.future.exception()}")

    # -- requests --------------------------------------------------------------------------------------------

    def submit(self, request: ImageRequest) -> Job:
        """Queue a request.

        Raises:
            NotReady: still loading, or stopping.
            QueueFull: ``queue_size`` requests wait already.
        """
        if not self.ready:
            raise NotReady(self.failure or "the artifact is loading")
        job = Job(request)
        with self._lock:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if len(self._waiting) >= self.options.queue_size:
                waves = (len(self._waiting) + self._running) / self.options.concurrency + 1
                raise QueueFull(max(1, round(waves * self._seconds_per_call)))
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a request that has not started (its client has gone); False if it has."""
        with self._lock:
            if job.taken or job not in self._waiting:
                return False
            self._waiting.remove(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.dropped.inc()
            self._lock.notify_all()
        job.future.cancel()
        return True

    def _dispatch(self) -> None:
        while True:
            self._free.acquire()
            batch = self._take()
            if batch is None:
                self._free.release()
                return
            threading.Thread(target=self._work, args=(batch,), name="diffbake-worker", daemon=True).start()

    def _take(self) -> list[Job] | None:
        """The next call's requests: the oldest, and those merged with it; None once stopping and drained."""
        o = self.options
        with self._lock:
            while True:
                while not self._waiting:
                    if self._stopping:
                        return None
                    self._lock.wait(0.5)
                first = self._waiting[0]
                if o.max_batch > 1:
                    deadline = first.arrived + o.max_wait
                    while first in self._waiting and time.monotonic() < deadline:
                        if self._mergeable(first)[1] >= o.max_batch:
                            break
                        self._lock.wait(deadline - time.monotonic())
                    if first not in self._waiting:  # its client went away while it waited
                        continue
                return self._take_locked()

    def _take_locked(self) -> list[Job]:
        batch, _ = self._mergeable(self._waiting[0])
        for job in batch:
            job.taken = True
            self._waiting.remove(job)
        self._running += 1
        self.metrics.queue_depth.set(len(self._waiting))
        return batch

    def _mergeable(self, first: Job) -> tuple[list[Job], int]:
        """The longest run of waiting requests like ``first`` (in arrival order, skipping others) whose images
        add up to a count the artifact serves, within ``max_batch``."""
        assert self.catalogue is not None
        r = first.request
        best, taken, total = [first], [first], r.n
        if self.options.max_batch > 1:
            for job in self._waiting:
                if job is first or job.request.batch_key != r.batch_key:
                    continue
                if total + job.request.n > self.options.max_batch:
                    break
                taken, total = [*taken, job], total + job.request.n
                if self.catalogue.serves(r.width, r.height, total, r.guidance):
                    best = taken
        return best, sum(j.request.n for j in best)

    def _work(self, batch: list[Job]) -> None:
        replica = self._replicas.pop()
        self.metrics.batch_images.observe(sum(job.request.n for job in batch))
        try:
            self._call(replica, batch)
        finally:
            self._replicas.append(replica)
            with self._lock:
                self._running -= 1
                self._lock.notify_all()
            self._free.release()

    def _call(self, pipe: Any, batch: list[Job]) -> None:
        """One pipeline call for every image of ``batch``; each job's future gets its encoded images or error."""
        import torch

        r = batch[0].request
        prompts, negatives, generators = [], [], []
        for job in batch:
            for j in range(job.request.n):
                prompts.append(job.request.prompt)
                negatives.append(job.request.negative_prompt)
                generators.append(torch.Generator().manual_seed(job.request.seed + j))
        kwargs: dict[str, Any] = {"prompt": prompts, "height": r.height, "width": r.width, "generator": generators}
        if r.num_inference_steps is not None:
            kwargs["num_inference_steps"] = r.num_inference_steps
        guidance_scale = r.guidance_scale if r.guidance_scale is not None else self._default_guidance
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        if r.negative_prompt is not None:
            kwargs["negative_prompt"] = negatives
        if self._text_tokens is not None:
            kwargs["max_sequence_length"] = self._text_tokens
        start = time.perf_counter()
        try:
            images = pipe(**kwargs).images
        except (InputMismatchError, ValueError) as e:
            # The runtime's input guards, and diffusers' own argument checks: the call the client asked for.
            error = RequestError(str(e), code="unsupported_value")
            for job in batch:
                _settle(job, error=error)
            return
        except Exception as e:
            logger.exception("pipeline call failed")
            error = RequestError(f"the pipeline call failed: {type(e).__name__}: {e}", status=500, code="server_error")
            for job in batch:
                _settle(job, error=error)
            return
        seconds = time.perf_counter() - start
        self._seconds_per_call = 0.8 * self._seconds_per_call + 0.2 * seconds
        for job in batch:
            mine, images = images[: job.request.n], images[job.request.n :]
            _settle(job, result=[encode(image, job.request) for image in mine])


def _settle(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    if job.future.cancelled():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)


def encode(image: Any, request: ImageRequest) -> str:
    """A PIL image as base64 in the request's output format."""
    buffer = io.BytesIO()
    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[request.output_format]
    options = {} if fmt == "PNG" else {"quality": request.output_compression}
    image.convert("RGB").save(buffer, format=fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _default_name(artifact: str) -> str:
    path = Path(artifact)
    return path.name if path.exists() else artifact


def _check_servable(pipe: Any, catalogue: Catalogue) -> None:
    """The images API makes images from text: refuse a pipeline that takes no prompt or needs an input image."""
    params = inspect.signature(type(pipe).__call__).parameters
    required = [
        n
        for n, p in params.items()
        if n != "self" and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    needs_image = [n for n in ("image", "mask_image", "control_image") if n in params and n in required]
    needs_image += [n for n in ("image", "control_image", "control_mask") if n in params and params[n].default is None]
    if "prompt" not in params or needs_image:
        raise ServeError(
            f"{catalogue.name}: {catalogue.pipeline} cannot serve /v1/images/generations, which makes images from a "
            f"prompt alone ({'it needs ' + ', '.join(needs_image) if needs_image else 'it takes no prompt'}); serve "
            "a text-to-image artifact"
        )
