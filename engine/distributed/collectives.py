"""The world layout (tensor x pipeline ranks), process-group set-up and torch.distributed-backed
collectives: all-reduce/gather inside a tensor-parallel group, send/recv between pipeline stages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel import stage_layers
from hal.capabilities import Capabilities

logger = logging.getLogger(__name__)


def collective_backend(caps: Capabilities, device: str = "auto") -> str:
    """The torch.distributed backend for a platform: "nccl" on CUDA and on ROCm (where torch's
    "nccl" is RCCL), "gloo" on the CPU, and for ranks told to run on the CPU (device="cpu") on
    any platform."""
    return "gloo" if device == "cpu" else caps.collective_backend


@dataclass(frozen=True)
class WorldLayout:
    """tp_size x pp_size ranks; global rank = pp_rank * tp_size + tp_rank.

    Each pipeline stage is one tensor-parallel group of consecutive ranks; activations flow from a
    rank to the rank with the same tp_rank in the next stage. Logits come out of the last stage's
    tp rank 0 (the output rank).
    """

    tp_size: int = 1
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(pp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank: {rank} must lie in 0..{self.world_size - 1}")
        return divmod(rank, self.tp_size)

    def tp_group_ranks(self, pp_rank: int) -> list[int]:
        return [self.rank_of(pp_rank, t) for t in range(self.tp_size)]

    @property
    def output_rank(self) -> int:
        return self.rank_of(self.pp_size - 1, 0)

    def describe(self, num_layers: int, backend: str) -> list[str]:
        """One line for the world, one per pipeline stage (its layers and ranks)."""
        lines = [
            f"parallel layout: world {self.world_size} = tensor_parallel {self.tp_size} x "
            f"pipeline_parallel {self.pp_size}, collectives {backend}"
        ]
        for p in range(self.pp_size):
            start, stop = stage_layers(num_layers, p, self.pp_size)
            ranks = ", ".join(str(r) for r in self.tp_group_ranks(p))
            lines.append(f"  stage {p}: layers {start}..{stop - 1} on ranks {ranks}")
        return lines


class TorchCollectives:
    """`engine.parallel.Collectives` over one torch.distributed group (a stage's TP ranks)."""

    def __init__(self, group: dist.ProcessGroup | None, ranks: list[int], oneshot=None) -> None:
        self.group = group
        self.ranks = ranks  # global ranks of the group, in tp_rank order
        self.rank_in_group = ranks.index(dist.get_rank())
        # the backend's one-shot all-reduce (`engine.distributed.oneshot.build_workspace`: NVIDIA
        # GPUs with peer access), set by the worker once its backend is loaded; or None
        self.oneshot = oneshot

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group: the one-shot kernel for tensors that fit its buffer while a CUDA
        graph is captured, NCCL (or gloo) otherwise, in place when x is contiguous (callers pass
        temporaries)."""
        if self._oneshot_serves(x):
            return self.oneshot.all_reduce(x)
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        fp8_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...] | None:
        """(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual) in one launch of the
        one-shot kernel (with fp8_dtype: the norm quantized per token, (q, scale, h)), or None
        when it does not serve x (the caller reduces, then norms)."""
        if not self._oneshot_serves(x) or residual.dtype != x.dtype:
            return None
        if fp8_dtype is not None and x.dim() != 2:
            return None
        return self.oneshot.all_reduce_rms_norm(x, residual, weight, eps, fp8_dtype)

    def ll_push(self, rows: int, cols: int, dtype: torch.dtype):
        """Where a row-parallel GEMM may write its [rows, cols] partial sum as the words of the
        one-shot all-reduce that reduces it next (`OneShotWorkspace.ll_push`), or None: only
        while a CUDA graph is captured (when that all-reduce is the one-shot kernel)."""
        if self.oneshot is None or not torch.cuda.is_current_stream_capturing():
            return None
        target = getattr(self.oneshot, "ll_push", None)
        return None if target is None else target(rows, cols, dtype)

    def mark_pushed(self, y: torch.Tensor) -> None:
        """y went out through an `ll_push` target: the next all-reduce, on y, only collects."""
        self.oneshot.mark_pushed(y)

    def _oneshot_serves(self, x: torch.Tensor) -> bool:
        # Graph capture only: eager, a Triton launch from Python costs more than NCCL's call
        # (engine.distributed.oneshot). Every rank captures the same graphs, so all agree.
        return (
            self.oneshot is not None
            and torch.cuda.is_current_stream_capturing()
            and self.oneshot.fits(x)
        )

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in self.ranks]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """x of group rank src, in place on every rank (x contiguous, the same shape on all)."""
        dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def gather(self, x: torch.Tensor, dim: int, dst: int) -> torch.Tensor | None:
        x = x.contiguous()
        if self.rank_in_group != dst:
            dist.gather(x, None, dst=self.ranks[dst], group=self.group)
            return None
        parts = [torch.empty_like(x) for _ in self.ranks]
        dist.gather(x, parts, dst=self.ranks[dst], group=self.group)
        return torch.cat(parts, dim)


class PipelineChannel:
    """Moves a stage's (hidden, residual) to the next stage: one [2, num_tokens, hidden] tensor."""

    def __init__(self, layout: WorldLayout, rank: int) -> None:
        pp_rank, tp_rank = layout.coords(rank)
        self.prev_rank = layout.rank_of(pp_rank - 1, tp_rank) if pp_rank > 0 else None
        self.next_rank = (
            layout.rank_of(pp_rank + 1, tp_rank) if pp_rank < layout.pp_size - 1 else None
        )

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        dist.send(torch.stack([hidden, residual]).contiguous(), dst=self.next_rank)

    def recv(
        self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
        dist.recv(buf, src=self.prev_rank)
        return buf[0], buf[1]


def init_world(
    layout: WorldLayout,
    rank: int,
    backend: str,
    master_addr: str,
    master_port: int,
    timeout_s: float,
) -> TorchCollectives | None:
    """Join the world (rank 0 hosts the rendezvous store) and build every stage's TP group.

    Every rank creates every group, in the same order, as torch.distributed requires. Returns this
    rank's TP collectives, or None at tp_size 1. A rank missing after timeout_s raises here.
    """
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=layout.world_size,
        timeout=timeout,
    )
    if layout.tp_size == 1:
        return None
    pp_rank, _ = layout.coords(rank)
    mine = None
    for p in range(layout.pp_size):
        ranks = layout.tp_group_ranks(p)
        group = None if layout.pp_size == 1 else dist.new_group(ranks, timeout=timeout)
        if p == pp_rank:
            mine = TorchCollectives(group, ranks)
    return mine
