"""The real server on loopback, driven by the official `openai` client: completions, chat with the
model's template, streaming, n > 1, stop strings, logprobs, seeds, the engine's extra fields,
/health and /metrics. Greedy outputs must equal the offline `LLM` on the same weights.
"""

from __future__ import annotations

import json
import math
import re

import openai
import pytest

from engine import LLM, SamplingParams
from engine.config import SchedulerConfig
from engine.tokenizer import apply_chat_template
from tests.server.conftest import MODEL_NAME, make_engine, start_server

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NO_EOS = {"ignore_eos": True}


class _NONE:
    content: list = []


@pytest.fixture(scope="module")
def offline(tiny_model) -> LLM:
    return LLM(model=str(tiny_model), dtype="float32", device="cpu", kv_cache_memory_bytes=4 << 20)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")


def test_completion_matches_offline_engine(client, offline):
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=NO_EOS
    )
    expected = offline.generate(PROMPT, _greedy(10), use_tqdm=False)[0]
    (choice,) = r.choices
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert r.object == "text_completion" and r.model == MODEL_NAME
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_a_request_without_model_goes_to_the_served_model(server, client):
    # vLLM's rule: "model" may be left out; the response names the served model.
    with server.http() as http:
        body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **NO_EOS}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        chat = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, **NO_EOS}
        c = http.post("/v1/chat/completions", json=chat)
        assert c.status_code == 200, c.text
    named = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=NO_EOS
    )
    assert r.json()["model"] == MODEL_NAME and c.json()["model"] == MODEL_NAME
    assert r.json()["choices"][0]["text"] == named.choices[0].text


