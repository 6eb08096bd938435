"""The engine end to end on a GPU backend: same greedy tokens as the CPU engine."""

from __future__ import annotations

import pytest
import torch
from models_fixtures import build_model

from engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpu")
    build_model("llama", folder)
    return folder


def test_gpu_engine_matches_cpu_engine(tiny):
    prompts = [[5, 9, 33, 100, 7] * k for k in (1, 3, 7)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    cpu = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    gpu = LLM(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3)
    assert gpu.engine.backend.name in ("cuda", "rocm")
    assert gpu.engine.memory_plan.activation_peak_bytes is not None
    a = cpu.generate(prompt_token_ids=prompts, sampling_params=params)
    b = gpu.generate(prompt_token_ids=prompts, sampling_params=params)
    for x, y in zip(a, b, strict=False):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        # fp32 on the GPU may use TF32 (10-bit mantissa) in GEMMs: logprobs agree to ~1e-2.
        lx = [d[t] for d, t in zip(x.outputs[0].logprobs, x.outputs[0].token_ids, strict=False)]
        ly = [d[t] for d, t in zip(y.outputs[0].logprobs, y.outputs[0].token_ids, strict=False)]
        assert max(abs(p - q) for p, q in zip(lx, ly, strict=False)) < 2e-2
    assert gpu.engine.kv_stats().num_used_blocks == 0


def test_gpu_engine_bf16_runs(tiny):
    llm = LLM(model=str(tiny), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3)
    out = llm.generate(
        prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(max_tokens=8)
    )
    assert len(out[0].outputs[0].token_ids) >= 1


def test_gpu_graphs_equal_eager(tiny):
    """Decode steps replayed from CUDA graphs give the eager engine's tokens, batch sizes that
    hit a bucket exactly and ones that need padding alike."""
    prompts = [[5, 9, 33, 100, 7][: 2 + k % 4] * (1 + k % 3) for k in range(11)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    kw = dict(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3)
    eager = LLM(enforce_eager=True, **kw)
    graphed = LLM(cuda_graph_sizes=[1, 2, 4, 8, 16], **kw)
    assert eager.engine.runner.graphs is None
    graphs = graphed.engine.runner.graphs
    if graphs is None:
        pytest.skip(f"graphs off here: {graphed.engine.runner.graph_skip_reasons}")
    assert graphed.engine.memory_plan.graph_pool_bytes > 0
    a = eager.generate(prompt_token_ids=prompts, sampling_params=params)
    b = graphed.generate(prompt_token_ids=prompts, sampling_params=params)
    assert graphs.replays > 0
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert graphed.engine.kv_stats().num_used_blocks == 0


def test_gpu_mixed_step_graphs_equal_eager(tiny):
    """Steps holding prefill tokens replayed from token-count buckets (prompts admitted while
    others decode, chunked by a small budget) give the eager engine's tokens."""
    prompts = [[5, 9, 33, 100, 7][: 2 + k % 4] * (1 + k % 5) for k in range(11)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    kw = dict(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3,
              max_num_batched_tokens=64, max_num_seqs=8)  # fmt: skip
    eager = LLM(enforce_eager=True, **kw)
    graphed = LLM(cuda_graph_sizes=[1, 2, 4, 8], mixed_graph_sizes=[16, 32, 64], **kw)
    mixed = graphed.engine.runner.mixed_graphs
    if mixed is None:
        pytest.skip(f"graphs off here: {graphed.engine.runner.graph_skip_reasons}")
    a = eager.generate(prompt_token_ids=prompts, sampling_params=params)
    b = graphed.generate(prompt_token_ids=prompts, sampling_params=params)
    assert mixed.replays > 0 and graphed.engine.runner.graphs.replays > 0
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert graphed.engine.kv_stats().num_used_blocks == 0


def test_gpu_async_scheduling_equals_sync(tiny):
    """Steps launched ahead (input tokens fed on the device, graphs on) give the synchronous
    engine's tokens, for greedy, seeded random and stop-token requests."""
    prompts = [[5, 9, 33, 100, 7][: 2 + k % 4] * (1 + k % 3) for k in range(9)]
    params = [SamplingParams(temperature=0, max_tokens=6 + k, ignore_eos=True) for k in range(9)]
    params[1] = SamplingParams(temperature=0.8, seed=7, max_tokens=14)
    params[2] = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=list(range(3, 384, 4)))
    kw = dict(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3,
              cuda_graph_sizes=[1, 2, 4, 8, 16])  # fmt: skip
    sync = LLM(async_scheduling=False, **kw)
    ahead = LLM(**kw)  # the default on a GPU
    assert ahead.engine.async_scheduling
    a = sync.generate(prompt_token_ids=prompts, sampling_params=params)
    b = ahead.generate(prompt_token_ids=prompts, sampling_params=params)
    assert ahead.engine.num_steps_ahead > 0
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].finish_reason == y.outputs[0].finish_reason
    assert ahead.engine.kv_stats().num_used_blocks == 0


def test_gpu_prompt_logprobs_and_speculative_decoding(tiny):
    """Prompt logprobs on the GPU agree with the CPU engine's (TF32 bound); n-gram speculative
    decoding with graphs gives the greedy tokens of plain decoding on the same GPU engine."""
    prompts = [[5, 9, 33, 100, 7] * k for k in (2, 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    cpu = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    kw = dict(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3)
    plain = LLM(**kw)
    a = cpu.generate(prompt_token_ids=prompts, sampling_params=params)
    b = plain.generate(prompt_token_ids=prompts, sampling_params=params)
    for x, y in zip(a, b, strict=True):
        assert len(y.prompt_logprobs) == len(x.prompt_logprobs) and y.prompt_logprobs[0] is None
        for ex, ey, t in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], x.prompt_token_ids[1:],
                             strict=True):  # fmt: skip
            assert abs(ex[t] - ey[t]) < 2e-2
    spec = LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                   "prompt_lookup_min": 1}, **kw)  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = plain.generate(prompt_token_ids=prompts, sampling_params=greedy)
    got = spec.generate(prompt_token_ids=prompts, sampling_params=greedy)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert spec.engine.scheduler.num_accepted_tokens > 0
    assert spec.engine.kv_stats().num_used_blocks == 0


