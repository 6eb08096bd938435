"""The scheduler with several batches in flight (pipeline parallelism), pure Python: batches are
disjoint and share the work, in-flight sequences are neither rescheduled nor preempted, an abort
frees blocks only when the batch returns, and a state machine finds no leaked or reused block."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.config import CacheConfig, SchedulerConfig
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Request, SequenceStatus
from tests.engine.test_scheduler_stateful import FakeParams, PagedKVSim


def make_scheduler(depth: int, num_gpu_blocks=64, block_size=4, **sched) -> Scheduler:
    cache = CacheConfig(block_size=block_size, num_gpu_blocks=num_gpu_blocks)
    return Scheduler(SchedulerConfig(**sched), cache, max_batches_in_flight=depth)


def add(s: Scheduler, rid: str, prompt_len: int, **params) -> Request:
    request = Request(
        rid, [(7 * i + len(rid)) % 50 for i in range(prompt_len)], FakeParams(**params)
    )
    s.add_request(request)
    return request


def finish(s: Scheduler, out: SchedulerOutput) -> None:
    """The batch came back: one fresh token per live sampling sequence."""
    sampled = {ss.seq_id: [1] * ss.num_samples for ss in out.scheduled if ss.samples}
    s.update_from_output(out, {k: v for k, v in sampled.items() if k in s.in_flight})


def rids(out: SchedulerOutput) -> list[str]:
    return [ss.seq.request.request_id for ss in out.scheduled]


def test_depth_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"max_batches_in_flight must be an integer >= 1.*got 0"):
        make_scheduler(0)


def test_batches_in_flight_are_disjoint_and_share_the_work():
    s = make_scheduler(2)
    for i in range(8):
        add(s, f"r{i}", 5)
    first, second = s.schedule(), s.schedule()
    assert rids(first) == ["r0", "r1", "r2", "r3"] and rids(second) == ["r4", "r5", "r6", "r7"]
    assert s.schedule().is_empty  # everything is in flight
    finish(s, first)
    third = s.schedule()  # the first batch's sequences decode again; the second's still fly
    assert rids(third) == ["r0", "r1", "r2", "r3"] and all(
        ss.num_new_tokens == 1 for ss in third.scheduled
    )
    assert s.num_in_flight == 8


def test_depth_one_schedules_everything_at_once():
    s = make_scheduler(1)
    for i in range(8):
        add(s, f"r{i}", 5)
    assert len(s.schedule().scheduled) == 8


def test_abort_in_flight_frees_blocks_when_the_batch_returns():
    s = make_scheduler(2, num_gpu_blocks=16)
    add(s, "a", 6)
    add(s, "b", 6)
    first, second = s.schedule(), s.schedule()
    (seq_a,) = [ss.seq for ss in first.scheduled]
    free_before = s.kv.num_free_blocks
    assert s.abort_request("a") and seq_a.status == SequenceStatus.FINISHED_ABORTED
    # Its batch may still write its blocks: they stay held (not handed to anyone) until it returns.
    assert s.kv.num_free_blocks == free_before and seq_a.seq_id in s.kv.block_tables
    assert "a" not in s.requests
    finish(s, first)
    assert seq_a.seq_id not in s.kv.block_tables and s.kv.num_free_blocks == free_before + 2
    finish(s, second)
    s.abort_request("b")
    assert s.kv.num_free_blocks == s.kv.gpu_pool.num_usable_blocks and not s.in_flight


def test_in_flight_sequences_are_waited_for_not_preempted():
    # 4 usable blocks of 4 tokens: a and b take two each; a's decode then needs a third.
    s = make_scheduler(2, num_gpu_blocks=5, max_model_len=16)
    add(s, "a", 8)
    add(s, "b", 8)
    first, second = s.schedule(), s.schedule()
    assert rids(first) == ["a"] and rids(second) == ["b"] and s.kv.num_free_blocks == 0
    finish(s, first)
    waiting = s.schedule()  # only b (in flight) could make room: a waits, nobody is preempted
    assert waiting.is_empty and not waiting.preempted and s.num_preemptions == 0
    assert [q.request.request_id for q in s.running] == ["a", "b"]
    finish(s, second)
    out = s.schedule()  # b is back: the later arrival makes room for a
    assert rids(out) == ["a"] and [q.request.request_id for q in out.preempted] == ["b"]
    assert s.requests["b"].seqs[0].status == SequenceStatus.PREEMPTED


class PipelinedSchedulerMachine(RuleBasedStateMachine):
    """Adds, aborts, submits (up to depth batches in flight, executed in submission order on a
    fake paged cache, as the workers do) and returns of the oldest batch, in any order."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 20),
        num_cpu_blocks=st.integers(2, 12),
        chunked=st.booleans(),
        prefix_caching=st.booleans(),
        mode=st.sampled_from(["recompute", "swap"]),
        budget=st.integers(1, 24),
        max_num_seqs=st.integers(3, 8),
        depth=st.integers(2, 3),
    )
    def setup(
        self, block_size, num_gpu_blocks, num_cpu_blocks, chunked, prefix_caching, mode, budget,
        max_num_seqs, depth,
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
        self.scheduler = Scheduler(config, cache, max_batches_in_flight=depth)
        self.depth = depth
        self.sim = PagedKVSim(num_gpu_blocks, num_cpu_blocks, block_size)
        self.pending: deque[SchedulerOutput] = deque()
        self.requests: dict[str, Request] = {}
        self.rng = random.Random(0)

    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=20),
        n=st.integers(1, 3),
        max_tokens=st.none() | st.integers(1, 6),
    )
    def add(self, prompt, n, max_tokens):
        if len(prompt) >= self.scheduler.max_model_len:
            return
        request = Request(f"r{len(self.requests)}", prompt, FakeParams(n, max_tokens))
        self.scheduler.add_request(request)
        self.requests[request.request_id] = request

    @precondition(lambda self: self.scheduler.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        s = self.scheduler
        request = s.requests[data.draw(st.sampled_from(sorted(s.requests)))]
        flying = [q for q in request.seqs if q.seq_id in s.in_flight]
        assert s.abort_request(request.request_id)
        for seq in flying:  # freed only when its batch returns
            assert seq.seq_id in s.kv.block_tables

    @precondition(lambda self: len(self.pending) < self.depth)
    @rule()
    def submit(self):
        self._submit()

    @precondition(lambda self: self.pending)
    @rule()
    def complete(self):
        self._complete()

    def _submit(self) -> SchedulerOutput:
        s = self.scheduler
        before = set(s.in_flight)
        out = s.schedule()
        ids = [ss.seq_id for ss in out.scheduled]
        assert not before & set(ids), "a sequence in flight was scheduled again"
        assert not before & {q.seq_id for q in out.preempted}, "a sequence in flight was preempted"
        self.sim.execute(out, s.kv.gpu_pool)  # the workers run batches in submission order
        self.pending.append(out)
        return out

    def _complete(self) -> None:
        s = self.scheduler
        out = self.pending.popleft()
        sampled = {
            ss.seq_id: [self.rng.randrange(3) for _ in range(ss.num_samples)]
            for ss in out.scheduled
            if ss.samples and not ss.seq.is_finished
        }
        s.update_from_output(out, sampled, is_stopped=lambda seq: self.rng.random() < 0.15)

    @invariant()
    def blocks_are_consistent(self):
        if not hasattr(self, "scheduler"):
            return
        s, kv = self.scheduler, self.scheduler.kv
        for pool, tables in ((kv.gpu_pool, kv.block_tables), (kv.cpu_pool, kv.cpu_tables)):
            if pool is None:
                assert not tables
                continue
            pool.check()
            refs = Counter(b.block_id for table in tables.values() for b in table)
            for block in pool.blocks:
                assert block.ref_cnt == refs.get(block.block_id, 0), block
            assert pool.num_free_blocks + len(refs) == pool.num_usable_blocks
        flying = [ss.seq_id for out in self.pending for ss in out.scheduled]
        assert len(flying) == len(set(flying)), "a sequence is in two batches in flight"
        assert set(flying) == set(s.in_flight)
        live = {q.seq_id for q in s.waiting + s.running + s.swapped}
        assert set(kv.block_tables) | set(kv.cpu_tables) <= live | set(s.in_flight)
        for seq in s.in_flight.values():
            assert seq.status == SequenceStatus.RUNNING or seq.is_finished

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        s = self.scheduler
        for _ in range(2000):
            if not (s.has_unfinished() or self.pending):
                break
            while len(self.pending) < self.depth:  # as the engine does
                flying = len(self.pending)
                out = self._submit()
                moves = out.blocks_to_swap_out or out.blocks_to_swap_in or out.blocks_to_copy
                if out.is_empty and not moves:
                    self.pending.pop()
                    assert flying or out.preempted, "nothing in flight, yet nothing scheduled"
                    break
            if self.pending:
                self._complete()
            self.blocks_are_consistent()
        assert not s.has_unfinished() and not self.pending and not s.in_flight
        kv = s.kv
        assert kv.gpu_pool.num_free_blocks == kv.gpu_pool.num_usable_blocks
        assert kv.cpu_pool is None or kv.cpu_pool.num_free_blocks == kv.cpu_pool.num_usable_blocks
        assert not kv.block_tables and not kv.cpu_tables


PipelinedSchedulerMachine.TestCase.settings = settings(
    max_examples=max(50, settings.default.max_examples), stateful_step_count=30
)
TestPipelinedScheduler = PipelinedSchedulerMachine.TestCase
