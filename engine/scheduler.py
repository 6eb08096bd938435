"""The scheduler: continuous batching under a token budget, FCFS, chunked prefill, preemption.

One rule, no hardware knowledge: each sequence's num_computed_tokens catches up to its num_tokens.
A prompt, a chunk of it, a prefix-cache hit, a recompute after preemption and a decode are all
"compute the tokens between the two"; a step samples for a sequence when they meet.

How the engine drives it, one step at a time (add_request / abort_request only between steps):

    out = scheduler.schedule()
    # The runner, in this order: 1. copy out.blocks_to_swap_out (GPU block -> CPU block),
    # 2. out.blocks_to_swap_in (CPU -> GPU), 3. out.blocks_to_copy (GPU -> GPU, copy-on-write),
    # 4. one forward over out.scheduled: each ScheduledSeq gives token_ids, positions,
    #    slot_mapping, block_table and seq_len; 5. for each one with samples=True, sample
    #    num_samples tokens from its last row (num_samples is n on the step a request forks).
    new_seqs = scheduler.update_from_output(out, {seq_id: [token, ...]}, is_stopped=check)
    # Stream the new tokens of new_seqs; a request is done once request.is_finished.

Per step: decodes first, then running prefill chunks, then swapped sequences (swap in), then
waiting ones (admission), each in FCFS order. When blocks run out, a sequence displaces the
latest-arrived running sequence not yet scheduled this step (recompute: free its blocks and start
over from token 0, keeping its output; swap: move its blocks to the CPU pool), or, if there is none
later than itself, is preempted itself. A step that preempted admits and swaps in nothing.

Pipelining (max_batches_in_flight = P > 1): the engine may call schedule() up to P times before
the first output comes back. A sequence is in flight from the schedule() that emits it until
update_from_output() of that output; schedule() skips it, never preempts it (a sequence that only
in-flight ones could make room for waits for them instead), and an abort frees its blocks only
when its output comes back. Each batch takes at most ceil(live sequences / P) of them, so P
batches share the work. At P = 1 an output always comes back before the next schedule(), and
none of this changes anything.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from array import array
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache_manager import KVCacheManager, KVCacheStats
from engine.sequence import Request, Sequence, SequenceStatus
from engine.spec_config import SpeculativeConfig
from engine.spec_decode import TokenHistory, can_speculate, propose_ngram

logger = logging.getLogger(__name__)


def _priority(seq: Sequence) -> tuple[int, int, int]:
    return seq.priority


class ScheduledSeq:
    """One sequence's share of a step: compute tokens [start_pos, start_pos + num_new_tokens).

    token_ids: [num_new_tokens]; block_table: [num_blocks] block ids covering seq_len slots (a
    list; block_ids holds the same as an int32 array, which the runner packs without touching
    each id); slot_mapping: [num_new_tokens], block_table[p // block_size] * block_size +
    p % block_size; num_samples: 0 for a prefill chunk that does not reach the end, 1, or n on
    the step a request forks.
    """

    __slots__ = (
        "seq",
        "num_new_tokens",
        "start_pos",
        "token_ids",
        "slot_mapping",
        "num_samples",
        "block_ids",
        "_block_table",
        "draft",
    )

    def __init__(
        self,
        seq: Sequence,
        num_new_tokens: int,
        start_pos: int,
        token_ids: list[int],
        block_table: Seq[int],
        slot_mapping: list[int],
        num_samples: int,
        draft: list[int] | None = None,
    ) -> None:
        self.seq = seq
        # Speculative decoding: the draft tokens computed after the sequence's last token (they
        # are the last len(draft) of token_ids and count in num_new_tokens; the step has a
        # logits row for the last token and for each draft).
        self.draft = draft or ()
        self.num_new_tokens = num_new_tokens
        self.start_pos = start_pos
        self.token_ids = token_ids
        self.slot_mapping = slot_mapping
        self.num_samples = num_samples
        if type(block_table) is array and block_table.typecode == "i":  # the scheduler's own
            self.block_ids, self._block_table = block_table, None
        else:
            self.block_table = block_table

    @property
    def block_table(self) -> list[int]:
        if self._block_table is None:
            self._block_table = self.block_ids.tolist()
        return self._block_table

    @block_table.setter
    def block_table(self, table: Seq[int]) -> None:
        if isinstance(table, array) and table.typecode == "i":
            self.block_ids, self._block_table = table, None
        else:
            self._block_table = list(table)
            self.block_ids = array("i", self._block_table)

    def __repr__(self) -> str:
        return (
            f"ScheduledSeq(seq={self.seq!r}, num_new_tokens={self.num_new_tokens}, "
            f"start_pos={self.start_pos}, num_samples={self.num_samples})"
        )

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id

    @property
    def samples(self) -> bool:
        return self.num_samples > 0

    @property
    def seq_len(self) -> int:
        """Total KV length after this step (the attention op's seq_lens entry)."""
        return self.start_pos + self.num_new_tokens

    @property
    def positions(self) -> list[int]:
        return list(range(self.start_pos, self.seq_len))


@dataclass
class SchedulerOutput:
    """What one step computes, and the block moves the runner makes before the forward pass."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) on the GPU
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting, running and swapped queues and the KV-cache manager."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        max_batches_in_flight: int = 1,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        v = max_batches_in_flight
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"max_batches_in_flight must be an integer >= 1 (the pipeline depth), got {v!r}"
            )
        if cache_config.num_gpu_blocks is None:
            raise ValueError(
                "cache_config.num_gpu_blocks is None: size the KV cache (the engine's memory "
                "plan) before building the Scheduler"
            )
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        num_cpu_blocks = 0
        if scheduler_config.preemption_mode == "swap":
            num_cpu_blocks = cache_config.num_cpu_blocks or 0
            if num_cpu_blocks < 2:
                raise ValueError(
                    f"preemption_mode='swap' needs cache_config.num_cpu_blocks >= 2, got "
                    f"{cache_config.num_cpu_blocks!r}"
                )
        self.kv = KVCacheManager(
            self.block_size,
            cache_config.num_gpu_blocks,
            num_cpu_blocks,
            cache_config.enable_prefix_caching,
        )
        capacity = self.kv.gpu_pool.num_usable_blocks * self.block_size
        if scheduler_config.max_model_len is None:
            self.max_model_len = capacity
            if not scheduler_config.enable_chunked_prefill:
                self.max_model_len = min(capacity, scheduler_config.max_num_batched_tokens)
        else:
            self.max_model_len = scheduler_config.max_model_len
            if self.max_model_len > capacity:
                raise ValueError(
                    f"num_gpu_blocks={cache_config.num_gpu_blocks} (block_size={self.block_size}) "
                    f"holds {capacity} tokens, less than max_model_len={self.max_model_len}: "
                    f"give the KV cache more memory or lower max_model_len"
                )
        self.waiting: list[Sequence] = []  # sorted by priority; PREEMPTED ones included
        self.running: list[Sequence] = []  # sorted by priority
        self.swapped: list[Sequence] = []  # sorted by priority
        self.requests: dict[str, Request] = {}  # unfinished requests
        self.max_batches_in_flight = max_batches_in_flight
        self.speculative = speculative
        self.num_draft_tokens = 0  # speculative decoding: drafts proposed (scheduled)
        self.num_accepted_tokens = 0  # and of those, accepted
        # seq_id -> sequence emitted by a schedule() whose update_from_output() has not come yet
        self.in_flight: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens), %d CPU swap blocks, prefix caching %s, "
            "preemption by %s, max_model_len %d",
            self.kv.gpu_pool.num_usable_blocks,
            self.block_size,
            capacity,
            max(num_cpu_blocks - 1, 0),
            "on" if cache_config.enable_prefix_caching else "off",
            scheduler_config.preemption_mode,
            self.max_model_len,
        )

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> Sequence:
        """Queue a request (by priority, then arrival); returns its first sequence."""
        rid = request.request_id
        if rid in self.requests or request.seqs:
            raise ValueError(f"request {rid!r} was already added")
        if request.priority != 0 and self.config.policy != "priority":
            raise ValueError(
                f"request {rid!r}: priority={request.priority} needs scheduling_policy="
                "'priority' (this engine schedules first come, first served)"
            )
        prompt_len = len(request.prompt_token_ids)
        if prompt_len >= self.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt has {prompt_len} tokens; max_model_len="
                f"{self.max_model_len} allows at most {self.max_model_len - 1} so that one token "
                f"can be generated"
            )
        if request.n > self.config.max_num_seqs:
            raise ValueError(
                f"request {rid!r}: n={request.n} exceeds max_num_seqs={self.config.max_num_seqs}"
            )
        request.arrival_index = next(self._arrivals)
        seq = Sequence(next(self._seq_ids), request, list(request.prompt_token_ids))
        request.seqs.append(seq)
        self.requests[rid] = request
        bisect.insort(self.waiting, seq, key=_priority)  # FCFS: the latest arrival sorts last
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Finish every sequence of the request as aborted and free its blocks; False if unknown
        (or already finished)."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        for seq in list(request.seqs):
            if not seq.is_finished:
                self.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
        return True

    def finish_sequence(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark seq finished with status (stopped, length, aborted) and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"status must be a FINISHED_* status, got {status.name}")
        if seq.is_finished:
            raise ValueError(f"{seq} is already finished")
        queue = {
            SequenceStatus.RUNNING: self.running,
            SequenceStatus.SWAPPED: self.swapped,
            SequenceStatus.WAITING: self.waiting,
            SequenceStatus.PREEMPTED: self.waiting,
        }[seq.status]
        queue.remove(seq)
        if seq.seq_id not in self.in_flight:  # else its batch may still write its blocks
            self.kv.free(seq)
        seq.status = status
        if seq.request.is_finished:
            del self.requests[seq.request.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_in_flight(self) -> int:
        """Sequences scheduled in outputs not yet passed to update_from_output."""
        return len(self.in_flight)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def kv_stats(self) -> KVCacheStats:
        return self.kv.stats()

    # -- one step ------------------------------------------------------------------------------
    def _num_seqs_needed(self, seq: Sequence) -> int:
        """Running slots seq takes: n for a request that will fork after its prompt."""
        request = seq.request
        return 1 if request.is_forked else request.n

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        scheduled_ids: set[int] = set()
        share = self._batch_share()  # None: no limit but max_num_seqs
        taken = 0  # sequence slots in this batch (counted only when share is set)
        blocked = False  # a sequence waits for blocks that in-flight sequences hold

        def full(seq: Sequence) -> bool:  # this batch already holds its share of the sequences
            return share is not None and taken > 0 and taken + self._num_seqs_needed(seq) > share

        self._make_room_by_priority(out)
        before = len(out.preempted)
        # 1. Running sequences: decodes first, then prefill chunks, each in FCFS order.
        decodes, prefills = [], []
        for seq in self.running:
            (decodes if len(seq.token_ids) - seq.num_computed_tokens == 1 else prefills).append(seq)
        running_status = SequenceStatus.RUNNING
        in_flight = self.in_flight
        allocate = self.kv.allocate_slots
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not running_status:  # preempted earlier in this loop
                continue
            if in_flight and seq.seq_id in in_flight:
                continue
            if share is not None and full(seq):
                break
            uncomputed = len(seq.token_ids) - seq.num_computed_tokens
            num_new = uncomputed if uncomputed < budget else budget
            if not chunked and num_new < uncomputed:
                continue
            draft = None
            if self.speculative is not None and uncomputed == 1:
                draft = self._draft(seq, budget - 1)
                num_new += len(draft)
            copies = allocate(seq, num_new)  # the common case: fits without preempting
            if copies is None and draft:  # drafts never preempt anyone: go on without them
                self.num_draft_tokens -= len(draft)
                num_new, draft = num_new - len(draft), None
                copies = allocate(seq, num_new)
            if copies is None:
                copies = self._allocate_or_preempt(seq, num_new, scheduled_ids, out)
            if copies is None:
                blocked = blocked or seq.status == SequenceStatus.RUNNING
                continue
            if copies:
                out.blocks_to_copy.extend(copies)
            self._emit(seq, num_new, out, scheduled_ids, draft)
            budget -= num_new
            if share is not None:
                taken += self._num_seqs_needed(seq)
        running_slots = None  # computed once phases 2 and 3 need it, then kept up to date

        # 2. Swapped sequences, only in a step that preempted nothing (so no CPU block is both
        #    written by a swap-out and read by a swap-in) and where nobody waits for blocks.
        while self.swapped and budget > 0 and not out.preempted and not blocked:
            seq = self.swapped[0]
            if running_slots is None:
                running_slots = self._running_slots()
            if running_slots + self._num_seqs_needed(seq) > self.config.max_num_seqs:
                break
            if full(seq):
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not chunked and num_new < seq.num_uncomputed_tokens:
                break
            if not self.kv.can_swap_in(seq, num_new):
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(self.kv.swap_in(seq))
            copies = self.kv.allocate_slots(seq, num_new)
            if copies is None or copies:
                raise RuntimeError(f"{seq}: allocation after swap-in failed; can_swap_in is wrong")
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_priority)
            running_slots += self._num_seqs_needed(seq)
            self._emit(seq, num_new, out, scheduled_ids)
            budget -= num_new
            if share is not None:
                taken += self._num_seqs_needed(seq)

        # 3. Waiting sequences (new, or preempted for recompute) in priority order (FCFS: arrival),
        #    no skipping ahead; none while earlier sequences wait swapped out. Under the
        #    priority policy a head that finds no room preempts running sequences of lower
        #    priority (not in this step or in flight) until it fits.
        pressure = len(out.preempted) > before  # steps 1-2 ran out of blocks: admit nobody
        while self.waiting and budget > 0 and not pressure:
            seq = self.waiting[0]
            if self.swapped and self.swapped[0].priority < seq.priority:
                break
            if running_slots is None:
                running_slots = self._running_slots()
            if running_slots + self._num_seqs_needed(seq) > self.config.max_num_seqs:
                if self._preempt_for(seq, scheduled_ids, out):
                    running_slots = None
                    continue
                break
            if blocked or full(seq):
                break
            hits, num_cached = self.kv.get_computed_blocks(seq)
            num_new = seq.num_tokens - num_cached  # >= 1: a hit never covers the last token
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            copies = self.kv.allocate_slots(seq, num_new, hits)
            if copies is None:
                if self._preempt_for(seq, scheduled_ids, out):
                    running_slots = None
                    continue
                break
            self.waiting.pop(0)
            seq.num_computed_tokens = num_cached
            if seq.request.num_cached_tokens is None:  # the first admission's hits count
                seq.request.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_priority)
            running_slots += self._num_seqs_needed(seq)
            self._emit(seq, num_new, out, scheduled_ids)
            budget -= num_new
            if share is not None:
                taken += self._num_seqs_needed(seq)

        self.kv.release_pending()
        for ss in out.scheduled:
            seq = ss.seq
            in_flight[seq.seq_id] = seq
        return out

    def schedule_ahead(self, out: SchedulerOutput) -> tuple[SchedulerOutput, list[int]] | None:
        """The next decode step of `out`'s sequences, scheduled before `out`'s tokens are known
        (asynchronous scheduling): each sequence computes the token `out` samples for it, at
        position num_tokens, whose id the engine feeds from the device. Returns the step and,
        per scheduled sequence, its sampling row in `out`; None when `out` cannot be followed
        this way, with nothing changed that the next schedule() would not do too.

        Only a step whose every sequence samples one token continues (no prefill chunk that
        stops short, no fork, no structured outputs), with nothing swapped out and either nobody
        waiting or no room to admit anyone (so admission order is what schedule() would give).
        Sequences that finish by length at `out` are left out (while others wait, they make
        `out` stop instead: the next schedule() admits in their place). Call `resume_in_flight`
        with the step after `out`'s update_from_output; a sequence that then stops (a stop token
        or string) has its computed token dropped.
        """
        if (
            not out.scheduled
            or self.swapped
            or len(out.scheduled) != len(self.running)  # everyone running is in out
            or self.in_flight.keys() - {ss.seq.seq_id for ss in out.scheduled}
        ):
            return None
        room = not self.waiting or self._running_slots() < self.config.max_num_seqs
        if self.waiting and room:
            return None
        if (
            self.waiting
            and self.config.policy == "priority"
            and self.running[-1].priority > self.waiting[0].priority
        ):  # the next schedule() may preempt for the waiting head
            return None
        bs = self.block_size
        max_model_len = self.max_model_len
        keep: list[tuple[Sequence, int]] = []
        row = 0
        for ss in out.scheduled:
            seq = ss.seq
            if (
                ss.num_samples != 1
                or seq.request.n != 1
                or seq.status.is_finished
                or seq.request.sampling_params.structured_outputs is not None
            ):  # structured outputs: the next mask needs this step's token on the host
                return None
            num_tokens = len(seq.token_ids) + 1  # after out's token
            max_tokens = seq.request.sampling_params.max_tokens
            if num_tokens >= max_model_len or (
                max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens
            ):
                if self.waiting:
                    return None
            else:
                keep.append((seq, row))
            row += 1
        if not keep or len(keep) > self.config.max_num_batched_tokens:
            return None
        nxt = SchedulerOutput()
        for seq, _ in keep:
            # Slots through position len(token_ids): out's token, computed by this step.
            copies = self.kv.allocate_slots(seq, len(seq.token_ids) + 1 - seq.num_computed_tokens)
            if copies is None:
                self.kv.release_pending()
                return None
            nxt.blocks_to_copy.extend(copies)
        self.kv.release_pending()
        for seq, _ in keep:
            pos = len(seq.token_ids)
            table = self.kv.block_ids(seq)
            slot = table[pos // bs] * bs + pos % bs
            nxt.scheduled.append(ScheduledSeq(seq, 1, pos, [0], table, [slot], 1))
        return nxt, [r for _, r in keep]

    def resume_in_flight(self, out: SchedulerOutput) -> None:
        """Mark a step from `schedule_ahead` in flight, once the step before it was updated; its
        sequences that finished meanwhile freed their blocks then (the device runs steps in
        order, so nothing handed out later is written by this one after its new owner)."""
        for ss in out.scheduled:
            seq = ss.seq
            if not seq.status.is_finished:
                self.in_flight[seq.seq_id] = seq

    def _running_slots(self) -> int:
        return sum(self._num_seqs_needed(s) for s in self.running)

    def _batch_share(self) -> int | None:
        """Sequence slots one batch may take: None (only max_num_seqs limits) at depth 1, else an
        equal share of the live ones, so the batches in flight split the work and every pipeline
        stage stays busy."""
        depth = self.max_batches_in_flight
        if depth == 1:
            return None
        live = sum(
            self._num_seqs_needed(s) for queue in (self.running, self.waiting, self.swapped)
            for s in queue
        )  # fmt: skip
        return max(1, -(-min(live, self.config.max_num_seqs) // depth))

    def _allocate_or_preempt(
        self, seq: Sequence, num_new: int, scheduled_ids: set[int], out: SchedulerOutput
    ) -> list[tuple[int, int]] | None:
        """Blocks for seq's new tokens, preempting later arrivals until they fit; None if seq
        itself had to be preempted, or (still RUNNING) waits for later arrivals in flight."""
        while True:
            copies = self.kv.allocate_slots(seq, num_new)
            if copies is not None:
                return copies
            later = [
                s
                for s in self.running
                if s.seq_id not in scheduled_ids and s.priority > seq.priority
            ]
            victims = [s for s in later if s.seq_id not in self.in_flight]
            if later and not victims:  # they become preemptible once their batch comes back
                return None
            victim = max(victims, key=_priority) if victims else seq
            self._preempt(victim, out)
            if victim is seq:
                return None

    def _make_room_by_priority(self, out: SchedulerOutput) -> None:
        """Priority policy, before the running sequences are scheduled: while the first waiting
        sequence would find no slot or too few free blocks for its next chunk, preempt the
        lowest-priority running sequence below it (none in flight)."""
        if self.config.policy != "priority":
            return
        budget, bs = self.config.max_num_batched_tokens, self.block_size
        while self.waiting:
            head = self.waiting[0]
            victims = [
                s for s in self.running
                if s.priority > head.priority and s.seq_id not in self.in_flight
            ]  # fmt: skip
            if not victims:
                return
            slots = self._running_slots() + self._num_seqs_needed(head) <= self.config.max_num_seqs
            chunk = min(head.num_tokens - head.num_computed_tokens, budget)
            if slots and self.kv.num_free_blocks >= -(-chunk // bs):
                return
            self._preempt(max(victims, key=_priority), out)

    def _preempt_for(self, seq: Sequence, scheduled_ids: set[int], out: SchedulerOutput) -> bool:
        """Priority policy: preempt the lowest-priority running sequence below seq's priority
        that this step has not scheduled and no batch in flight holds; False if none."""
        if self.config.policy != "priority":
            return False
        victims = [
            s for s in self.running
            if s.priority > seq.priority and s.seq_id not in scheduled_ids
            and s.seq_id not in self.in_flight
        ]  # fmt: skip
        if not victims:
            return False
        self._preempt(max(victims, key=_priority), out)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        mapping = self.kv.swap_out(seq) if self.config.preemption_mode == "swap" else None
        if mapping is not None:
            seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, seq, key=_priority)
            out.blocks_to_swap_out.extend(mapping)
        else:
            if self.config.preemption_mode == "swap":
                logger.warning("CPU swap pool full: preempting %s by recompute instead", seq)
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.PREEMPTED
            bisect.insort(self.waiting, seq, key=_priority)
        out.preempted.append(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (%s)", seq, seq.status.name)

    def _draft(self, seq: Sequence, room: int) -> list[int]:
        """Speculative decoding: draft tokens for a decode step of seq (at most room of them),
        none where they could not all be kept (max_tokens, max_model_len) or the request's
        sampling reads more than the logits."""
        spec = self.speculative
        params = seq.request.sampling_params
        num_output = len(seq.token_ids) - seq.num_prompt_tokens
        if room < 1 or not can_speculate(params, num_output):
            return []
        if (
            spec.disable_by_batch_size is not None
            and len(self.running) >= spec.disable_by_batch_size
        ):
            return []
        k = min(spec.num_speculative_tokens, room, self.max_model_len - len(seq.token_ids) - 1)
        if params.max_tokens is not None:
            k = min(k, params.max_tokens - num_output - 1)
        history = getattr(seq, "token_history", None)
        if history is None:
            history = seq.token_history = TokenHistory()
        tokens = history.view(seq.token_ids)
        draft = propose_ngram(tokens, spec.prompt_lookup_min, spec.prompt_lookup_max, k)
        self.num_draft_tokens += len(draft)
        return draft

    def _emit(
        self,
        seq: Sequence,
        num_new: int,
        out: SchedulerOutput,
        scheduled_ids: set[int],
        draft: list[int] | None = None,
    ) -> None:
        bs = self.block_size
        start = seq.num_computed_tokens
        end = start + num_new
        table = self.kv.block_ids(seq)
        num_samples = 0
        tokens = seq.token_ids[start:end]
        if draft:
            tokens = tokens + draft
        if end == len(seq.token_ids) + len(draft or ()):
            request = seq.request
            num_samples = 1 if request.is_forked else request.sampling_params.n
        if num_new == 1:
            slots = [table[start // bs] * bs + start % bs]
        else:
            slots = [table[p // bs] * bs + p % bs for p in range(start, end)]
        out.scheduled.append(
            ScheduledSeq(seq, num_new, start, tokens, table, slots, num_samples, draft)
        )
        scheduled_ids.add(seq.seq_id)

    # -- results -------------------------------------------------------------------------------
    def update_from_output(
        self,
        out: SchedulerOutput,
        sampled_token_ids: Mapping[int, Seq[int]],
        is_stopped: Callable[[Sequence], bool] | None = None,
    ) -> list[Sequence]:
        """Advance computed tokens, append sampled tokens, fork n > 1 requests, finish sequences.

        sampled_token_ids: seq_id -> num_samples tokens, for each ScheduledSeq with samples=True
        (entries for sequences aborted since schedule() are ignored); a step with drafts gives
        1 to len(draft) + 1 tokens in order (the accepted drafts, then the target's token).
        is_stopped(seq) is asked after each new token (stop tokens or strings: the caller's
        business); max_tokens and max_model_len end a sequence with FINISHED_LENGTH. Returns the
        sequences that got a new token, children of a fork included, in schedule order; finished
        ones have freed their blocks.
        """
        # Validate everything before changing anything: a quick pass, and on anything unusual
        # (an error, or entries of aborted sequences) the full check, which raises in order.
        running = SequenceStatus.RUNNING
        num_sampling = 0
        ok = True
        for ss in out.scheduled:
            seq = ss.seq
            status = seq.status
            if status.is_finished:
                continue
            if status is not running or seq.num_computed_tokens != ss.start_pos:
                ok = False
                break
            if ss.num_samples:
                num_sampling += 1
                got = len(sampled_token_ids.get(seq.seq_id, ()))
                if got != ss.num_samples and not (ss.draft and 1 <= got <= len(ss.draft) + 1):
                    ok = False
                    break
        if not ok or len(sampled_token_ids) != num_sampling:
            self._check_output(out, sampled_token_ids)

        new_seqs: list[Sequence] = []
        checked: set[int] = set()  # speculative steps: stop-checked token by token already
        in_flight = self.in_flight
        cache_full_blocks = self.kv.cache_full_blocks
        for ss in out.scheduled:
            seq = ss.seq
            was_in_flight = in_flight.pop(seq.seq_id, None) is not None
            if seq.status.is_finished:
                if was_in_flight:  # finished (aborted) while in flight: its free was deferred
                    self.kv.free(seq)
                continue
            if ss.draft:
                self._append_verified(seq, sampled_token_ids[seq.seq_id], len(ss.draft), is_stopped)
                new_seqs.append(seq)
                checked.add(seq.seq_id)
                continue
            seq.num_computed_tokens += ss.num_new_tokens
            cache_full_blocks(seq)
            if not ss.num_samples:
                continue
            tokens = sampled_token_ids[seq.seq_id]
            seq.token_ids.append(tokens[0])
            new_seqs.append(seq)
            if len(tokens) > 1:
                for index in range(1, len(tokens)):
                    new_seqs.append(self._fork(seq, index, tokens[index]))
            seq.request.is_forked = True

        max_model_len = self.max_model_len  # inline, not _stop_status: the per-step hot loop
        for seq in new_seqs:
            if checked and seq.seq_id in checked:
                continue
            if is_stopped is not None and is_stopped(seq):
                self.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED)
                continue
            max_tokens = seq.request.sampling_params.max_tokens
            num_tokens = len(seq.token_ids)
            if num_tokens >= max_model_len or (
                max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens
            ):
                self.finish_sequence(seq, SequenceStatus.FINISHED_LENGTH)
        return new_seqs

    def _stop_status(
        self, seq: Sequence, is_stopped: Callable[[Sequence], bool] | None
    ) -> SequenceStatus | None:
        """Whether seq's newest token ends it: a stop (the caller's test), else its length (the
        rule update_from_output's loop applies inline)."""
        if is_stopped is not None and is_stopped(seq):
            return SequenceStatus.FINISHED_STOPPED
        max_tokens = seq.request.sampling_params.max_tokens
        num_tokens = len(seq.token_ids)
        if num_tokens >= self.max_model_len or (
            max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens
        ):
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _append_verified(
        self,
        seq: Sequence,
        tokens: Seq[int],
        num_draft: int,
        is_stopped: Callable[[Sequence], bool] | None,
    ) -> None:
        """A speculative step's tokens, one at a time with the stop test after each (the rest
        are dropped once one ends the sequence). The KV of the last token and of the accepted
        drafts is valid: num_computed_tokens moves past them; the rejected drafts' slots are
        written again when their positions come."""
        self.num_accepted_tokens += len(tokens) - 1
        status = None
        appended = 0
        for token in tokens:
            seq.token_ids.append(token)
            appended += 1
            status = self._stop_status(seq, is_stopped)
            if status is not None:
                break
        # Computed: the last token and the drafts now in token_ids (all but the newest token).
        seq.num_computed_tokens = len(seq.token_ids) - 1
        self.kv.cache_full_blocks(seq)
        if status is not None:
            self.finish_sequence(seq, status)

    @staticmethod
    def _check_output(out: SchedulerOutput, sampled_token_ids: Mapping[int, Seq[int]]) -> None:
        """Raise if sampled_token_ids does not answer the sampling sequences of out."""
        expected = {s.seq_id: s.num_samples for s in out.scheduled if s.samples}
        for seq_id, tokens in sampled_token_ids.items():
            if seq_id not in expected:
                raise ValueError(f"sequence {seq_id} did not sample this step, got tokens {tokens}")
        for ss in out.scheduled:
            if ss.seq.is_finished:
                continue
            if (
                ss.seq.status != SequenceStatus.RUNNING
                or ss.seq.num_computed_tokens != ss.start_pos
            ):
                raise RuntimeError(f"{ss.seq}: output does not belong to the last schedule()")
            got = len(sampled_token_ids.get(ss.seq_id, ()))
            if ss.draft and ss.samples and 1 <= got <= len(ss.draft) + 1:
                continue
            if ss.samples and got != ss.num_samples:
                raise ValueError(
                    f"sequence {ss.seq_id} needs {ss.num_samples} sampled tokens, got "
                    f"{sampled_token_ids.get(ss.seq_id)!r}"
                )

    def _fork(self, parent: Sequence, index: int, token: int) -> Sequence:
        """A child sharing parent's computed blocks, with its own sampled last token."""
        child = Sequence(
            next(self._seq_ids), parent.request, parent.token_ids[:-1] + [token], index
        )
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.kv.fork(parent, child)
        parent.request.seqs.append(child)
        bisect.insort(self.running, child, key=_priority)
        return child