def test_gpu_structured_outputs(tiny):
    """Constrained requests on the GPU (graphs, asynchronous scheduling on by default there):
    the bitmask reaches the device through pinned memory and every output is a sentence of its
    constraint; greedy constrained tokens equal the CPU engine's (where the tiny model's margins
    allow: same rule as test_gpu_engine_matches_cpu_engine)."""
    pytest.importorskip("xgrammar")
    import re

    prompts = [[5, 9, 33, 100, 7] * k for k in (1, 2, 3, 4)]
    params = [
        SamplingParams(temperature=0, max_tokens=24, structured_outputs={"regex": r"[ab]{3}-\d"}),
        SamplingParams(temperature=0, max_tokens=24,
                       structured_outputs={"choice": ["alpha", "beta", "gamma"]}),
        SamplingParams(temperature=0.8, seed=2, max_tokens=24,
                       structured_outputs={"grammar": 'root ::= ("x" | "y")+ "."'}),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),  # unconstrained beside them
    ]  # fmt: skip
    cpu = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    gpu = LLM(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3)
    assert gpu.engine.async_scheduling
    a = cpu.generate(prompt_token_ids=prompts, sampling_params=params)
    b = gpu.generate(prompt_token_ids=prompts, sampling_params=params)
    assert re.fullmatch(r"[ab]{3}-\d", b[0].outputs[0].text)
    assert b[1].outputs[0].text in ("alpha", "beta", "gamma")
    assert re.fullmatch(r"[xy]+\.", b[2].outputs[0].text)
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].finish_reason == y.outputs[0].finish_reason
    assert a[0].outputs[0].text == b[0].outputs[0].text
    assert a[1].outputs[0].text == b[1].outputs[0].text
    assert gpu.engine.kv_stats().num_used_blocks == 0
    # speculative: constrained rows verified under per-draft masks on the device
    spec = LLM(model=str(tiny), dtype="float32", device="cuda", gpu_memory_utilization=0.3,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_min": 1})  # fmt: skip
    rep = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"regex": "(ab|cd){12}"})
    want = gpu.generate(prompt_token_ids=prompts[:2], sampling_params=rep)
    got = spec.generate(prompt_token_ids=prompts[:2], sampling_params=rep)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(re.fullmatch("(ab|cd){12}", o.outputs[0].text) for o in got)
    assert spec.engine.scheduler.num_accepted_tokens > 0


def test_gpu_pooling_engine(tiny):
    """Embeddings on the GPU equal the CPU engine's (TF32 bound on fp32 GEMMs) and bf16's within
    its rounding, chunked prefill included."""
    prompts = [[5, 9, 33, 100, 7] * k for k in (1, 4, 11)]
    cpu = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20,
              runner="pooling", max_num_batched_tokens=32)  # fmt: skip
    want = torch.tensor([o.outputs.embedding for o in cpu.embed(prompt_token_ids=prompts)])
    for dtype, atol in (("float32", 2e-2), ("bfloat16", 6e-2)):
        gpu = LLM(model=str(tiny), dtype=dtype, device="cuda", gpu_memory_utilization=0.3,
                  runner="pooling", max_num_batched_tokens=32)  # fmt: skip
        got = torch.tensor([o.outputs.embedding for o in gpu.embed(prompt_token_ids=prompts)])
        assert got.shape == want.shape and (got - want).abs().max() < atol, dtype
        assert gpu.engine.kv_stats().num_used_blocks == 0
        gpu.shutdown()
