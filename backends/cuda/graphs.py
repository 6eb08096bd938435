"""CUDA graph capture of one step on static buffers, replayed with `GraphRunner.replay()`.

Code in this file may assume CUDA. The step is warmed up on a side stream first (so lazy
initialisation such as cuBLAS workspaces and autotuning happens outside the capture), then
captured, optionally into a memory pool shared with other captures (batch-size buckets).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from hal.backend import GraphRunner

logger = logging.getLogger(__name__)

StepFn = Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]


class CudaGraphRunner(GraphRunner):
    """A captured step. Inputs are the tensors `fn` closes over: copy new values into them, then
    `replay()`; it returns the static outputs (overwritten by the next replay)."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, outputs: torch.Tensor | tuple[torch.Tensor, ...]
    ):
        self.graph = graph
        self.outputs = outputs

    @property
    def pool(self) -> object:
        """This capture's memory pool handle, to share with the next capture (`pool=`)."""
        return self.graph.pool()

    def replay(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


def new_pool() -> object:
    """A fresh graph memory pool handle that several captures can share."""
    return torch.cuda.graph_pool_handle()


def capture_graph(fn: StepFn, pool: object | None = None, warmup: int = 2) -> CudaGraphRunner:
    """Warm `fn` up on a side stream, then capture it in a CUDA graph (into `pool` if given).

    `fn` must read only static tensors and must not synchronise with the host.
    """
    if not callable(fn):
        raise ValueError(f"fn: {fn!r} is not callable")
    if warmup < 1:
        raise ValueError(
            f"warmup: {warmup} must be >= 1 (lazy initialisation must not be captured)"
        )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    logger.debug("captured a CUDA graph (pool %s)", "shared" if pool is not None else "private")
    return CudaGraphRunner(graph, outputs)
