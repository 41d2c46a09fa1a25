"""Load benchmark of `diffbake serve`: images per second and p50/p99 latency under a bounded client.

For each server setup (one process; one process with micro-batching; Ray Serve with two replicas) the server is
started on 127.0.0.1, waited for until ready, sent ``--requests`` requests at each client concurrency, and stopped
with SIGTERM. Every figure comes from one run on this machine: compare them as ratios.

    python benchmarks/serve_load.py artifacts/tiny-sd-serve --requests 200 --concurrency 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

SETUPS = {
    "one process": [],
    "one process + micro-batching": ["--max-batch", "4", "--max-wait-ms", "25"],
    # Merges only what queued while a call ran: no added wait when the server is idle.
    "one process + micro-batching, no wait": ["--max-batch", "4", "--max-wait-ms", "0"],
    "Ray Serve x2 replicas": ["--ray", "--replicas", "2", "--num-cpus", "1"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(artifact: str, flags: list[str], queue: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "diffbake.cli", "serve", artifact, "--port", str(port), "--queue-size", str(queue)]
    proc = subprocess.Popen([*cmd, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd + flags)}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server was not ready within 300 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def _load(url: str, requests: int, concurrency: int, steps: int) -> dict:
    body = {"prompt": "a photo of a cat", "num_inference_steps": steps}
    latencies: list[float] = []
    failures: dict[int, int] = {}

    def one(i: int) -> None:
        start = time.perf_counter()
        response = client.post("/v1/images/generations", json={**body, "seed": i})
        if response.status_code == 200:
            latencies.append(time.perf_counter() - start)
        else:
            failures[response.status_code] = failures.get(response.status_code, 0) + 1

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else 0.0

    return {
        "concurrency": concurrency,
        "images_per_s": round(len(latencies) / wall, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "failed": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--setups", default="|".join(SETUPS), help="separated by '|', of: " + "; ".join(SETUPS))
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    report = {
        "artifact": args.artifact,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "requests": args.requests,
        "steps": args.steps,
        "setups": {},
    }
    for name in args.setups.split("|"):
        proc, url = _start(args.artifact, SETUPS[name], queue=max(levels) * 2)
        try:
            report["setups"][name] = [_load(url, args.requests, c, args.steps) for c in levels]
        finally:
            _stop(proc)
        for row in report["setups"][name]:
            print(
                f"{name:30s} c={row['concurrency']}: {row['images_per_s']:6.2f} img/s  p50 {row['p50_ms']:8.1f} ms  "
                f"p99 {row['p99_ms']:8.1f} ms  failed {row['failed']}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