def test_tokenize_detokenize_and_version(server, offline):
    tok = offline.get_tokenizer()
    ids = list(tok.encode(PROMPT))
    chat = apply_chat_template(tok, MESSAGES, add_generation_prompt=True)
    with server.http() as http:
        r = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] > 0
        assert body["token_strs"] == tok.convert_ids_to_tokens(ids)
        r = http.post("/tokenize", json={"model": MODEL_NAME, "messages": MESSAGES})
        assert r.json()["tokens"] == list(chat)
        r = http.post("/detokenize", json={"tokens": ids})
        assert r.status_code == 200 and r.json() == {"prompt": tok.decode(ids)}
        r = http.post("/tokenize", json={"prompt": "x", "messages": MESSAGES})
        assert r.status_code == 400 and "exactly one" in r.json()["error"]["message"]
        r = http.post("/detokenize", json={"tokens": [ids[0], -1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = http.post("/detokenize", json={"model": "other", "tokens": ids})
        assert r.status_code == 404
        r = http.get("/version")
        assert r.status_code == 200 and r.json()["version"]


def test_completion_from_token_ids_and_batch(client, offline):
    tok = offline.get_tokenizer()
    ids = tok.encode(PROMPT)
    r = client.completions.create(
        model=MODEL_NAME, prompt=[ids, "What is"], max_tokens=4, temperature=0, extra_body=NO_EOS
    )
    assert [c.index for c in r.choices] == [0, 1]
    expected = offline.generate([PROMPT, "What is"], _greedy(4), use_tqdm=False)
    assert [c.text for c in r.choices] == [e.outputs[0].text for e in expected]
    assert r.usage.completion_tokens == 8


def test_chat_uses_the_models_template(client, offline):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0, extra_body=NO_EOS
    )
    expected = offline.chat(MESSAGES, _greedy(8), use_tqdm=False)[0]
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    ids = apply_chat_template(offline.get_tokenizer(), MESSAGES)
    assert r.usage.prompt_tokens == len(ids) == len(expected.prompt_token_ids)
    assert r.object == "chat.completion"


def test_chat_default_max_tokens_fills_to_eos_or_limit(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 64  # the fixture's max_tokens limit


def test_streaming_completion_equals_non_streaming(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert len(texts) > 1, "the text should arrive in several chunks"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_streaming_chat_deltas(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0, extra_body=NO_EOS)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_n_greater_than_one(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=11)
    r = client.completions.create(extra_body=NO_EOS, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert len({c.text for c in r.choices}) > 1, "three samples at temperature 1 all equal"
    again = client.completions.create(extra_body=NO_EOS, **kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices], "seed not honoured"
    # Streaming with n = 3: every choice streams, each ends once.
    chunks = list(client.completions.create(stream=True, extra_body=NO_EOS, **kw))
    by_index: dict[int, str] = {}
    ends = []
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + ch.text
            if ch.finish_reason:
                ends.append(ch.index)
    assert sorted(ends) == [0, 1, 2]
    assert [by_index[i] for i in range(3)] == [c.text for c in r.choices]


def test_chat_n_greater_than_one(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, n=2, temperature=1.0, seed=3,
        extra_body=NO_EOS,
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 10


def _pick_stop(text: str) -> tuple[str, str]:
    """A stop string from the middle of `text` and the text before its first occurrence."""
    for start in range(2, len(text) - 2):
        stop = text[start : start + 2]
        if stop.strip() and "\ufffd" not in stop:
            return stop, text[: text.index(stop)]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kw).choices[0].text
    stop, before = _pick_stop(full)
    r = client.completions.create(stop=[stop, "never-appears"], **kw)
    assert r.choices[0].text == before
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    streamed = client.completions.create(stop=stop, stream=True, **kw)
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == before
    assert chunks[-1].finish_reason == "stop"
    # Chat honours stop too.
    ckw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0, extra_body=NO_EOS)
    content = client.chat.completions.create(**ckw).choices[0].message.content
    cstop, cbefore = _pick_stop(content)
    c = client.chat.completions.create(stop=[cstop], **ckw).choices[0]
    assert (c.message.content, c.finish_reason) == (cbefore, "stop")


def test_completion_logprobs(client, offline):
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body=NO_EOS
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    expected = offline.generate(PROMPT, _greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    for i, (_token, value, top) in enumerate(
        zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)
    ):
        want = expected.logprobs[i][expected.token_ids[i]]
        assert math.isclose(value, want, rel_tol=1e-5, abs_tol=1e-5)
        assert 1 <= len(top) <= 4 and value <= 0
        assert math.isclose(max(top.values()), value, abs_tol=1e-6), "greedy picks the top token"
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    # Streaming carries the same logprobs, chunk by chunk.
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            logprobs=3,
            stream=True,
            extra_body=NO_EOS,
        )  # fmt: skip
    )
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    # What evaluation harnesses send for log-likelihoods: echo + logprobs, max_tokens 0 or more.
    ids = offline.get_tokenizer().encode(PROMPT)
    params = _greedy(3, logprobs=2, prompt_logprobs=2)
    expected = offline.generate(PROMPT, params, use_tqdm=False)[0]
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
        extra_body=NO_EOS,
    )  # fmt: skip
    (choice,) = r.choices
    assert choice.text == PROMPT + expected.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    prompt_want = [e[t].logprob for e, t in zip(expected.prompt_logprobs[1:], ids[1:], strict=True)]
    out = expected.outputs[0]
    gen_want = [e[t] for e, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert lp.token_logprobs[1:] == pytest.approx(prompt_want + gen_want, abs=1e-5)
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    assert r.usage.completion_tokens == 3
    # max_tokens 0: the prompt and its logprobs only.
    r0 = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=0, logprobs=1, echo=True
    )
    (c0,) = r0.choices
    assert c0.text == PROMPT and c0.finish_reason == "length"
    assert c0.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-6)
    assert r0.usage.completion_tokens == 0 and r0.usage.prompt_tokens == len(ids)
    # Streamed: the first chunk carries the prompt; together the same lists.
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            logprobs=2,
            echo=True,
            stream=True,
            extra_body=NO_EOS,
        )  # fmt: skip
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    only = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=0, logprobs=1, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in only) == PROMPT
    assert only[-1].choices[0].finish_reason == "length"
    only_lps = [
        v for c in only if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs
    ]
    assert only_lps == c0.logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0)


