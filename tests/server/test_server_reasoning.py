"""Reasoning parsers (engine/server/reasoning.py): the thinking split off finished replies, and
streamed char by char, chunk by chunk: the reasoning and answer deltas add up to the finished
split; on the real server, deepseek_r1 (the template opened the tag) and qwen3 (optional)."""

from __future__ import annotations

import pytest

from engine.server.reasoning import ReasoningParser, ReasoningStream
from tests.server.conftest import MODEL_NAME, make_engine, start_server

REPLIES = [
    "Let me think.\nTwo and two.</think>\n\nIt is 4.",
    "<think>\nHmm.</think>The answer.",
    "  <think>x</think>",
    "No tags at all.",
    "Cut off while thinking, </thi",
    "</think>Empty thinking.",
    "a < b but </ think> is not the tag</think>ok",
]
SPLITS = {
    "deepseek_r1": [
        ("Let me think.\nTwo and two.", "\n\nIt is 4."),
        ("\nHmm.", "The answer."),
        ("x", None),
        ("No tags at all.", None),
        ("Cut off while thinking, </thi", None),
        (None, "Empty thinking."),
        ("a < b but </ think> is not the tag", "ok"),
    ],
    "qwen3": [
        (None, "Let me think.\nTwo and two.</think>\n\nIt is 4."),  # not opened: all answer
        ("\nHmm.", "The answer."),
        ("x", None),
        (None, "No tags at all."),
        (None, "Cut off while thinking, </thi"),
        (None, "</think>Empty thinking."),
        (None, "a < b but </ think> is not the tag</think>ok"),
    ],
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_split(name):
    parser = ReasoningParser(name)
    assert [parser.split(t) for t in REPLIES] == SPLITS[name]


@pytest.mark.parametrize("name", sorted(SPLITS))
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streamed_deltas_add_up(name, chunk):
    parser = ReasoningParser(name)
    for text in REPLIES:
        stream = ReasoningStream(parser)
        reasoning, answers = "", []
        for end in range(chunk, len(text) + chunk, chunk):
            final = end >= len(text)
            piece, body = stream.step(0, text[: min(end, len(text))], final)
            reasoning += piece
            if answers:  # the answer so far only grows
                assert body.startswith(answers[-1]), (text, body)
            answers.append(body)
        want_r, want_c = parser.split(text)
        if name == "qwen3" and text.lstrip().startswith("<think>") and "</think>" not in text:
            continue  # streamed as thinking; the finished split calls it content
        assert reasoning == (want_r or ""), (text, reasoning)
        assert answers[-1] == (want_c or ""), (text, answers[-1])


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'"):
        ReasoningParser("r2")


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_server(tiny_model, name):
    handle = start_server(make_engine(tiny_model), reasoning_parser=name)
    try:
        client = handle.client()
        kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                  temperature=0)  # fmt: skip
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        reasoning = getattr(msg, "reasoning_content", None)
        # random weights write no tags: deepseek_r1 calls the reply thinking, qwen3 the answer
        text = (reasoning or "") + (msg.content or "")
        assert text and (reasoning is None) == (name == "qwen3")
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        streamed_r = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                             for c in chunks)  # fmt: skip
        streamed_c = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert (streamed_r, streamed_c) == (reasoning or "", msg.content or "")
        # a constrained reply is not split
        r = client.chat.completions.create(extra_body={"guided_choice": ["yes", "no"]}, **kw)
        assert r.choices[0].message.content in ("yes", "no")
    finally:
        handle.stop()
