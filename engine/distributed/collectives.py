"""The world layout (tensor x pipeline ranks), process-group set-up and torch.distributed-backed
collectives: all-reduce/gather inside a tensor-parallel group, send/recv between pipeline stages."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel import stage_layers
from hal.capabilities import Capabilities

logger = logging.getLogger(__name__)


def collective_backend(caps: Capabilities) -> str:
    """The torch.distributed backend for a platform: "nccl" on CUDA and on ROCm (where torch's
    "nccl" is RCCL), "gloo" on the CPU."""
    return caps.collective_backend


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


# Opt-in, not yet measured on GPUs: "1" routes decode-sized all-reduces through SymmMemAllReduce.
SYMM_MEM_ENV = "ENGINE_SYMM_MEM_ALLREDUCE"
SYMM_MEM_MAX_BYTES = 1 << 20  # decode steps reduce tokens x hidden bf16: 8 KiB per token at 4096


class SymmMemAllReduce:
    """A one-shot all-reduce over torch symmetric memory (`torch.distributed._symmetric_memory`):
    each rank copies its tensor into a buffer every peer can read over NVLink and sums all of
    them (`torch.ops.symm_mem.one_shot_all_reduce`); no NVLink multicast needed. Latency-bound
    decode all-reduces (NCCL: ~13 us per 8 KiB in a CUDA graph on H100s) are what it is for;
    tensors over max_bytes or of another dtype return None (the caller uses NCCL)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        max_bytes: int = SYMM_MEM_MAX_BYTES,
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        pg = group if group is not None else dist.group.WORLD
        self.group_name = pg.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.8
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        n = x.numel()
        if x.dtype != self.dtype or n > self.max_numel or n == 0:
            return None
        staged = self.buffer[:n]
        staged.copy_(x.reshape(-1))
        out = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
        return out.view(x.shape)


class TorchCollectives:
    """`engine.parallel.Collectives` over one torch.distributed group (a stage's TP ranks).

    symm: an optional SymmMemAllReduce that takes the all-reduces it can (small bf16 tensors)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        ranks: list[int],
        symm: SymmMemAllReduce | None = None,
    ) -> None:
        self.group = group
        self.ranks = ranks  # global ranks of the group, in tp_rank order
        self.rank_in_group = ranks.index(dist.get_rank())
        self.symm = symm

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group; reduces in place when x is contiguous (callers pass temporaries)."""
        if self.symm is not None:
            y = self.symm(x)
            if y is not None:
                return y
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

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
            mine = TorchCollectives(group, ranks, _symm_mem(group, backend))
    return mine


def _symm_mem(group: dist.ProcessGroup | None, backend: str) -> SymmMemAllReduce | None:
    """SymmMemAllReduce when ENGINE_SYMM_MEM_ALLREDUCE=1 on NCCL over CUDA devices, else None
    (a set-up failure is logged and leaves NCCL in charge)."""
    if os.environ.get(SYMM_MEM_ENV, "") != "1":
        return None
    if backend != "nccl" or not torch.cuda.is_available():
        logger.warning("%s=1 ignored: symmetric memory needs NCCL on CUDA devices", SYMM_MEM_ENV)
        return None
    try:
        symm = SymmMemAllReduce(group, torch.device("cuda", torch.cuda.current_device()))
    except Exception as exc:  # noqa: BLE001 - any set-up failure falls back to NCCL, logged
        logger.warning("%s=1: symmetric memory set-up failed (%s: %s); using NCCL",
                       SYMM_MEM_ENV, type(exc).__name__, exc)  # fmt: skip
        return None
    logger.info("all-reduce: one-shot over symmetric memory up to %d bytes, NCCL above",
                symm.max_numel * symm.dtype.itemsize)  # fmt: skip
    return symm
