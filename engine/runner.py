"""The model runner: owns the KV cache tensors, packs a scheduled step into a ForwardBatch, runs
the model through the backend, and moves blocks (swap, copy-on-write) when the scheduler says so."""

from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass

import numpy as np
import torch

from engine.batch import ForwardBatch
from engine.graphs import (
    DecodeGraphs,
    MixedGraphs,
    context_hints,
    graph_pool_estimate,
    graph_reasons,
)
from engine.pooling import pooled_rows
from engine.sampler import PromptRows, logprob_lists, logprob_tensors
from engine.scheduler import ScheduledSeq, SchedulerOutput
from hal.backend import Backend

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]

# What pack_step reads of each scheduled entry (a ScheduledSeq; block_ids an int32 array).
_SCHEDULED_FIELDS = operator.attrgetter(
    "num_new_tokens", "start_pos", "num_samples", "block_ids", "token_ids", "slot_mapping", "draft"
)
_ALIGN = 16  # bytes: each field of a packed batch starts aligned (Triton specializes on it)


class _Layout:
    """Where each ForwardBatch field sits in one packed byte buffer: int64 input_ids, positions,
    slot_mapping [num_tokens] and logits_indices [num_rows]; int32 query_start_loc [n + 1],
    seq_lens [n] and block_tables [n, width]."""

    def __init__(self, num_tokens: int, num_rows: int, n: int, width: int) -> None:
        self.sizes = (num_tokens, num_rows, n, width)
        fields = (
            ("input_ids", np.int64, (num_tokens,)),
            ("positions", np.int64, (num_tokens,)),
            ("slot_mapping", np.int64, (num_tokens,)),
            ("logits_indices", np.int64, (num_rows,)),
            ("query_start_loc", np.int32, (n + 1,)),
            ("seq_lens", np.int32, (n,)),
            ("block_tables", np.int32, (n, width)),
        )
        self.fields = []
        offset = 0
        for name, dtype, shape in fields:
            count = shape[0] if len(shape) == 1 else shape[0] * shape[1]
            nbytes = count * (8 if dtype is np.int64 else 4)
            self.fields.append((name, dtype, shape, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = max(offset, _ALIGN)

    def __reduce__(self):
        return (_Layout, self.sizes)

    def numpy_views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        return {
            name: buf[off : off + nbytes].view(dtype).reshape(shape)
            for name, dtype, shape, off, nbytes in self.fields
        }

    def batch(self, buf: torch.Tensor, max_query_len: int, max_seq_len: int) -> ForwardBatch:
        tdtype = {np.int64: torch.int64, np.int32: torch.int32}
        views = {
            name: buf[off : off + nbytes].view(tdtype[dtype]).view(shape)
            for name, dtype, shape, off, nbytes in self.fields
        }
        return ForwardBatch(**views, max_query_len=max_query_len, max_seq_len=max_seq_len)


@dataclass
class _Staging:
    """A reusable host buffer for batches bound to a device, and the copy that last read it."""

    buffer: torch.Tensor | None = None
    event: object | None = None  # torch.cuda.Event recorded after the copy
    pinned: bool = False


@dataclass
class TokenFeed:
    """Input ids that live on the device: token i of a decode-only batch is tokens[rows[i]]
    (the previous step's samples, at the rows of the sequences that go on)."""

    tokens: torch.Tensor  # int64 [num_sampled]
    rows: list[int]

    def write(self, input_ids: torch.Tensor) -> None:
        if len(self.rows) != input_ids.shape[0]:
            raise ValueError(f"token feed: {len(self.rows)} rows for {input_ids.shape[0]} inputs")
        if self.rows == list(range(self.tokens.shape[0])):  # every sequence goes on, in order
            input_ids.copy_(self.tokens)
            return
        idx = torch.tensor(self.rows, dtype=torch.int64, pin_memory=input_ids.is_cuda)
        idx = idx.to(input_ids.device, non_blocking=True)
        torch.index_select(self.tokens, 0, idx, out=input_ids)


def sampled_rows(hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """The hidden rows whose tokens sample ([num_sampling, hidden]); when every token samples
    (decode-only steps) that is all of them, in order, so no gather is launched."""
    if batch.logits_indices.shape[0] == hidden.shape[0]:
        return hidden
    return hidden[batch.logits_indices]


@dataclass
class PackedStep:
    """One step's batch fields packed in the `_Layout` of its sizes (`pack_step`): what the
    driver of a distributed engine sends the ranks instead of per-sequence objects."""

    layout: _Layout
    buffer: torch.Tensor | bytes  # uint8 host tensor where packed, its bytes once sent
    max_query_len: int
    max_seq_len: int

    def __reduce__(self):  # ship the bytes (a pinned or shared tensor would not travel as such)
        data = self.buffer
        if isinstance(data, torch.Tensor):
            data = data.numpy().tobytes()
        return (PackedStep, (self.layout, data, self.max_query_len, self.max_seq_len))


def pack_step(scheduled, host_buffer=None) -> PackedStep:
    """Pack scheduled sequences (ScheduledSeq, in order) into one host buffer: input ids, slot
    mapping, positions, query_start_loc, seq_lens, logits rows and block tables.
    host_buffer(nbytes) gives the uint8 tensor to fill (default: a fresh CPU one)."""
    n = len(scheduled)
    if n == 0:
        raise ValueError("pack_step: no scheduled sequences")
    # Fields of all entries at once (attrgetter and zip run in C, not per entry in Python).
    fields = zip(*map(_SCHEDULED_FIELDS, scheduled), strict=True)
    num_new_t, start_t, samples_t, tables, token_ids, slot_mapping, drafts = fields
    num_new = np.array(num_new_t, dtype=np.int64)
    seq_lens = np.array(start_t, dtype=np.int64) + num_new
    samples = np.array(samples_t, dtype=np.int64) > 0
    table_lens = np.fromiter(map(len, tables), np.int64, n)
    num_tokens = int(num_new.sum())
    width = int(table_lens.max())
    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(num_new, out=qsl[1:])
    num_rows = int(samples.sum())
    # Speculative steps: a sampling sequence with d drafts has d + 1 logits rows, its last.
    rows_each = None
    if any(drafts):
        rows_each = samples * (1 + np.fromiter(map(len, drafts), np.int64, n))
        num_rows = int(rows_each.sum())

    layout = _Layout(num_tokens, num_rows, n, width)
    if host_buffer is None:
        host = torch.empty(layout.nbytes, dtype=torch.uint8)
    else:
        host = host_buffer(layout.nbytes)
    views = layout.numpy_views(host.numpy())
    chain = itertools.chain.from_iterable
    views["input_ids"][:] = np.fromiter(chain(token_ids), np.int64, num_tokens)
    views["slot_mapping"][:] = np.fromiter(chain(slot_mapping), np.int64, num_tokens)
    if num_tokens == n:  # decode-only: one token each, at position seq_len - 1
        views["positions"][:] = seq_lens - 1
    else:
        # positions: start_pos + 0..num_new-1 per sequence, start_pos = seq_len - num_new
        offsets = np.repeat(seq_lens - num_new - qsl[:-1], num_new)
        views["positions"][:] = np.arange(num_tokens, dtype=np.int64) + offsets
    views["query_start_loc"][:] = qsl
    views["seq_lens"][:] = seq_lens
    if rows_each is None:
        views["logits_indices"][:] = qsl[1:][samples] - 1
    else:
        first = np.repeat(qsl[1:] - rows_each, rows_each)
        offsets = np.arange(num_rows) - np.repeat(np.cumsum(rows_each) - rows_each, rows_each)
        views["logits_indices"][:] = first + offsets
    total_blocks = int(table_lens.sum())
    flat = np.frombuffer(b"".join(tables), dtype=np.int32, count=total_blocks)  # int32 arrays
    block_tables = views["block_tables"]
    if total_blocks == n * width:  # every row full
        block_tables[:] = flat.reshape(n, width)
    else:  # row i holds table_lens[i] ids, then zeros
        block_tables[:] = 0
        rows = np.repeat(np.arange(n), table_lens)
        starts = np.repeat(np.cumsum(table_lens) - table_lens, table_lens)
        block_tables[rows, np.arange(total_blocks) - starts] = flat
    return PackedStep(layout, host, int(num_new.max()), int(seq_lens.max()))


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
        mixed_graph_sizes: tuple[int, ...] = (),
        max_num_seqs: int | None = None,
        pooling: str | None = None,
    ) -> None:
        """graph_sizes: decode batch sizes to capture in `capture_graphs` (empty: eager only).
        mixed_graph_sizes: token counts to capture for steps with prefill tokens, each with room
        for max_num_seqs sequences (empty: such steps run eagerly); only with graph_sizes.
        pooling: a pooling engine's pooling type ("LAST" or "MEAN"): steps return final hidden
        rows (fp32, `engine.pooling.pooled_rows`), not logits."""
        self.model = model
        self.pooling = pooling
        # LoRA (engine.lora): the slot buffers (LoRAWeights), and in the engine's own process
        # the LoRAManager that says each step's slots (workers get them with the step)
        self.lora = None
        self.lora_manager = None
        self.backend = backend
        self.device = backend.device
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.kv_caches: list[KVCache] = []
        self.cpu_caches: list[KVCache] = []  # the swap space, when preemption_mode == "swap"
        self.graph_sizes = tuple(graph_sizes)
        self.mixed_graph_sizes = tuple(mixed_graph_sizes) if self.graph_sizes else ()
        if self.mixed_graph_sizes and not max_num_seqs:
            raise ValueError("mixed_graph_sizes needs max_num_seqs (a capture's sequence slots)")
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.graph_skip_reasons: list[str] = []
        self._staging = [_Staging(), _Staging()]
        self._staging_next = 0
        self._staging_last = self._staging[0]

    # -- memory ------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        shape = self.model.kv_cache_shape(1, self.block_size)
        elems = shape[1] * shape[2] * shape[3]
        itemsize = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * len(self.model.layers) * elems * itemsize

    def allocate(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        """Allocate the per-layer caches: [num_blocks, block_size, num_kv_heads, head_dim]."""
        self.graphs = self.mixed_graphs = None  # captures point at the old cache tensors
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

    def graph_pool_estimate(self, activation_peak: int, profile_tokens: int) -> tuple[int, int]:
        """(all, mixed): bytes the captures will take (decode buckets, and mixed-step buckets in
        a pool of their own), and the mixed-step part, from the activation peak of a
        profile_tokens forward."""
        captures = sum(len(context_hints(b, self._context_bounds, self.max_model_len))
                       for b in self.graph_sizes)  # fmt: skip
        total = graph_pool_estimate(
            activation_peak, profile_tokens, max(self.graph_sizes), captures
        )
        mixed = 0
        if self.mixed_graph_sizes:
            sizes = self.mixed_graph_sizes
            mixed = graph_pool_estimate(activation_peak, profile_tokens, max(sizes), len(sizes))
        return total + mixed, mixed

    def _context_bounds(self, num_seqs: int) -> tuple[int, ...]:
        """The backend's decode context bounds for a bucket of num_seqs (DecodeGraphs)."""
        kv_heads = self.model.kv_cache_shape(1, self.block_size)[2]
        return self.backend.decode_context_bounds(num_seqs, kv_heads, self.block_size,
                                                  self.max_model_len)  # fmt: skip

    def drop_mixed_graphs(self) -> None:
        """No mixed-step captures (the memory plan had no room for them)."""
        self.mixed_graph_sizes = ()
        self.mixed_graphs = None

    def capture_graphs(self, allow_eager: bool = False) -> int:
        """Capture the decode buckets over the allocated KV cache; returns the bytes they took.

        allow_eager "captures" on a backend without graphs or with a host-syncing attention
        (replay then runs eagerly): tests of the static-buffer logic on CPU."""
        self.graphs = self.mixed_graphs = None
        self.graph_skip_reasons = self.graph_reasons(allow_eager)
        if self.graph_skip_reasons:
            logger.info("decode graphs: off (%s)", "; ".join(self.graph_skip_reasons))
            return 0
        if not self.kv_caches:
            raise RuntimeError("capture_graphs: allocate the KV cache first")
        max_blocks = -(-self.max_model_len // self.block_size)
        graphs = DecodeGraphs(
            self.model, self.backend, self.kv_caches, self.graph_sizes, max_blocks,
            self.max_model_len, self._context_bounds,
        )  # fmt: skip
        mixed = None
        if self.mixed_graph_sizes:
            mixed = MixedGraphs(
                self.model, self.backend, self.kv_caches, self.mixed_graph_sizes,
                self.max_num_seqs, max_blocks, self.max_model_len,
            )  # fmt: skip
        with torch.inference_mode():
            used = graphs.capture().pool_bytes
            if mixed is not None:
                used += mixed.capture().pool_bytes
        self.graphs, self.mixed_graphs = graphs, mixed
        return used

    def forward(
        self, batch: ForwardBatch, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        """The model over `batch`: a graph replay for a step fitting a bucket (decode, then mixed),
        else eager."""
        if self.graphs is not None and intermediate is None:
            b = self.graphs.bucket(batch)
            if b is not None:
                return self.graphs.run(batch, b)
            if self.mixed_graphs is not None:
                b = self.mixed_graphs.bucket(batch)
                if b is not None:
                    return self.mixed_graphs.run(batch, b)
        return self.model(batch, self.kv_caches, intermediate)

    def release(self) -> None:
        """Drop the graphs, KV caches and model, so their device memory can be returned."""
        self.graphs, self.kv_caches, self.cpu_caches, self.model = None, [], [], None
        self.mixed_graphs = None

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
        """Pack the scheduled sequences, in order, into the attention op's layout: one host
        buffer (numpy), which on a device reaches it in one copy (from pinned memory)."""
        return self.upload(pack_step(scheduled, self._host_buffer))

    def upload(self, packed: PackedStep) -> ForwardBatch:
        """The ForwardBatch of a packed step, on this runner's device. A step packed elsewhere
        (a worker receives the driver's bytes) is first copied into this runner's staging."""
        host = packed.buffer
        if not isinstance(host, torch.Tensor):
            host = self._host_buffer(packed.layout.nbytes)
            host.numpy()[:] = np.frombuffer(packed.buffer, dtype=np.uint8)
        buf = host if self.device.type == "cpu" else self._to_device(host)
        return packed.layout.batch(buf, packed.max_query_len, packed.max_seq_len)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        """Where build_batch packs a step: fresh on the CPU (the batch is used in place), else the
        next of two reused pinned staging buffers, once the copy that last read it is done."""
        if self.device.type == "cpu":
            return torch.empty(nbytes, dtype=torch.uint8)
        slot = self._staging[self._staging_next]
        self._staging_next = 1 - self._staging_next
        if slot.event is not None:
            slot.event.synchronize()  # its previous copy to the device has finished
        if slot.buffer is None or slot.buffer.numel() < nbytes:
            pin = True  # every non-CPU device here is driven through torch.cuda (CUDA or HIP)
            size = max(nbytes, 2 * (slot.buffer.numel() if slot.buffer is not None else 0), 4096)
            slot.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            slot.pinned = pin
        self._staging_last = slot
        return slot.buffer[:nbytes]

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """One host-to-device copy of the packed batch (asynchronous from pinned memory; the
        event lets the next reuse of this staging buffer wait for it)."""
        slot = self._staging_last
        dev = host.to(self.device, non_blocking=slot.pinned)
        if slot.pinned:
            if slot.event is None:
                slot.event = torch.cuda.Event()
            slot.event.record(torch.cuda.current_stream(self.device))
        return dev

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        feed: TokenFeed | None = None,
        prompt: PromptRows | None = None,
    ):
        """Run the step; returns logits [num_sampling_seqs, vocab] in schedule order, in the
        model's dtype (the sampler widens to float32 what it computes on; an all-greedy batch
        takes the argmax as they are, without a [rows, vocab] float32 copy).

        feed: the input tokens of a decode-only step scheduled ahead, still on the device (the
        previous step's samples): they replace the batch's placeholder input ids. prompt: prompt
        positions to score; then (logits, `score_prompt`'s lists) is returned."""
        self.apply_block_moves(out)
        if not out.scheduled:
            return None if prompt is None else (None, ([], [], []))
        batch = self.build_batch(out.scheduled)
        if feed is not None:
            feed.write(batch.input_ids)
        if self.lora is None:
            hidden = self.forward(batch)  # [num_tokens, hidden]
        else:  # each token through its request's adapter (engine.lora)
            self.lora.begin(self.lora_manager.step_lora(out.scheduled))
            try:
                hidden = self.forward(batch)
            finally:
                self.lora.end()
        if self.pooling:  # a pooling engine: hidden rows (engine.pooling)
            return pooled_rows(hidden, batch, self.pooling)
        scored = None if prompt is None else self.score_prompt(hidden, prompt)
        logits = None
        if batch.logits_indices.numel():
            logits = self.model.compute_logits(sampled_rows(hidden, batch), float32=False)
        return logits if prompt is None else (logits, scored)

    def score_prompt(self, hidden: torch.Tensor, prompt: PromptRows):
        """Raw fp32 logprobs of prompt tokens: (logprob, top-k dict, rank) lists per row of
        `prompt`, computed a slice of at most max_num_seqs rows at a time (the sampling logits'
        size, which the memory plan counts). Every rank of a tensor-parallel group calls it (the
        LM head gathers); those that get no logits return None."""
        chosen, tops, ranks = [], [], []
        step = max(1, self.max_num_seqs or 256)
        for s in range(0, len(prompt.rows), step):
            rows = torch.tensor(prompt.rows[s : s + step], device=hidden.device)
            logits = self.model.compute_logits(hidden[rows], float32=True)
            if logits is None:  # not the output rank: it took part in the gather only
                chosen = None
                continue
            targets = torch.tensor(prompt.targets[s : s + step], device=hidden.device)
            num_top = prompt.num_top[s : s + step]
            c, v, i, r = logprob_tensors(logits, targets, num_top)
            lp, top = logprob_lists(c.tolist(), v.tolist(), i.tolist(), num_top)
            chosen += lp
            tops += top
            ranks += r.tolist()
        return None if chosen is None else (chosen, tops, ranks)
