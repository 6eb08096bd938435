"""Speculative decoding with n-gram proposals (engine/spec_decode.py): the proposer, the verifier
(greedy exact, random distribution-preserving), and end to end through `LLM`: greedy tokens and
logprobs equal to decoding without speculation, stops inside accepted drafts, no KV leak."""

from __future__ import annotations

import random

import pytest
import torch
from models_fixtures import build_model

from engine import LLM, SamplingParams
from engine.spec_decode import SpeculativeConfig, propose_ngram, verify, verify_batch

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}


# -- the proposer ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "n_min", "n_max", "k", "want"),
    [
        ([1, 2, 3, 4, 1, 2], 1, 3, 2, [3, 4]),  # "1 2" seen before: what followed it
        ([1, 2, 3, 9, 2, 5, 1, 2], 1, 2, 3, [3, 9, 2]),  # the 2-gram wins over "2" (-> 5)
        ([7, 2, 5, 8, 2, 6, 2], 1, 1, 1, [6]),  # the latest occurrence of "2"
        ([1, 2, 3, 1], 1, 3, 5, [2, 3, 1]),  # fewer than k follow
        ([1, 2, 3, 4], 1, 3, 2, []),  # the last token never occurred before
        ([5, 5, 5], 1, 2, 3, [5]),  # a run: the overlapping earlier match
        ([4], 1, 3, 2, []),
    ],
)
def test_propose_ngram(tokens, n_min, n_max, k, want):
    assert propose_ngram(tokens, n_min, n_max, k) == want


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"method": "eagle"}, "not supported"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "exceeds prompt_lookup_max"),
        ({"draft_model": "x"}, "unknown keys"),
        ({"disable_by_batch_size": 0}, "disable_by_batch_size must be an integer >= 1"),
        ([3], "must be a dict"),
    ],
)
def test_config_is_checked(value, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(value)


# -- the verifier ---------------------------------------------------------------------------------
def test_greedy_verify_keeps_the_agreeing_prefix_and_one_token_of_its_own():
    logits = torch.zeros(4, 10)
    for row, top in enumerate((3, 7, 2, 9)):
        logits[row, top] = 1.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, [3, 7, 2], greedy, 0, None) == [3, 7, 2, 9]  # all accepted + bonus
    assert verify(logits, [3, 5, 2], greedy, 0, None) == [3, 7]  # the correction at the miss
    assert verify(logits, [4, 7, 2], greedy, 0, None) == [3]
    assert verify(logits[:1], [], greedy, 0, None) == [3]


def test_random_verify_preserves_the_distribution():
    # Position 0's emitted token must follow p0 whatever the draft; a draft accepted at 0 must be
    # followed by a token from p1. Chi-square against p at p = 0.001 (fixed generator seed).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, generator=g)
    params = SamplingParams(temperature=0.8)
    probs = torch.softmax(logits / 0.8, dim=-1)
    gen = torch.Generator().manual_seed(1)
    first, second = torch.zeros(6), torch.zeros(6)
    trials = 6000
    for _ in range(trials):
        out = verify(logits, [2], params, 0, gen)
        first[out[0]] += 1
        if len(out) == 2:
            assert out[0] == 2
            second[out[1]] += 1
    for counts, p in ((first, probs[0]), (second, probs[1])):
        expected = p * counts.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.52, (counts, expected)  # 5 degrees of freedom
    assert abs(second.sum() / trials - float(probs[0, 2])) < 0.03  # accepted with p0(draft)
    # Seeded requests: the same (seed, step) gives the same tokens.
    seeded = SamplingParams(temperature=1.0, seed=5)
    assert verify(logits, [2], seeded, 3, None) == verify(logits, [2], seeded, 3, None)


def test_batched_verify_equals_one_sequence_at_a_time():
    g = torch.Generator().manual_seed(3)
    drafts = [[4, 7], [], [1, 2, 3], [9]]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.1, top_k=5, seed=2),
              SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05, seed=3)]  # fmt: skip
    logits = torch.randn(sum(len(d) + 1 for d in drafts), 12, generator=g) * 2
    logits[0, 4] = logits[1, 7] = 50.0  # the greedy sequence accepts both drafts
    got = verify_batch(logits, drafts, params, [5, 6, 7, 8], None)
    want, at = [], 0
    for d, p, step in zip(drafts, params, [5, 6, 7, 8], strict=True):
        want.append(verify(logits[at : at + len(d) + 1], d, p, step, None))
        at += len(d) + 1
    assert got == want and got[0] == [4, 7, int(logits[2].argmax())]


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_spec")
    build_model("llama", folder)
    return folder


