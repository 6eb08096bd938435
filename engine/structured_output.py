"""Structured outputs (vLLM's `structured_outputs`, the OpenAI server's `response_format`): a JSON
schema, any JSON object, a regular expression, a choice among strings or an EBNF grammar constrains
what a request may generate.

The grammar work is xgrammar's (compiling a constraint against the tokenizer's vocabulary, and a
matcher per sequence that says which tokens may come next); the engine keeps one matcher per
sequence on the host, fills each constrained row's bitmask of allowed tokens before the step
samples (`SamplingRow.token_bitmask`: int32 words, bit t of the row = token t allowed), the sampler
sets every other token's logit to -inf wherever it samples (in-process or on a distributed
engine's output rank), and each sampled token advances its sequence's matcher. A sequence whose
grammar is complete may only end (its stop tokens); reaching the end stops it.

Such steps run synchronously: a step scheduled ahead of its predecessor's tokens cannot know the
next mask (`Scheduler.schedule_ahead` leaves them out). Speculative drafts of a constrained
sequence get one mask per drafted row (`StructuredOutputs.draft_masks`: the matcher walks the
drafts and rolls back), applied before verification.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
COMPILED_CACHE_SIZE = 256  # compiled constraints kept per engine (least recently used dropped)


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's `StructuredOutputsParams`): exactly one of

    json: a JSON schema (a dict or its JSON text); the output is a JSON value it accepts.
    regex: the output matches this regular expression (whole).
    choice: the output is one of these strings.
    grammar: an EBNF grammar (GBNF / xgrammar syntax, a `root` rule) the output is a sentence of.
    json_object: True: the output is a JSON object, any keys and values (OpenAI's
    `response_format: json_object`; an object, not any JSON value).

    disable_any_whitespace: JSON output without whitespace between tokens (the default allows
    any, as vLLM's xgrammar backend does)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar and "
                f"json_object, got {given or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(
                f"structured_outputs.json must be a JSON schema (a dict or its JSON text), got "
                f"{type(self.json).__name__}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, "
                                 f"got {value!r}")  # fmt: skip
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not self.choice
            or any(not isinstance(c, str) or not c for c in self.choice)
        ):
            raise ValueError(
                f"structured_outputs.choice must be a non-empty list of non-empty strings, got "
                f"{self.choice!r}"
            )
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be true or false, "
                             f"got {self.json_object!r}")  # fmt: skip
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be true or false, "
                             f"got {self.disable_any_whitespace!r}")  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredOutputsParams:
        """From a request's JSON object (the server's `structured_outputs` field); unknown keys
        are an error naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled constraint: (kind, its canonical text, whitespace)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, dict):
            value = json.dumps(value)  # key order kept: it is the order properties come in
        elif kind == "choice":
            value = json.dumps(list(value), ensure_ascii=False)
        elif kind == "json_object":
            value = ""
        return kind, value, self.disable_any_whitespace


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (string literals in JSON's escapes,
    which xgrammar's EBNF reads the same way)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputs:
    """An engine's constraint compiler: xgrammar's tokenizer info for the model's vocabulary
    (built on first use), compiled constraints cached by `StructuredOutputsParams.key`, and
    matchers for new sequences. Thread-safe: the server compiles while validating a request, off
    the engine's loop thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self._compiler = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._init_lock = threading.Lock()  # the compiler, built once

    def _xgr(self):
        try:
            import xgrammar
        except ImportError as e:
            raise ValueError(
                "structured outputs need the xgrammar package, which is not installed: "
                "pip install xgrammar"
            ) from e
        return xgrammar

    def compiler(self):
        with self._init_lock:
            if self._compiler is None:
                xgr = self._xgr()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, params: StructuredOutputsParams):
        """The compiled constraint (cached); a constraint xgrammar cannot compile is a
        ValueError naming the field and xgrammar's reason. Compiles outside the cache's lock
        (two threads may compile the same constraint once each; one result is kept)."""
        key = params.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiler = self.compiler()
        kind, value, tight = key
        try:
            if kind == "json":
                compiled = compiler.compile_json_schema(value, any_whitespace=not tight)
            elif kind == "json_object":  # an object, as the name says (xgrammar's built-in
                # JSON grammar would take an array too)
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not tight
                )
            elif kind == "regex":
                compiled = compiler.compile_regex(value)
            elif kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(params.choice))
            else:
                compiled = compiler.compile_grammar(value)
        except (RuntimeError, ValueError) as e:
            what = {"json": "JSON schema", "regex": "regular expression",
                    "choice": "choice list", "grammar": "EBNF grammar"}.get(kind, kind)  # fmt: skip
            reason = _reason(e)
            raise ValueError(f"structured_outputs.{kind}: not a valid {what}: {reason}") from e
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: StructuredOutputsParams):
        """A new sequence's matcher (at the start of the output)."""
        return self._xgr().GrammarMatcher(self.compile(params))

    def bitmask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def fill(self, matchers: Sequence[Any]) -> torch.Tensor:
        """int32 [len(matchers), words]: each matcher's allowed next tokens."""
        xgr = self._xgr()
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        return mask

    def draft_masks(self, matcher, draft) -> torch.Tensor:
        """int32 [1 + len(draft), words]: the allowed tokens at each logits row of a drafted
        step (row j after drafts[:j]), found by walking the matcher through the drafts and back.
        Rows after a draft the grammar refuses repeat the last mask: verification stops at that
        draft (masked to -inf, it is never accepted), so they are never read."""
        xgr = self._xgr()
        masks = xgr.allocate_token_bitmask(1 + len(draft), self.vocab_size)
        matcher.fill_next_token_bitmask(masks, 0)
        walked = 0
        for j, token in enumerate(draft, 1):
            if matcher.is_terminated() or not matcher.accept_token(int(token)):
                masks[j:] = masks[j - 1]
                break
            walked += 1
            matcher.fill_next_token_bitmask(masks, j)
        if walked:
            matcher.rollback(walked)
        return masks


def _reason(e: Exception) -> str:
    """xgrammar's message without its time stamp, source line and check text."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)
    return re.sub(r"^Check failed: \(.*?\) is false: ", "", line)


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from int32 bitmask words [rows, ceil(vocab / 32)]: bit j of word w
    is token 32 * w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()
