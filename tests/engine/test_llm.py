"""End to end through `LLM`: exact against transformers, batch invariance, sampling, errors."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from models_fixtures import build_model, hf_greedy

from engine import LLM, Logprob, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf = build_model("llama", folder)
    return folder, hf


def _llm(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    return LLM(model=str(folder), dtype="float32", device="cpu", **kw)


def _prompts(n: int, seed: int = 0, low: int = 3, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randint(low, high))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny):
    """Each prompt's greedy tokens from transformers, one prompt at a time."""
    _, hf = tiny
    prompts = _prompts(6)
    return prompts, [hf_greedy(hf, p, GREEDY.max_tokens)[0] for p in prompts]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers_batched(tiny, reference):
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == expected
    # Alone, one at a time, gives the same.
    for p, e in zip(prompts[:2], expected[:2], strict=False):
        assert _tokens(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)) == [e]


@pytest.mark.parametrize(
    "kw",
    [
        dict(enable_chunked_prefill=True, max_num_batched_tokens=16),  # prompts split in chunks
        dict(enable_prefix_caching=False),
        dict(
            num_gpu_blocks=9, max_model_len=128
        ),  # 8 usable blocks = 128 tokens: forces preemption by recompute
        dict(num_gpu_blocks=9, max_model_len=128, preemption_mode="swap", swap_space=0.01),
        dict(block_size=8, max_num_seqs=2),
    ],
    ids=["chunked", "no-prefix-cache", "preempt-recompute", "preempt-swap", "bs8-maxseqs2"],
)
def test_batch_invariance(tiny, reference, kw):
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder, **kw)
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == expected
    if "num_gpu_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny pool should have preempted"
    stats = llm.engine.kv_stats()
    assert stats.num_used_blocks == 0, "blocks leaked after every request finished"


def test_prefix_cache_hits_and_same_tokens(tiny, reference):
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    shared = prompts[0] * 2  # > 2 full blocks shared by both requests
    first = llm.generate(prompt_token_ids=[shared], sampling_params=GREEDY)
    second = llm.generate(prompt_token_ids=[shared], sampling_params=GREEDY)
    assert _tokens(first) == _tokens(second)
    assert llm.engine.kv_stats().prefix_cache_hits >= 32


def test_waste_under_four_percent(tiny):
    folder, _ = tiny
    llm = _llm(folder, kv_cache_memory_bytes=32 << 20)
    prompts = _prompts(16, seed=3, low=225, high=245)
    llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=8))
    peak = llm.engine.peak_kv_stats
    assert peak is not None and peak.num_used_blocks > 0
    # Only each sequence's last block is partly empty: at most block_size - 1 slots each.
    assert peak.num_allocated_slots - peak.num_held_tokens <= 16 * 15
    assert peak.waste < 0.04, llm.engine.kv_report()


def test_seeded_sampling_is_batch_invariant(tiny):
    folder, _ = tiny
    llm = _llm(folder)
    prompts = _prompts(4, seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = _tokens(llm.generate(prompt_token_ids=prompts[:1], sampling_params=params))
    batched = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params))
    assert alone[0] == batched[0]


