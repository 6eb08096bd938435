"""Scheduler.schedule_ahead: the next decode step of a step still in flight (asynchronous
scheduling), and every case where it must decline so schedule() keeps its order and limits."""

from __future__ import annotations

import itertools

from test_scheduler import add, make_scheduler

from engine.scheduler import SchedulerOutput
from engine.sequence import SequenceStatus

_tokens = itertools.count(2000)


def _sampled(out):
    return {ss.seq_id: [next(_tokens)] for ss in out.scheduled if ss.samples}


def test_ahead_step_computes_the_pending_token_and_chains():
    s = make_scheduler(block_size=4)
    add(s, "a", 3, max_tokens=10)
    add(s, "b", 6, max_tokens=10)
    out = s.schedule()  # both prefills end: each samples
    plan = s.schedule_ahead(out)
    assert plan is not None
    nxt, rows = plan
    assert rows == [0, 1]
    for ss, prev in zip(nxt.scheduled, out.scheduled, strict=True):
        seq = ss.seq
        assert ss.start_pos == len(seq.token_ids) == prev.start_pos + prev.num_new_tokens
        assert ss.num_new_tokens == 1 and ss.num_samples == 1
        table = s.kv.block_ids(seq)
        assert ss.slot_mapping == [table[ss.start_pos // 4] * 4 + ss.start_pos % 4]
    s.update_from_output(out, _sampled(out))
    s.resume_in_flight(nxt)
    assert set(s.in_flight) == {ss.seq_id for ss in nxt.scheduled}
    # The next one chains from the step still in flight, then outputs arrive in order.
    nxt2, _ = s.schedule_ahead(nxt)
    s.update_from_output(nxt, _sampled(nxt))
    s.resume_in_flight(nxt2)
    s.update_from_output(nxt2, _sampled(nxt2))
    for ss in nxt2.scheduled:
        assert ss.seq.num_computed_tokens == len(ss.seq.token_ids) - 1
    assert not s.in_flight


def test_ahead_leaves_out_sequences_that_finish_by_length():
    s = make_scheduler()
    add(s, "short", 3, max_tokens=1)  # its first token is its last
    add(s, "long", 3, max_tokens=5)
    out = s.schedule()
    nxt, rows = s.schedule_ahead(out)
    assert [ss.seq.request.request_id for ss in nxt.scheduled] == ["long"] and rows == [1]
    s.update_from_output(out, _sampled(out))
    assert s.requests.keys() == {"long"}
    s.resume_in_flight(nxt)
    s.update_from_output(nxt, _sampled(nxt))
    assert s.kv.num_used_blocks == len(s.kv.block_tables)  # only "long" holds blocks


def test_ahead_declines_when_schedule_would_do_otherwise():
    # Someone waits and there is room: schedule() would admit them next.
    s = make_scheduler(max_num_seqs=4)
    add(s, "a", 3, max_tokens=8)
    out = s.schedule()
    add(s, "late", 3, max_tokens=8)
    assert s.schedule_ahead(out) is None
    # Someone waits, no room, but a sequence finishes by length: schedule() admits in its place.
    s = make_scheduler(max_num_seqs=1)
    add(s, "a", 3, max_tokens=1)
    add(s, "b", 3, max_tokens=8)
    out = s.schedule()
    assert s.schedule_ahead(out) is None
    # Someone waits, no room, nobody finishes: the running ones go on.
    s = make_scheduler(max_num_seqs=1)
    add(s, "a", 3, max_tokens=8)
    add(s, "b", 3, max_tokens=8)
    out = s.schedule()
    assert s.schedule_ahead(out) is not None
    # A prefill chunk that stops short of the end samples nothing: no token to feed.
    s = make_scheduler(max_num_batched_tokens=4, enable_chunked_prefill=True)
    add(s, "long_prompt", 10, max_tokens=4)
    assert s.schedule_ahead(s.schedule()) is None
    # A request that forks (n > 1) on this step.
    s = make_scheduler()
    add(s, "fork", 3, n=2, max_tokens=4)
    assert s.schedule_ahead(s.schedule()) is None
    # An aborted sequence in the step.
    s = make_scheduler()
    add(s, "a", 3, max_tokens=8)
    out = s.schedule()
    s.abort_request("a")
    assert out.scheduled[0].seq.status == SequenceStatus.FINISHED_ABORTED
    assert s.schedule_ahead(out) is None


def test_ahead_declines_without_blocks_and_changes_nothing_schedule_would_not():
    s = make_scheduler(num_gpu_blocks=4, block_size=4)  # 3 usable blocks (block 0 is null)
    add(s, "a", 8, max_tokens=8)  # two full blocks
    add(s, "b", 4, max_tokens=8)  # one: the pool is full, each next token needs a new block
    out = s.schedule()
    free = s.kv.num_free_blocks
    assert s.schedule_ahead(out) is None
    assert s.kv.num_free_blocks == free


def test_ahead_never_leaves_a_running_sequence_behind():
    s = make_scheduler()
    add(s, "a", 3, max_tokens=8)
    add(s, "b", 3, max_tokens=8)
    out = s.schedule()
    s.update_from_output(out, _sampled(out))
    both = s.schedule()
    only_a = SchedulerOutput(scheduled=both.scheduled[:1])  # "b" runs but is not in the step
    assert s.schedule_ahead(only_a) is None
    assert s.schedule_ahead(both) is not None
