"""Embeddings (engine/pooling.py): a pooling engine's vectors against transformers' last hidden
state of the last token (L2-normalized), and its mean over the prompt (MEAN pooling, chunks
summed across steps, preempted prompts summed again), through chunked prefill, prefix-cache hits,
mixed batches, Matryoshka dimensions, TP=2 and PP=2; the parameter, pooler_config and mode
errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from models_fixtures import cpu_llm
from transformers import AutoModel

from engine import LLM, PoolerConfig, PoolingParams, SamplingParams
from engine.pooling import PoolingConfig

ATOL = 1e-5  # fp32, the same ops in another order (chunks, batches): a few ulps of O(1) values


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def reference(tiny):
    model = AutoModel.from_pretrained(str(tiny)).float().eval()

    def last_hidden(ids: list[int], mean: bool = False) -> torch.Tensor:
        with torch.no_grad():
            states = model(torch.tensor([ids])).last_hidden_state[0]
        return states.mean(0) if mean else states[-1]

    return last_hidden


def _prompts(n: int, seed: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randint(1, 70))] for _ in range(n)]


def _llm(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    return LLM(model=str(folder), dtype="float32", device="cpu", runner="pooling", **kw)


def test_embeddings_equal_transformers_last_token(tiny, reference):
    # 32-token budget: prompts up to 70 tokens run in chunks, several per step
    llm = _llm(tiny, max_num_batched_tokens=32)
    prompts = _prompts(12)
    outs = llm.embed(prompt_token_ids=prompts)
    for ids, out in zip(prompts, outs, strict=True):
        want = torch.nn.functional.normalize(reference(ids), dim=-1)
        got = torch.tensor(out.outputs.embedding)
        assert out.prompt_token_ids == ids and out.finished
        assert torch.allclose(got, want, atol=ATOL), (len(ids), (got - want).abs().max())
    # the same prompts again: prefix-cache hits recompute the last token, same vectors
    again = llm.embed(prompt_token_ids=prompts)
    for a, b in zip(outs, again, strict=True):
        assert torch.allclose(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding),
                              atol=ATOL)  # fmt: skip
    assert llm.engine.kv_stats().num_used_blocks == 0 and not llm.engine.requests


def test_mean_pooling_equals_transformers_mean(tiny, reference):
    # 32-token budget: prompts up to 70 tokens are summed over several steps' chunks
    llm = _llm(tiny, max_num_batched_tokens=32, pooler_config={"pooling_type": "mean"})
    assert llm.engine.pooling == PoolingConfig(normalize=True, pooling_type="MEAN")
    assert not llm.engine.cache_config.enable_prefix_caching  # a hit would skip rows
    prompts = _prompts(12, seed=5)
    outs = llm.embed(prompt_token_ids=prompts)
    for ids, out in zip(prompts, outs, strict=True):
        want = torch.nn.functional.normalize(reference(ids, mean=True), dim=-1)
        got = torch.tensor(out.outputs.embedding)
        assert torch.allclose(got, want, atol=ATOL), (len(ids), (got - want).abs().max())
        if len(ids) > 1:  # not the last token's vector
            last = torch.nn.functional.normalize(reference(ids), dim=-1)
            assert not torch.allclose(got, last, atol=1e-3)
    raw = llm.embed(prompt_token_ids=prompts[:1], pooling_params=PoolingParams(normalize=False))
    assert torch.allclose(torch.tensor(raw[0].outputs.embedding), reference(prompts[0], True),
                          atol=ATOL)  # fmt: skip
    assert llm.engine.kv_stats().num_used_blocks == 0 and not llm.engine.requests


def test_mean_pooling_through_preemption(tiny, reference):
    # One sequence slot, priority scheduling: a higher-priority prompt arriving while a long one
    # is mid-prefill preempts it; the long one is recomputed from its first token later, and its
    # mean starts again (16-token chunks).
    llm = _llm(tiny, max_num_batched_tokens=16, max_num_seqs=1, scheduling_policy="priority",
               pooler_config=PoolerConfig(pooling_type="MEAN"))  # fmt: skip
    engine = llm.engine
    rng = random.Random(9)
    long_ids = [rng.randrange(3, 384) for _ in range(60)]
    short_ids = [rng.randrange(3, 384) for _ in range(30)]
    engine.add_request(None, PoolingParams(), long_ids, request_id="long", priority=1)
    done = {}
    for out in engine.step():  # the long prompt's first chunk
        done[out.request_id] = out
    engine.add_request(None, PoolingParams(), short_ids, request_id="short", priority=0)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.scheduler.num_preemptions == 1
    for rid, ids in (("long", long_ids), ("short", short_ids)):
        want = torch.nn.functional.normalize(reference(ids, mean=True), dim=-1)
        got = torch.tensor(done[rid].outputs.embedding)
        assert torch.allclose(got, want, atol=ATOL), (rid, (got - want).abs().max())


def test_dimensions_normalize_and_text_prompts(tiny, reference):
    llm = _llm(tiny)
    ids = _prompts(1)[0]
    raw = llm.embed(prompt_token_ids=[ids], pooling_params=PoolingParams(normalize=False))
    h = reference(ids)
    assert torch.allclose(torch.tensor(raw[0].outputs.embedding), h, atol=ATOL)
    cut = llm.embed(prompt_token_ids=[ids], pooling_params=PoolingParams(dimensions=16))
    want = torch.nn.functional.normalize(h[:16], dim=-1)  # cut, then normalized
    assert torch.allclose(torch.tensor(cut[0].outputs.embedding), want, atol=ATOL)
    (text,) = llm.embed("hello there")
    tok_ids = llm.get_tokenizer().encode("hello there")
    assert text.prompt_token_ids == tok_ids and len(text.outputs.embedding) == 64


def test_errors(tiny):
    llm = _llm(tiny)
    with pytest.raises(ValueError, match="dimensions=65 exceeds the model's hidden size 64"):
        llm.embed("hi", PoolingParams(dimensions=65))
    with pytest.raises(ValueError, match="dimensions must be an integer >= 1"):
        PoolingParams(dimensions=0)
    with pytest.raises(TypeError, match="give PoolingParams"):
        llm.generate("hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="leave speculative_config out"):
        _llm(tiny, speculative_config={"method": "ngram"})
    with pytest.raises(ValueError, match="runner must be one of generate, pooling"):
        LLM(model=str(tiny), device="cpu", runner="embed")
    gen = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=4 << 20)
    with pytest.raises(ValueError, match="embed needs a pooling engine"):
        gen.embed("hi")
    assert not llm.engine.requests


def test_sentence_transformers_pooling_config(tmp_path):
    assert PoolingConfig.from_model(str(tmp_path)) == PoolingConfig(normalize=True)
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    pooling = tmp_path / "1_Pooling" / "config.json"
    pooling.write_text(
        json.dumps({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False})
    )
    assert PoolingConfig.from_model(str(tmp_path)) == PoolingConfig(normalize=False)  # no Normalize
    modules.append(
        {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolingConfig.from_model(str(tmp_path)) == PoolingConfig(normalize=True)
    pooling.write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert PoolingConfig.from_model(str(tmp_path)) == PoolingConfig(True, "MEAN")
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="pooling_mode_cls_token is not supported"):
        PoolingConfig.from_model(str(tmp_path))
    # vLLM's pooler_config overrides the folder's setting (and names a type the folder's lacks)
    override = PoolerConfig(pooling_type="last", normalize=False)
    assert PoolingConfig.from_model(str(tmp_path), override) == PoolingConfig(False, "LAST")
    assert PoolerConfig.parse({"pooling_type": "Mean"}) == PoolerConfig("MEAN")
    bad_configs = (
        ({"pooling_type": "CLS"}, "must be one of LAST, MEAN"),
        ({"normalize": "yes"}, "normalize must be"),
        ({"pooling": "MEAN"}, "unknown field"),
        ("MEAN", "must be a dict"),
    )
    for bad, match in bad_configs:
        with pytest.raises(ValueError, match=match):
            PoolerConfig.parse(bad)
    with pytest.raises(ValueError, match="applies to a pooling engine"):
        LLM(model=str(tmp_path), pooler_config={"pooling_type": "MEAN"})


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
                         ids=["tp2", "pp2"])  # fmt: skip
@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_parallel_engines_give_the_same_vectors(tiny, parallel, pooling_type):
    prompts = _prompts(6, seed=8)
    pooler = {"pooling_type": pooling_type}
    want = _llm(tiny, max_num_batched_tokens=32, pooler_config=pooler).embed(
        prompt_token_ids=prompts
    )
    llm = _llm(tiny, max_num_batched_tokens=32, pooler_config=pooler, **parallel)
    try:
        got = llm.embed(prompt_token_ids=prompts)
    finally:
        llm.shutdown()
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding),
                              atol=1e-4)  # fmt: skip


def test_truncate_prompt_tokens(tiny, reference):
    ids = _prompts(1, seed=11)[0] + list(range(3, 60))
    llm = _llm(tiny)
    (out,) = llm.embed(
        prompt_token_ids=[ids], pooling_params=PoolingParams(truncate_prompt_tokens=9)
    )
    assert out.prompt_token_ids == ids[-9:]
    want = torch.nn.functional.normalize(reference(ids[-9:]), dim=-1)
    assert torch.allclose(torch.tensor(out.outputs.embedding), want, atol=ATOL)
    gen = cpu_llm(tiny, max_model_len=32)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=-1)
    (g,) = gen.generate(prompt_token_ids=[ids], sampling_params=params)
    assert g.prompt_token_ids == ids[-31:] and len(g.outputs[0].token_ids) <= 4
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be None, -1"):
        SamplingParams(truncate_prompt_tokens=0)