def test_n_greater_than_one(tiny):
    folder, _ = tiny
    llm = _llm(folder)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate(prompt_token_ids=_prompts(1, seed=9), sampling_params=params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "3 seeded samples all identical"
    assert llm.engine.kv_stats().num_used_blocks == 0
    # n greedy samples are all the greedy sequence.
    params = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
    (out,) = llm.generate(prompt_token_ids=_prompts(1, seed=9), sampling_params=params)
    assert out.outputs[0].token_ids == out.outputs[1].token_ids


def test_logprobs_match_transformers(tiny, reference):
    folder, hf = tiny
    prompts, _ = reference
    llm = _llm(folder)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    (out,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
    tokens, logprobs = hf_greedy(hf, prompts[0], 6)
    c = out.outputs[0]
    assert c.token_ids == tokens
    assert len(c.logprobs) == 6 and all(len(d) >= 3 for d in c.logprobs)
    got = [d[t] for d, t in zip(c.logprobs, c.token_ids, strict=False)]
    # float32 end to end: differences are accumulation order only.
    assert torch.allclose(torch.tensor(got), torch.tensor(logprobs), atol=1e-4)
    assert c.cumulative_logprob == pytest.approx(sum(got), abs=1e-4)


def test_logprob_entries_carry_vllms_fields(tiny):
    # Each entry is a float and vLLM's Logprob: alternatives ranked 1..k in order, the sampled
    # token ranked against the whole distribution (transformers' logits, the same prefix), and
    # each token's text decoded alone.
    folder, hf = tiny
    llm = _llm(folder)
    tok = llm.get_tokenizer()
    prompt = _prompts(1, seed=4)[0]
    params = SamplingParams(temperature=1.5, max_tokens=8, ignore_eos=True, logprobs=2, seed=3)
    (out,) = llm.generate(prompt_token_ids=[prompt], sampling_params=params)
    c = out.outputs[0]
    beyond_top = 0
    for step, (entry, token) in enumerate(zip(c.logprobs, c.token_ids, strict=True)):
        for t, lp in entry.items():
            assert isinstance(lp, float) and isinstance(lp, Logprob) and lp.logprob == float(lp)
            assert lp.decoded_token == tok.decode([t], skip_special_tokens=False)
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks[:2] == [1, 2] and len(ranks) in (2, 3)
        if len(ranks) == 3:  # the sampled token is not among the top 2
            assert entry[token].rank == ranks[2] > 2
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + c.token_ids[:step]])).logits[0, -1].float()
        full = torch.log_softmax(logits, dim=-1)
        chosen = full[token]
        # float32 on both sides: count the tokens clearly above, and those not clearly below.
        above = int((full > chosen + 1e-4).sum())
        not_below = int((full > chosen - 1e-4).sum())
        assert above + 1 <= entry[token].rank <= not_below, (step, entry[token], above, not_below)
        beyond_top += entry[token].rank > 2
    assert beyond_top > 0, "temperature 1.5 should sample some token outside the top 2"


def _hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every prompt position [len - 1, vocab] (row p: token p + 1)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _check_prompt_logprobs(out, full: torch.Tensor, k: int) -> None:
    prompt = out.prompt_token_ids
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for p, entry in enumerate(out.prompt_logprobs[1:]):
        token, row = prompt[p + 1], full[p]
        # float32 on both sides: accumulation order only.
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        above = int((row > row[token] + 1e-4).sum())
        assert above + 1 <= entry[token].rank <= int((row > row[token] - 1e-4).sum())
        top = sorted((t for t in entry if t != token or entry[t].rank <= k),
                     key=lambda t: entry[t].rank)  # fmt: skip
        assert [entry[t].rank for t in top] == list(range(1, k + 1))
        values, _ = row.topk(k)
        got = torch.tensor([entry[t].logprob for t in top])
        assert torch.allclose(got, values, atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(enable_chunked_prefill=True, max_num_batched_tokens=16),  # prompts in chunks
        dict(num_gpu_blocks=9, max_model_len=128),  # preemption by recompute: nothing twice
        # preempted between chunks of a prompt: its recompute scores only what is still owed
        dict(
            num_gpu_blocks=9,
            max_model_len=128,
            enable_chunked_prefill=True,
            max_num_batched_tokens=16,
        ),  # fmt: skip
    ],
    ids=["whole", "chunked", "preempt-recompute", "preempt-mid-prompt"],
)
def test_prompt_logprobs_match_transformers(tiny, reference, kw):
    folder, hf = tiny
    prompts, expected = reference
    llm = _llm(folder, **kw)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert _tokens(outs) == expected
    for out, prompt in zip(outs, prompts, strict=True):
        _check_prompt_logprobs(out, _hf_prompt_logprobs(hf, prompt), 3)
    if "num_gpu_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny pool should have preempted"
    assert not llm.engine._prompt_pending and llm.engine.kv_stats().num_used_blocks == 0


