"""SamplingParams: vLLM defaults, and every invalid value is a ValueError naming field and range."""

from __future__ import annotations

import math

import pytest

from engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.ignore_eos) == (None, 16, 0, False)
    assert (p.logprobs, p.prompt_logprobs, p.stop, p.stop_token_ids) == (None, None, None, None)
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert p.stop_strings == [] and p.stop_token_id_set == frozenset()
    assert not p.is_greedy and not p.needs_penalties


@pytest.mark.parametrize(
    "field, value, range_text",
    [
        ("n", 0, ">= 1"),
        ("n", -3, ">= 1"),
        ("n", 1.5, ">= 1"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", math.nan, ">= 0"),
        ("temperature", math.inf, ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.01, "(0, 1]"),
        ("top_p", -0.5, "(0, 1]"),
        ("top_k", 0, ">= 1"),
        ("top_k", -2, ">= 1"),
        ("top_k", 2.0, ">= 1"),
        ("min_p", -0.01, "[0, 1]"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("presence_penalty", 2.5, "[-2.0, 2.0]"),
        ("presence_penalty", -2.1, "[-2.0, 2.0]"),
        ("frequency_penalty", 3.0, "[-2.0, 2.0]"),
        ("seed", 1.5, "integer"),
        ("seed", "7", "integer"),
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", -1, ">= 1"),
        ("min_tokens", -1, ">= 0"),
        ("logprobs", -1, ">= 0"),
        ("prompt_logprobs", -2, ">= 0"),
        ("stop", "", "non-empty"),
        ("stop", ["ok", ""], "non-empty"),
        ("stop", [3], "non-empty"),
        ("stop_token_ids", [-1], ">= 0"),
        ("stop_token_ids", ["a"], ">= 0"),
        ("ignore_eos", 1, "True or False"),
        ("skip_special_tokens", None, "True or False"),
    ],
)
def test_invalid_value_names_field_value_and_range(field, value, range_text):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert field in msg and range_text in msg and repr(value) in msg


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_tokens=4\], got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=50).min_tokens == 50


def test_valid_edges_accepted():
    p = SamplingParams(temperature=0.0, top_p=1.0, top_k=None, min_p=1.0, presence_penalty=-2.0)
    assert p.top_k == -1 and p.is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy  # below SAMPLING_EPS: argmax
    assert not SamplingParams(temperature=1e-3).is_greedy
    assert SamplingParams(top_k=1, top_p=1e-9, max_tokens=1, logprobs=0).top_k == 1
    assert SamplingParams(repetition_penalty=1.2).needs_penalties
    assert SamplingParams(frequency_penalty=0.5).needs_penalties


def test_stop_normalized():
    assert SamplingParams(stop="###").stop_strings == ["###"]
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]
    assert SamplingParams(stop_token_ids=[5, 7, 5]).stop_token_id_set == {5, 7}


def test_child_params_for_n():
    p = SamplingParams(n=3, seed=10, temperature=0.7)
    kids = [p.child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12]
    assert all(k.n == 1 and k.temperature == 0.7 for k in kids)
    assert SamplingParams(n=2).child(1).seed is None
    with pytest.raises(ValueError, match=r"child index must be in \[0, n=3\), got 3"):
        p.child(3)
