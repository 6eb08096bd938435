"""Stop rules: EOS, stop token ids, min_tokens, length; stop-string search and hold-back length."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from engine.stop import StopDecision, check_token_stop, find_stop_string, partial_stop_len

EOS = 2


@pytest.mark.parametrize(
    "params, output, cap, want",
    [
        (SamplingParams(), [], None, None),
        (SamplingParams(), [5, 6], None, None),
        (SamplingParams(), [5, EOS], None, StopDecision("stop")),
        (SamplingParams(ignore_eos=True), [5, EOS], None, None),
        (SamplingParams(stop_token_ids=[9]), [5, 9], None, StopDecision("stop", 9)),
        (SamplingParams(min_tokens=3), [5, EOS], None, None),
        (SamplingParams(min_tokens=3, stop_token_ids=[9]), [5, 9], None, None),
        (SamplingParams(min_tokens=2), [5, EOS], None, StopDecision("stop")),
        (SamplingParams(max_tokens=3), [5, 6, 7], None, StopDecision("length")),
        (SamplingParams(max_tokens=3), [5, 6, EOS], None, StopDecision("stop")),
        (SamplingParams(max_tokens=10), [5, 6], 2, StopDecision("length")),
        (SamplingParams(max_tokens=None), [5] * 100, None, None),
        (SamplingParams(max_tokens=None), [5] * 100, 100, StopDecision("length")),
        (SamplingParams(max_tokens=2, ignore_eos=True), [EOS, EOS], None, StopDecision("length")),
    ],
)
def test_check_token_stop(params, output, cap, want):
    assert check_token_stop(params, output, [EOS], max_tokens_cap=cap) == want


def test_find_stop_string():
    assert find_stop_string("abc STOP def END", ["END", "STOP"]) == (4, "STOP")
    assert find_stop_string("xxabab", ["ab", "bab"], start=3) == (3, "bab")
    assert find_stop_string("aab", ["ab", "aab"]) == (0, "aab")
    assert find_stop_string("aab", ["aa", "aab"]) == (0, "aa")  # same start: listed first wins
    assert find_stop_string("nothing", ["x"]) is None


def test_partial_stop_len():
    assert partial_stop_len("hello ##", ["###"]) == 2
    assert partial_stop_len("hello #", ["###", "#!"]) == 1
    assert partial_stop_len("abcab", ["abcabd"]) == 5
    assert partial_stop_len("xab", ["abc", "bx"]) == 2
    assert partial_stop_len("hello", ["###"]) == 0
    assert partial_stop_len("", ["###"]) == 0
