"""Priority scheduling (SchedulerConfig.policy "priority", vLLM's scheduling_policy): waiting
requests start in priority order, a waiting request that finds no room preempts running ones of
lower priority, and nothing changes the tokens a greedy request gets or leaks a block; FCFS
engines refuse priorities."""

from __future__ import annotations

import random

import pytest
from models_fixtures import cpu_llm

from engine import SamplingParams
from engine.config import CacheConfig, SchedulerConfig
from engine.scheduler import Scheduler
from engine.sequence import Request


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


def _scheduler(policy: str, **kw) -> Scheduler:
    cache = CacheConfig(
        block_size=4, num_gpu_blocks=kw.pop("blocks", 64), enable_prefix_caching=False
    )
    sched = SchedulerConfig(max_num_batched_tokens=64, max_model_len=20, policy=policy, **kw)
    return Scheduler(sched, cache)


def _request(rid: str, n_tokens: int, priority: int = 0) -> Request:
    return Request(
        rid, list(range(1, n_tokens + 1)), SamplingParams(max_tokens=8), priority=priority
    )


def _step(s: Scheduler):
    out = s.schedule()
    sampled = {ss.seq.seq_id: [7] for ss in out.scheduled if ss.num_samples}
    s.update_from_output(out, sampled, is_stopped=lambda seq: False)
    return out


def test_waiting_requests_start_in_priority_order():
    s = _scheduler("priority", max_num_seqs=1)
    for rid, prio in (("low", 5), ("mid", 1), ("high", -3)):
        s.add_request(_request(rid, 6, prio))
    out = _step(s)
    assert [ss.seq.request.request_id for ss in out.scheduled] == ["high"]
    assert [q.request.request_id for q in s.waiting] == ["mid", "low"]


def test_a_higher_priority_arrival_preempts_a_lower_one():
    s = _scheduler("priority", max_num_seqs=1)
    s.add_request(_request("low", 6, 5))
    _step(s)
    _step(s)  # low is decoding
    s.add_request(_request("high", 6, 0))
    out = _step(s)
    assert [ss.seq.request.request_id for ss in out.scheduled] == ["high"]
    assert [q.request.request_id for q in out.preempted] == ["low"]
    assert s.num_preemptions == 1 and s.waiting[0].request.request_id == "low"
    # FCFS: the same arrivals wait their turn
    f = _scheduler("fcfs", max_num_seqs=1)
    f.add_request(_request("first", 6))
    _step(f)
    f.add_request(_request("second", 6))
    assert [ss.seq.request.request_id for ss in _step(f).scheduled] == ["first"]


def test_blocks_too_are_taken_from_lower_priorities():
    s = _scheduler("priority", max_num_seqs=8, blocks=6)  # 5 usable blocks of 4 tokens
    s.add_request(_request("low", 16, 9))  # 4 blocks
    _step(s)
    s.add_request(_request("high", 8, 0))  # 2 blocks: only after low gives its back
    out = _step(s)
    assert [ss.seq.request.request_id for ss in out.scheduled] == ["high"]
    assert [q.request.request_id for q in out.preempted] == ["low"]


def test_fcfs_refuses_priorities(tiny):
    s = _scheduler("fcfs")
    with pytest.raises(ValueError, match="priority=2 needs scheduling_policy='priority'"):
        s.add_request(_request("x", 4, 2))
    with pytest.raises(ValueError, match="scheduling policy must be one of fcfs, priority"):
        SchedulerConfig(policy="lifo")
    llm = cpu_llm(tiny)
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        llm.generate(prompt_token_ids=[[5, 6]], priority=[1])
    assert not llm.engine.requests


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_priorities_keep_greedy_tokens_and_leak_nothing(tiny, async_scheduling):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(4, 40))] for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = cpu_llm(tiny).generate(prompt_token_ids=prompts, sampling_params=params)
    # few slots and blocks; the later half arrives while the first runs, mostly ahead of it
    llm = cpu_llm(tiny, scheduling_policy="priority", max_num_seqs=3, num_gpu_blocks=12,
                  max_model_len=64, async_scheduling=async_scheduling)  # fmt: skip
    engine, done, finished_order = llm.engine, {}, []
    for i, p in enumerate(prompts[:6]):
        engine.add_request(None, params, prompt_token_ids=p, request_id=str(i), priority=5)
    for _ in range(3):
        engine.step()
    for i, p in enumerate(prompts[6:], 6):
        engine.add_request(None, params, prompt_token_ids=p, request_id=str(i), priority=i % 3 - 1)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
                finished_order.append(int(out.request_id))
    assert [done[i].outputs[0].token_ids for i in range(12)] == [
        o.outputs[0].token_ids for o in want
    ]
    assert engine.kv_stats().num_used_blocks == 0 and engine.scheduler.num_preemptions > 0
    assert (engine.num_steps_ahead > 0) == async_scheduling
    # every late arrival finished before the early ones still waiting when it came
    assert max(finished_order.index(i) for i in range(6, 12)) < finished_order.index(5)
