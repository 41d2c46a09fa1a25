"""diffbake serve on Ray Serve: replicas on a local Ray instance bound to 127.0.0.1, stopped by the test.

The fault test kills a replica's process while it serves, then the replica Ray Serve starts in its place while
that one is still loading: no request hangs, each gets an image or a 5xx with a reason, and both replicas come
back.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from servers import free_port, server_process, wait_until

GEN = "/v1/images/generations"
REQUEST = {"prompt": "a cat", "num_inference_steps": 2, "seed": 1}


def test_the_cli_serves_on_ray_and_stops_on_sigterm(artifacts):
    port = free_port()
    cmd = [sys.executable, "-m", "diffbake.cli", "serve", str(artifacts("sd")), "--ray", "--replicas", "1"]
    with server_process([*cmd, "--num-cpus", "0.5", "--port", str(port)], port) as (proc, client):
        response = client.post(GEN, json=REQUEST)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1
        refused = client.post(GEN, json={**REQUEST, "size": "128x128"})
        assert refused.status_code == 400
        assert refused.json()["error"]["message"].startswith("size 128x128 is not what this artifact was compiled")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0


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
    from diffbake.server.rayserve import DEPLOYMENT, app

    serve = ray_instance
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Through the application builder a Serve config file names (import_path: diffbake.server.rayserve:app).
    serve.run(app({"artifact": str(artifacts("sd")), "replicas": 2, "num_cpus": 1}), name=DEPLOYMENT, route_prefix="/")
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
            wait_until(lambda: any(a not in old for a, _ in _replicas()), 120, "a replacement replica")
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
        wait_until(lambda: _states(serve) == {"RUNNING": 2}, 180, "two running replicas")
        assert len(_replicas()) == 2
        assert client.post(GEN, json=REQUEST).status_code == 200


def test_the_config_file_builder_refuses_what_it_does_not_know():
    from diffbake.errors import ServeError
    from diffbake.server.rayserve import app

    with pytest.raises(ServeError) as e:
        app({"artifact": "artifacts/tiny-sd", "replica": 2})
    assert str(e.value) == (
        "unknown argument(s) replica for diffbake.server.rayserve:app; expected artifact, concurrency, device, "
        "max_batch, max_replicas, max_steps, max_wait, name, num_cpus, num_gpus, queue_size, replicas, revision, "
        "trust_remote_code, warmup"
    )
    with pytest.raises(ServeError) as e:
        app({"replicas": 2})
    assert str(e.value) == "diffbake.server.rayserve:app needs args.artifact: a folder or a Hub repo id"
    with pytest.raises(ServeError) as e:
        app({"artifact": "artifacts/tiny-sd", "replicas": 3, "max_replicas": 2})
    assert str(e.value) == ("replicas must be at least 1 and max_replicas at least replicas (found 3 and 2)")
