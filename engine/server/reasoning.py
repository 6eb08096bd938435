"""Reasoning models' thinking, separated from the answer (vLLM's `--reasoning-parser`): chat
replies get `reasoning_content` (the text between `<think>` and `</think>`) beside `content` (what
follows), and stream deltas carry `reasoning_content` until the end tag.

- `deepseek_r1`: the chat template opens `<think>` itself, so the reply starts inside the
  thinking; without an end tag (cut by max_tokens) all of it is reasoning.
- `qwen3`: thinking is optional (`enable_thinking`): only a reply that opens with `<think>` has
  reasoning, up to `</think>`; without the end tag the whole reply is content (streamed, it went
  out as reasoning). Models whose template opens the tag (Qwen3 2507 Thinking) take `deepseek_r1`.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


def _held(text: str, tag: str) -> int:
    """How many trailing characters of `text` may be the start of `tag` (held back)."""
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return keep
    return 0


@dataclass
class ReasoningParser:
    name: str

    def __post_init__(self) -> None:
        if self.name not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {self.name!r}; known: {', '.join(REASONING_PARSERS)}"
            )

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a finished reply (None for an empty part)."""
        stripped = text.lstrip()
        opened = stripped.startswith(START)
        if self.name == "qwen3" and not opened:
            return None, (text or None)
        body = stripped[len(START) :] if opened else text
        at = body.find(END)
        if at < 0:
            if self.name == "deepseek_r1":
                return (body or None), None
            return None, (text or None)
        reasoning, content = body[:at], body[at + len(END) :]
        return (reasoning or None), (content or None)

    def partial(self, text: str, final: bool = False) -> tuple[str, str, bool]:
        """A reply being written: (reasoning so far, content so far, whether the reasoning is
        done), each a prefix of what it will be streamed as: text that may still turn out to be
        a tag is held back. A qwen3 reply that does not open with `<think>` is all content; one
        that does streams as reasoning until `</think>`. final: the reply is complete (nothing
        is held back)."""
        stripped = text.lstrip()
        if not final and len(stripped) < len(START) and START.startswith(stripped):
            return "", "", False  # may still open the tag (blank so far included)
        opened = stripped.startswith(START)
        if self.name == "qwen3" and not opened:
            return "", text, True
        body = stripped[len(START) :] if opened else text
        at = body.find(END)
        if at < 0:
            keep = 0 if final else _held(body, END)
            return body[: len(body) - keep], "", False
        return body[:at], body[at + len(END) :], True


class ReasoningStream:
    """A streamed chat request's thinking: per choice, the reasoning not yet sent and the
    answer text so far (what the content or tool-call deltas are made from)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self._sent: dict[int, int] = {}  # choice -> reasoning characters sent

    def step(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """(new reasoning to send, the answer so far) for choice `index` whose reply so far is
        `text` (final: complete)."""
        reasoning, body, _ = self.parser.partial(text, final=final)
        sent = self._sent.get(index, 0)
        self._sent[index] = max(sent, len(reasoning))
        return reasoning[sent:], body
