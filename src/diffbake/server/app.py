"""The HTTP API (FastAPI): OpenAI's ``POST /v1/images/generations``, ``GET /v1/models``, health, readiness and
Prometheus metrics, on an :class:`~diffbake.server.engine.Engine`.

The same routes serve one process (``diffbake serve``) and each Ray Serve replica (``diffbake.server.ray``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from diffbake.errors import DiffbakeError, ServeError
from diffbake.server.engine import Engine, EngineOptions, NotReady, QueueFull
from diffbake.server.request import RequestError, parse

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
GENERATIONS = "/v1/images/generations"


def _error(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def add_routes(app: FastAPI, engine: Engine) -> None:
    """The API's routes, served by ``engine``."""

    @app.post(GENERATIONS)
    async def generations(request: Request) -> Response:
        start = time.perf_counter()
        response = await _generate(engine, request)
        engine.metrics.requests.labels(status=str(response.status_code)).inc()
        engine.metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.get("/v1/models")
    async def models() -> Response:
        if engine.catalogue is None:
            return _not_ready(engine)
        return JSONResponse({"object": "list", "data": [engine.catalogue.as_model()]})

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if engine.ready:
            return JSONResponse({"status": "ready", "model": engine.catalogue.name if engine.catalogue else None})
        return _not_ready(engine)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _not_ready(engine: Engine) -> JSONResponse:
    if engine.failure:
        error = RequestError(f"the artifact failed to load: {engine.failure}", status=503, code="load_failed")
        return _error(error)
    return _error(
        RequestError("the artifact is still loading; retry shortly", status=503, code="loading"),
        headers={"Retry-After": "5"},
    )


async def _generate(engine: Engine, request: Request) -> Response:
    if engine.catalogue is None or not engine.ready:
        return _not_ready(engine)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return _error(RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", status=413))
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(RequestError(f"the request body is not valid JSON ({e})", code="invalid_json"))
    try:
        parsed = parse(body, engine.catalogue, max_steps=engine.options.max_steps)
        job = engine.submit(parsed)
    except RequestError as e:
        return _error(e)
    except QueueFull as e:
        error = RequestError(
            f"too many requests: {engine.options.queue_size} already wait; retry after {e.retry_after} s",
            status=429,
            code="queue_full",
        )
        return _error(error, headers={"Retry-After": str(e.retry_after)})
    except NotReady as e:
        return _error(RequestError(f"not taking requests: {e}", status=503, code="unavailable"))
    result = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({result}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected() and engine.cancel(job):
            logger.info("dropped a queued request whose client went away")
            return Response(status_code=499)
    try:
        images = result.result()
    except RequestError as e:
        return _error(e)
    engine.metrics.images.inc(len(images))
    r = parsed
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": [{"b64_json": b} for b in images],
            "output_format": r.output_format,
            "size": f"{r.width}x{r.height}",
            "seed": r.seed,
        }
    )


def api(engine: Engine, **fastapi: Any) -> FastAPI:
    """The API's routes on ``engine``, in a new FastAPI app (``fastapi``: its options, such as a lifespan)."""
    app = FastAPI(title="diffbake", **fastapi)
    add_routes(app, engine)
    return app


def create_app(engine: Engine, on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The one-process app: the load (with every check, then a warm-up call) runs in the background once the
    server starts, so ``/healthz`` answers at once and ``/readyz`` only when requests can be served; at shutdown
    (SIGTERM) it stops taking requests and finishes those queued and running. ``on_load_failure`` is called if the
    artifact cannot be served."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load, args=(engine, on_load_failure), name="diffbake-load", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(engine.stop)

    return api(engine, lifespan=lifespan)


def _load(engine: Engine, on_load_failure: Callable[[], None] | None) -> None:
    try:
        engine.start()
    except Exception as e:
        if isinstance(e, DiffbakeError):  # a known refusal: its message says it all
            logger.error("the artifact cannot be served: %s", e)
        else:
            logger.exception("the artifact could not be served")
        if on_load_failure is not None:
            on_load_failure()


def run(options: EngineOptions, host: str, port: int) -> None:
    """Serve in this process until SIGTERM or SIGINT (then drain and return).

    Raises:
        ServeError: the artifact could not be served (the server stops as soon as its load fails).
    """
    engine = Engine(options)
    server: DrainingServer | None = None

    def stop() -> None:
        assert server is not None
        server.should_exit = True

    server = DrainingServer(uvicorn.Config(create_app(engine, stop), host=host, port=port, log_level="warning"))
    server.run()
    if engine.failure:
        raise ServeError(f"{options.artifact}: cannot be served: {engine.failure}")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, exiting 0 after a SIGTERM (or SIGINT) once every request is finished.

    uvicorn stops taking connections on the signal, waits for the requests in flight, runs the app's shutdown
    (which drains the engine's queue), then raises the signal again so that the process dies of it (exit 143).
    A drained shutdown is the expected end of a server under an orchestrator, so that last step is skipped.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()
