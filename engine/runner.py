"""The model runner: owns the KV cache tensors, packs a scheduled step into a ForwardBatch, runs
the model through the backend, and moves blocks (swap, copy-on-write) when the scheduler says so."""

from __future__ import annotations

import logging

import torch

from engine.batch import ForwardBatch
from engine.graphs import DecodeGraphs, graph_reasons
from engine.scheduler import ScheduledSeq, SchedulerOutput
from hal.backend import Backend

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]


class ModelRunner:
    """Runs one step of `model` on `backend` over the paged KV cache it allocates."""

    def __init__(
        self,
        model,
        backend: Backend,
        block_size: int,
        kv_dtype: torch.dtype,
        graph_sizes: tuple[int, ...] = (),
        max_model_len: int | None = None,
    ) -> None:
        """graph_sizes: decode batch sizes to capture in `capture_graphs` (empty: eager only)."""
        self.model = model
        self.backend = backend
        self.device = backend.device
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.kv_caches: list[KVCache] = []
        self.cpu_caches: list[KVCache] = []  # the swap space, when preemption_mode == "swap"
        self.graph_sizes = tuple(graph_sizes)
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.graphs: DecodeGraphs | None = None
        self.graph_skip_reasons: list[str] = []

    # -- memory ------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        shape = self.model.kv_cache_shape(1, self.block_size)
        elems = shape[1] * shape[2] * shape[3]
        itemsize = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * len(self.model.layers) * elems * itemsize

    def allocate(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        """Allocate the per-layer caches: [num_blocks, block_size, num_kv_heads, head_dim]."""
        self.graphs = None  # captures point at the old cache tensors
        shape = self.model.kv_cache_shape(num_blocks, self.block_size)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
            )
            for _ in self.model.layers
        ]
        if num_cpu_blocks:
            cpu_shape = self.model.kv_cache_shape(num_cpu_blocks, self.block_size)
            pin = self.device.type != "cpu"  # pinned host memory for async copies to a device
            self.cpu_caches = [
                (
                    torch.zeros(cpu_shape, dtype=self.kv_dtype, pin_memory=pin),
                    torch.zeros(cpu_shape, dtype=self.kv_dtype, pin_memory=pin),
                )
                for _ in self.model.layers
            ]

    # -- graphs ---------------------------------------------------------------------------------
    def graph_reasons(self, allow_eager: bool = False) -> list[str]:
        """Why this runner replays no graphs (empty: `capture_graphs` will capture)."""
        if not self.graph_sizes:
            return ["graphs off (enforce_eager, or no sizes to capture)"]
        reasons = [] if allow_eager else graph_reasons(self.backend)
        if self.model.embed_tokens is None or self.model.norm is None:
            reasons.append("pipeline stages run eagerly (activations cross ranks mid-step)")
        return reasons

    def capture_graphs(self, allow_eager: bool = False) -> int:
        """Capture the decode buckets over the allocated KV cache; returns the bytes they took.

        allow_eager "captures" on a backend without graphs or with a host-syncing attention
        (replay then runs eagerly): tests of the static-buffer logic on CPU."""
        self.graphs = None
        self.graph_skip_reasons = self.graph_reasons(allow_eager)
        if self.graph_skip_reasons:
            logger.info("decode graphs: off (%s)", "; ".join(self.graph_skip_reasons))
            return 0
        if not self.kv_caches:
            raise RuntimeError("capture_graphs: allocate the KV cache first")
        max_blocks = -(-self.max_model_len // self.block_size)
        graphs = DecodeGraphs(
            self.model, self.backend, self.kv_caches, self.graph_sizes, max_blocks,
            self.max_model_len,
        )  # fmt: skip
        with torch.inference_mode():
            stats = graphs.capture()
        self.graphs = graphs
        return stats.pool_bytes

    def forward(
        self, batch: ForwardBatch, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        """The model over `batch`: a graph replay for a decode step fitting a bucket, else eager."""
        if self.graphs is not None and intermediate is None:
            b = self.graphs.bucket(batch)
            if b is not None:
                return self.graphs.run(batch, b)
        return self.model(batch, self.kv_caches, intermediate)

    # -- block moves ----------------------------------------------------------------------------
    def apply_block_moves(self, out: SchedulerOutput) -> None:
        """Swap out, swap in, then copy-on-write copies, in the scheduler's documented order."""
        if out.blocks_to_swap_out:
            src = torch.tensor([g for g, _ in out.blocks_to_swap_out], device=self.device)
            dst = torch.tensor([c for _, c in out.blocks_to_swap_out])
            for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_caches, strict=False):
                ck[dst] = k[src].to("cpu")
                cv[dst] = v[src].to("cpu")
        if out.blocks_to_swap_in:
            src = torch.tensor([c for c, _ in out.blocks_to_swap_in])
            dst = torch.tensor([g for _, g in out.blocks_to_swap_in], device=self.device)
            for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_caches, strict=False):
                k[dst] = ck[src].to(self.device)
                v[dst] = cv[src].to(self.device)
        if out.blocks_to_copy:
            src = torch.tensor([s for s, _ in out.blocks_to_copy], device=self.device)
            dst = torch.tensor([d for _, d in out.blocks_to_copy], device=self.device)
            caches = [t for kv in self.kv_caches for t in kv]
            self.backend.copy_blocks(caches, src, dst)

    # -- one step -------------------------------------------------------------------------------
    def build_batch(self, scheduled: list[ScheduledSeq]) -> ForwardBatch:
        """Pack the scheduled sequences, in order, into the attention op's layout."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        max_blocks = max(len(s.block_table) for s in scheduled)
        tables = torch.zeros((len(scheduled), max_blocks), dtype=torch.int32)
        for i, s in enumerate(scheduled):
            input_ids += s.token_ids
            positions += s.positions
            slots += s.slot_mapping
            qsl.append(qsl[-1] + s.num_new_tokens)
            seq_lens.append(s.seq_len)
            tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
            if s.samples:
                logits_indices.append(qsl[-1] - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
            max_query_len=max(s.num_new_tokens for s in scheduled),
            max_seq_len=max(seq_lens),
        )
        return batch if self.device.type == "cpu" else batch.to(self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Run the step; returns fp32 logits [num_sampling_seqs, vocab] in schedule order."""
        self.apply_block_moves(out)
        if not out.scheduled:
            return None
        batch = self.build_batch(out.scheduled)
        hidden = self.forward(batch)  # [num_tokens, hidden]
        if batch.logits_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden[batch.logits_indices])
