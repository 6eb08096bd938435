"""Incremental detokenization for streaming: whole characters only, stop strings cut the text.

Each step decodes a small window of recent tokens twice (vLLM's prefix/read offsets) so a token's
text is seen in context; a window ending in U+FFFD is an unfinished UTF-8 character and waits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.sampling_params import SamplingParams
from engine.stop import find_stop_string, partial_stop_len

logger = logging.getLogger(__name__)

# How many prompt tokens to decode as context before the first output token (vLLM's value).
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def _backend_decode(tokenizer):
    """The `tokenizers` decode that a stock transformers fast tokenizer's `decode(ids,
    skip_special_tokens=..., clean_up_tokenization_spaces=False)` comes down to, or None (any
    other tokenizer, or a subclass that overrides decoding). Skips transformers' per-call input
    conversion, which costs more than the decode of a few tokens."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
    ):
        return tokenizer.backend_tokenizer.decode
    return None


class IncrementalDetokenizer:
    """One sequence's output text, built token by token from a Hugging Face tokenizer.

    Text is decoded without clean_up_tokenization_spaces, so the streamed deltas concatenate to
    `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
    (with prompt_token_ids given: to the text the output adds after the prompt's text).
    """

    def __init__(
        self,
        tokenizer,
        params: SamplingParams | None = None,
        prompt_token_ids: Sequence[int] = (),
    ):
        self.tokenizer = tokenizer
        self.params = params if params is not None else SamplingParams()
        self.token_ids: list[int] = list(prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - INITIAL_CONTEXT_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""  # all complete output text decoded so far (cut at a stop string)
        self.num_emitted = 0  # characters of self.text already handed out
        self.stop_reason: str | None = None  # the stop string that ended the text, if any
        self._max_stop_len = max((len(s) for s in self.params.stop_strings), default=0)
        self._plain = not self.params.stop_strings  # no stop strings: text can wait
        self._off = not self.params.detokenize  # token ids only, never any text
        self._fast_decode = _backend_decode(tokenizer)

    @property
    def output_text(self) -> str:
        """The text handed out so far (all of it once finished). Without stop strings, tokens
        are decoded when the text is asked for, not per token (a batch run never asks before
        the end). With detokenize off: always empty."""
        if self._lazy and not self._off and self.read_offset < len(self.token_ids):
            self.text += self._decode_step(flush=False)
            self.num_emitted = len(self.text)
        return self.text[: self.num_emitted]

    @property
    def _lazy(self) -> bool:
        return not self.params.stop_strings

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def _decode(self, ids: Sequence[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_step(self, flush: bool) -> str:
        """New complete text since read_offset; with flush, unfinished bytes come out as U+FFFD."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not flush):
            # Nothing printable yet (a special token skipped, or a character still unfinished).
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def add_token(
        self, token_id: int, *, finished: bool = False, stop_terminated: bool = False
    ) -> str:
        """`add_tokens([token_id], ...)`, with nothing to do per token when there are no stop
        strings and the sequence goes on (the common case, once per sequence per step)."""
        if self._plain and not (finished or stop_terminated) and self.stop_reason is None:
            self.token_ids.append(token_id)
            return ""
        return self.add_tokens([token_id], finished=finished, stop_terminated=stop_terminated)

    def add_tokens(
        self, new_token_ids: Sequence[int], *, finished: bool = False, stop_terminated: bool = False
    ) -> str:
        """Appends this step's tokens and returns the text newly safe to stream.

        stop_terminated: the last new token is EOS or a stop token id; its text is dropped unless
        include_stop_str_in_output. finished: the sequence ends now, so everything held back
        (unfinished UTF-8, a possible stop-string start) comes out. When a stop string appears,
        the text is cut there, `stop_reason` is set and the caller finishes the sequence.
        """
        if self.stopped:
            return ""
        if self._off:
            self.token_ids.extend(new_token_ids)
            return ""
        ids = list(new_token_ids)
        if stop_terminated and ids and not self.params.include_stop_str_in_output:
            ids = ids[:-1]
        if self._lazy and not finished:  # nothing to search: decode when the text is asked for
            self.token_ids.extend(ids)
            return ""
        if self._lazy:  # finished: everything pending at once, unfinished bytes flushed
            self.token_ids.extend(ids)
            if self.read_offset < len(self.token_ids):
                self.text += self._decode_step(flush=True)
            delta = self.text[self.num_emitted :]
            self.num_emitted = len(self.text)
            return delta
        checked = len(self.text)
        for i, token_id in enumerate(ids):
            self.token_ids.append(token_id)
            self.text += self._decode_step(flush=finished and i == len(ids) - 1)
        if finished and not ids and self.read_offset < len(self.token_ids):
            self.text += self._decode_step(flush=True)

        stops = self.params.stop_strings
        if stops and len(self.text) > checked:
            # Only a stop string ending in the new text is new: search from where one could start.
            hit = find_stop_string(self.text, stops, max(0, checked - self._max_stop_len + 1))
            if hit is not None:
                idx, s = hit
                end = idx + len(s) if self.params.include_stop_str_in_output else idx
                self.text = self.text[:end]
                self.stop_reason = s
                finished = True

        limit = len(self.text)
        if not finished and stops and not self.params.include_stop_str_in_output:
            limit -= partial_stop_len(self.text, stops)
        if limit <= self.num_emitted:
            return ""
        delta = self.text[self.num_emitted : limit]
        self.num_emitted = limit
        return delta


class TokenText:
    """Token id -> its text decoded alone (cached): what a logprob entry and the server's
    logprobs show for a token. tokenizer None: every token's text is None."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text
