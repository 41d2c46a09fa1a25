"""Helpers for tests that start servers on 127.0.0.1: a free port, bounded waits, and a child process that is
always gone when the test ends."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def server_process(
    cmd: list[str], port: int, timeout: float = 180, **popen
) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """Run ``cmd`` (a server on ``port``) until /readyz says ready; yield it and a client; kill it if still alive."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_until(lambda: proc.poll() is not None or ready(client), timeout, "the server to be ready")
            assert proc.poll() is None, f"the server exited with {proc.returncode}: {proc.communicate()[1][-2000:]}"
            yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
