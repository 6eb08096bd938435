"""Tool calling on chat completions (OpenAI's `tools` / `tool_choice`, vLLM's behaviour).

- `tool_choice` naming a function: the output is constrained (structured outputs) to a JSON value
  of that function's `parameters` schema, returned as the one tool call's `arguments`.
- `tool_choice: "required"`: the output is constrained to a non-empty JSON array of
  `{"name": <a tool's name>, "parameters": <its schema>}` objects, returned as tool calls.
- `tool_choice: "auto"` (the default when tools are given and the server has a parser): the model
  writes calls in its own format and a parser (`--tool-call-parser`, vLLM's names) takes them out of
  the text: `hermes` (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`: Qwen 2.5 / 3,
  Hermes) or `llama3_json` (the whole reply a `{"name": ..., "parameters": {...}}` object, or
  several joined by ";", optionally after `<|python_tag|>`: Llama 3.1 / 3.2) or `pythonic` (the
  reply a Python list of calls with keyword arguments, `[f(a=1), g(b="x")]`, optionally between
  `<|python_start|>` and `<|python_end|>`: Llama 3.2 / 4's pythonic templates) or `mistral`
  (`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`: Mistral 7B v0.3, Nemo; or
  `[TOOL_CALLS]name[ARGS]{...}` per call: Mistral Small 3.2, Magistral; `[TOOL_CALLS]` is a special
  token, so such replies are decoded with skip_special_tokens off, as vLLM does).
- `tool_choice: "none"`: the tools reach the chat template, nothing is parsed.

The tools always reach the model's chat template (`tools=`), which decides how the model sees them.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def body(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool_calls entry (with `index` in a streaming delta)."""
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            call["index"] = index
        return call


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def function_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema (an object with any keys when it gives none)."""
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def required_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of `tool_choice: "required"`'s output: a non-empty array of calls."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": function_schema(t),
            },
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def parse_required(text: str) -> list[ToolCall] | None:
    """The calls of a `required` reply (None when it is not a complete array: cut by length)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [ToolCall(c["name"], _arguments(c["parameters"])) for c in value]


# -- parsers of free-form ("auto") replies --------------------------------------------------------
class ToolParser(ABC):
    """Takes tool calls out of a reply: `parse(text)` -> (content or None, calls); `streamable
    (text)` -> how much of a reply still being written can go out as content now.
    keeps_special_tokens: the calls' markers are special tokens, so the reply must be decoded
    with skip_special_tokens off."""

    keeps_special_tokens = False

    @abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]: ...

    @abstractmethod
    def streamable(self, text: str) -> int: ...


def _call_from(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            return ToolCall(obj["name"], _arguments(obj[key]))
    return ToolCall(obj["name"], "{}")


def _held_back(text: str, tag: str) -> int:
    """How much of `text` can go out as content: everything before `tag`, holding back a tail
    that may begin it."""
    at = text.find(tag)
    if at >= 0:
        return at
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def _whole_or_nothing(text: str, opener: str, tag: str) -> int:
    """For formats where the whole reply is the calls: nothing of `text` goes out while it may
    still become one (empty, starting with `opener`, or with a start of `tag`), else all of it."""
    body = text.lstrip()
    if not body or body.startswith(opener) or tag.startswith(body[: len(tag)]):
        return 0
    return len(text)


class HermesParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls = []
        for closed, open_ in self._CALL.findall(text[start:]):
            try:
                call = _call_from(json.loads((closed or open_).strip()), ("arguments",))
            except json.JSONDecodeError:
                call = None
            if call is None:  # not a call after all: the reply stays text
                return text, []
            calls.append(call)
        content = text[:start].strip()
        return (content or None), calls

    def streamable(self, text: str) -> int:
        """Everything before a tag start, holding back a tail that may begin one."""
        return _held_back(text, self.START)


class Llama3JsonParser(ToolParser):
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG) :].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        at = 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return None, calls

    def streamable(self, text: str) -> int:
        """Nothing while the reply may still be a call (it starts with "{" or the tag)."""
        return _whole_or_nothing(text, "{", self.TAG)


