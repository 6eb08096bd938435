"""Scheduler units: token budget and chunked prefill, decodes first, limits, preemption by
recompute and by swap, abort, prefix hits, forks (n > 1), finishing, waste, and config errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from engine.config import (
    CacheConfig,
    SchedulerConfig,
    kv_block_bytes,
    num_blocks_for_budget,
)
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Request, SequenceStatus


@dataclass
class FakeParams:
    n: int = 1
    max_tokens: int | None = None
    prompt_logprobs: int | None = None  # set: the request takes no prefix-cache hits
    structured_outputs: object = None  # set: never scheduled ahead


_tokens = itertools.count(1000)


def make_scheduler(
    num_gpu_blocks=64, block_size=4, num_cpu_blocks=None, prefix_caching=True, **sched
) -> Scheduler:
    cache = CacheConfig(
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=num_cpu_blocks,
        enable_prefix_caching=prefix_caching,
    )
    return Scheduler(SchedulerConfig(**sched), cache)


def add(s: Scheduler, rid: str, prompt_len: int, n=1, max_tokens=None, prompt=None) -> Request:
    prompt = prompt if prompt is not None else [hash((rid, i)) % 50 for i in range(prompt_len)]
    request = Request(rid, prompt, FakeParams(n=n, max_tokens=max_tokens))
    s.add_request(request)
    return request


def step(s: Scheduler, is_stopped=None) -> SchedulerOutput:
    """schedule + a fake model that samples fresh token ids."""
    out = s.schedule()
    sampled = {
        ss.seq_id: [next(_tokens) for _ in range(ss.num_samples)]
        for ss in out.scheduled
        if ss.samples
    }
    s.update_from_output(out, sampled, is_stopped)
    return out


def chunks(out: SchedulerOutput) -> dict[str, int]:
    return {
        f"{ss.seq.request.request_id}/{ss.seq.index}": ss.num_new_tokens for ss in out.scheduled
    }


def drain(s: Scheduler, max_steps=1000) -> int:
    for i in range(max_steps):
        if not s.has_unfinished():
            return i
        step(s)
    raise AssertionError("requests did not finish")


def assert_pool_full(s: Scheduler) -> None:
    kv = s.kv
    assert kv.gpu_pool.num_free_blocks == kv.gpu_pool.num_usable_blocks
    assert kv.cpu_pool is None or kv.cpu_pool.num_free_blocks == kv.cpu_pool.num_usable_blocks
    kv.gpu_pool.check()


# -- budget, chunking, ordering ----------------------------------------------------------------
def test_chunked_prefill_respects_the_budget_and_samples_only_at_the_end():
    s = make_scheduler(max_num_batched_tokens=32, max_model_len=200)
    add(s, "a", 100, max_tokens=2)
    sizes, samples = [], []
    for _ in range(4):
        out = step(s)
        (ss,) = out.scheduled
        assert out.num_batched_tokens <= 32
        assert ss.slot_mapping == [
            ss.block_table[p // 4] * 4 + p % 4 for p in range(ss.start_pos, ss.seq_len)
        ]
        sizes.append(ss.num_new_tokens)
        samples.append(ss.samples)
    assert sizes == [32, 32, 32, 4] and samples == [False, False, False, True]
    seq = s.requests["a"].seqs[0]
    assert seq.num_computed_tokens == 100 and seq.num_output_tokens == 1
    out = step(s)
    assert chunks(out) == {"a/0": 1} and out.scheduled[0].positions == [100]
    assert not s.has_unfinished() and seq.finish_reason == "length"
    assert_pool_full(s)


def test_decodes_go_first_and_mix_with_a_prefill_chunk():
    s = make_scheduler(max_num_batched_tokens=16, max_model_len=200)
    add(s, "a", 5)
    add(s, "b", 6)
    assert chunks(step(s)) == {"a/0": 5, "b/0": 6}
    add(s, "c", 40)
    out = step(s)
    assert chunks(out) == {"a/0": 1, "b/0": 1, "c/0": 14}
    assert [ss.samples for ss in out.scheduled] == [True, True, False]
    assert chunks(step(s)) == {"a/0": 1, "b/0": 1, "c/0": 14}
    assert chunks(step(s)) == {"a/0": 1, "b/0": 1, "c/0": 12}
    assert chunks(step(s)) == {"a/0": 1, "b/0": 1, "c/0": 1}


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = make_scheduler(max_num_batched_tokens=20, max_model_len=20, enable_chunked_prefill=False)
    add(s, "a", 6)
    add(s, "b", 15)
    # b does not fit next to a's prompt (6 + 15 > 20) and is not split: it waits a step.
    assert chunks(step(s)) == {"a/0": 6}
    assert chunks(step(s)) == {"a/0": 1, "b/0": 15}
    with pytest.raises(ValueError, match="at most 19"):
        add(s, "c", 20)


def test_max_num_seqs_counts_the_forks_of_n():
    s = make_scheduler(max_num_seqs=3, max_model_len=100)
    add(s, "a", 4, n=2)
    add(s, "b", 4, n=2)
    add(s, "c", 4)
    # a reserves 2 of the 3 slots; b needs 2 and, FCFS, c may not pass it.
    assert chunks(step(s)) == {"a/0": 4}
    assert chunks(step(s)) == {"a/0": 1, "a/1": 1}
    s.abort_request("a")
    assert chunks(step(s)) == {"b/0": 4, "c/0": 4}
    assert chunks(step(s)) == {"b/0": 1, "b/1": 1, "c/0": 1}
    with pytest.raises(ValueError, match="n=4 exceeds max_num_seqs=3"):
        add(s, "d", 4, n=4)


def test_add_request_rejects_duplicates_and_bad_requests():
    s = make_scheduler(max_model_len=50)
    add(s, "a", 3)
    with pytest.raises(ValueError, match="already added"):
        add(s, "a", 3)
    with pytest.raises(ValueError, match="prompt has 50 tokens"):
        add(s, "long", 50)
    with pytest.raises(ValueError, match="must not be empty"):
        Request("x", [], FakeParams())
    with pytest.raises(ValueError, match="token ids must be integers >= 0, got -1"):
        Request("x", [1, -1], FakeParams())
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        Request("x", [1], FakeParams(n=0))
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1 or None, got 0"):
        Request("x", [1], FakeParams(max_tokens=0))


# -- preemption --------------------------------------------------------------------------------
def test_recompute_preemption_frees_the_latest_and_keeps_its_output():
    # 6 usable blocks of 4 slots; two sequences growing from 8 tokens cannot both reach 16.
    s = make_scheduler(num_gpu_blocks=7, max_model_len=24, prefix_caching=False)
    a = add(s, "a", 8, max_tokens=12).seqs[0]
    b = add(s, "b", 8, max_tokens=12).seqs[0]
    preempted_at = None
    for _ in range(40):
        out = step(s)
        if out.preempted:
            assert out.preempted == [b] and b.status == SequenceStatus.PREEMPTED
            assert b.num_computed_tokens == 0 and b.num_output_tokens > 0
            assert s.kv.get_block_table(b) == [] and "b/0" not in chunks(out)
            preempted_at = b.num_tokens
            break
    assert preempted_at is not None
    out = step(s)
    assert not out.preempted and "b/0" not in chunks(out), "no admission while a still runs"
    while not a.is_finished:
        step(s)
    out = step(s)
    # b recomputes prompt and output together, then samples its next token.
    assert chunks(out) == {"b/0": preempted_at} and out.scheduled[0].samples
    drain(s)
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert s.num_preemptions == 1
    assert_pool_full(s)


def test_swap_preemption_moves_blocks_out_and_back():
    s = make_scheduler(num_gpu_blocks=7, num_cpu_blocks=8, max_model_len=24, preemption_mode="swap")
    a = add(s, "a", 8, max_tokens=12).seqs[0]
    b = add(s, "b", 8, max_tokens=12).seqs[0]
    swap_out = None
    while swap_out is None:
        out = step(s)
        if out.preempted:
            assert out.preempted == [b] and b.status == SequenceStatus.SWAPPED
            swap_out = out.blocks_to_swap_out
            computed = b.num_computed_tokens
            assert len(swap_out) == len(s.kv.cpu_tables[b.seq_id]) and computed > 0
    while not a.is_finished:
        out = step(s)
        assert not out.blocks_to_swap_in
    out = step(s)
    assert [c for c, _ in out.blocks_to_swap_in] == [c for _, c in swap_out]
    (ss,) = out.scheduled
    assert ss.seq is b and ss.start_pos == computed and ss.num_new_tokens == 1
    assert ss.block_table[: len(swap_out)] == [g for _, g in out.blocks_to_swap_in]
    drain(s)
    assert b.num_output_tokens == 12
    assert_pool_full(s)


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    s = make_scheduler(num_gpu_blocks=7, num_cpu_blocks=2, max_model_len=24, preemption_mode="swap")
    add(s, "a", 8, max_tokens=12)
    b = add(s, "b", 8, max_tokens=12).seqs[0]
    while not s.num_preemptions:
        out = step(s)
    assert out.preempted == [b] and b.status == SequenceStatus.PREEMPTED
    assert not out.blocks_to_swap_out
    drain(s)
    assert_pool_full(s)


def test_abort_frees_blocks_wherever_the_request_is():
    s = make_scheduler(num_gpu_blocks=7, num_cpu_blocks=8, max_model_len=24, preemption_mode="swap")
    add(s, "a", 8, max_tokens=12)
    b = add(s, "b", 8, max_tokens=12).seqs[0]
    while b.status != SequenceStatus.SWAPPED:
        step(s)
    add(s, "c", 3)
    assert "c/0" not in chunks(step(s)), "no admission while an earlier request is swapped out"
    assert s.kv.cpu_pool.num_free_blocks < s.kv.cpu_pool.num_usable_blocks
    assert s.abort_request("b") and b.finish_reason == "abort"
    assert s.kv.cpu_pool.num_free_blocks == s.kv.cpu_pool.num_usable_blocks
    assert s.abort_request("c")  # still waiting
    assert s.abort_request("a")  # running
    assert not s.abort_request("a") and not s.abort_request("nope")
    assert not s.has_unfinished() and s.schedule().is_empty
    assert_pool_full(s)


def test_abort_between_schedule_and_update_is_ignored():
    s = make_scheduler()
    add(s, "a", 5)
    add(s, "b", 5)
    out = s.schedule()
    s.abort_request("a")
    sampled = {ss.seq_id: [1] for ss in out.scheduled}
    new = s.update_from_output(out, sampled)
    assert [q.request.request_id for q in new] == ["b"]


# -- prefix caching ----------------------------------------------------------------------------
def test_prefix_hits_skip_computed_blocks():
    s = make_scheduler(block_size=16, num_gpu_blocks=20, max_model_len=200)
    prompt = list(range(40))
    add(s, "a", 0, max_tokens=1, prompt=prompt)
    drain(s)
    add(s, "b", 0, max_tokens=1, prompt=prompt[:36] + [7, 7, 7, 7])
    out = step(s)
    (ss,) = out.scheduled
    assert ss.start_pos == 32 and ss.num_new_tokens == 8
    add(s, "c", 0, max_tokens=1, prompt=prompt[:32])  # exactly two blocks: recompute the last
    (ss,) = step(s).scheduled
    assert ss.start_pos == 16 and ss.num_new_tokens == 16 and ss.samples
    stats = s.kv_stats()
    assert stats.prefix_cache_hits == 32 + 16 and stats.prefix_cache_queries == 40 + 40 + 32
    assert stats.prefix_cache_hit_rate == pytest.approx(48 / 112)


def test_prefix_caching_off_computes_everything():
    s = make_scheduler(block_size=16, num_gpu_blocks=20, max_model_len=200, prefix_caching=False)
    prompt = list(range(40))
    add(s, "a", 0, max_tokens=1, prompt=prompt)
    drain(s)
    add(s, "b", 0, max_tokens=1, prompt=prompt)
    (ss,) = step(s).scheduled
    assert ss.start_pos == 0 and ss.num_new_tokens == 40


# -- n > 1, finishing ----------------------------------------------------------------------------
def test_n_forks_after_the_prompt_and_copies_on_write():
    s = make_scheduler(block_size=4, max_model_len=100)
    request = add(s, "a", 6, n=3, max_tokens=3)
    out = s.schedule()
    (ss,) = out.scheduled
    assert ss.num_samples == 3
    new = s.update_from_output(out, {ss.seq_id: [10, 11, 12]})
    assert [q.output_token_ids for q in new] == [[10], [11], [12]]
    assert [q.index for q in new] == [0, 1, 2] and request.seqs == new
    table = s.kv.get_block_table(new[0])
    assert all(s.kv.get_block_table(q) == table for q in new)
    assert s.kv.gpu_pool.blocks[table[1]].ref_cnt == 3

    out = step(s)
    assert [ss.num_samples for ss in out.scheduled] == [1, 1, 1]
    # Two of the three sharers copy the partial block; the last writes in place.
    assert len(out.blocks_to_copy) == 2 and {c[0] for c in out.blocks_to_copy} == {table[1]}
    assert len({tuple(ss.block_table) for ss in out.scheduled}) == 3
    drain(s)
    assert [q.num_output_tokens for q in request.seqs] == [3, 3, 3]
    assert request.is_finished and all(q.finish_reason == "length" for q in request.seqs)
    assert_pool_full(s)


def test_stop_callback_and_length_limits():
    s = make_scheduler(max_model_len=12)
    a = add(s, "a", 4, max_tokens=100).seqs[0]
    b = add(s, "b", 4).seqs[0]
    c = add(s, "c", 4, max_tokens=2).seqs[0]

    def is_stopped(seq):
        return seq is b and seq.num_output_tokens == 3

    for _ in range(20):
        step(s, is_stopped)
    assert (a.finish_reason, a.num_tokens) == ("length", 12)  # max_model_len
    assert (b.finish_reason, b.num_output_tokens) == ("stop", 3)
    assert (c.finish_reason, c.num_output_tokens) == ("length", 2)
    assert_pool_full(s)


def test_update_rejects_wrong_sample_counts():
    s = make_scheduler()
    add(s, "a", 4, n=2)
    add(s, "b", 8)
    s.add_request(Request("c", [1] * 40, FakeParams()))
    s.config.max_num_batched_tokens = 20
    out = s.schedule()
    ids = {ss.seq.request.request_id: ss.seq_id for ss in out.scheduled}
    with pytest.raises(ValueError, match="needs 2 sampled tokens"):
        s.update_from_output(out, {ids["a"]: [1], ids["b"]: [1]})
    with pytest.raises(ValueError, match="needs 1 sampled tokens"):
        s.update_from_output(out, {ids["a"]: [1, 2]})
    with pytest.raises(ValueError, match="did not sample this step"):
        s.update_from_output(out, {ids["a"]: [1, 2], ids["b"]: [1], ids["c"]: [3]})
    # Nothing changed by the failed calls: the right answer is still accepted.
    assert len(s.update_from_output(out, {ids["a"]: [1, 2], ids["b"]: [1]})) == 3
    with pytest.raises(RuntimeError, match="does not belong"):
        s.update_from_output(out, {ids["a"]: [1, 2], ids["b"]: [1]})


def test_finish_sequence_checks_its_arguments():
    s = make_scheduler()
    seq = add(s, "a", 4).seqs[0]
    with pytest.raises(ValueError, match="FINISHED_"):
        s.finish_sequence(seq, SequenceStatus.RUNNING)
    s.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED)
    with pytest.raises(ValueError, match="already finished"):
        s.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)


# -- memory statistics -------------------------------------------------------------------------
def test_waste_is_the_partial_last_blocks_only():
    s = make_scheduler(block_size=16, num_gpu_blocks=400, max_model_len=4000)
    lengths = [1000, 777, 1500, 1201]
    for i, n in enumerate(lengths):
        add(s, f"r{i}", n)
    while any(
        q.num_computed_tokens < len(q.request.prompt_token_ids) for q in s.running + s.waiting
    ):
        step(s)
    stats = s.kv_stats()
    held = sum(q.num_computed_tokens for q in s.running)
    blocks = sum(-(-q.num_computed_tokens // 16) for q in s.running)
    assert stats.num_held_tokens == held and stats.num_allocated_slots == blocks * 16
    assert stats.waste == pytest.approx(1 - held / (blocks * 16))
    assert stats.waste < 0.04
    assert stats.num_used_blocks == blocks and stats.usage == pytest.approx(blocks / 399)


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 12}, "block_size must be a power of two in \\[1, 512\\], got 12"),
        ({"block_size": 1024}, "block_size"),
        ({"num_gpu_blocks": 1}, "num_gpu_blocks must be an integer >= 2 or None, got 1"),
        ({"num_cpu_blocks": -1}, "num_cpu_blocks"),
        ({"swap_space_gib": -1}, "swap_space_gib must be a number in \\[0, 1024\\], got -1"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"cache_dtype": "int3"}, "cache_dtype must be one of auto, .*got 'int3'"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes must be an integer >= 1"),
    ],
)
def test_cache_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an integer >= 1, got 0"),
        ({"max_num_seqs": 2.0}, "max_num_seqs must be an integer >= 1, got 2.0"),
        ({"max_model_len": 1}, "max_model_len must be an integer >= 2 or None, got 1"),
        ({"preemption_mode": "drop"}, "preemption_mode must be one of recompute, swap"),
        (
            {"enable_chunked_prefill": False, "max_model_len": 4096},
            "max_num_batched_tokens must be >= max_model_len=4096 when enable_chunked_prefill",
        ),
    ],
)
def test_scheduler_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_scheduler_construction_errors():
    with pytest.raises(ValueError, match="num_gpu_blocks is None"):
        Scheduler(SchedulerConfig(), CacheConfig())
    with pytest.raises(ValueError, match="preemption_mode='swap' needs .*num_cpu_blocks >= 2"):
        make_scheduler(preemption_mode="swap")
    with pytest.raises(ValueError, match="holds 252 tokens, less than max_model_len=300"):
        make_scheduler(num_gpu_blocks=64, block_size=4, max_model_len=300)
    # Without max_model_len, the pool's capacity (and without chunking, the budget) bounds it.
    assert make_scheduler(num_gpu_blocks=64, block_size=4).max_model_len == 252
    s = make_scheduler(enable_chunked_prefill=False, max_num_batched_tokens=100)
    assert s.max_model_len == 100


def test_kv_sizing_helpers():
    # Llama-3-8B shape: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks: 2 MiB a block.
    block = kv_block_bytes(16, 32, 8, 128, 2)
    assert block == 2 * 32 * 16 * 8 * 128 * 2 == 2 * 2**20
    assert num_blocks_for_budget(10 * 2**30, block) == 5120
    assert CacheConfig(swap_space_gib=1).resolve_num_cpu_blocks(block) == 512
    assert CacheConfig(num_cpu_blocks=7).resolve_num_cpu_blocks(block) == 7
    with pytest.raises(ValueError, match="holds 1 blocks of 2097152 bytes; at least 2"):
        num_blocks_for_budget(3 * 2**20, block)
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1, got 0"):
        kv_block_bytes(16, 32, 8, 0, 2)