def test_logit_bias_and_allowed_token_ids(client, offline):
    # The offline engine with the same fields gives the same text (greedy; seeded sampling).
    biased = _greedy(4, logit_bias={42: 100.0})
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={"42": 100},
        extra_body=NO_EOS,
    )  # fmt: skip
    want = offline.generate(PROMPT, biased, use_tqdm=False)[0].outputs[0]
    assert want.token_ids == [42] * 4 and r.choices[0].text == want.text
    allowed = SamplingParams(temperature=0.8, seed=2, max_tokens=4, ignore_eos=True,
                             allowed_token_ids=[7, 8, 9])  # fmt: skip
    want = offline.generate(PROMPT, allowed, use_tqdm=False)[0].outputs[0]
    assert set(want.token_ids) <= {7, 8, 9}
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0.8, seed=2,
        extra_body={**NO_EOS, "allowed_token_ids": [7, 8, 9]},
    )  # fmt: skip
    assert r.choices[0].text == want.text
    # vLLM's bad_words: the server's text equals the offline engine's with the same words
    words = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, bad_words=["the", "a"])
    want = offline.generate(PROMPT, words, use_tqdm=False)[0].outputs[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={**NO_EOS, "bad_words": ["the", "a"]})  # fmt: skip
    assert r.choices[0].text == want.text
    with pytest.raises(openai.BadRequestError, match="bad_words must be a list"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={"bad_words": [""]})  # fmt: skip
    for bad, match in (({"x": 1}, "decimal strings"), ({"3": 101}, r"\[-100, 100\]"),
                       ({"999999": 1}, "outside the vocabulary")):  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      logit_bias=bad)  # fmt: skip


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, extra_body=NO_EOS,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, extra_body=NO_EOS
    )
    assert plain.choices[0].logprobs is None
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body=NO_EOS,
        )  # fmt: skip
    )
    streamed = [
        e.logprob for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_extra_sampling_fields(client):
    greedy = (
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=NO_EOS
        )
        .choices[0]
        .text
    )
    top1 = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=5,
        extra_body={"top_k": 1, "ignore_eos": True},
    ).choices[0].text  # fmt: skip
    assert top1 == greedy, "top_k=1 must be greedy whatever the temperature"
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
        extra_body={"min_tokens": 8, "repetition_penalty": 1.3},
    )  # fmt: skip
    assert r.usage.completion_tokens == 8


def test_health_and_metrics(server, client):
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3)
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        text = http.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    label = f'{{model_name="{MODEL_NAME}"}}'
    assert samples[f"hal_generation_tokens_total{label}"] >= 3
    assert samples[f"hal_prompt_tokens_total{label}"] >= 4
    assert samples[f"hal_time_to_first_token_seconds_count{label}"] >= 1
    assert samples[f"hal_inter_token_latency_seconds_count{label}"] >= 2
    assert samples[f"hal_kv_cache_usable_blocks{label}"] > 0
    for gauge in ("hal_num_requests_running", "hal_num_requests_waiting",
                  "hal_kv_cache_usage_perc", "hal_prefix_cache_hit_rate"):  # fmt: skip
        assert f"{gauge}{label}" in samples
    assert 0 <= samples[f"hal_prefix_cache_hit_rate{label}"] <= 1


def test_a_speculative_server_streams_the_plain_tokens_and_counts_drafts(tiny_model, client):
    # The same greedy text, streamed, from a server whose engine drafts n-gram tokens; /metrics
    # shows the drafts and the accepted ones.
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    handle = start_server(make_engine(tiny_model, speculative_config=spec))
    try:
        prompt = [5, 9, 33, 100, 7] * 4
        want = (
            client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, extra_body=NO_EOS
            )
            .choices[0]
            .text
        )
        chunks = list(
            handle.client().completions.create(
                model=MODEL_NAME,
                prompt=prompt,
                max_tokens=24,
                temperature=0,
                stream=True,
                extra_body=NO_EOS,
            )  # fmt: skip
        )
        assert "".join(c.choices[0].text for c in chunks) == want
        handle.wait_idle()
        with handle.http() as http:
            text = http.get("/metrics").text
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("hal_spec_decode_")
        }
        drafts = values["hal_spec_decode_draft_tokens"]
        assert 0 < values["hal_spec_decode_accepted_tokens"] <= drafts
    finally:
        handle.stop()


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


