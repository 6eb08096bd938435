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
    if not isinstance(eos_token_ids, (tuple, list, set, frozenset)):
        eos_token_ids = tuple(eos_token_ids)
    return check_last_token_stop(
        params, output_token_ids[-1], num_output, eos_token_ids, max_tokens_cap
    )


_STOP = StopDecision("stop")
_LENGTH = StopDecision("length")


def check_last_token_stop(
    params: SamplingParams,
    last_token: int,
    num_output: int,
    eos_token_ids: Iterable[int],
    max_tokens_cap: int | None = None,
) -> StopDecision | None:
    """`check_token_stop` given the newest token and the output length (num_output >= 1), so a
    per-token caller needs no copy of the output. eos_token_ids: a tuple or set is fastest."""
    if num_output >= params.min_tokens:
        if not params.ignore_eos and last_token in eos_token_ids:
            return _STOP
        if last_token in params.stop_token_id_set:
            return StopDecision("stop", last_token)
    max_tokens = params.max_tokens
    if max_tokens is not None and num_output >= max_tokens:
        return _LENGTH
    if max_tokens_cap is not None and num_output >= max_tokens_cap:
        return _LENGTH
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
