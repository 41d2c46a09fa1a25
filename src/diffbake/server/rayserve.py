"""Scale-out on Ray Serve: the images API as a Ray Serve application, one artifact load per replica.

Each replica is an :class:`~diffbake.server.engine.Engine` behind the same FastAPI routes as ``diffbake serve``
(its queue, micro-batching and metrics are per replica). A replica loads in its constructor, with every check
``diffbake.load`` makes and a warm-up call, so Ray Serve routes to it only once it can serve; a replica that dies,
or whose health check fails, is replaced by Ray Serve.

Locally: ``diffbake serve ARTIFACT --ray --replicas 2``. On an existing cluster (KubeRay's RayService), a Serve
config names the application builder :func:`app` and its arguments::

    applications:
      - name: diffbake
        route_prefix: /
        import_path: diffbake.server.rayserve:app
        args:
          artifact: my-org/sd-turbo          # a folder every node can read, or a Hub repo id
          revision: 0123456789abcdef0123456789abcdef01234567
          trust_remote_code: true
          replicas: 2                        # or min_replicas / max_replicas to autoscale
          num_gpus: 1
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

from ray import serve

from diffbake.errors import ServeError
from diffbake.server.app import api
from diffbake.server.engine import Engine, EngineOptions

DEPLOYMENT = "diffbake"


@serve.ingress()
class ImageReplica:
    """One replica: the artifact loaded, checked and warmed up in the constructor."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.engine = Engine(EngineOptions(**options))
        self.engine.start()

    def __serve_build_asgi_app__(self) -> Any:
        return api(self.engine)

    def check_health(self) -> None:
        # Ray Serve replaces a replica whose health check raises.
        if not self.engine.ready:
            raise RuntimeError(f"not ready: {self.engine.failure or 'stopping'}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=60)


def application(
    options: EngineOptions,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Any:
    """The Ray Serve application: ``replicas`` replicas, or between ``replicas`` and ``max_replicas`` as Ray Serve's
    autoscaler decides from the requests in flight; each replica reserves ``num_cpus`` CPUs and ``num_gpus``
    GPUs."""
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ServeError(
            f"replicas must be at least 1 and max_replicas at least replicas (found {replicas} and {max_replicas})"
        )
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                # A replica is busy with `concurrency` calls; scale out before its queue fills.
                "target_ongoing_requests": options.concurrency,
            }
        }
    deployment = serve.deployment(ImageReplica).options(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Requests beyond what the engine runs and queues wait in Ray Serve's router rather than 429 at once.
        max_ongoing_requests=options.concurrency + options.queue_size,
        health_check_period_s=10,
        **scaling,
    )
    return deployment.bind(asdict(options))


def app(args: dict[str, Any]) -> Any:
    """Application builder for a Serve config file (``import_path: diffbake.server.rayserve:app``): ``args`` holds
    :class:`~diffbake.server.engine.EngineOptions` fields and ``replicas``, ``max_replicas``, ``num_cpus``,
    ``num_gpus``."""
    args = dict(args)
    placement = {k: args.pop(k) for k in ("replicas", "max_replicas", "num_cpus", "num_gpus") if k in args}
    known = {f.name for f in fields(EngineOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ServeError(
            f"unknown argument(s) {', '.join(unknown)} for diffbake.server.rayserve:app; expected "
            f"{', '.join(sorted(known | {'replicas', 'max_replicas', 'num_cpus', 'num_gpus'}))}"
        )
    if "artifact" not in args:
        raise ServeError("diffbake.server.rayserve:app needs args.artifact: a folder or a Hub repo id")
    return application(EngineOptions(**args), **placement)


def run(
    options: EngineOptions,
    host: str,
    port: int,
    *,
    report: Callable[[str], None],
    **placement: Any,
) -> None:
    """Deploy :func:`application` (``placement``: its replicas, CPUs, GPUs) on a local Ray instance, or the cluster
    $RAY_ADDRESS names, serving on ``host``:``port``; wait for SIGTERM or SIGINT, then take it down.

    Raises:
        ServeError: Ray Serve could not start the replicas.
    """
    import ray

    target = application(options, **placement)
    if not os.environ.get("RAY_ADDRESS"):
        # A local instance has no load balancer to drain: its proxy need not wait Ray's 30 s before stopping.
        os.environ.setdefault("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", "1")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        report(f"deploying {options.artifact} on Ray Serve")
        try:
            serve.run(target, name=DEPLOYMENT, route_prefix="/")
        except RuntimeError as e:
            raise ServeError(f"{options.artifact}: Ray Serve could not start the replicas: {e}") from e
        report(f"serving {options.artifact} on http://{host}:{port} (Ray Serve)")
        stop.wait()
        report("stopping")
    finally:
        serve.shutdown()
        ray.shutdown()