def test_prompt_logprobs_skip_the_prefix_cache_but_fill_it(tiny, reference):
    folder, hf = tiny
    prompts, _ = reference
    llm = _llm(folder)
    shared = prompts[0] * 2  # > 2 full blocks
    scored = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    first = llm.generate(prompt_token_ids=[shared], sampling_params=GREEDY)
    hits = llm.engine.kv_stats().prefix_cache_hits
    (again,) = llm.generate(prompt_token_ids=[shared], sampling_params=scored)
    assert llm.engine.kv_stats().prefix_cache_hits == hits  # its prompt ran whole
    _check_prompt_logprobs(again, _hf_prompt_logprobs(hf, shared), 0)
    assert first[0].prompt_logprobs is None
    llm.generate(prompt_token_ids=[shared], sampling_params=GREEDY)
    assert llm.engine.kv_stats().prefix_cache_hits >= hits + 32


def test_logit_bias_and_allowed_token_ids(tiny, reference):
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    allowed = [7, 8, 9, 300]
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=10, ignore_eos=True,
                            allowed_token_ids=allowed)  # fmt: skip
    for out in llm.generate(prompt_token_ids=prompts[:3], sampling_params=params):
        assert set(out.outputs[0].token_ids) <= set(allowed)
    # A large enough bias wins every greedy step.
    biased = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={42: 1e4})
    (out,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=biased)
    assert out.outputs[0].token_ids == [42] * 6
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=prompts[:1],
                     sampling_params=SamplingParams(logit_bias={10**6: 1.0}))  # fmt: skip
    assert (
        _tokens(llm.generate(prompt_token_ids=prompts[:2], sampling_params=GREEDY))
        == (expected[:2])
    )


def _clean_span(tok, outputs: list[list[int]], k: int) -> tuple[int, int, str]:
    """(prompt index, start, text) of k greedy tokens whose text is printable, not blank, and
    encodes back to exactly those tokens (so a bad word written as that text bans them)."""
    for p, ids in enumerate(outputs):
        for start in range(len(ids) - k + 1):
            text = tok.decode(ids[start : start + k])
            if text.strip() and text.isprintable() and text == text.lstrip():
                if tok.encode(text, add_special_tokens=False) == ids[start : start + k]:
                    return p, start, text
    pytest.skip(f"no greedy span of {k} tokens with a clean text in this tiny model")


def test_bad_words(tiny, reference):
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    tok = llm.get_tokenizer()
    # a one-token word: that token never comes
    p, at, one = _clean_span(tok, expected, 1)
    words = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[one])
    (out,) = llm.generate(prompt_token_ids=prompts[p : p + 1], sampling_params=words)
    got = out.outputs[0].token_ids
    assert (expected[p][at],) in words.bad_words_token_ids
    banned = {w[0] for w in words.bad_words_token_ids if len(w) == 1}
    assert not banned & set(got) and got[:at] == expected[p][:at] and got[at] != expected[p][at]
    # a two-token word: its second token never follows its first
    p, at, pair = _clean_span(tok, expected, 2)
    two = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[pair])
    (out2,) = llm.generate(prompt_token_ids=prompts[p : p + 1], sampling_params=two)
    got = out2.outputs[0].token_ids
    assert tuple(expected[p][at : at + 2]) in two.bad_words_token_ids
    for w in two.bad_words_token_ids:
        assert all(tuple(got[i : i + len(w)]) != w for i in range(len(got) - len(w) + 1)), w
    assert got[: at + 1] == expected[p][: at + 1] and got[at + 1] != expected[p][at + 1]
    # n > 1: every sample keeps the words' ids
    n2 = SamplingParams(n=2, temperature=0.8, seed=0, max_tokens=8, ignore_eos=True,
                        bad_words=[one])  # fmt: skip
    (out3,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=n2)
    assert all(not banned & set(c.token_ids) for c in out3.outputs)
    with pytest.raises(ValueError, match="bad_words must be a list of non-empty strings"):
        SamplingParams(bad_words=["ok", " "])


