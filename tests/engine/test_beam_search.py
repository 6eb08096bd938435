"""Beam search (engine/beam_search.py, `LLM.beam_search`): against the same search run directly on
transformers' model (a full forward per beam and step, no KV cache), with EOS ending beams, length
penalties, several prompts at once; the step rule on hand-made logprobs; the parameter checks."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, BeamSearchParams
from engine.beam_search import BeamSearchSequence, extend


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


def _reference(model, prompt, width, max_tokens, eos, ignore_eos, length_penalty):
    """The search as the docstring states it, on transformers' log-softmax, no engine."""

    def score(tokens, cum, ended_by_eos):
        n = len(tokens) - len(prompt) - (1 if ended_by_eos else 0)
        return cum / (max(n, 1) ** length_penalty)

    live, done = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        cands = []
        for tokens, cum in live:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), -1)
            values, ids = lp.topk(2 * width)
            for v, t in zip(values.tolist(), ids.tolist(), strict=True):
                stop = t == eos and not ignore_eos
                length = len(tokens) + 1 - len(prompt) >= max_tokens
                cands.append(([*tokens, t], cum + v, stop, stop or length))
        cands.sort(key=lambda c: -score(c[0], c[1], c[2]))
        kept = cands[:width]
        done += [c for c in kept if c[3]]
        live = [(c[0], c[1]) for c in kept if not c[3]]
        if not live:
            break
    done.sort(key=lambda c: -score(c[0], c[1], c[2]))
    return [(c[0][len(prompt) :], c[1]) for c in done[:width]]


@pytest.mark.parametrize(
    ("width", "max_tokens", "ignore_eos", "length_penalty"),
    [(1, 6, True, 1.0), (3, 6, True, 1.0), (4, 5, False, 0.5), (2, 7, False, 2.0)],
)
def test_beam_search_equals_the_reference(tiny, width, max_tokens, ignore_eos, length_penalty):
    llm = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny)).float().eval()
    rng = random.Random(width)
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(2, 20))] for _ in range(3)]
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=ignore_eos,
                              length_penalty=length_penalty)  # fmt: skip
    outs = llm.beam_search(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        want = _reference(ref, prompt, width, max_tokens, 2, ignore_eos, length_penalty)
        got = [(s.output_token_ids, s.cum_logprob) for s in out.sequences]
        assert [g[0] for g in got] == [w[0] for w in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert math.isclose(a, b, abs_tol=1e-4)
        for s in out.sequences:
            assert s.tokens[: len(prompt)] == prompt and len(s.logprobs) == len(s.output_token_ids)
            assert s.finish_reason in ("stop", "length")
            assert s.text == llm.get_tokenizer().decode(
                s.output_token_ids, skip_special_tokens=True
            )
    assert llm.engine.kv_stats().num_used_blocks == 0


def test_the_step_rule_on_made_up_logprobs():
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    a = BeamSearchSequence([1, 2], 2, cum_logprob=-1.0)
    b = BeamSearchSequence([1, 3], 2, cum_logprob=-1.5)
    tops = [{7: -0.1, 9: -2.0, 0: -0.3}, {7: -0.05, 8: -0.2}]
    live, ended = extend([a, b], tops, params, frozenset({0}))
    # a+7 (-1.1), a+EOS (-1.3, ends; its EOS is not counted in the length: score -1.3 / 1)
    assert [s.tokens for s in live] == [[1, 2, 7]]
    assert [(s.tokens, s.finish_reason) for s in ended] == [([1, 2, 0], "stop")]
    # ignore_eos: EOS is an ordinary token; max_tokens ends beams by length
    params = BeamSearchParams(beam_width=2, max_tokens=1, ignore_eos=True)
    live, ended = extend([a, b], tops, params, frozenset({0}))
    assert live == [] and [s.finish_reason for s in ended] == ["length", "length"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(beam_width=0, max_tokens=4), "beam_width must be an integer >= 1"),
        (dict(beam_width=2, max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(beam_width=2, max_tokens=4, temperature=0.7), "temperature must be 0"),
        (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "finite"),
    ],
)
def test_params_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**kw)


def test_prompts_too_long_for_max_tokens(tiny):
    llm = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    with pytest.raises(ValueError, match="exceed max_model_len=256"):
        llm.beam_search([[5] * 250], BeamSearchParams(beam_width=2, max_tokens=10))
    (out,) = llm.beam_search(["hello"], BeamSearchParams(beam_width=2, max_tokens=3))
    assert len(out.sequences) == 2
