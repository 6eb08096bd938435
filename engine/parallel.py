"""Parallel context: this rank's place in the tensor- and pipeline-parallel layout, its collectives
and the shard math. At tp_size 1 every collective is the identity (no communication, no copies); a
distributed worker plugs real collectives (torch.distributed) in through the `Collectives` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hal.errors import HalError


class WeightLoadError(HalError):
    """A weight file or tensor is missing, unreadable or misshapen; names the file and tensor."""


class Collectives(Protocol):
    """The three collectives the parallel layers need, over the tensor-parallel group."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over all ranks, returned on every rank."""

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x concatenated along dim in rank order, returned on every rank."""

    def gather(self, x: torch.Tensor, dim: int, dst: int) -> torch.Tensor | None:
        """Every rank's x concatenated along dim in rank order on rank dst; None elsewhere."""


class TensorSource(Protocol):
    """Where weights come from, read one slice at a time so each rank loads only its shard."""

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds tensor `name` (Hugging Face naming)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The full (unsharded) shape of tensor `name`."""

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Tensor `name`, or only its [start, stop) slice along `dim`, on the CPU."""

    def location(self, name: str) -> str:
        """The file holding `name`, for error messages."""


def shard_range(size: int, tp_rank: int, tp_size: int, what: str = "size") -> tuple[int, int]:
    """[start, stop) of rank `tp_rank`'s equal share of `size` rows; size must divide evenly."""
    if size % tp_size:
        raise ValueError(f"{what}: {size} is not divisible by tensor_parallel_size {tp_size}")
    step = size // tp_size
    return tp_rank * step, (tp_rank + 1) * step


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, stop) of the contiguous decoder layers pipeline stage `pp_rank` runs.

    Layers split as evenly as possible; the first num_layers % pp_size stages take one more.
    """
    if not 1 <= pp_size <= num_layers:
        raise ValueError(
            f"pipeline_parallel_size: {pp_size} must lie in 1..{num_layers} (the model has "
            f"{num_layers} layers, and each stage needs at least one)"
        )
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


@dataclass(frozen=True)
class ParallelContext:
    """This process's rank in its tensor-parallel group (rank 0 gathers the logits) and its
    pipeline stage (pp_rank of pp_size; stage 0 embeds, the last stage computes logits)."""

    tp_rank: int = 0
    tp_size: int = 1
    collectives: Collectives | None = None
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size: {self.tp_size} must be >= 1")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank: {self.tp_rank} must lie in 0..{self.tp_size - 1}")
        if self.tp_size > 1 and self.collectives is None:
            raise ValueError(f"collectives: required when tp_size is {self.tp_size} (> 1)")
        if self.pp_size < 1:
            raise ValueError(f"pp_size: {self.pp_size} must be >= 1")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank: {self.pp_rank} must lie in 0..{self.pp_size - 1}")

    @property
    def is_driver(self) -> bool:
        return self.tp_rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_layers(self, num_layers: int) -> tuple[int, int]:
        """[start, stop) of the decoder layers this rank's pipeline stage runs."""
        return stage_layers(num_layers, self.pp_rank, self.pp_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        return self.collectives.all_reduce(x)

    def all_reduce_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        fp8_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...] | None:
        """(rms_norm(h), h) with h = all_reduce(x) + residual in one fused collective (with
        fp8_dtype: (q, scale, h), the norm quantized per token), or None when the collectives
        have no fused path for x (the caller reduces, then norms)."""
        if self.tp_size == 1:
            return None
        fused = getattr(self.collectives, "all_reduce_rms_norm", None)
        return None if fused is None else fused(x, residual, weight, eps, fp8_dtype)

    def ll_push(self, rows: int, cols: int, dtype: torch.dtype):
        """A target for a row-parallel GEMM to write its [rows, cols] partial sum into as the
        next all-reduce's words (the collectives' `ll_push`), or None (TP = 1, or no such path):
        after a launch that pushed (target.done), call mark_pushed(y) before that all-reduce."""
        if self.tp_size == 1:
            return None
        target = getattr(self.collectives, "ll_push", None)
        return None if target is None else target(rows, cols, dtype)

    def mark_pushed(self, y: torch.Tensor) -> None:
        self.collectives.mark_pushed(y)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        return self.collectives.all_gather(x, dim)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's x along dim on the driver; None on the other ranks."""
        if self.tp_size == 1:
            return x
        return self.collectives.gather(x, dim, 0)

    def shard(self, size: int, what: str = "size") -> tuple[int, int]:
        """This rank's [start, stop) of `size` rows split evenly across the group."""
        return shard_range(size, self.tp_rank, self.tp_size, what)

    def num_kv_heads(self, total_kv_heads: int) -> int:
        """KV heads this rank holds: an equal split, or 1 (replicated) when tp_size exceeds them."""
        self._check_kv_split(total_kv_heads)
        return max(1, total_kv_heads // self.tp_size)

    def kv_head_range(self, total_kv_heads: int) -> tuple[int, int]:
        """[start, stop) of the KV heads this rank holds.

        With tp_size > total_kv_heads each KV head is replicated on tp_size / total_kv_heads
        consecutive ranks, so rank r's query heads (an equal split) still read their own KV head.
        """
        self._check_kv_split(total_kv_heads)
        if self.tp_size <= total_kv_heads:
            return shard_range(total_kv_heads, self.tp_rank, self.tp_size, "num_kv_heads")
        head = self.tp_rank // (self.tp_size // total_kv_heads)
        return head, head + 1

    def _check_kv_split(self, total_kv_heads: int) -> None:
        if total_kv_heads % self.tp_size and self.tp_size % total_kv_heads:
            raise ValueError(
                f"num_kv_heads: {total_kv_heads} and tensor_parallel_size {self.tp_size} must "
                "divide one another (split KV heads or replicate them)"
            )


SINGLE = ParallelContext()


def load_tensor(
    param: torch.Tensor,
    source: TensorSource,
    name: str,
    full_shape: tuple[int, ...],
    dim: int | None = None,
    start: int = 0,
    stop: int | None = None,
) -> None:
    """Copy tensor `name` (or its [start, stop) slice along dim) into `param`, checking shapes.

    `full_shape` is the unsharded shape the model expects; a mismatch names the file and tensor.
    """
    actual = tuple(source.shape(name))
    if actual != tuple(full_shape):
        raise WeightLoadError(
            f"{source.location(name)}: tensor {name!r} has shape {list(actual)}, the model "
            f"expects {list(full_shape)}"
        )
    t = source.read(name, dim, start, stop)
    if tuple(t.shape) != tuple(param.shape):
        raise WeightLoadError(
            f"{source.location(name)}: tensor {name!r} slice [{start}:{stop}] along dim {dim} has "
            f"shape {list(t.shape)}, expected {list(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(t)
