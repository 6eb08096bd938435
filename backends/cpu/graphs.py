"""The CPU "graph capture": no graphs, so replay just calls the function eagerly."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hal.backend import GraphRunner


class EagerGraphRunner(GraphRunner):
    """Same interface as a captured CUDA/HIP graph; `replay()` reruns `fn` on the live buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]) -> None:
        if not callable(fn):
            raise ValueError(f"fn: {fn!r} is not callable")
        self.fn = fn

    def replay(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.fn()


def capture_graph(
    fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], pool: object | None = None
) -> EagerGraphRunner:
    """'Capture' `fn`; `pool` is accepted for interface parity and unused (no graph memory)."""
    return EagerGraphRunner(fn)