def test_structured_outputs_every_field(client, offline):
    pytest.importorskip("xgrammar")
    # response_format json_schema (chat): the offline engine's constrained text, and valid
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
    )  # fmt: skip
    ids = apply_chat_template(offline.get_tokenizer(), MESSAGES)
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": SCHEMA})
    want = offline.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False)
    text = chat.choices[0].message.content
    assert text == want[0].outputs[0].text and text.startswith("{")  # whitespace may run long
    # without whitespace the random weights finish the object
    tight = {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40,
                                          temperature=0, extra_body=tight)  # fmt: skip
    assert chat.choices[0].finish_reason == "stop"
    value = json.loads(chat.choices[0].message.content)
    assert value["color"] in ("red", "green") and isinstance(value["ok"], bool)
    # json_object, vLLM's structured_outputs object and guided_* fields, on completions
    kinds = [
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"structured_outputs": {"regex": "[ab]{3}"}}, lambda t: re.fullmatch("[ab]{3}", t)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_regex": r"\d\d"}, lambda t: re.fullmatch(r"\d\d", t)),
        ({"guided_json": SCHEMA}, lambda t: set(json.loads(t)) == {"ok", "color"}),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
            lambda t: set(json.loads(t)) == {"ok", "color"},
        ),
        ({"guided_grammar": 'root ::= "x" "y"+'}, lambda t: re.fullmatch("xy+", t)),
    ]
    stopped = 0
    for body, ok in kinds:
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=60,
                                      temperature=0, extra_body=body)  # fmt: skip
        if r.choices[0].finish_reason == "stop":
            assert ok(r.choices[0].text), (body, r.choices[0].text)
            stopped += 1
        else:  # JSON with any whitespace may run long on random weights
            assert "json" in json.dumps(body) and r.choices[0].text.startswith("{")
    assert stopped >= 5
    # streaming gives the same text
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                       temperature=0, stream=True,
                                       extra_body={"guided_choice": ["left", "right"]})  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) in ("left", "right")


def test_structured_outputs_bad_requests(client):
    pytest.importorskip("xgrammar")
    cases = [
        ({"response_format": {"type": "xml"}}, "response_format type must be"),
        ({"response_format": {"type": "json_schema"}}, "needs json_schema.schema"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "one output constraint"),
        ({"structured_outputs": {"regexp": "a"}}, "unknown keys"),
        ({"guided_regex": "([a-z"}, "not a valid regular expression"),
        ({"guided_json": {"type": "objectx"}}, 'Unsupported type "objectx"'),
    ]
    for body, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      extra_body=body)  # fmt: skip


def test_priority_needs_the_priority_policy(client, tiny_model):
    with pytest.raises(openai.BadRequestError, match="scheduling_policy='priority'"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={"priority": 3})  # fmt: skip
    handle = start_server(make_engine(tiny_model, scheduler=SchedulerConfig(policy="priority")))
    try:
        client = handle.client()
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3,
                                      temperature=0, extra_body={"priority": -2})  # fmt: skip
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        handle.stop()


def test_usage_counts_prefix_cache_hits(client, offline):
    prompt = "A prompt seen twice: " + " ".join(f"w{i}" for i in range(30))  # many full blocks
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0  # whole blocks
    runs = [offline.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0]
            for _ in range(2)]  # fmt: skip
    assert [o.num_cached_tokens for o in runs] == [0, cached]  # RequestOutput has it too


