"""Steps replayed from captured graphs: one capture per bucket on static buffers.

A decode-only step (every sequence adds one token) of n sequences runs the graph of the smallest
bucket >= n; rows n.. are padding (slot -1, so nothing is written; length 1 over the null block 0).
A bucket is captured with the attention hint max_seq_len = max_model_len, and also once per
context bound the backend names for it (`Backend.decode_context_bounds`: below it the decode
attention launches fewer kernels); a step replays the capture of the smallest bound >= its
longest context.

Optionally (`mixed_graph_sizes`), steps holding prefill chunks replay too (`MixedGraphs`): one
capture per token-count bucket, every capture with room for max_num_seqs sequences. Launching such
a step op by op costs the host more than the device takes at tensor-parallel sizes
(docs/distributed.md, fifteenth session); the attention kernel for these steps sizes its grid by
the token and sequence counts alone, so a padded bucket captures.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.batch import ForwardBatch
from hal.backend import Backend, GraphRunner

logger = logging.getLogger(__name__)

# Attention implementations whose launch needs no host sync, so a step can be captured.
CAPTURABLE_ATTENTION = frozenset({"triton"})
# Graph implementations that replay eagerly (no capture).
EAGER_GRAPHS = frozenset({"eager", "reference"})


def default_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (capped at 512), as vLLM buckets."""
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4) if b <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return tuple(sizes)


def configured_sizes(config) -> tuple[int, ...]:
    """An EngineConfig's decode buckets: none with enforce_eager, else cuda_graph_sizes or the
    defaults for its max_num_seqs."""
    if config.enforce_eager or config.runner == "pooling":  # pooling: no decode steps
        return ()
    return tuple(config.cuda_graph_sizes or default_sizes(config.scheduler.max_num_seqs))


# The largest token count the default mixed-step buckets reach: above it a step's kernels run
# long enough that launching them from Python costs little (an 8B model's 8,192-token step is
# ~200 ms of device time on an H100), and its capture would hold that many tokens' activations.
DEFAULT_MIXED_MAX = 8192
DEFAULT_MIXED_MIN = 128


def default_mixed_sizes(max_num_batched_tokens: int) -> tuple[int, ...]:
    """Powers of two from DEFAULT_MIXED_MIN up to max_num_batched_tokens (capped at
    DEFAULT_MIXED_MAX), and the cap itself when it is not one, so every step up to it fits."""
    top = min(max_num_batched_tokens, DEFAULT_MIXED_MAX)
    sizes, b = [], DEFAULT_MIXED_MIN
    while b < top:
        sizes.append(b)
        b *= 2
    return (*sizes, top)


def configured_mixed_sizes(config) -> tuple[int, ...]:
    """An EngineConfig's token-count buckets for steps with prefill tokens: none with
    enforce_eager or mixed_graph_sizes=(), the defaults for its token budget when None."""
    if config.enforce_eager:
        return ()
    if config.mixed_graph_sizes is None:
        return default_mixed_sizes(config.scheduler.max_num_batched_tokens)
    return tuple(config.mixed_graph_sizes)


# Device memory each captured graph keeps beyond the shared activation pool (measured on an H100,
# torch 2.11: 35 buckets took 1.0 GiB for a 1B and an 8B model alike: not the activations).
PER_GRAPH_BYTES = 30 << 20


def graph_pool_estimate(
    activation_peak: int, profile_tokens: int, max_size: int, num_graphs: int = 1
) -> int:
    """Bytes to reserve for the decode graphs before capturing them: the buckets share one pool
    sized by the largest, whose activations scale with its tokens against the profiled peak
    (doubled for the warm-up copies), plus PER_GRAPH_BYTES per capture."""
    scaled = activation_peak * min(1.0, max_size / max(profile_tokens, 1))
    return int(2 * scaled) + num_graphs * PER_GRAPH_BYTES


def graph_reasons(backend: Backend) -> list[str]:
    """Why decode steps on this backend cannot be captured (empty: they can)."""
    reasons = []
    if backend.chosen("graph") in EAGER_GRAPHS:
        reasons.append(
            f"backend {backend.name} has no graph capture (graph: {backend.chosen('graph')})"
        )
    attention = backend.chosen("attention")
    if attention not in CAPTURABLE_ATTENTION:
        reasons.append(
            f"attention {attention!r} synchronises with the host; capturable: "
            f"{', '.join(sorted(CAPTURABLE_ATTENTION))}"
        )
    return reasons


@dataclass
class GraphStats:
    sizes: tuple[int, ...]
    pool_bytes: int  # device memory the captures took (static buffers + the shared pool)
    seconds: float