class PythonicParser(ToolParser):
    START, END = "<|python_start|>", "<|python_end|>"

    def _body(self, text: str) -> str:
        body = text.strip()
        if body.startswith(self.START):
            body = body[len(self.START) :]
            body = body[: body.rindex(self.END)] if self.END in body else body
        return body.strip()

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A reply that is exactly a list of calls (names, keyword arguments of Python
        literals) gives those calls; anything else stays text."""
        body = self._body(text)
        if not body.startswith("["):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for node in tree.elts:
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                    return text, []
                if node.args:  # positional arguments have no names to send
                    return text, []
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
                if None in args:  # **kwargs
                    return text, []
                calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError):
            return text, []
        return None, calls

    def streamable(self, text: str) -> int:
        """Nothing while the reply may still be a list of calls."""
        return _whole_or_nothing(text, "[", self.START)


class MistralParser(ToolParser):
    """Content, then `[TOOL_CALLS]` and either a JSON array (or object) of calls with
    "arguments" (tokenizer v3 templates) or, per call, `name[ARGS]{json}` (v11 and later; a
    `[CALL_ID]id` between the name and `[ARGS]` is skipped; each call after the first repeats
    `[TOOL_CALLS]`). Anything that does not parse whole stays text."""

    TAG, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    keeps_special_tokens = True

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.TAG)
        if start < 0:
            return text, []
        body = text[start + len(self.TAG) :].strip()
        calls = self._json_calls(body) if body[:1] in ("[", "{") else self._tagged_calls(body)
        if not calls:
            return text, []
        content = text[:start].strip()
        return (content or None), calls

    @staticmethod
    def _json_calls(body: str) -> list[ToolCall] | None:
        try:
            value, end = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return None
        if body[end:].strip():
            return None
        items = value if isinstance(value, list) else [value]
        calls = [_call_from(obj, ("arguments", "parameters")) for obj in items]
        return None if not calls or None in calls else calls

    def _tagged_calls(self, body: str) -> list[ToolCall] | None:
        calls = []
        for part in body.split(self.TAG):
            head, sep, args = part.partition(self.ARGS)
            name = head.partition(self.CALL_ID)[0].strip()
            if not sep or not name or any(c in name for c in " \n\t{}[]\"'"):
                return None
            try:
                value = json.loads(args)
            except json.JSONDecodeError:
                return None
            calls.append(ToolCall(name, _arguments(value)))
        return calls

    def streamable(self, text: str) -> int:
        """Everything before the tag, holding back a tail that may begin it."""
        return _held_back(text, self.TAG)


def make_parser(name: str) -> ToolParser:
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    if name == "mistral":
        return MistralParser()
    if name == "pythonic":
        return PythonicParser()
    raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_CALL_PARSERS)}")


# -- replies --------------------------------------------------------------------------------------
@dataclass
class _StreamState:
    sent: int = 0  # characters of the reply sent as content (auto) or arguments (named)
    call_id: str | None = None


class ToolReply:
    """How one chat request's choices become messages and stream deltas under its tool mode
    ("named", "required" or "auto"; other modes answer plain text and need none)."""

    def __init__(self, mode: str, name: str | None = None, parser: ToolParser | None = None):
        if mode not in ("named", "required", "auto"):
            raise ValueError(f"no tool reply for mode {mode!r}")
        if (mode == "named") != (name is not None) or (mode == "auto") != (parser is not None):
            raise ValueError("a named reply needs the name, an auto one the parser")
        self.mode, self.name, self.parser = mode, name, parser
        self._streams: dict[int, _StreamState] = {}

    def _calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        if self.mode == "required":
            calls = parse_required(text)
            return (text, []) if calls is None else (None, calls)
        return self.parser.parse(text)

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """(the assistant message, finish_reason) of a finished choice: "tool_calls" when the
        model called tools of its own accord or as required (a named call keeps the engine's)."""
        content, calls = self._calls(text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [c.body() for c in calls]
            if self.mode != "named" and finish == "stop":
                finish = "tool_calls"
        return msg, finish

    def delta(
        self, index: int, text: str, finish: str | None, first: bool
    ) -> tuple[dict[str, Any], str | None]:
        """The stream delta of choice `index` whose reply so far is `text`: a named call's
        arguments as they come; an auto reply's content up to where a call may start; calls
        (required, auto) whole in the last chunk."""
        st = self._streams.setdefault(index, _StreamState())
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if self.mode == "named":
            piece = {"index": 0, "function": {"arguments": text[st.sent :]}}
            if st.call_id is None:
                call = ToolCall(self.name, text[st.sent :]).body(index=0)
                st.call_id, piece = call["id"], call
            st.sent = len(text)
            delta["tool_calls"] = [piece]
            return delta, finish
        if finish is None:
            if self.mode == "auto":
                upto = max(self.parser.streamable(text), st.sent)
                if upto > st.sent:
                    delta["content"] = text[st.sent : upto]
                    st.sent = upto
            return delta, None
        content, calls = self._calls(text)
        if calls:
            delta["tool_calls"] = [c.body(index=i) for i, c in enumerate(calls)]
            return delta, ("tool_calls" if finish == "stop" else finish)
        if len(text) > st.sent:  # no calls after all: the rest is content
            delta["content"] = text[st.sent :]
        return delta, finish
