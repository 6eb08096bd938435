"""Zeroed int32 counters for kernels whose last program to finish a unit of work does the
combining itself (today the GEMV's split-K sum, `backends.triton.gemv`): each program adds one
with release-acquire order, the one that brings the count to the total combines, then stores zero
again, so every launch and every CUDA-graph replay finds them zero. One buffer per device; its
users run one after another on a stream (one stream per device at a time, as the engine runs).
(The decode attention tried the same for its KV splits and dropped it: slower than its combine
kernel on an H100, docs/benchmarks.md, ninth session.)"""

from __future__ import annotations

import torch

MIN_COUNTERS = 1 << 16  # allocated at once (256 KiB of int32 per device)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Buffers replaced by larger ones stay allocated: CUDA graphs captured earlier hold their address.
_RETIRED: list[torch.Tensor] = []


def tile_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """The device's zeroed counters (at least `count`), or None when they would have to grow
    during a CUDA graph capture (the caller then launches its separate combine kernel)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(count, 2 * buf.numel() if buf is not None else MIN_COUNTERS),
                          dtype=torch.int32, device=device)  # fmt: skip
        _COUNTERS[device] = buf
    return buf
