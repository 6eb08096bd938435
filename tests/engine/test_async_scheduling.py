"""Asynchronous scheduling (step N + 1 launched before N's tokens reach the host): the same tokens,
finish reasons and block accounting as synchronous steps, on any mix of requests."""

from __future__ import annotations

import random

import pytest
from models_fixtures import build_model

from engine import LLM, SamplingParams
from engine.engine_config import EngineConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_async")
    build_model("llama", folder)
    return folder


def _llm(folder, async_scheduling: bool, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    return LLM(
        model=str(folder), dtype="float32", device="cpu", async_scheduling=async_scheduling, **kw
    )


def _workload(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts with every kind of request the engine treats differently when scheduling ahead."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(2, 40))] for _ in range(14)]
    shared = prompts[0][:32]  # prefix-cache hits
    prompts[1] = shared + [5, 6, 7]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24)) for _ in prompts]
    params[2] = SamplingParams(temperature=0.9, seed=11, max_tokens=20)  # seeded random
    params[3] = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3, max_tokens=16)
    # Stop tokens: sequences stop at steps nobody knows in advance (their row ahead is wasted).
    params[4] = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=list(range(3, 384, 5)))
    params[5] = SamplingParams(temperature=0, max_tokens=16, logprobs=2)  # host-side sampling
    params[6] = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3)
    params[7] = SamplingParams(temperature=0, max_tokens=16, min_tokens=6, stop_token_ids=[9])
    params[8] = SamplingParams(temperature=0.8, n=3, seed=4, max_tokens=10)  # a fork
    params[9] = SamplingParams(temperature=0, max_tokens=24, stop=["a", "e"])  # stop strings
    # Bad words: one-token bans sample on the device; a longer word needs the output so far.
    params[10] = SamplingParams(temperature=0, max_tokens=20, bad_words=["the", "ab c"])
    params[11] = SamplingParams(temperature=0.8, seed=5, max_tokens=12, bad_words=["e"])
    return prompts, params


def _run(llm: LLM, prompts, params):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.text, c.logprobs) for c in o.outputs] for o in outs]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(max_num_seqs=3),  # a queue waits while the running ones are full
        dict(enable_chunked_prefill=True, max_num_batched_tokens=16),
        dict(num_gpu_blocks=24, block_size=4, max_model_len=80),  # preemption by recompute
    ],
    ids=["plain", "queue", "chunked", "preempt"],
)
def test_async_steps_equal_sync_steps(tiny, kw):
    prompts, params = _workload(0)
    sync = _llm(tiny, False, **kw)
    expected = _run(sync, prompts, params)
    again = _run(sync, prompts, params)  # prefix cache warm: other chunks, other float sums
    llm = _llm(tiny, True, **kw)
    assert _run(llm, prompts, params) == expected
    engine = llm.engine
    assert engine.num_steps_ahead > 0
    if "num_gpu_blocks" in kw:
        assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.kv.num_used_blocks == 0  # no block leaks, wasted rows included
    assert not engine.scheduler.in_flight and not engine.has_unfinished_requests()
    # And again on the same engine (prefix cache warm, state reused).
    assert _run(llm, prompts, params) == again


def test_batch_one_decode_runs_ahead_every_step(tiny):
    llm = _llm(tiny, True)
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p, use_tqdm=False)
    engine = llm.engine
    # 20 steps: the prefill and 19 decodes; all but the last decode run ahead of the previous
    # step's readback (the last one is never scheduled: max_tokens is known).
    assert engine.num_steps == 20
    assert engine.num_steps_ahead == 19


def test_abort_while_a_step_runs_ahead(tiny):
    llm = _llm(tiny, True)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a = engine.add_request(None, greedy, prompt_token_ids=[4, 5, 6])
    b = engine.add_request(None, greedy, prompt_token_ids=[7, 8, 9, 10])
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None  # a step is in flight
    assert engine.abort_request(a)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[a].outputs[0].finish_reason == "abort"
    assert finished[b].outputs[0].finish_reason == "length"
    assert len(finished[b].outputs[0].token_ids) == 40
    assert engine.scheduler.kv.num_used_blocks == 0
    assert not engine.scheduler.in_flight


def test_async_scheduling_config_errors(tiny):
    with pytest.raises(ValueError, match="async_scheduling must be"):
        EngineConfig(async_scheduling="yes")
    with pytest.raises(ValueError, match="async_scheduling=True is not available"):
        LLM(model=str(tiny), device="cpu", async_scheduling=True, pipeline_parallel_size=2)