def test_stop_strings_and_stop_tokens(tiny, reference):
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    tok = llm.get_tokenizer()
    full = tok.decode(expected[0])
    stop_token = expected[0][4]
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_token])
    (out,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
    first = expected[0].index(stop_token)
    assert out.outputs[0].token_ids == expected[0][: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_token
    stop_str = full[len(full) // 2 : len(full) // 2 + 2]
    if stop_str.strip():
        params = SamplingParams(temperature=0, max_tokens=12, stop=[stop_str], ignore_eos=True)
        (out,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
        assert out.outputs[0].text == full[: full.index(stop_str)]
        assert out.outputs[0].finish_reason == "stop"


def test_chat_uses_template(tiny):
    folder, _ = tiny
    llm = _llm(folder)
    (out,) = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=3))
    assert out.prompt_token_ids[0] == llm.get_tokenizer().convert_tokens_to_ids("<|im_start|>")
    assert out.outputs[0].finish_reason in ("stop", "length")


PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_chat_with_its_own_template(tiny, tmp_path):
    # chat_template (the text, or a file holding it) replaces the model's template.
    from engine.tokenizer import load_chat_template

    folder, _ = tiny
    llm = _llm(folder)
    tok = llm.get_tokenizer()
    want = tok.encode("user: hello\n", add_special_tokens=False)
    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN_TEMPLATE)
    for template in (PLAIN_TEMPLATE, str(path)):
        (out,) = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=2),
                          chat_template=template)  # fmt: skip
        assert out.prompt_token_ids == want
    assert load_chat_template(None) is None and load_chat_template(path) == PLAIN_TEMPLATE
    with pytest.raises(ValueError, match="neither a file that exists nor a Jinja template"):
        llm.chat([{"role": "user", "content": "hi"}], chat_template=str(tmp_path / "missing"))


def test_bad_input(tiny):
    folder, _ = tiny
    llm = _llm(folder, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len=64"):  # nothing queued, prompt 0 included
        llm.generate(prompt_token_ids=[[5, 6], [5] * 64], sampling_params=GREEDY)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.generate(prompt_token_ids=[[5] * 64], sampling_params=GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], GREEDY)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(n=0), dict(max_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer >= 0"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _llm(folder, max_model_len=100000)
    # The engine still serves after the rejected requests; nothing was queued by them.
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


def _stream(engine, params, prompts) -> dict[str, list]:
    """Every output each request streamed through engine.step(), by request id."""
    ids = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    got: dict[str, list] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].append(out)
    return got


