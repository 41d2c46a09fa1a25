"""diffbake serve on Ray Serve: replicas on a local Ray instance bound to 127.0.0.1, stopped by the test.

The fault test kills a replica's process while it serves, then the replica Ray Serve starts in its place while
that one is still loading: no request hangs, each gets an image or a 5xx with a reason, and both replicas come
back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

GEN = "/v1/images/generations"
REQUEST = {"prompt": "a cat", "num_inference_steps": 2, "seed": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_the_cli_serves_on_ray_and_stops_on_sigterm(artifacts):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffbake.cli",
            "serve",
            str(artifacts("sd")),
            "--ray",
            "--replicas",
            "1",
            "--num-cpus",
            "0.5",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            _wait(lambda: _ready(client) or proc.poll() is not None, 180, "the Ray replica")
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            response = client.post(GEN, json=REQUEST)
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == 1
            refused = client.post(GEN, json={**REQUEST, "size": "128x128"})
            assert refused.status_code == 400
            assert refused.json()["error"]["message"].startswith("size 128x128 is not what this artifact was compiled")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def ray_instance():
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas() -> list[tuple[str, int]]:
    """(actor id, process id) of every live replica, from Ray's actor table (its state API needs the dashboard)."""
    from ray._private.state import actors

    table = actors(actor_state_name="ALIVE").values()
    return [(a["ActorID"], a["Pid"]) for a in table if a["ActorClassName"].startswith("ServeReplica:diffbake")]


def _states(serve) -> dict[str, int]:
    status = serve.status().applications["diffbake"].deployments["diffbake"]
    return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}


def test_a_replica_killed_serving_and_its_successor_killed_loading(artifacts, ray_instance, tmp_path: Path):
    from diffbake.server.engine import EngineOptions
    from diffbake.server.rayserve import DEPLOYMENT, application

    serve = ray_instance
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        application(EngineOptions(artifact=str(artifacts("sd"))), replicas=2, num_cpus=1),
        name=DEPLOYMENT,
        route_prefix="/",
    )
    assert _states(serve) == {"RUNNING": 2}
    first = _replicas()
    assert len(first) == 2
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        assert client.post(GEN, json=REQUEST).status_code == 200
        with ThreadPoolExecutor(3) as pool:
            # Requests in flight while replicas die: each ends, with an image or a 5xx that says why.
            futures = [pool.submit(client.post, GEN, json={**REQUEST, "seed": i}) for i in range(6)]
            os.kill(first[0][1], signal.SIGKILL)
            old = {actor for actor, _ in first}
            _wait(lambda: any(a not in old for a, _ in _replicas()), 120, "a replacement replica")
            successor = next((a, pid) for a, pid in _replicas() if a not in old)
            loading = _states(serve)
            os.kill(successor[1], signal.SIGKILL)  # still in its constructor: loading the artifact
            futures += [pool.submit(client.post, GEN, json={**REQUEST, "seed": 10 + i}) for i in range(4)]
            statuses = []
            for f in futures:
                response = f.result()  # httpx's timeout bounds each: a hung request fails the test
                statuses.append(response.status_code)
                assert response.status_code == 200 or (response.status_code >= 500 and response.text)
        assert loading.get("RUNNING", 0) == 1, loading  # the successor was killed before it could serve
        assert statuses.count(200) >= 1
        # Ray Serve brings the deployment back to two replicas, and they serve.
        _wait(lambda: _states(serve) == {"RUNNING": 2}, 180, "two running replicas")
        assert len(_replicas()) == 2
        assert client.post(GEN, json=REQUEST).status_code == 200
