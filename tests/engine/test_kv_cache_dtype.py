"""kv_cache_dtype: the paged KV cache in FP8 through `LLM` (vLLM's --kv-cache-dtype fp8): the
dtype resolved per platform, the memory plan counting its bytes, outputs within a stated bound of
the model-dtype cache, bad values rejected."""

from __future__ import annotations

import pytest
import torch
from models_fixtures import PagedSequence, build_model

from engine import LLM, SamplingParams
from engine.config import resolve_cache_dtype
from engine.loader import load_model
from hal import load_backend

U_E4M3 = 2.0**-4  # e4m3 keeps 3 mantissa bits: unit roundoff 2^-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_kv")
    build_model("llama", folder)
    return folder


def _llm(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    return LLM(model=str(folder), dtype="float32", device="cpu", **kw)


def test_resolve_cache_dtype():
    bf16 = torch.bfloat16
    assert resolve_cache_dtype("auto", bf16, None) == bf16
    assert resolve_cache_dtype("bfloat16", bf16, None) == bf16
    assert resolve_cache_dtype("fp8", bf16, torch.float8_e4m3fnuz) == torch.float8_e4m3fnuz
    assert resolve_cache_dtype("fp8_e4m3", bf16, None) == torch.float8_e4m3fn  # no FP8 hardware
    assert resolve_cache_dtype("fp8_e5m2", bf16, torch.float8_e4m3fn) == torch.float8_e5m2
    with pytest.raises(ValueError, match="differs from the model's dtype bfloat16"):
        resolve_cache_dtype("float16", bf16, None)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        resolve_cache_dtype("int8", bf16, None)


def test_fp8_cache_through_llm(tiny):
    base, fp8 = _llm(tiny), _llm(tiny, kv_cache_dtype="fp8")
    assert base.engine.runner.kv_dtype == torch.float32
    assert fp8.engine.runner.kv_dtype == torch.float8_e4m3fn  # the CPU has no FP8 format
    assert all(k.dtype == torch.float8_e4m3fn for k, _ in fp8.engine.runner.kv_caches)
    # The same memory budget holds 4x the blocks of an fp32 cache.
    assert fp8.engine.runner.block_bytes() * 4 == base.engine.runner.block_bytes()
    assert fp8.engine.memory_plan.num_blocks == 4 * base.engine.memory_plan.num_blocks
    report = fp8.engine.startup_report()
    assert any("kv cache float8_e4m3fn" in line for line in report)
    # the backend's settings are part of the report, one line each
    settings = fp8.engine.backend.info.settings
    assert settings and all(f"  {k}: {v}" in report for k, v in settings.items())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = fp8.generate(prompt_token_ids=[[5, 6, 7], [9, 10, 11, 12]], sampling_params=params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]


def test_bad_kv_cache_dtype(tiny):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        _llm(tiny, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="differs from the model's dtype float32"):
        _llm(tiny, kv_cache_dtype="bfloat16")


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_logprobs_within_bound(tiny, cpu_caps, kv_dtype):
    """Bound: every cached K and V value is rounded once to the FP8 format (relative error up to
    u = 2^-4 for e4m3, 2^-3 for e5m2; ~u / sqrt(3) RMS). Scores q.k and the value average each
    see one such rounding per term, so an attention output errs by ~u / sqrt(3) RMS relative;
    through the tiny model's 2 layers (residual stream and MLPs carry it on) the logits move by
    under 2u RMS relative to their spread (measured: e4m3 0.043, e5m2 0.086), the
    log-probabilities by under 1 nat at worst (0.17, 0.41) and 2u on average (0.027, 0.053)
    over 40 positions x 384 tokens.
    A cache read without decoding, or written with a wrong scale, misses these by far."""
    u = U_E4M3 if kv_dtype == torch.float8_e4m3fn else 2 * U_E4M3
    backend = load_backend(cpu_caps, configured="cpu")
    model, _, _ = load_model(tiny, backend, "float32")
    tokens = [(7 * i + 3) % 380 + 1 for i in range(40)]
    ref = PagedSequence(model).step(tokens, all_logits=True)
    seq = PagedSequence(model, kv_dtype=kv_dtype)
    out = seq.step(tokens[:24], all_logits=True)  # a prefill, then decode steps on the cache
    out = torch.cat([out] + [seq.step([t], all_logits=True) for t in tokens[24:]])
    assert seq.kv_caches[0][0].dtype == kv_dtype
    d = out - ref
    centered = ref - ref.mean(-1, keepdim=True)
    rel = (d - d.mean(-1, keepdim=True)).pow(2).mean().sqrt() / centered.pow(2).mean().sqrt()
    assert 0 < rel < 2 * u, float(rel)
    dlp = (torch.log_softmax(out, -1) - torch.log_softmax(ref, -1)).abs()
    assert dlp.max() < 1.0 and dlp.mean() < 2 * u, (float(dlp.max()), float(dlp.mean()))
