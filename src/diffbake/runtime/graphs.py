"""CUDA graphs for static-shape variants: launch overhead paid once per shape, not once per kernel and step."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


class GraphReplay:
    """CUDA graphs of one static-shape variant: launch overhead paid once per shape, not once per kernel and step.

    The first call at a shape runs as is (lazy initialization, allocator warm-up); the second captures a graph
    after a warm-up on a side stream and checks that the graph's output equals an uncaptured run's on the same
    inputs; every later call copies its inputs into the graph's buffers, replays it, and returns a copy of its
    output buffers (the next replay overwrites it). A capture that fails or disagrees turns graphs off for the
    variant, with a warning, rather than serving different numbers.
    """

    def __init__(self, run: Callable[..., list[torch.Tensor]], device: torch.device, label: str):
        """``run``: the package's runner; ``label``: the variant, as warnings name it."""
        self.run, self.device, self.label = run, device, label
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], Any]] = {}
        self.off: str | None = None
        # Replicas share this object; a graph has one set of buffers, so replays take turns.
        self.lock = threading.Lock()

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock:
            return self._call(tensors)

    def _call(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        run = self.run
        if self.off is not None:
            return list(run(*tensors))
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:
                self.seen.add(key)
                return list(run(*tensors))
            graph = self._capture(key, tensors)
            if graph is None:
                return list(run(*tensors))
        inputs, outputs, cuda_graph = graph
        for buffer, t in zip(inputs, tensors, strict=True):
            buffer.copy_(t)
        cuda_graph.replay()
        return [o.clone() for o in outputs]

    def _capture(self, key: tuple, tensors: list[torch.Tensor]) -> tuple | None:
        run, device = self.run, self.device
        inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    expected = [o.clone() for o in run(*inputs)]
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = list(run(*inputs))
            graph.replay()
            torch.cuda.synchronize(device)
        except Exception as e:  # capture is refused for many reasons (a host sync, an unsupported op)
            return self._turn_off(f"capture failed ({type(e).__name__}: {e})")
        for output, want in zip(outputs, expected, strict=True):
            error = (output.float() - want.float()).abs().max().item()
            bound = 1e-3 * want.float().abs().max().item() + 1e-5
            if not error <= bound:
                return self._turn_off(f"the captured graph's output differs from an uncaptured run by {error:.3g}")
        self.graphs[key] = (inputs, outputs, graph)
        return self.graphs[key]

    def _turn_off(self, why: str) -> None:
        self.off = why
        logger.warning("CUDA graphs off for %s: %s", self.label, why)
        return None