def test_output_kinds(tiny, reference):
    # vLLM's RequestOutputKind: CUMULATIVE streams everything so far, DELTA only what is new
    # (the deltas add up to the cumulative output: text, token ids, logprobs; the prompt's
    # logprobs once), FINAL_ONLY one output at the end; LLM.generate is whole whatever the kind.
    from engine import RequestOutputKind

    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    base = dict(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    whole = _stream(llm.engine, SamplingParams(**base), prompts[:2])
    for kind in RequestOutputKind:
        params = SamplingParams(**base, output_kind=kind)
        (final,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
        assert final.outputs[0].token_ids == expected[0] and len(final.outputs[0].logprobs) == 12
        got = _stream(llm.engine, params, prompts[:2])
        for outs, ref, exp in zip(got.values(), whole.values(), expected[:2], strict=True):
            last = ref[-1].outputs[0]
            assert last.token_ids == exp and outs[-1].finished
            if kind == RequestOutputKind.CUMULATIVE:
                assert [o.outputs[0].token_ids for o in outs] == [
                    o.outputs[0].token_ids for o in ref
                ]
            elif kind == RequestOutputKind.FINAL_ONLY:
                assert len(outs) == 1 and outs[0].outputs[0].token_ids == exp
                assert outs[0].outputs[0].text == last.text
            else:
                assert len(outs) == len(ref) > 1
                parts = [o.outputs[0] for o in outs]
                assert sum((c.token_ids for c in parts), []) == exp
                assert "".join(c.text for c in parts) == last.text
                assert sum((c.logprobs for c in parts), []) == last.logprobs
                assert all(c.token_ids for c in parts)
                assert parts[-1].finish_reason == "length" and parts[0].finish_reason is None
                assert outs[0].prompt_logprobs == ref[0].prompt_logprobs
                assert all(o.prompt_logprobs is None for o in outs[1:])
    # n = 2 with DELTA: each output carries the samples with news; each finishes once.
    n2 = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True,
                        output_kind=RequestOutputKind.DELTA)  # fmt: skip
    (outs,) = _stream(llm.engine, n2, prompts[:1]).values()
    (ref,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=n2)
    for c in ref.outputs:
        mine = [x for o in outs for x in o.outputs if x.index == c.index]
        assert sum((x.token_ids for x in mine), []) == c.token_ids
        assert [x.finish_reason for x in mine if x.finish_reason] == ["length"]
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=7)


def test_delta_outputs_with_stop_strings_and_drafts(tiny, reference):
    # Text held back for a possible stop string and several tokens a step (n-gram drafts): the
    # DELTA pieces still add up to the CUMULATIVE run's final text and tokens.
    from engine import RequestOutputKind

    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    full = llm.get_tokenizer().decode(expected[0])
    stop = full[len(full) // 2 :][:3]
    if not stop.strip():
        pytest.skip("no printable stop string in this tiny model's greedy text")
    base = dict(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    (whole,) = _stream(llm.engine, SamplingParams(**base), prompts[:1]).values()
    (parts,) = _stream(
        llm.engine, SamplingParams(**base, output_kind=RequestOutputKind.DELTA), prompts[:1]
    ).values()
    last = whole[-1].outputs[0]
    assert "".join(o.outputs[0].text for o in parts) == last.text
    assert sum((o.outputs[0].token_ids for o in parts), []) == last.token_ids
    spec = _llm(folder, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                            "prompt_lookup_min": 1})  # fmt: skip
    repeat = [prompts[0] * 3]
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    (ref,) = spec.generate(prompt_token_ids=repeat, sampling_params=SamplingParams(**greedy))
    (pieces,) = _stream(
        spec.engine, SamplingParams(**greedy, output_kind=RequestOutputKind.DELTA), repeat
    ).values()
    assert sum((o.outputs[0].token_ids for o in pieces), []) == ref.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in pieces) == ref.outputs[0].text


def test_delta_outputs_through_the_async_engine(tiny, reference):
    # AsyncLLMEngine.generate streams the engine's DELTA outputs as they are: they add up to the
    # greedy reference, one finish at the end.
    import asyncio

    from engine import RequestOutputKind
    from engine.async_engine import AsyncLLMEngine

    folder, _ = tiny
    prompts, expected = reference
    loop = AsyncLLMEngine(_llm(folder).engine)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)  # fmt: skip

    async def run() -> list:
        return [out async for out in loop.generate(None, params, prompt_token_ids=prompts[1])]

    try:
        outs = asyncio.run(run())
    finally:
        loop.shutdown(timeout=10)
    assert len(outs) > 1 and sum((o.outputs[0].token_ids for o in outs), []) == expected[1]
    assert [o.outputs[0].finish_reason for o in outs].count("length") == 1 and outs[-1].finished


