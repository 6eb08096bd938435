"""Per-request sampling parameters: vLLM's field names and defaults, validated on construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from engine.structured_output import StructuredOutputsParams

# Temperatures below this are treated as greedy (as vLLM does): dividing logits by a tiny
# temperature overflows float32, and the limit of softmax(logits / t) as t -> 0 is the argmax.
SAMPLING_EPS = 1e-5
# vLLM's range for the OpenAI-style presence/frequency penalties.
MAX_ABS_PENALTY = 2.0


class RequestOutputKind(enum.IntEnum):
    """What a streamed RequestOutput holds (vLLM's): CUMULATIVE everything so far, DELTA only
    what is new since the request's last output (text, token ids, logprobs; the prompt's
    logprobs in the first), FINAL_ONLY nothing until the request finishes. `LLM.generate` and
    any run that does not stream return whole outputs whatever the kind."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_truncation(k: object) -> None:
    """truncate_prompt_tokens: None (off), -1 (the context's room) or an integer >= 1."""
    if k is not None and (not _is_int(k) or (k < 1 and k != -1)):
        raise ValueError(
            f"truncate_prompt_tokens must be None, -1 (the context's room) or an integer >= 1, "
            f"got {k!r}"
        )


def truncate_prompt(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """The prompt's last k tokens (k -1: the last max_model_len - 1, leaving one for output)."""
    if k is None:
        return ids
    keep = max_model_len - 1 if k == -1 else k
    return ids[-keep:] if len(ids) > keep else ids


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; every field is checked in `__post_init__`.

    top_k: -1 or None means off (all tokens), otherwise >= 1. max_tokens: None means "until the
    model's context is full" (the engine applies max_model_len). logprobs: the number of top
    alternatives to return per step (0 = only the chosen token's logprob); logprobs are of the raw
    model distribution, before penalties, temperature and truncation (vLLM's default
    "raw_logprobs"). prompt_logprobs: the same for prompt positions (computed by the engine with
    `engine.sampler.gather_logprobs`). logit_bias: token id -> a value added to its logit before
    penalties and sampling (greedy too); allowed_token_ids: only these tokens can be picked (vLLM's
    fields). For n > 1 the engine runs `child(i)` for i in range(n).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # Words never to complete (vLLM's field): the engine tokenizes each (as written and after a
    # space) into bad_words_token_ids; a word's last token is banned wherever the output so far
    # ends with the tokens before it (always, for a one-token word).
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # False: no output text (token ids only; logprob entries' decoded_token None), vLLM's field;
    # stop strings need the text, so they are refused with it.
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # A JSON schema / regex / choice / grammar the output must follow (a dict is read as
    # StructuredOutputsParams' fields; `engine.structured_output`).
    structured_outputs: StructuredOutputsParams | None = None
    # Keep only the prompt's last k tokens (-1: as many as the context leaves room for), vLLM's.
    truncate_prompt_tokens: int | None = None
    # Normalized forms filled in by __post_init__ (not constructor arguments).
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)
    stop_token_id_set: frozenset[int] = field(init=False, repr=False, default=frozenset())
    # bad_words as token id sequences, set by the engine from its tokenizer (`bad_word_ids`).
    bad_words_token_ids: list[tuple[int, ...]] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is None:
            self.top_k = -1
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(
                f"top_k must be -1 or None (off) or an integer >= 1, got {self.top_k!r}"
            )
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 = off), "
                f"got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or abs(value) > MAX_ABS_PENALTY:
                raise ValueError(
                    f"{name} must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], got {value!r}"
                )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        self.stop_strings = self._normalize_stop(self.stop)
        self.stop_token_id_set = self._normalize_stop_token_ids(self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got "
                                 f"{type(self.logit_bias).__name__}")  # fmt: skip
            for token_id, bias in self.logit_bias.items():
                if not _is_int(token_id) or token_id < 0 or not _is_real(bias):
                    raise ValueError(
                        f"logit_bias must map token ids (integers >= 0) to finite numbers, got "
                        f"{token_id!r}: {bias!r}"
                    )
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not ids or any(not _is_int(t) or t < 0 for t in ids):
                raise ValueError(
                    f"allowed_token_ids must be a non-empty list of integers >= 0, got {ids!r}"
                )
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, list | tuple) or any(
                not isinstance(w, str) or not w.strip() for w in words
            ):
                raise ValueError(
                    f"bad_words must be a list of non-empty strings, got {self.bad_words!r}"
                )
            self.bad_words = list(words)
        check_truncation(self.truncate_prompt_tokens)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                "structured_outputs must be a StructuredOutputsParams or a dict of its fields, "
                f"got {type(self.structured_outputs).__name__}"
            )
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
                     "detokenize"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.detokenize and self.stop_strings:
            raise ValueError(
                f"stop strings need the output text: stop={self.stop!r} with detokenize=False "
                "(set detokenize=True, or stop on token ids with stop_token_ids)"
            )
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(
                f"output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY), got "
                f"{self.output_kind!r}"
            ) from None

    @staticmethod
    def _normalize_stop(stop: list[str] | str | None) -> list[str]:
        if stop is None:
            return []
        strings = [stop] if isinstance(stop, str) else list(stop)
        for s in strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r} in {stop!r}")
        return strings

    @staticmethod
    def _normalize_stop_token_ids(ids: list[int] | None) -> frozenset[int]:
        if ids is None:
            return frozenset()
        for token_id in ids:
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(
                    f"stop_token_ids must hold integers >= 0, got {token_id!r} in {ids!r}"
                )
        return frozenset(ids)

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: temperature 0 (or below SAMPLING_EPS)."""
        return self.temperature < SAMPLING_EPS

    @property
    def changes_logits(self) -> bool:
        """Whether logit_bias, allowed_token_ids, structured outputs or bad_words edit the
        logits before sampling."""
        return (
            bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or self.structured_outputs is not None
            or bool(self.bad_words)
        )

    @property
    def bad_words_need_history(self) -> bool:
        """Whether a bad word spans several tokens, so its ban depends on the output so far."""
        return any(len(ids) > 1 for ids in self.bad_words_token_ids or ())

    def token_ids_used(self) -> list[int]:
        """The token ids the request names in logit_bias and allowed_token_ids (checked against
        the vocabulary when the request is added)."""
        return [*(self.logit_bias or ()), *(self.allowed_token_ids or ())]

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def child(self, index: int) -> SamplingParams:
        """Parameters of the index-th of n parallel samples: n = 1 and seed + index (as vLLM V1)."""
        if not _is_int(index) or not 0 <= index < self.n:
            raise ValueError(f"child index must be in [0, n={self.n}), got {index!r}")
        seed = None if self.seed is None else self.seed + index
        child = replace(self, n=1, seed=seed)
        child.bad_words_token_ids = self.bad_words_token_ids  # set by the engine, not __init__
        return child
