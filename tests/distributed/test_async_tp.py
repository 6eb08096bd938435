"""Asynchronous scheduling on workers (TP=2, mp executor, gloo on the CPU): the ranks hold a step's
samples on their devices, the output rank shares them with the group, the next step is fed from
them; tokens equal the in-process synchronous engine's, aborts and stops leak nothing."""

from __future__ import annotations

import random

import pytest
from test_remote_sampling import _engine as remote_sampling_engine

from engine import SamplingParams
from engine.llm_engine import LLMEngine


def _engine(model: str, tp: int, async_scheduling: bool) -> LLMEngine:
    return remote_sampling_engine(model, tp, async_scheduling=async_scheduling, max_num_seqs=4)


def _requests() -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(5)
    out = {}
    for i in range(7):
        prompt = [rng.randrange(3, 384) for _ in range(rng.randint(3, 30))]
        out[f"greedy{i}"] = (prompt, SamplingParams(temperature=0, max_tokens=rng.randint(2, 14)))
    out["seeded"] = ([4, 5, 6, 7], SamplingParams(temperature=0.9, top_k=40, seed=3, max_tokens=12))
    out["stops"] = ([8, 9, 10], SamplingParams(temperature=0, max_tokens=20,
                                               stop_token_ids=list(range(3, 384, 6))))  # fmt: skip
    out["logprobs"] = ([11, 12], SamplingParams(temperature=0, max_tokens=6, logprobs=1))
    return out


def _run(engine: LLMEngine, abort: bool = False) -> tuple[dict, str | None]:
    """Every request's (tokens, finish reason); with abort, one request of the step in flight
    ahead is aborted at the 7th step (returned as the second value)."""
    for name, (prompt, params) in _requests().items():
        engine.add_request(None, params, prompt_token_ids=prompt, request_id=name)
    done, aborted = {}, None
    for step in range(400):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if abort and step == 6:
            assert engine._ahead is not None
            aborted = min(ss.seq.request.request_id for ss in engine._ahead[0].scheduled)
            assert engine.abort_request(aborted)
    assert sorted(done) == sorted(_requests())
    return {
        k: (v.outputs[0].token_ids, v.outputs[0].finish_reason) for k, v in done.items()
    }, aborted


@pytest.fixture(scope="module")
def reference(dist_model):
    engine = _engine(dist_model, 1, False)
    try:
        return _run(engine)[0]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("abort", [False, True])
def test_tp2_async_matches_in_process_sync(reference, dist_model, abort):
    engine = _engine(dist_model, 2, True)
    try:
        assert engine.async_scheduling and engine.executor.kind == "mp"
        got, aborted = _run(engine, abort)
        assert engine.num_steps_ahead > 0
        assert engine.executor.failure is None and engine.executor.num_in_flight == 0
    finally:
        engine.shutdown()
    for name, want in reference.items():
        if name == aborted:
            assert got[name][1] == "abort"
            assert got[name][0] == want[0][: len(got[name][0])]
        else:
            assert got[name] == want, name
    assert engine.kv_stats().num_used_blocks == 0 and not engine.scheduler.in_flight


@pytest.mark.parametrize("sharded", [True, False])
def test_tp2_greedy_steps_take_the_sharded_argmax(reference, dist_model, monkeypatch, sharded):
    # Steps whose rows are all plain greedy take their tokens from every rank's argmax of its
    # vocab shard (HAL_TP_GREEDY_ARGMAX; off: the logits gathered to rank 0, tokens broadcast):
    # the same tokens as the in-process engine either way.
    from engine.distributed import executor as executor_module

    monkeypatch.setattr(executor_module, "GREEDY_ARGMAX", sharded)
    greedy = {k: v for k, v in _requests().items() if k.startswith("greedy")}
    engine = _engine(dist_model, 2, True)
    try:
        for name, (prompt, params) in greedy.items():
            engine.add_request(None, params, prompt_token_ids=prompt, request_id=name)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert (engine.executor.num_greedy_steps > 0) == sharded
        assert engine.executor.num_in_flight == 0
    finally:
        engine.shutdown()
    assert done == {name: reference[name][0] for name in greedy}
