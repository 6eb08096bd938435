"""The memory plan: weights, activation peak, graph pools and KV blocks, logged as a table."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import num_blocks_for_budget

logger = logging.getLogger(__name__)

MiB = float(1 << 20)
FREE_HEADROOM_BYTES = 512 << 20


@dataclass
class MemoryPlan:
    """Bytes per use on the engine's device, and the KV pool they leave room for."""

    device: str
    total_bytes: int  # device memory the plan may use (budget), 0 on CPU
    weight_bytes: int
    activation_peak_bytes: int | None  # None: not measured (CPU)
    graph_pool_bytes: int
    kv_bytes: int
    num_blocks: int
    block_size: int
    num_cpu_blocks: int = 0
    # The part of graph_pool_bytes reserved for the mixed-step graphs, and whether the plan
    # dropped them (they would have left the KV cache less than min_kv_tokens)
    mixed_graph_bytes: int = 0
    mixed_graphs_dropped: bool = False

    @property
    def kv_tokens(self) -> int:
        # Block 0 is the reserved null block.
        return (self.num_blocks - 1) * self.block_size

    def table(self) -> str:
        act = "n/a (not measured on CPU)"
        if self.activation_peak_bytes is not None:
            act = f"{self.activation_peak_bytes / MiB:10.1f} MiB"
        rows = [
            ("weights", f"{self.weight_bytes / MiB:10.1f} MiB"),
            ("activation peak", act),
            ("graph pools", f"{self.graph_pool_bytes / MiB:10.1f} MiB"),
            (
                "KV cache",
                f"{self.kv_bytes / MiB:10.1f} MiB  {self.num_blocks} blocks x {self.block_size}"
                f" = {self.kv_tokens} tokens",
            ),
        ]
        if self.num_cpu_blocks:
            rows.append(("CPU swap space", f"{self.num_cpu_blocks} blocks"))
        if self.total_bytes:
            rows.append(("budget", f"{self.total_bytes / MiB:10.1f} MiB"))
        width = max(len(r[0]) for r in rows)
        lines = [f"memory plan ({self.device}):"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue  # tied embeddings count once
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def plan_cpu(
    model: torch.nn.Module, block_bytes: int, block_size: int, kv_budget_bytes: int
) -> MemoryPlan:
    """On CPU the KV cache gets an explicit budget (kv_cache_memory_bytes)."""
    num_blocks = num_blocks_for_budget(kv_budget_bytes, block_bytes)
    return MemoryPlan(
        device="cpu",
        total_bytes=0,
        weight_bytes=weight_bytes(model),
        activation_peak_bytes=None,
        graph_pool_bytes=0,
        kv_bytes=num_blocks * block_bytes,
        num_blocks=num_blocks,
        block_size=block_size,
    )


def plan_gpu(
    model: torch.nn.Module,
    device: torch.device,
    block_bytes: int,
    block_size: int,
    utilization: float,
    activation_peak_bytes: int,
    graph_pool_bytes: int = 0,
    mixed_graph_bytes: int = 0,
    min_kv_tokens: int = 0,
) -> MemoryPlan:
    """KV gets what is left of utilization x device memory after weights, peak and graphs.

    mixed_graph_bytes (part of graph_pool_bytes) is the mixed-step graphs' reserve: they are
    an optimisation, so when keeping them would leave the KV cache less than min_kv_tokens
    tokens (or no room at all) the plan drops them (its mixed_graph_bytes is then 0, and the
    caller must not capture them)."""
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * utilization)
    weights = weight_bytes(model)

    def kv_left(graphs: int) -> int:
        left = budget - weights - activation_peak_bytes - graphs
        # Weights are resident and the profiling peak was released: other processes (or
        # engines) on the same device hold the rest of what is not free, so never plan past
        # what is free now, less a headroom for allocator fragmentation and library workspaces
        # (cuBLAS, NCCL).
        return min(left, free - FREE_HEADROOM_BYTES - activation_peak_bytes - graphs)

    left = kv_left(graph_pool_bytes)
    dropped = False
    if mixed_graph_bytes:
        tokens = (max(left, 0) // block_bytes - 1) * block_size  # block 0 is the null block
        if left < 2 * block_bytes or tokens < min_kv_tokens:
            logger.warning(
                "mixed-step graphs off: their %.0f MiB would leave the KV cache %d tokens "
                "(fewer than %d); steps with prefill tokens run eagerly",
                mixed_graph_bytes / MiB, max(tokens, 0), min_kv_tokens,
            )  # fmt: skip
            graph_pool_bytes -= mixed_graph_bytes
            mixed_graph_bytes, dropped = 0, True
            left = kv_left(graph_pool_bytes)
    if left < 2 * block_bytes:
        raise MemoryError(
            f"no room for the KV cache: budget {budget / MiB:.0f} MiB (gpu_memory_utilization="
            f"{utilization}) - weights {weights / MiB:.0f} MiB - activation peak "
            f"{activation_peak_bytes / MiB:.0f} MiB leaves {max(left, 0) / MiB:.0f} MiB; raise "
            f"gpu_memory_utilization, lower max_num_batched_tokens or use a smaller dtype"
        )
    num_blocks = num_blocks_for_budget(left, block_bytes)
    return MemoryPlan(
        device=str(device),
        total_bytes=budget,
        weight_bytes=weights,
        activation_peak_bytes=activation_peak_bytes,
        graph_pool_bytes=graph_pool_bytes,
        kv_bytes=num_blocks * block_bytes,
        num_blocks=num_blocks,
        block_size=block_size,
        mixed_graph_bytes=mixed_graph_bytes,
        mixed_graphs_dropped=dropped,
    )
