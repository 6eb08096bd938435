"""When a sequence stops: EOS, stop token ids and length (on tokens); stop strings (on text)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    """Why a sequence finished: finish_reason "stop" or "length"; stop_reason the token id or
    stop string that ended it (None for EOS and length), as in vLLM's CompletionOutput."""

    finish_reason: str
    stop_reason: int | str | None = None


def check_token_stop(
    params: SamplingParams,
    output_token_ids: Sequence[int],
    eos_token_ids: Iterable[int],
    max_tokens_cap: int | None = None,
) -> StopDecision | None:
    """Checks the newest output token; None means keep going.

    Before min_tokens outputs, neither EOS nor stop token ids stop the sequence. EOS stops unless
    ignore_eos. Length: max_tokens outputs, or max_tokens_cap (what the context still allows; the
    engine passes max_model_len - prompt_len), whichever is smaller.
    """
    num_output = len(output_token_ids)
    if num_output == 0:
        return None
    if num_output >= params.min_tokens:
        last = output_token_ids[-1]
        if not params.ignore_eos and last in set(eos_token_ids):
            return StopDecision("stop")
        if last in params.stop_token_id_set:
            return StopDecision("stop", last)
    limits = [m for m in (params.max_tokens, max_tokens_cap) if m is not None]
    if limits and num_output >= min(limits):
        return StopDecision("length")
    return None


def find_stop_string(text: str, stop: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence at or after start of any stop string: (index, string), else None.

    Two stop strings starting at the same index: the one listed first wins.
    """
    best: tuple[int, str] | None = None
    for s in stop:
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string.

    Streaming holds this many trailing characters back: they may yet become a stop string.
    """
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
