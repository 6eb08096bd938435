"""Hypothesis state machine over the scheduler and block pool: adds, aborts, forks (n > 1) and
steps with a fake model; no block leaks or is freed twice, and the pool is full after draining."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_pool import BlockPool
from engine.config import CacheConfig, SchedulerConfig
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Request, SequenceStatus


@dataclass
class FakeParams:
    n: int = 1
    max_tokens: int | None = None
    prompt_logprobs: int | None = None


class PagedKVSim:
    """Plays the runner on a fake paged cache whose "KV" at position p is the token prefix up to
    p: applies swaps and copies in the documented order, writes each scheduled token, then checks
    that every scheduled sequence reads back its own whole history through its block table."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.gpu: list[list[tuple | None]] = [[None] * block_size for _ in range(num_gpu_blocks)]
        self.cpu: list[list[tuple | None]] = [[None] * block_size for _ in range(num_cpu_blocks)]

    def execute(self, out: SchedulerOutput, pool: BlockPool) -> None:
        bs = self.bs
        for g, c in out.blocks_to_swap_out:
            self.cpu[c] = list(self.gpu[g])
        assert not (out.blocks_to_swap_out and out.blocks_to_swap_in)
        for c, g in out.blocks_to_swap_in:
            self.gpu[g] = list(self.cpu[c])
        # Copies run as one batched kernel: no block may be both a source and a destination.
        srcs = {s for s, _ in out.blocks_to_copy}
        dsts = [d for _, d in out.blocks_to_copy]
        assert not srcs & set(dsts) and len(set(dsts)) == len(dsts)
        snapshot = {s: list(self.gpu[s]) for s in srcs}
        for s, d in out.blocks_to_copy:
            self.gpu[d] = list(snapshot[s])
        slots = [slot for ss in out.scheduled for slot in ss.slot_mapping]
        assert len(set(slots)) == len(slots), "two tokens of one step share a KV slot"
        assert all(slot >= bs for slot in slots), "the null block was written"
        for block_id in {slot // bs for slot in slots}:
            block = pool.blocks[block_id]
            # A written block is private and not in the prefix cache (its KV is still changing).
            assert block.ref_cnt == 1 and block.block_hash is None, block
        for ss in out.scheduled:
            seq = ss.seq
            assert ss.num_new_tokens >= 1
            assert ss.token_ids == seq.token_ids[ss.start_pos : ss.seq_len]
            assert ss.samples == (ss.seq_len == seq.num_tokens)
            assert len(ss.block_table) * bs >= ss.seq_len
            for pos, slot in zip(ss.positions, ss.slot_mapping, strict=True):
                assert slot == ss.block_table[pos // bs] * bs + pos % bs
                self.gpu[slot // bs][slot % bs] = tuple(seq.token_ids[: pos + 1])
        for ss in out.scheduled:
            for pos in range(ss.seq_len):
                block = ss.block_table[pos // bs]
                got = self.gpu[block][pos % bs]
                want = tuple(ss.seq.token_ids[: pos + 1])
                assert got == want, f"{ss.seq} reads a wrong KV at position {pos} (block {block})"


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 20),
        num_cpu_blocks=st.integers(2, 12),
        chunked=st.booleans(),
        prefix_caching=st.booleans(),
        mode=st.sampled_from(["recompute", "swap"]),
        budget=st.integers(1, 24),
        max_num_seqs=st.integers(3, 8),
    )
    def setup(
        self, block_size, num_gpu_blocks, num_cpu_blocks, chunked, prefix_caching, mode, budget,
        max_num_seqs,
    ):  # fmt: skip
        max_model_len = min((num_gpu_blocks - 1) * block_size, 24)
        if not chunked:
            budget = max(budget, max_model_len)
        cache = CacheConfig(
            block_size=block_size,
            num_gpu_blocks=num_gpu_blocks,
            num_cpu_blocks=num_cpu_blocks,
            enable_prefix_caching=prefix_caching,
        )
        config = SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            preemption_mode=mode,
        )
        self.scheduler = Scheduler(config, cache)
        self.sim = PagedKVSim(num_gpu_blocks, num_cpu_blocks, block_size)
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.num_requests = 0

    # -- rules ---------------------------------------------------------------------------------
    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=26),
        n=st.integers(1, 3),
        max_tokens=st.none() | st.integers(1, 8),
    )
    def add(self, prompt, n, max_tokens):
        rid = f"r{self.num_requests}"
        self.num_requests += 1
        request = Request(rid, prompt, FakeParams(n=n, max_tokens=max_tokens))
        if len(prompt) >= self.scheduler.max_model_len:
            try:
                self.scheduler.add_request(request)
            except ValueError:
                return
            raise AssertionError("a prompt of max_model_len tokens was accepted")
        self.scheduler.add_request(request)
        self.requests[rid] = request

    @precondition(lambda self: self.scheduler.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        assert self.scheduler.abort_request(rid)
        self.aborted.add(rid)
        assert self.requests[rid].is_finished

    @rule(rid=st.sampled_from(["r0", "nope"]))
    def abort_unknown_or_finished(self, rid):
        expected = rid in self.scheduler.requests
        assert self.scheduler.abort_request(rid) == expected
        if expected:
            self.aborted.add(rid)

    @rule(seed=st.integers(0, 2**16), num_steps=st.integers(1, 4))
    def step(self, seed, num_steps):
        rng = random.Random(seed)
        for _ in range(num_steps):
            self._step(rng)

    def _step(self, rng: random.Random) -> None:
        s = self.scheduler
        out = s.schedule()
        if s.has_unfinished():
            # Progress: a step schedules something unless it preempted (the next one then will).
            assert not out.is_empty or out.preempted
        assert out.num_batched_tokens <= s.config.max_num_batched_tokens
        self.sim.execute(out, s.kv.gpu_pool)
        sampled = {
            ss.seq_id: [rng.randrange(3) for _ in range(ss.num_samples)]
            for ss in out.scheduled
            if ss.samples
        }
        new = s.update_from_output(out, sampled, is_stopped=lambda seq: rng.random() < 0.15)
        for seq in new:
            assert seq.num_output_tokens >= 1

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def blocks_are_consistent(self):
        s = self.scheduler
        kv = s.kv
        for pool, tables in ((kv.gpu_pool, kv.block_tables), (kv.cpu_pool, kv.cpu_tables)):
            if pool is None:
                assert not tables
                continue
            pool.check()
            refs = Counter(b.block_id for table in tables.values() for b in table)
            for block in pool.blocks:
                assert block.ref_cnt == refs.get(block.block_id, 0), block
            assert pool.num_free_blocks + len(refs) == pool.num_usable_blocks
        assert not kv._pending_release

    @invariant()
    def queues_are_consistent(self):
        s = self.scheduler
        kv = s.kv
        queued = s.waiting + s.running + s.swapped
        assert len({q.seq_id for q in queued}) == len(queued)
        for seq in s.running:
            assert seq.status == SequenceStatus.RUNNING and seq.seq_id in kv.block_tables
            assert len(kv.block_tables[seq.seq_id]) * s.block_size >= seq.num_computed_tokens
            assert 0 < seq.num_uncomputed_tokens
        for seq in s.waiting:
            assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
            assert seq.num_computed_tokens == 0 and seq.seq_id not in kv.block_tables
        for seq in s.swapped:
            assert seq.status == SequenceStatus.SWAPPED and seq.seq_id in kv.cpu_tables
        live = {q.seq_id for q in queued}
        assert set(kv.block_tables) | set(kv.cpu_tables) <= live
        assert sum(1 if q.request.is_forked else q.request.n for q in s.running) <= (
            s.config.max_num_seqs
        )
        for rid, request in self.requests.items():
            assert (rid in s.requests) == (not request.is_finished)
            for seq in request.seqs:
                assert seq.is_finished or seq.seq_id in live
                assert seq.num_tokens <= s.max_model_len

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        s = self.scheduler
        rng = random.Random(0)
        for _ in range(2000):
            if not s.has_unfinished():
                break
            self._step(rng)
            self.blocks_are_consistent()
            self.queues_are_consistent()
        assert not s.has_unfinished(), "requests left after 2000 steps"
        kv = s.kv
        assert kv.gpu_pool.num_free_blocks == kv.gpu_pool.num_usable_blocks
        assert kv.cpu_pool is None or kv.cpu_pool.num_free_blocks == kv.cpu_pool.num_usable_blocks
        assert not kv.block_tables and not kv.cpu_tables
        assert not (s.waiting or s.running or s.swapped)
        for rid, request in self.requests.items():
            assert request.is_finished
            assert len(request.seqs) in (1, request.n)
            for seq in request.seqs:
                if seq.status == SequenceStatus.FINISHED_ABORTED:
                    assert rid in self.aborted
                elif seq.status == SequenceStatus.FINISHED_LENGTH:
                    assert seq.num_tokens == s.max_model_len or (
                        seq.num_output_tokens == request.max_tokens
                    )
                else:
                    assert seq.status == SequenceStatus.FINISHED_STOPPED
            if rid not in self.aborted:
                assert len(request.seqs) == request.n


SchedulerMachine.TestCase.settings = settings(
    max_examples=max(50, settings.default.max_examples), stateful_step_count=30
)
TestSchedulerStateMachine = SchedulerMachine.TestCase
