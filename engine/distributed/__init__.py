"""Distributed inference: tensor x pipeline parallel ranks in worker processes (one per device),
driven by executors; the scheduler and KV-cache manager stay on the driver."""

from __future__ import annotations

from hal.errors import HalError


class DistributedError(HalError):
    """A worker died, stopped answering, or the world could not form; names the rank and why."""


__all__ = ["DistributedError"]