class _BucketGraphs(ABC):
    """What both kinds of captures share: the model, one graph per bucket size in a shared
    pool (`capture`), static token inputs sized for the largest bucket, replay counts."""

    KIND = "graphs"  # the log's name for them
    UNIT = ""  # the unit of a bucket size in the log

    def __init__(
        self, model, backend: Backend, kv_caches: list, sizes: tuple[int, ...], max_model_len: int
    ) -> None:
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"{self.KIND[:-1]} sizes: {sizes!r} must be positive integers")
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.sizes = tuple(sorted(set(sizes)))
        self.max_model_len = max_model_len
        top, dev = self.sizes[-1], backend.device
        # Token inputs, sized for the largest bucket; bucket b uses the first b rows.
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=dev)
        # LoRA (engine.lora): the captures read each token's slot from here (-1: none), so they
        # run the deltas' kernels even in steps of the base model alone (which change nothing).
        self.lora = getattr(model, "lora_context", None)
        self.lora_slots = None
        if self.lora is not None:
            self.lora_slots = torch.full((top,), -1, dtype=torch.int32, device=dev)
        self.runners: dict[int, GraphRunner] = {}
        self.stats: GraphStats | None = None
        self.replays = 0  # steps served from a graph (tests and the debug log read it)

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    @abstractmethod
    def _batch(self, key) -> ForwardBatch:
        """The static inputs as the batch a capture key reads (`capture_keys`)."""

    def capture_keys(self) -> list:
        """What `capture` captures, largest first (the first sizes the shared pool): one key
        per bucket size here."""
        return list(reversed(self.sizes))

    def capture(self) -> GraphStats:
        """Capture every key, largest first, into one shared memory pool."""
        dev = self.backend.device
        on_gpu = dev.type != "cpu"
        if on_gpu:
            torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev) if on_gpu else 0
        start = time.perf_counter()
        pool = None
        for key in self.capture_keys():
            batch = self._batch(key)
            runner = self.backend.capture_graph(lambda batch=batch: self._forward(batch), pool=pool)
            pool = getattr(runner, "pool", None) if pool is None else pool
            self.runners[key] = runner
        if on_gpu:
            torch.cuda.synchronize(dev)
        used = (torch.cuda.memory_allocated(dev) - before) if on_gpu else 0
        self.stats = GraphStats(self.sizes, max(used, 0), time.perf_counter() - start)
        extra = len(self.runners) - len(self.sizes)
        logger.info(
            "captured %d %s (%s%s%s) in %.1f s, %.1f MiB", len(self.runners), self.KIND,
            _ranges(self.sizes), self.UNIT,
            f"; {extra} more for short contexts" if extra else "", self.stats.seconds,
            used / (1 << 20),
        )  # fmt: skip
        return self.stats

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """What a capture records: the model over the static inputs (and LoRA slots)."""
        if self.lora is None:
            return self.model(batch, self.kv_caches)
        step = self.lora.batch
        self.lora.batch = self.lora.batch_for(self.lora_slots[: batch.num_tokens])
        try:
            return self.model(batch, self.kv_caches)
        finally:
            self.lora.batch = step

    def _copy_tokens(self, batch: ForwardBatch, b: int) -> None:
        """The batch's token rows into the static inputs; rows n..b write nothing."""
        n = batch.num_tokens
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        if b > n:
            self.slot_mapping[n:b].fill_(-1)
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
        if self.lora is not None:  # the step's token slots (none: the base model alone)
            step = self.lora.batch
            if step is None:
                self.lora_slots[:b].fill_(-1)
            else:
                self.lora_slots[:n].copy_(step.token_slots, non_blocking=True)
                self.lora_slots[n:b].fill_(-1)


