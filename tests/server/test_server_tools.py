"""Tool calling on chat completions: the free-form parsers (hermes, llama3_json, mistral,
pythonic) and their streaming hold-back against hand-written replies; on the real server, named
and required tool choices (constrained, so valid on any model: the tiny random one here),
streaming deltas equal to the whole reply, tools and earlier calls reaching the chat template, a
mistral-parsed request decoded with its special tokens, and the 400s."""

from __future__ import annotations

import json

import openai
import pytest

from engine.server.protocol import ChatCompletionRequest
from engine.server.tools import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    PythonicParser,
    ToolReply,
    make_parser,
)
from engine.tokenizer import apply_chat_template
from tests.server.conftest import MODEL_NAME, make_engine, start_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


# -- parsers --------------------------------------------------------------------------------------
def test_hermes_parser():
    p = HermesParser()
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}'
    )  # the second call unterminated: the model stopped at EOS
    content, calls = p.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert p.parse("no calls here") == ("no calls here", [])
    assert p.parse("<tool_call>{not json}</tool_call>")[1] == []  # stays text
    assert p.parse('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name: text
    # streaming: everything before a tag, holding back what may start one
    assert p.streamable("Hello <tool") == len("Hello ")
    assert p.streamable("Hello <tools are fun") == len("Hello <tools are fun")
    assert p.streamable("Hi <tool_call>{") == len("Hi ")
    assert p.streamable("a<") == 1


def test_llama3_json_parser():
    p = Llama3JsonParser()
    content, calls = p.parse('{"name": "get_time", "parameters": {"zone": "CET"}}')
    assert content is None and [(c.name, c.arguments) for c in calls] == [
        ("get_time", '{"zone": "CET"}')
    ]
    text = '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}'
    assert [(c.name, json.loads(c.arguments)) for c in p.parse(text)[1]] == [
        ("a", {}),
        ("b", {"x": 1}),
    ]
    assert p.parse("The answer is 4.") == ("The answer is 4.", [])
    assert p.parse('{"no": "name"}') == ('{"no": "name"}', [])
    assert p.streamable("  {") == 0 and p.streamable("<|py") == 0
    assert p.streamable("The answer") == len("The answer")


def test_pythonic_parser():
    p = PythonicParser()
    content, calls = p.parse('[get_weather(city="Paris", celsius=True), get_time(zone="UTC")]')
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "celsius": True}),
        ("get_time", {"zone": "UTC"}),
    ]
    wrapped = "<|python_start|>[f(x=[1, 2], y=None)]<|python_end|>"
    assert [(c.name, json.loads(c.arguments)) for c in p.parse(wrapped)[1]] == [
        ("f", {"x": [1, 2], "y": None})
    ]
    for text in ("[1, 2, 3]", "[f(1)]", "[f(**kw)]", "[f(x=y)]", "[f(", "It is [f(x=1)]", "[]"):
        assert p.parse(text) == (text, []), text  # not a list of keyword calls: text
    assert p.streamable(" [f(") == 0 and p.streamable("<|python") == 0
    assert p.streamable("Sure") == len("Sure")


def test_mistral_parser():
    p = MistralParser()
    assert (
        make_parser("mistral").keeps_special_tokens
        and not make_parser("hermes").keeps_special_tokens
    )
    # tokenizer v3: a JSON array of calls after the tag
    text = (
        'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    )
    content, calls = p.parse(text)
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    single = p.parse('[TOOL_CALLS]{"name": "f", "arguments": {}}')
    assert single[0] is None and [(c.name, c.arguments) for c in single[1]] == [("f", "{}")]
    # v11+: name[ARGS]{json} per call, the tag repeated; a call id skipped
    text = (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'
        '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"zone": "CET"}'
    )
    content, calls = p.parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"zone": "CET"}),
    ]
    for text in (
        "no calls",
        "[TOOL_CALLS] [{not json}]",
        '[TOOL_CALLS] [{"arguments": {}}]',  # no name
        '[TOOL_CALLS] [{"name": "f", "arguments": {}}] and more',
        "[TOOL_CALLS]f[ARGS]{broken",
        '[TOOL_CALLS]f {"x": 1}',  # no [ARGS]
        "[TOOL_CALLS]",
    ):
        assert p.parse(text) == (text, []), text
    assert p.streamable("Hi [TOOL") == len("Hi ")
    assert p.streamable("Hi [TOOL_CALLS]f") == len("Hi ")
    assert p.streamable("a [1, 2]") == len("a [1, 2]")


def test_auto_stream_deltas_add_up_to_the_whole_reply():
    text = 'Sure.\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    for step in (1, 3, 7):
        reply = ToolReply("auto", parser=HermesParser())
        content, calls, finish = "", [], None
        for end in range(step, len(text) + step, step):
            part = text[: min(end, len(text))]
            done = "stop" if end >= len(text) else None
            delta, finish = reply.delta(0, part, done, end == step)
            content += delta.get("content", "")
            calls += delta.get("tool_calls", [])
            if done:
                break
        assert content == "Sure.\n" and finish == "tool_calls"
        assert [(c["function"]["name"], c["index"]) for c in calls] == [("get_time", 0)]
    # a reply without calls streams whole
    reply = ToolReply("auto", parser=HermesParser())
    parts = ["An <", "An <b>", "An <b> answer"]
    got = [reply.delta(0, t, "stop" if i == 2 else None, i == 0)[0] for i, t in enumerate(parts)]
    assert "".join(d.get("content", "") for d in got) == "An <b> answer"