def _llm(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    return LLM(model=str(folder), dtype="float32", device="cpu", **kw)


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(5)
    prompts = []
    for i in range(n):
        motif = [rng.randrange(3, 384) for _ in range(rng.randint(2, 6))]
        noise = [rng.randrange(3, 384) for _ in range(rng.randint(0, 8))]
        prompts.append(noise + motif * (2 + i % 3))  # repeated motifs: drafts to find
    return prompts


@pytest.mark.parametrize(
    "kw",
    [{}, dict(num_gpu_blocks=7, max_model_len=96)],  # the second preempts by recompute
    ids=["plain", "preempting"],
)
def test_greedy_tokens_and_logprobs_equal_decoding_without_drafts(tiny, kw):
    prompts = _prompts(6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    want = _llm(tiny, **kw).generate(prompt_token_ids=prompts, sampling_params=params)
    llm = _llm(tiny, speculative_config=NGRAM, **kw)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    sched = llm.engine.scheduler
    assert sched.num_accepted_tokens > 0, "repeated motifs should give accepted drafts"
    assert sched.num_accepted_tokens <= sched.num_draft_tokens
    for a, b in zip(want, got, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert y.token_ids == x.token_ids and y.finish_reason == x.finish_reason == "length"
        assert len(y.logprobs) == len(x.logprobs) == 40
        for la, lb, t in zip(x.logprobs, y.logprobs, x.token_ids, strict=True):
            assert la.keys() == lb.keys()
            assert lb[t] == pytest.approx(la[t], abs=1e-4) and lb[t].rank == la[t].rank
    assert llm.engine.kv_stats().num_used_blocks == 0
    assert llm.engine.num_steps < _steps_without(tiny, prompts, params, kw)
    if "num_gpu_blocks" in kw:
        assert sched.num_preemptions > 0, "the tiny pool should have preempted"


def _steps_without(folder, prompts, params, kw) -> int:
    llm = _llm(folder, **kw)
    llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return llm.engine.num_steps


def test_stops_inside_accepted_drafts_cut_the_rest(tiny):
    prompts = _prompts(4)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = _llm(tiny).generate(prompt_token_ids=prompts, sampling_params=greedy)
    llm = _llm(tiny, speculative_config=NGRAM)
    for out, prompt in zip(base, prompts, strict=True):
        tokens = out.outputs[0].token_ids
        stop = tokens[len(tokens) // 2]  # a token the greedy run emits mid-way
        params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop])
        (got,) = llm.generate(prompt_token_ids=[prompt], sampling_params=params)
        c = got.outputs[0]
        assert c.token_ids == tokens[: tokens.index(stop) + 1] and c.finish_reason == "stop"
        for max_tokens in (1, 7):
            short = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            (s,) = llm.generate(prompt_token_ids=[prompt], sampling_params=short)
            assert s.outputs[0].token_ids == tokens[:max_tokens]
    assert llm.engine.kv_stats().num_used_blocks == 0


def test_no_drafts_from_the_batch_size_limit(tiny):
    prompts = _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = _llm(tiny, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    want = _llm(tiny).generate(prompt_token_ids=prompts, sampling_params=params)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llm.engine.scheduler.num_draft_tokens == 0  # three running: never below the limit
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
    assert llm.engine.scheduler.num_draft_tokens > 0  # alone: drafts again


def test_random_and_penalized_requests(tiny):
    prompts = _prompts(4)
    llm = _llm(tiny, speculative_config=NGRAM)
    seeded = SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=24, ignore_eos=True)
    first = llm.generate(prompt_token_ids=prompts, sampling_params=seeded)
    again = llm.generate(prompt_token_ids=prompts, sampling_params=seeded)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(len(o.outputs[0].token_ids) == 24 for o in first)
    # A penalized request gets no drafts and decodes as without speculation.
    drafts = llm.engine.scheduler.num_draft_tokens
    pen = SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=12, ignore_eos=True)
    got = llm.generate(prompt_token_ids=prompts[:2], sampling_params=pen)
    assert llm.engine.scheduler.num_draft_tokens == drafts
    want = _llm(tiny).generate(prompt_token_ids=prompts[:2], sampling_params=pen)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