def test_continue_final_message(client, offline):
    messages = [*MESSAGES, {"role": "assistant", "content": "The capital is"}]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, **NO_EOS},
    )  # fmt: skip
    tok = offline.get_tokenizer()
    ids = apply_chat_template(tok, messages, add_generation_prompt=False,
                              continue_final_message=True)  # fmt: skip
    assert tok.decode(ids).endswith("The capital is")  # the turn is left open
    want = offline.generate(prompt_token_ids=[ids], sampling_params=_greedy(4), use_tqdm=False)
    assert r.choices[0].message.content == want[0].outputs[0].text
    for extra, match in (({"continue_final_message": True}, "add_generation_prompt=false"),
                         ({"continue_final_message": True, "add_generation_prompt": False},
                          "last message to be the assistant's")):  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2,
                                           extra_body=extra)  # fmt: skip


def test_prompt_logprobs_field(server, offline):
    # vLLM's prompt_logprobs: per prompt token None (the first) or its top k and itself, the same
    # values LLM.generate gives; on each completions choice, at the top of a chat reply; not
    # with stream=true, k within the limit; with echo + logprobs both come back.
    ids = list(offline.get_tokenizer().encode(PROMPT))
    (ref,) = offline.generate(prompt_token_ids=[ids], sampling_params=_greedy(1, prompt_logprobs=2))
    with server.http() as http:
        r = http.post("/v1/completions", json={
            "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "echo": True, "logprobs": 1,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        got = choice["prompt_logprobs"]
        assert len(got) == len(ids) and got[0] is None
        for pos, (entry, want) in enumerate(zip(got[1:], ref.prompt_logprobs[1:], strict=True), 1):
            assert ids[pos] in map(int, entry) and len(entry) <= 3
            for t, v in entry.items():
                assert v["logprob"] == pytest.approx(float(want[int(t)]), abs=1e-5)
                assert v["rank"] == want[int(t)].rank and isinstance(v["decoded_token"], str)
        assert len(choice["logprobs"]["top_logprobs"][1]) <= 2  # echo's own k stays 1 (+ chosen)
        chat = http.post("/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0,
        })  # fmt: skip
        body = chat.json()
        assert body["prompt_logprobs"][0] is None and all(len(e) == 1 for e in
                                                           body["prompt_logprobs"][1:])  # fmt: skip
        assert body["usage"]["prompt_tokens"] == len(body["prompt_logprobs"])
        bad = http.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 2,
                                                 "stream": True})  # fmt: skip
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"
        far = http.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 99})
        assert far.status_code == 400 and "prompt_logprobs must be in" in far.text


def _sse_json(http, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed reply (without [DONE])."""
    import json

    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = [ln[len("data: ") :] for ln in r.iter_lines() if ln.startswith("data: ")]
    return [json.loads(ln) for ln in lines if ln != "[DONE]"]


def test_return_token_ids(server, offline):
    # vLLM's return_token_ids: the prompt's ids and each choice's generated ids, whole and
    # streamed (the chunks' ids add up to the whole reply's; the prompt's come in the first).
    ids = list(offline.get_tokenizer().encode(PROMPT))
    (ref,) = offline.generate(prompt_token_ids=[ids], sampling_params=_greedy(5))
    want = ref.outputs[0].token_ids
    common = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with server.http() as http:
        choice = http.post("/v1/completions", json={"prompt": ids, **common}).json()["choices"][0]
        assert choice["prompt_token_ids"] == ids and choice["token_ids"] == want
        events = _sse_json(http, "/v1/completions", {"prompt": ids, "stream": True, **common})
        chosen = [e["choices"][0] for e in events if e["choices"]]
        assert chosen[0]["prompt_token_ids"] == ids
        assert all("prompt_token_ids" not in c for c in chosen[1:])
        assert sum((c["token_ids"] for c in chosen), []) == want
        chat_req = {"messages": MESSAGES, **common}
        whole = http.post("/v1/chat/completions", json=chat_req).json()
        prompt = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert whole["prompt_token_ids"] == prompt and len(whole["choices"][0]["token_ids"]) == 5
        events = _sse_json(http, "/v1/chat/completions", {**chat_req, "stream": True})
        assert events[0]["prompt_token_ids"] == prompt
        streamed = sum((e["choices"][0].get("token_ids", []) for e in events if e["choices"]), [])
        assert streamed == whole["choices"][0]["token_ids"]
        plain = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}).json()
        assert "token_ids" not in plain["choices"][0]
