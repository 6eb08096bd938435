"""LLM.start_profile / stop_profile: torch.profiler where the steps run, one summary per rank (the
engine's process at world size 1, each worker at TP=2 on the CPU with gloo), Chrome traces when
asked, and clear errors when used out of order or while requests run."""

from __future__ import annotations

import json

import pytest
import torch
from test_remote_sampling import _engine as remote_sampling_engine

from engine import SamplingParams
from engine.llm_engine import LLMEngine


def _engine(model: str, tp: int) -> LLMEngine:
    return remote_sampling_engine(model, tp, max_num_seqs=4)


def _generate(engine: LLMEngine, n: int = 2) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(n):
        engine.add_request(None, params, prompt_token_ids=[5 + i, 6, 7], request_id=f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("tp", [1, 2])
def test_profile_per_rank(dist_model, tmp_path, tp):
    engine = _engine(dist_model, tp)
    try:
        with pytest.raises(RuntimeError, match="no profile is running"):
            engine.stop_profile()
        engine.start_profile(str(tmp_path))
        with pytest.raises(RuntimeError, match="already running"):
            engine.start_profile()
        _generate(engine)
        summaries = engine.stop_profile()
        assert [s.rank for s in summaries] == list(range(tp))
        for s in summaries:
            assert s.device == "cpu" and s.wall_ms > 0
            names = [k.name for k in s.kernels]
            # every rank ran its share of the linears
            linears = ("aten::mm", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise")
            assert any(n in linears for n in names), names
            assert all(k.total_ms > 0 and k.count > 0 for k in s.kernels)
            assert s.busy_ms <= s.wall_ms * 1.05  # own op times on one thread fit in the span
            assert s.trace is not None and json.loads(open(s.trace).read())["traceEvents"]
            lines = s.table(steps=5, top=3)
            assert lines[0].startswith(f"rank {s.rank} (cpu)") and len(lines) == 5
        # a profile without a trace directory, and the engine still runs after profiling
        engine.start_profile()
        _generate(engine, 1)
        assert engine.stop_profile()[0].trace is None
    finally:
        engine.shutdown()


def test_profile_refused_while_requests_run(dist_model):
    engine = _engine(dist_model, 1)
    engine.add_request(None, SamplingParams(max_tokens=3), prompt_token_ids=[5, 6], request_id="a")
    with pytest.raises(RuntimeError, match="requests are still running"):
        engine.start_profile()
    while engine.has_unfinished_requests():
        engine.step()
    engine.start_profile()
    engine.stop_profile()


def test_allocator_counters_in_the_table():
    from engine.profiling import KernelTime, ProfileSummary, _allocator_counters

    assert _allocator_counters(None) == {} and _allocator_counters(torch.device("cpu")) == {}
    s = ProfileSummary(0, "cuda:0", 10.0, [KernelTime("k", 4.0, 2)],
                       allocator={"device_mallocs": 3, "retries": 1})  # fmt: skip
    lines = s.table(steps=2)
    assert lines[1] == "caching allocator: 3 device mallocs, 1 retries"
    assert lines[-1].split() == ["2.000", "1.0", "k"]
    if torch.cuda.is_available():  # real counters: non-negative ints, a malloc seen
        before = _allocator_counters(torch.device("cuda", 0))
        torch.cuda.empty_cache()
        x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        after = _allocator_counters(torch.device("cuda", 0))
        assert after["device_mallocs"] > before["device_mallocs"]
        del x