class DecodeGraphs(_BucketGraphs):
    """Captures `model`'s forward (embedding to final norm) for each bucket size and replays it.

    The LM head runs eagerly after replay, on the rows the sampler needs, so logits gathering
    across ranks stays outside the graph.
    """

    KIND = "decode graphs"
    UNIT = " sequences"

    def __init__(
        self,
        model,
        backend: Backend,
        kv_caches: list,
        sizes: tuple[int, ...],
        max_blocks_per_seq: int,
        max_model_len: int,
        context_bounds: Callable[[int], tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__(model, backend, kv_caches, sizes, max_model_len)
        top, dev = self.sizes[-1], backend.device
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((top, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(top, dtype=torch.int64, device=dev)
        # per bucket: the max_seq_len hints it is captured with, ascending, max_model_len last
        self.hints = {b: context_hints(b, context_bounds, max_model_len) for b in self.sizes}
        self.key_replays: Counter = Counter()  # replays per (bucket, hint)

    def capture_keys(self) -> list[tuple[int, int]]:
        return [(b, h) for b in reversed(self.sizes) for h in reversed(self.hints[b])]

    def _batch(self, key: tuple[int, int]) -> ForwardBatch:
        b, hint = key
        return ForwardBatch(
            input_ids=self.input_ids[:b],
            positions=self.positions[:b],
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            logits_indices=self.logits_indices[:b],
            max_query_len=1,
            max_seq_len=hint,
        )

    def bucket(self, batch: ForwardBatch) -> int | None:
        """The bucket a decode-only batch replays in, or None when it must run eagerly."""
        n = batch.num_seqs
        if batch.max_query_len != 1 or batch.num_tokens != n or n > self.max_size:
            return None
        if batch.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        return next(b for b in self.sizes if b >= n)

    def run(self, batch: ForwardBatch, b: int) -> torch.Tensor:
        """Copy `batch` into the static buffers, replay bucket b; hidden [n, hidden_size]."""
        n, width = batch.num_seqs, batch.block_tables.shape[1]
        self._copy_tokens(batch, b)
        self.seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        if b > n:  # padding rows attend over one position of the null block
            self.seq_lens[n:b].fill_(1)
            self.block_tables[n:b].zero_()
        key = (b, next((h for h in self.hints[b] if h >= batch.max_seq_len), self.max_model_len))
        hidden = self.runners[key].replay()
        self.replays += 1
        self.key_replays[key] += 1
        return hidden[:n]


class MixedGraphs(_BucketGraphs):
    """Captures the forward for steps with prefill tokens, one graph per token-count bucket.

    Every capture has max_seqs sequence slots: a step of n tokens over s <= max_seqs sequences
    replays the smallest bucket >= n. Token rows n.. belong to no sequence (slot -1, position 0:
    nothing is written, their attention output is zero and no logits are read from them);
    sequence slots s.. hold empty queries (query_start_loc stays at n; length 1 over the null
    block 0). The attention hints are fixed at capture as upper bounds of any step the bucket
    takes: max_query_len the bucket size, max_seq_len max_model_len. Padded rows are computed
    like real ones but never read: every op after the embedding works row by row (attention
    only within a sequence's rows), so they cannot reach a real row.
    """

    KIND = "mixed-step graphs"
    UNIT = " tokens"

    def __init__(
        self,
        model,
        backend: Backend,
        kv_caches: list,
        sizes: tuple[int, ...],
        max_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
    ) -> None:
        if max_seqs < 1:
            raise ValueError(f"max_seqs: {max_seqs} must be >= 1")
        super().__init__(model, backend, kv_caches, sizes, max_model_len)
        self.max_seqs = max_seqs
        dev = backend.device
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(max_seqs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(
            (max_seqs, max_blocks_per_seq), dtype=torch.int32, device=dev
        )
        self.logits_indices = torch.zeros(0, dtype=torch.int64, device=dev)  # read outside

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b],
            positions=self.positions[:b],
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            logits_indices=self.logits_indices,
            max_query_len=b,
            max_seq_len=self.max_model_len,
        )

    def bucket(self, batch: ForwardBatch) -> int | None:
        """The bucket a batch replays in, or None when it must run eagerly."""
        n = batch.num_tokens
        if n > self.max_size or batch.num_seqs > self.max_seqs or batch.num_seqs == 0:
            return None
        if batch.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        return next(b for b in self.sizes if b >= n)

    def run(self, batch: ForwardBatch, b: int) -> torch.Tensor:
        """Copy `batch` into the static buffers, replay bucket b; hidden [n, hidden_size]."""
        n, s, width = batch.num_tokens, batch.num_seqs, batch.block_tables.shape[1]
        self._copy_tokens(batch, b)  # rows n..b: tokens of no sequence
        self.query_start_loc[: s + 1].copy_(batch.query_start_loc, non_blocking=True)
        self.query_start_loc[s + 1 :].fill_(n)
        self.seq_lens[:s].copy_(batch.seq_lens, non_blocking=True)
        self.seq_lens[s:].fill_(1)
        self.block_tables[:s, :width].copy_(batch.block_tables, non_blocking=True)
        self.block_tables[s:].zero_()
        hidden = self.runners[b].replay()
        self.replays += 1
        return hidden[:n]


def context_hints(
    size: int, context_bounds: Callable[[int], tuple[int, ...]] | None, max_model_len: int
) -> tuple[int, ...]:
    """A decode bucket's max_seq_len hints: the backend's bounds for it below max_model_len,
    ascending, then max_model_len."""
    bounds = context_bounds(size) if context_bounds is not None else ()
    return (*sorted({h for h in bounds if 0 < h < max_model_len}), max_model_len)


def _ranges(sizes: tuple[int, ...]) -> str:
    return (
        ", ".join(str(s) for s in sizes)
        if len(sizes) <= 6
        else (f"{', '.join(str(s) for s in sizes[:4])}, ..., {sizes[-1]}")
    )
