"""diffbake serve: OpenAI's images API on real servers bound to 127.0.0.1, on the suite's tiny artifacts.

Each server runs uvicorn in a thread of the test process (or, for SIGTERM, a child process), answers a bounded
number of requests, and is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import io
import re
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from click.testing import CliRunner
from PIL import Image

import diffbake
from diffbake.cli import cli
from diffbake.server.app import create_app
from diffbake.server.engine import Engine, EngineOptions
from servers import free_port, server_process, wait_until

GEN = "/v1/images/generations"


@contextmanager
def running(artifact: Path, *, wait: bool = True, **options) -> Iterator[tuple[httpx.Client, Engine]]:
    """A server in a thread on a free port of 127.0.0.1, once it listens and (``wait``) its engine is ready;
    stopped, its requests drained, on exit."""
    engine = Engine(EngineOptions(artifact=str(artifact), **options))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        up = (lambda: server.started and engine.ready) if wait else (lambda: server.started)
        wait_until(lambda: engine.failure is not None or up(), 120, "the server")
        assert engine.failure is None, engine.failure
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, engine
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not stop"


@contextmanager
def calls_held(engine: Engine) -> Iterator[None]:
    """Every pipeline call the engine starts inside the block waits until the block ends: a test that needs
    requests running or queued sets them up without racing the tiny artifact's calls, which a loaded host may
    finish in well under a second."""
    release = threading.Event()
    call = engine._call

    def held(pipe, batch):
        release.wait(120)
        call(pipe, batch)

    engine._call = held
    try:
        yield
    finally:
        release.set()
        engine._call = call


def image_of(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


@pytest.fixture(scope="module")
def sd(artifacts):
    with running(artifacts("sd"), queue_size=1) as served:
        yield served


def test_an_image_equals_load_plus_the_same_call(sd, artifacts):
    client, _ = sd
    response = client.post(GEN, json={"prompt": "a photo of a cat", "seed": 3, "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data", "output_format", "size", "seed"}
    assert (body["size"], body["output_format"], body["seed"], len(body["data"])) == ("64x64", "png", 3, 1)
    pipe = diffbake.load(artifacts("sd"))
    want = pipe(
        ["a photo of a cat"], height=64, width=64, num_inference_steps=2, generator=[torch.Generator().manual_seed(3)]
    ).images[0]
    np.testing.assert_array_equal(image_of(body["data"][0]["b64_json"]), np.asarray(want))
    # Other formats decode to an image of the same size.
    for fmt in ("jpeg", "webp"):
        response = client.post(GEN, json={"prompt": "a cat", "num_inference_steps": 1, "output_format": fmt})
        assert response.status_code == 200, response.text
        assert image_of(response.json()["data"][0]["b64_json"]).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"prompt": "a cat", "steps": 2},
            400,
            "unknown field(s) 'steps'; this endpoint takes prompt, n, size, "
            "response_format, output_format, output_compression, model, user, negative_prompt, seed, "
            "num_inference_steps, guidance_scale",
        ),
        ({"n": 1}, 400, "'prompt' is required: the text of the image to make"),
        ({"prompt": "a cat", "n": "two"}, 400, "'n' must be an integer, not 'two'"),
        ({"prompt": "a cat", "n": True}, 400, "'n' must be an integer, not True"),
        ({"prompt": 7}, 400, "'prompt' must be a string, not 7"),
        (
            {"prompt": "a cat", "size": "big"},
            400,
            "'size' must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512'), not 'big'",
        ),
        (
            {"prompt": "a cat", "size": "128x64"},
            400,
            "size 128x64 is not what this artifact was compiled for; it "
            "serves 64x64 with n=1 (with guidance); ask for one of those sizes, or rebuild the artifact with "
            "[components.*] shapes for this size",
        ),
        (
            {"prompt": "a cat", "n": 2},
            400,
            "n=2 images at 64x64 is not what this artifact was compiled for; at that "
            "size it makes n in [1] per request (it serves 64x64 with n=1 (with guidance))",
        ),
        (
            {"prompt": "a cat", "guidance_scale": 1.0},
            400,
            "size 64x64 is served only with classifier-free guidance "
            "(guidance_scale > 1); it serves 64x64 with n=1 (with guidance)",
        ),
        (
            {"prompt": "a cat", "response_format": "url"},
            400,
            "response_format 'url' is not supported: this server "
            "keeps no images to link to; ask for 'b64_json' (the default), which returns the image in the response",
        ),
        ({"prompt": "a cat", "output_format": "gif"}, 400, "output_format 'gif' is not one of png, jpeg, webp"),
        (
            {"prompt": "a cat", "num_inference_steps": 0},
            400,
            "'num_inference_steps' must be 1 to 100 on this server, not 0",
        ),
        (
            {"prompt": "a cat", "model": "dall-e-3"},
            404,
            "model 'dall-e-3' is not served here; this server serves 'sd' (GET /v1/models)",
        ),
        (["a cat"], 400, "the request body must be a JSON object with at least 'prompt'"),
    ],
)
def test_a_client_mistake_is_a_4xx_with_the_reason(sd, body, status, message):
    client, _ = sd
    response = client.post(GEN, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"


def test_malformed_json_and_models(sd):
    client, _ = sd
    response = client.post(GEN, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the request body is not valid JSON (")
    models = client.get("/v1/models").json()
    assert models == {
        "object": "list",
        "data": [
            {
                "id": "sd",
                "object": "model",
                "owned_by": "diffbake",
                "pipeline": "StableDiffusionPipeline",
                "dtype": "float32",
                "device": "cpu",
                "sizes": ["64x64 with n=1 (with guidance)"],
            }
        ],
    }
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model": "sd"}


def test_beyond_the_queue_a_429_with_retry_after_and_the_metrics_count_it(sd):
    client, engine = sd
    before = client.get("/metrics").text
    call = {"prompt": "a cat", "num_inference_steps": 2}
    with ThreadPoolExecutor(2) as pool:
        with calls_held(engine):
            running_ = pool.submit(client.post, GEN, json=call)
            wait_until(lambda: engine._running == 1)  # taken by the worker
            queued = pool.submit(client.post, GEN, json=call)
            wait_until(lambda: len(engine._waiting) == 1)  # the queue (size 1) is full
            refused = client.post(GEN, json=call)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["message"].startswith("too many requests: 1 already wait; retry after ")
        assert running_.result().status_code == 200 and queued.result().status_code == 200
    after = client.get("/metrics").text
    for status, more in (("200", 2), ("429", 1)):
        name = f'diffbake_requests_total{{status="{status}"}}'
        was = metric(before, name) if name in before else 0
        assert metric(after, name) - was == more
    assert metric(after, "diffbake_images_total") - metric(before, "diffbake_images_total") == 2
    assert metric(after, "diffbake_queue_depth") == 0


def test_a_queued_request_whose_client_has_gone_is_dropped(sd):
    client, engine = sd
    before = client.get("/metrics").text
    dropped = "diffbake_requests_dropped_total"
    with ThreadPoolExecutor(1) as pool:
        with calls_held(engine):
            first = pool.submit(client.post, GEN, json={"prompt": "a cat", "num_inference_steps": 2})
            wait_until(lambda: engine._running == 1)
            with pytest.raises(httpx.ReadTimeout):
                client.post(GEN, json={"prompt": "gone", "num_inference_steps": 2}, timeout=0.5)
            # The server looks for a gone client every 0.25 s while the request waits.
            wait_until(lambda: not engine._waiting, 10, "the gone client's request to leave the queue")
        assert first.result().status_code == 200
    wait_until(lambda: not engine._waiting and not engine._running)
    after = client.get("/metrics").text
    assert metric(after, dropped) - metric(before, dropped) == 1
    # Only the first request ran: one pipeline call.
    calls = "diffbake_batch_images_count"
    assert metric(after, calls) - metric(before, calls) == 1


def test_concurrent_calls_share_one_copy_of_the_weights(artifacts):
    with running(artifacts("sd"), concurrency=2, warmup=False) as (client, engine):
        call = {"prompt": "a cat", "num_inference_steps": 2}
        with ThreadPoolExecutor(2) as pool:
            with calls_held(engine):
                futures = [pool.submit(client.post, GEN, json={**call, "seed": i}) for i in range(2)]
                wait_until(lambda: engine._running == 2, what="two calls in flight at once")
            assert [f.result().status_code for f in futures] == [200, 200]
        # Two pipelines (one a replica of the other) hold the same compiled modules: no weight copy.
        first, second = engine._replicas
        assert first is not second and first.unet is second.unet and first.vae is second.vae


def test_merged_requests_get_the_images_they_get_alone(artifacts):
    requests = [
        {"prompt": "a photo of a cat", "seed": 5, "size": "48x48", "num_inference_steps": 2},
        {"prompt": "a red dog", "seed": 9, "size": "48x48", "num_inference_steps": 2, "n": 2},
    ]
    with running(artifacts("sd-dynamic"), max_batch=3, max_wait=1.0) as (client, _):
        alone = [client.post(GEN, json=r).json() for r in requests]  # one at a time: nothing to merge with
        before = client.get("/metrics").text
        with ThreadPoolExecutor(2) as pool:
            merged = [f.result().json() for f in [pool.submit(client.post, GEN, json=r) for r in requests]]
        after = client.get("/metrics").text
    # One call of 3 images served both requests.
    assert metric(after, "diffbake_batch_images_count") - metric(before, "diffbake_batch_images_count") == 1
    assert metric(after, "diffbake_batch_images_sum") - metric(before, "diffbake_batch_images_sum") == 3
    for a, m in zip(alone, merged, strict=True):
        assert len(a["data"]) == len(m["data"])
        for x, y in zip(a["data"], m["data"], strict=True):
            difference = np.abs(image_of(x["b64_json"]).astype(int) - image_of(y["b64_json"]).astype(int))
            assert difference.max() <= 1  # batch 1 vs 3 of one compiled variant: float rounding at most


def test_what_only_the_pipeline_can_refuse_is_a_400_too(artifacts):
    with running(artifacts("sd-dynamic"), warmup=False) as (client, _):
        # Inside the compiled range, but not a size diffusers' pipeline takes.
        response = client.post(GEN, json={"prompt": "a cat", "size": "44x44", "num_inference_steps": 1})
        assert response.status_code == 400
        assert response.json()["error"]["message"] == (
            "`height` and `width` have to be divisible by 8 but are 44 and 44."
        )
        models = client.get("/v1/models").json()["data"][0]
        assert models["sizes"] == [
            "64x64 with n=1 (with guidance)",
            "32..96x32..96 with n=1..3 (with guidance)",
            "64x64 with n=1 (guidance_scale <= 1, no negative prompt)",
        ]
        # Without guidance: the no-CFG variant.
        response = client.post(GEN, json={"prompt": "a cat", "guidance_scale": 1.0, "num_inference_steps": 1})
        assert response.status_code == 200, response.text


def test_a_negative_prompt_needs_guidance(artifacts):
    with running(artifacts("flux"), warmup=False) as (client, _):
        response = client.post(GEN, json={"prompt": "a cat", "negative_prompt": "blurry"})
        assert response.status_code == 400
        assert response.json()["error"]["message"] == (
            "'negative_prompt' needs classifier-free guidance, which this artifact was built without; drop it, or "
            "rebuild with a guided variant (cfg = true)"
        )
        response = client.post(GEN, json={"prompt": "a cat", "num_inference_steps": 2, "size": "48x32"})
        assert response.status_code == 200, response.text


def test_an_image_to_image_artifact_is_refused_at_start(artifacts):
    result = CliRunner().invoke(cli, ["serve", str(artifacts("sd-img2img")), "--port", "0"])
    assert result.exit_code == 1
    assert result.output.splitlines()[-2] == (
        f"error: {artifacts('sd-img2img')}: cannot be served: ServeError: sd-img2img: "
        "StableDiffusionImg2ImgPipeline cannot serve /v1/images/generations, which makes images from a prompt "
        "alone (it needs image); serve a text-to-image artifact"
    )


def test_readyz_waits_for_the_load(artifacts, monkeypatch):
    import diffbake.runtime.load

    gate = threading.Event()
    load = diffbake.runtime.load.load

    def slow_load(*args, **kwargs):
        gate.wait(60)
        return load(*args, **kwargs)

    monkeypatch.setattr(diffbake.runtime.load, "load", slow_load)
    try:
        with running(artifacts("sd"), wait=False) as (client, engine):
            assert client.get("/healthz").status_code == 200
            loading = client.get("/readyz")
            assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
            refused = client.post(GEN, json={"prompt": "a cat"})
            assert refused.status_code == 503
            assert refused.json()["error"]["message"] == "the artifact is still loading; retry shortly"
            gate.set()
            wait_until(lambda: engine.ready)
            assert client.get("/readyz").status_code == 200
    finally:
        gate.set()


def test_sigterm_finishes_the_request_in_flight_and_exits_0(artifacts):
    port = free_port()
    cmd = [sys.executable, "-m", "diffbake.cli", "serve", str(artifacts("sd")), "--port", str(port)]
    with server_process(cmd, port) as (proc, client), ThreadPoolExecutor(1) as pool:
        calls = "diffbake_batch_images_count"
        before = metric(client.get("/metrics").text, calls)
        flight = pool.submit(client.post, GEN, json={"prompt": "a cat", "num_inference_steps": 100})
        wait_until(lambda: metric(client.get("/metrics").text, calls) > before, 30, "the call to start")
        proc.send_signal(signal.SIGTERM)
        response = flight.result()
        assert response.status_code == 200
        assert len(response.json()["data"]) == 1
        assert proc.wait(timeout=60) == 0


def test_a_request_without_guidance_runs_what_a_guided_build_of_an_unguided_pipeline_compiled(ldm_artifact):
    # LDMTextToImagePipeline defaults to guidance_scale = 1.0, but its cfg = true artifact compiled only the doubled
    # batch: a request that names no scale runs 7.5, as the build asked (the pipeline's default would be refused).
    with running(ldm_artifact) as (client, _):
        response = client.post(GEN, json={"prompt": "a cat", "seed": 3, "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    want = diffbake.load(ldm_artifact)(
        ["a cat"],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    np.testing.assert_array_equal(image_of(response.json()["data"][0]["b64_json"]), np.asarray(want))