def test_detokenize_off(tiny, reference):
    # detokenize=False: the same tokens, no text, logprob entries without decoded tokens; stop
    # strings need the text and are refused.
    folder, _ = tiny
    prompts, expected = reference
    llm = _llm(folder)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1, detokenize=False)  # fmt: skip
    (out,) = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
    c = out.outputs[0]
    assert c.token_ids == expected[0] and c.text == ""
    assert all(lp.decoded_token is None for entry in c.logprobs for lp in entry.values())
    assert all(lp.decoded_token is None for entry in out.prompt_logprobs[1:]
               for lp in entry.values())  # fmt: skip
    (on,) = llm.generate(
        prompt_token_ids=prompts[:1], sampling_params=replace(params, detokenize=True)
    )
    assert on.outputs[0].text and on.outputs[0].logprobs[0][expected[0][0]].decoded_token
    with pytest.raises(ValueError, match="stop strings need the output text"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize must be True or False"):
        SamplingParams(detokenize=None)


def test_abort_frees_blocks(tiny):
    folder, _ = tiny
    llm = _llm(folder)
    engine = llm.engine
    keep = engine.add_request(None, GREEDY, prompt_token_ids=[5] * 40)
    drop = engine.add_request(None, SamplingParams(max_tokens=50), prompt_token_ids=[6] * 40)
    engine.step()
    assert engine.abort_request(drop)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished[keep].outputs[0].token_ids) == GREEDY.max_tokens
    assert engine.kv_stats().num_used_blocks == 0


def test_startup_heap_frozen_and_dropped_engines_freed(tiny, monkeypatch):
    # GPU engines freeze what start-up left alive (gc.freeze: full collections skip it) and thaw
    # + collect when the next engine starts or memory is released, so an engine dropped inside
    # a reference cycle is still freed then. (CPU engines skip it; forced on here.)
    import gc
    import weakref

    import engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "_freezes_heap", lambda config, caps: True)
    # What a thaw leaves: 0 on Python 3.11; 3.12's collection keeps a few hundred objects in the
    # permanent generation by itself (seen on the H200 machine's 3.12.3: 375 after any collect).
    llm_engine._thaw_heap()
    baseline = gc.get_freeze_count()
    folder, _ = tiny
    first = _llm(folder)
    assert gc.get_freeze_count() > baseline
    first.engine.cycle = first.engine  # a reference cycle: refcounting alone cannot free it
    gone = weakref.ref(first.engine)
    del first
    gc.collect()  # frozen: not collected yet
    assert gone() is not None
    second = _llm(folder)
    assert gone() is None
    assert gc.get_freeze_count() > baseline
    second.engine.release_memory()
    assert gc.get_freeze_count() == baseline


def test_engine_owned_by_an_async_loop_refuses_other_threads(tiny):
    # An AsyncLLMEngine over an LLM's engine: the engine is not thread-safe, so requests, aborts
    # and steps from the main thread are refused with an error naming the owner, a second
    # AsyncLLMEngine is refused, and requests through the loop still run.
    import asyncio

    from engine.async_engine import AsyncLLMEngine

    folder, _ = tiny
    llm = _llm(folder)
    engine = llm.engine
    loop = AsyncLLMEngine(engine)
    try:
        with pytest.raises(RuntimeError, match="add_request from thread 'MainThread'.*loop"):
            llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY)
        with pytest.raises(RuntimeError, match="step from thread"):
            engine.step()
        with pytest.raises(RuntimeError, match="abort_request from thread"):
            engine.abort_request("nope")
        with pytest.raises(RuntimeError, match="already driven by an AsyncLLMEngine"):
            AsyncLLMEngine(engine)

        async def run() -> list[int]:
            final = None
            async for out in loop.generate(None, GREEDY, prompt_token_ids=[5, 6, 7]):
                final = out
            return list(final.outputs[0].token_ids)

        tokens = asyncio.run(run())
        assert len(tokens) == GREEDY.max_tokens
    finally:
        loop.shutdown(timeout=10)
    assert engine._driver is None