def test_earlier_calls_and_tools_reach_the_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = (
        "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}(call {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}){% endfor %}"
        "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}{% endfor %}"
    )
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                *MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [WEATHER],
        }
    )  # fmt: skip
    ids = apply_chat_template(tok, req.conversation(), False, tools=req.tool_dicts())
    text = tok.decode(ids)
    assert text.startswith("[tool get_weather]<user>Weather in Paris?")
    assert '(call get_weather {"city": "Paris"})' in text  # arguments as an object
    assert text.endswith("<tool>sunny(for call_1)")


# -- the server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    pytest.importorskip("xgrammar")
    return server.client()


def test_named_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, TIME],
                                       tool_choice=named, max_tokens=40, temperature=0)  # fmt: skip
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Oslo") and isinstance(args["celsius"], bool)
    assert choice.finish_reason == "stop"
    # streamed: the first delta names the call, the arguments add up to the whole reply's
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=named,
        max_tokens=40, temperature=0, stream=True,
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.function.name == "get_weather" and first.id.startswith("call_")
    streamed = "".join(
        tc.function.arguments or "" for c in chunks for tc in c.choices[0].delta.tool_calls or []
    )
    assert streamed == call.function.arguments


def test_required_tool_choice(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, TIME],
                                       tool_choice="required", max_tokens=60, temperature=0.8,
                                       seed=1, n=3)  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert set(args) == {"city", "celsius"}
            else:
                assert call.function.name == "get_time" and args["zone"] in ("UTC", "CET")
    # (the tiny vocabulary's tokens are short: one get_time call fits the server's 64)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[TIME],
                                            tool_choice="required", max_tokens=60, temperature=0,
                                            stream=True)  # fmt: skip
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    (call,) = chunks[-1].choices[0].delta.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tools_without_a_parser_answer_text_and_bad_choices_are_400(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER],
                                       max_tokens=5, temperature=0)  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    cases = [
        (dict(tools=[WEATHER], tool_choice="auto"), "--enable-auto-tool-choice"),
        (dict(tool_choice="required"), "tool_choice needs tools"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
         "not one of the tools"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice must be"),
        (dict(tools=[WEATHER, WEATHER]), "distinct names"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
         "constrains the output itself"),
    ]  # fmt: skip
    for kw, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, **kw)


def test_auto_tool_choice_with_a_parser(tiny_model):
    pytest.importorskip("xgrammar")
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        start_server(make_engine(tiny_model), enable_auto_tool_choice=True)
    handle = start_server(make_engine(tiny_model), tool_call_parser="hermes",
                          enable_auto_tool_choice=True)  # fmt: skip
    try:
        client = handle.client()
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER],
                                           max_tokens=8, temperature=0)  # fmt: skip
        # random weights write no <tool_call>: the reply is content, as plain chat gives it
        plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                               max_tokens=8, temperature=0)  # fmt: skip
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == plain.choices[0].finish_reason
        stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                tools=[WEATHER], max_tokens=8, temperature=0,
                                                stream=True)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == r.choices[0].message.content
    finally:
        handle.stop()


def test_mistral_parser_requests_keep_special_tokens(tiny_model):
    # [TOOL_CALLS] is a special token: an auto request under the mistral parser is decoded with
    # skip_special_tokens off (vLLM does the same); a request without tools keeps the default.
    engine = make_engine(tiny_model)
    seen = []
    original = engine.add_request

    async def recording(prompt, params, *args, **kw):
        seen.append(params.skip_special_tokens)
        return await original(prompt, params, *args, **kw)

    engine.add_request = recording
    handle = start_server(engine, tool_call_parser="mistral", enable_auto_tool_choice=True)
    try:
        client = handle.client()
        for tools in ([WEATHER], None):
            extra = {"tools": tools} if tools else {}
            r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                               temperature=0, **extra)  # fmt: skip
            assert r.choices[0].message.tool_calls is None  # random weights write no calls
    finally:
        handle.stop()
    assert seen == [False, True]


def test_chat_template_kwargs_reach_the_template(tiny_model, client):
    from engine import LLM, SamplingParams

    llm = LLM(model=str(tiny_model), dtype="float32", device="cpu", kv_cache_memory_bytes=4 << 20)
    tok = llm.get_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}"
        "{% for t in tools or [] %} [{{ t.function.name }}]{% endfor %}"
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.decode(apply_chat_template(tok, msgs, template_kwargs={"enable_thinking": False}))\
        == "hi /no_think"  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    (a,) = llm.chat(msgs, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": False},
                    tools=[WEATHER])  # fmt: skip
    assert tok.decode(a.prompt_token_ids) == "hi /no_think [get_weather]"
    bad = {"chat_template_kwargs": {"tools": []}}
    with pytest.raises(openai.BadRequestError, match="may not set"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2,
                                       extra_body=bad)  # fmt: skip
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"x": 1}})  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")
