"""Structured outputs (engine/structured_output.py): the bitmask unpacking and the sampler's mask
against references, the parameters' checks, and end to end on a tiny random model (whose
unconstrained output is noise, so only the constraint makes it valid): JSON schemas, any JSON
object, regexes, choices and EBNF grammars give output the constraint accepts, with forks, mixed
batches, asynchronous scheduling, speculative engines and preemption; bad constraints are refused
before anything is queued."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from models_fixtures import cpu_llm

from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.sampler import Sampler, SamplingRow
from engine.structured_output import allowed_tokens, choice_grammar

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "color", "n"],
    "additionalProperties": False,
}
REGEX = r"[ab]{3}-\d"
CHOICES = ["alpha", "beta", "gamma delta", 'quote " and \\ slash']


# -- the pieces ----------------------------------------------------------------------------------
def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """The int32 words of a bool [rows, vocab] mask, bit j of word w = token 32 w + j (a plain
    loop: the reference for `allowed_tokens`)."""
    rows, vocab = allowed.shape
    words = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int64)
    for r in range(rows):
        for t in allowed[r].nonzero().flatten().tolist():
            words[r, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 384])
def test_bitmask_unpacks_every_bit(vocab):
    g = torch.Generator().manual_seed(vocab)
    allowed = torch.rand(3, vocab, generator=g) < 0.4
    allowed[0] = True  # every bit of every word set, bit 31 included (a negative int32)
    allowed[1, -1] = True
    assert torch.equal(allowed_tokens(_pack(allowed), vocab), allowed)


def test_xgrammar_bitmask_layout_is_ours():
    # A matcher's words for a two-token grammar must unpack to exactly those tokens.
    info = xgr.TokenizerInfo(["a", "b", "c", "</s>"] + [f"<x{i}>" for i in range(60)],
                             stop_token_ids=[3])  # fmt: skip
    compiled = xgr.GrammarCompiler(info).compile_grammar('root ::= "b" | "c"')
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(mask, 0)
    assert allowed_tokens(mask, info.vocab_size)[0].nonzero().flatten().tolist() == [1, 2]


def test_sampler_picks_only_allowed_tokens_and_keeps_raw_logprobs():
    vocab = 70
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=g) * 3
    allowed = torch.zeros(4, vocab, dtype=torch.bool)
    allowed[0, [5, 64]] = True
    allowed[1, 69] = True
    allowed[2, :40] = True
    words = _pack(allowed)
    greedy = SamplingParams(temperature=0, logprobs=2, structured_outputs={"regex": "a"})
    rand = SamplingParams(temperature=1.5, seed=4, logprobs=0, structured_outputs={"regex": "a"})
    rows = [
        SamplingRow(greedy, (), (), token_bitmask=words[0]),
        SamplingRow(rand, (), (), token_bitmask=words[1]),
        SamplingRow(rand, (), (), token_bitmask=words[2]),
        SamplingRow(SamplingParams(temperature=0), (), ()),  # unconstrained beside them
    ]
    for step in range(30):
        for r in rows:
            r.step = step
        out = Sampler().sample(logits, rows)
        assert out.token_ids[0] == max((5, 64), key=lambda t: logits[0, t])
        assert out.token_ids[1] == 69
        assert allowed[2, out.token_ids[2]]
        assert out.token_ids[3] == int(logits[3].argmax())
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[0] == pytest.approx(float(raw[0, out.token_ids[0]]), abs=1e-5)
    assert list(out.top_logprobs[0]) == raw[0].topk(2).indices.tolist()  # unmasked alternatives


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({}, "exactly one of"),
        ({"json": SCHEMA, "regex": "a"}, "exactly one of"),
        ({"json": 3}, "must be a JSON schema"),
        ({"regex": ""}, "non-empty string"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", ""]}, "non-empty list"),
        ({"json_object": "yes"}, "true or false"),
        ({"regex": "a", "disable_any_whitespace": 1}, "true or false"),
        ({"regexp": "a"}, r"unknown keys \['regexp'\]"),
    ],
)
def test_params_are_checked(value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(structured_outputs=value)


def test_json_schema_key_keeps_property_order():
    a = StructuredOutputsParams(json={"properties": {"b": {}, "a": {}}})
    b = StructuredOutputsParams(json={"properties": {"a": {}, "b": {}}})
    assert a.key() != b.key()  # properties are generated in the schema's order
    assert StructuredOutputsParams(json=json.dumps(SCHEMA)).kind == "json"


def test_choice_grammar_escapes_its_strings():
    info = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["</s>"], stop_token_ids=[95])
    compiled = xgr.GrammarCompiler(info).compile_grammar(choice_grammar(CHOICES))
    for text in CHOICES:
        m = xgr.GrammarMatcher(compiled)
        assert m.accept_string(text) and m.is_completed(), text
    assert not xgr.GrammarMatcher(compiled).accept_string('quote \\" and')


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


_llm = cpu_llm


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(9)
    return [[rng.randrange(3, 384) for _ in range(rng.randint(3, 20))] for _ in range(n)]


def _check(llm: LLM, params: SamplingParams, completion) -> None:
    """The completion's tokens are a sentence (finish "stop") or a prefix (finish "length") of
    the constraint, token by token through a fresh matcher; its text is what the kind says."""
    so = params.structured_outputs
    m = llm.engine.structured.matcher(so)
    for t in completion.token_ids:
        assert not m.is_terminated()
        assert m.accept_token(t), (completion.text, t)
    text = completion.text
    if completion.finish_reason == "length":
        assert len(completion.token_ids) == params.max_tokens
        return
    assert completion.finish_reason == "stop" and m.is_terminated(), completion
    if so.kind == "json":
        value = json.loads(text)
        assert set(value) == {"ok", "color", "n"} and isinstance(value["ok"], bool)
        assert value["color"] in ("red", "green") and 0 <= value["n"] <= 99
    elif so.kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif so.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif so.kind == "choice":
        assert text in CHOICES
    else:
        assert re.fullmatch(r"[xy]+\.", text), text


CONSTRAINTS = {
    "json": {"json": SCHEMA, "disable_any_whitespace": True},
    "json_object": {"json_object": True},
    "regex": {"regex": REGEX},
    "choice": {"choice": CHOICES},
    "grammar": {"grammar": 'root ::= ("x" | "y")+ "."'},
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_kind_gives_output_its_constraint_accepts(tiny, temperature):
    llm = _llm(tiny)
    prompts = _prompts(4)
    stopped = 0
    for so in CONSTRAINTS.values():
        params = SamplingParams(temperature=temperature, seed=3, max_tokens=48,
                                structured_outputs=so)  # fmt: skip
        for out in llm.generate(prompt_token_ids=prompts, sampling_params=params):
            _check(llm, params, out.outputs[0])
            stopped += out.outputs[0].finish_reason == "stop"
    assert stopped >= 16  # json_object may run long on a random model; the rest end
    assert llm.engine.kv_stats().num_used_blocks == 0


def test_mixed_batch_forks_and_unconstrained_neighbours(tiny):
    llm = _llm(tiny)
    prompts = _prompts(4)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=prompts[:2], sampling_params=free)
    fork = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=20,
                          structured_outputs={"choice": CHOICES})  # fmt: skip
    regex = SamplingParams(temperature=0.7, seed=6, max_tokens=20,
                           structured_outputs={"regex": REGEX})  # fmt: skip
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=[free, free, fork, regex])
    for a, b in zip(alone, outs[:2], strict=True):  # masks never reach other rows
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert len(outs[2].outputs) == 4
    for c in outs[2].outputs:  # each child advances its own matcher
        _check(llm, fork, c)
    _check(llm, regex, outs[3].outputs[0])
    assert llm.engine.kv_stats().num_used_blocks == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(async_scheduling=True),
        dict(
            speculative_config={
                "method": "ngram",
                "num_speculative_tokens": 3,
                "prompt_lookup_min": 1,
            }
        ),  # fmt: skip
        dict(num_gpu_blocks=8, max_model_len=112),  # preempts by recompute
    ],
    ids=["async", "speculative", "preempting"],
)
def test_engine_modes_give_the_plain_engines_output(tiny, kw):
    prompts = [p * 3 for p in _prompts(6)]  # repeats: the speculative engine drafts for "free"
    params = [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=CONSTRAINTS[name])
        for name in ("json", "regex", "choice", "grammar")
    ] + [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 2
    want = _llm(tiny).generate(prompt_token_ids=prompts, sampling_params=params)
    llm = _llm(tiny, **kw)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for w, g, p in zip(want, got, params, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        if p.structured_outputs is not None:
            _check(llm, p, g.outputs[0])
    assert llm.engine.kv_stats().num_used_blocks == 0
    if "num_gpu_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0
    if "speculative_config" in kw:
        assert llm.engine.scheduler.num_draft_tokens > 0  # the unconstrained rows drafted


def test_the_grammar_end_stops_even_with_ignore_eos(tiny):
    llm = _llm(tiny)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                            structured_outputs={"choice": ["yes", "no"]})  # fmt: skip
    (out,) = llm.generate(prompt_token_ids=_prompts(1), sampling_params=params)
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.text in ("yes", "no")
    assert c.token_ids[-1] in llm.engine.eos_token_ids


@pytest.mark.parametrize(
    ("so", "match"),
    [
        ({"regex": "([a-z"}, r"structured_outputs.regex: not a valid regular expression: .*"),
        ({"json": "{not json"}, "structured_outputs.json: not a valid JSON schema"),
        ({"json": {"type": "objectx"}}, 'Unsupported type "objectx"'),
        ({"grammar": "root ::= foo"}, 'Rule "foo" is not defined'),
    ],
)
def test_bad_constraints_are_refused_before_queuing(tiny, so, match):
    llm = _llm(tiny)
    params = SamplingParams(max_tokens=4, structured_outputs=so)
    with pytest.raises(ValueError, match=match) as e:
        llm.generate(prompt_token_ids=_prompts(1), sampling_params=params)
    assert "[" not in str(e.value).split(":", 1)[0]  # no xgrammar time stamp in front
    assert not llm.engine.has_unfinished_requests()


def test_constrained_requests_take_drafts(tiny):
    """n-gram drafts for constrained requests: each drafted row verified under its position's
    mask; the same tokens as without speculation, with drafts accepted."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
    params = [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs={"regex": "(ab|cd){12}"}),
        SamplingParams(temperature=0.8, seed=3, max_tokens=40,
                       structured_outputs={"regex": "(xy){6}-(xy){6}"}),
    ]  # fmt: skip
    prompts = _prompts(2)
    want = _llm(tiny).generate(prompt_token_ids=prompts, sampling_params=params)
    llm = _llm(tiny, speculative_config=spec)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids  # greedy: the same
    assert re.fullmatch("(ab|cd){12}", got[0].outputs[0].text)
    assert re.fullmatch("(xy){6}-(xy){6}", got[1].outputs[0].text)  # sampled: still valid
    assert llm.engine.scheduler.num_accepted_tokens > 0
    assert llm.engine.kv_stats().num_used_blocks == 0


def test_draft_masks_walk_and_roll_back(tiny):
    llm = _llm(tiny)
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    m = llm.engine.structured.matcher(so)
    tok = llm.get_tokenizer()
    good = tok.encode("alpha", add_special_tokens=False)
    bad = tok.encode("gamma", add_special_tokens=False)
    masks = llm.engine.structured.draft_masks(m, good)
    vocab = llm.engine.model_config.vocab_size
    allowed = allowed_tokens(masks, vocab)
    for j, t in enumerate(good):
        assert allowed[j, t]  # each draft token allowed at its row
    assert allowed[len(good), llm.engine.eos_token_ids[0]]  # then the end
    assert m.accept_token(good[0])  # the walk was rolled back: the matcher is at the start
    m2 = llm.engine.structured.matcher(so)
    masks = llm.engine.structured.draft_masks(m2, bad)
    assert not allowed_tokens(masks, vocab)[0, bad[0]]  # refused at row 0 ...
    assert torch.equal(masks[1:], masks[:1].expand(len(bad), -1))  # ... later rows repeat it
