"""Model level: our Llama-family model on the CPU backend against transformers on the same weights.

Tiny random Llama, Mistral (sliding window), Qwen2 (QKV bias, tied) and Qwen3 (q/k norm)
checkpoints are built with transformers and loaded from disk. Prefill logits and log-probabilities
must agree within LOGIT_ATOL, and 16 greedy tokens decoded through the paged KV cache (block size
16, blocks in random order) must equal transformers' generate(do_sample=False) exactly.
"""

from __future__ import annotations

import pytest
import torch
from models_fixtures import (
    BLOCK_SIZE,
    VARIANTS,
    VOCAB,
    PagedSequence,
    build_model,
    hf_greedy,
    write_gguf,
)

from engine.batch import ForwardBatch
from engine.loader import load_model, resolve_dtype
from hal.select import load_backend

# fp32 on both sides; observed differences are 0 to ~1e-6 on these shapes.
LOGIT_ATOL = 1e-4
LOGPROB_ATOL = 1e-4
NUM_GREEDY = 16
PROMPT_LEN = 21  # > block size and > the Mistral window (5)


@pytest.fixture(scope="module")
def backend(cpu_caps):
    backend = load_backend(cpu_caps, configured="cpu")
    assert backend.name == "cpu"
    return backend


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """variant -> (folder, transformers model), built once per module."""
    built = {}

    def get(variant: str):
        if variant not in built:
            folder = tmp_path_factory.mktemp(variant)
            built[variant] = (folder, build_model(variant, folder))
        return built[variant]

    return get


def _prompt(seed: int = 0, length: int = PROMPT_LEN) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def _hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float()  # [len, vocab]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_match_transformers(variant, checkpoint, backend):
    folder, hf = checkpoint(variant)
    model, config, tokenizer = load_model(folder, backend, "float32")
    assert model.dtype == torch.float32 and tokenizer is not None
    prompt = _prompt()

    ours = PagedSequence(model, seed=1).step(prompt, all_logits=True)  # [len, vocab]
    ref = _hf_logits(hf, prompt)
    torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(
        torch.log_softmax(ours, -1), torch.log_softmax(ref, -1), atol=LOGPROB_ATOL, rtol=0
    )

    tokens, logprobs = PagedSequence(model, seed=2).greedy(prompt, NUM_GREEDY)
    ref_tokens, ref_logprobs = hf_greedy(hf, prompt, NUM_GREEDY)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) <= LOGPROB_ATOL


def test_config_reflects_each_variant(checkpoint, backend):
    expect = {
        "llama_tied": lambda c: c.tie_word_embeddings and not c.attention_bias,
        "llama_bias": lambda c: c.attention_bias and c.o_proj_bias and c.mlp_bias,
        "llama3_rope": lambda c: c.rope_scaling["rope_type"] == "llama3",
        "linear_rope": lambda c: c.rope_scaling["factor"] == 2.0 and c.rope_theta == 500.0,
        "mistral_sliding": lambda c: c.sliding_window_for(0) == 5 and c.head_dim == 16,
        "qwen2": lambda c: c.attention_bias and not c.o_proj_bias and c.tie_word_embeddings,
        "qwen3": lambda c: c.qk_norm and c.head_dim == 32 and not c.attention_bias,
    }
    for variant, check in expect.items():
        folder, _ = checkpoint(variant)
        _, config, _ = load_model(folder, backend, "float32", with_tokenizer=False)
        assert check(config), (variant, config)


def test_sliding_window_is_exercised(checkpoint, backend):
    """Without its window transformers computes different logits, so the match above means
    our model applied the window (prompt length 21 > window 5)."""
    folder, hf = checkpoint("mistral_sliding")
    prompt = _prompt()
    windowed = _hf_logits(hf, prompt)
    hf.config.sliding_window = None
    try:
        full = _hf_logits(hf, prompt)
    finally:
        hf.config.sliding_window = 5
    assert (windowed - full).abs().max() > 1e-3
    model, _, _ = load_model(folder, backend, "float32", with_tokenizer=False)
    ours = PagedSequence(model).step(prompt, all_logits=True)
    torch.testing.assert_close(ours, windowed, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["llama", "mistral_sliding"])
def test_chunked_prefill_matches_one_shot(variant, checkpoint, backend):
    folder, _ = checkpoint(variant)
    model, _, _ = load_model(folder, backend, "float32", with_tokenizer=False)
    prompt = _prompt(3)
    whole = PagedSequence(model, seed=4).step(prompt, all_logits=True)
    seq = PagedSequence(model, seed=5)
    first = seq.step(prompt[:9], all_logits=True)
    second = seq.step(prompt[9:], all_logits=True)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=0)


def test_packed_sequences_match_single_runs(checkpoint, backend):
    """Two prompts of different lengths packed in one ForwardBatch (disjoint blocks)."""
    folder, _ = checkpoint("qwen3")
    model, _, _ = load_model(folder, backend, "float32", with_tokenizer=False)
    prompts = [_prompt(6, 19), _prompt(7, 5)]
    singles = [PagedSequence(model, seed=8).step(p)[-1] for p in prompts]

    num_blocks = 6
    shape = model.kv_cache_shape(num_blocks, BLOCK_SIZE)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_layers)]
    tables = torch.tensor([[4, 1], [3, 0]], dtype=torch.int32)  # sequence 1 uses one block
    ids, positions, slots, starts = [], [], [], [0]
    for s, p in enumerate(prompts):
        pos = torch.arange(len(p))
        ids += p
        positions.append(pos)
        slots.append(tables[s].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + len(p))
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.cat(positions),
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int32),
        block_tables=tables,
        logits_indices=torch.tensor(starts[1:]) - 1,
        max_query_len=max(len(p) for p in prompts),
        max_seq_len=max(len(p) for p in prompts),
    )
    logits = model.compute_logits(model(batch, caches)[batch.logits_indices])
    torch.testing.assert_close(logits, torch.stack(singles), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes_run_close_to_fp32(dtype, checkpoint, backend):
    """Lower-precision weights and activations: logits within a dtype-scaled bound of fp32."""
    folder, _ = checkpoint("llama")
    prompt = _prompt()
    ref_model, _, _ = load_model(folder, backend, "float32", with_tokenizer=False)
    ref = PagedSequence(ref_model).step(prompt, all_logits=True)
    model, _, _ = load_model(folder, backend, dtype, with_tokenizer=False)
    assert model.embed_tokens.weight.dtype == dtype
    out = PagedSequence(model).step(prompt, all_logits=True)
    assert out.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    assert (out - ref).abs().max() <= 64 * eps * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_narrow_logits_are_the_float32_logits_unwidened(dtype, checkpoint, backend):
    """compute_logits(float32=False) (what the in-process runner hands the sampler) is the LM
    head's output in the model's dtype; widened it equals the float32 logits bit for bit, and
    its greedy token is theirs."""
    folder, _ = checkpoint("llama")
    model, config, _ = load_model(folder, backend, dtype, with_tokenizer=False)
    hidden = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(3))
    hidden = hidden.to(dtype)
    narrow = model.compute_logits(hidden, float32=False)
    wide = model.compute_logits(hidden)
    assert narrow.dtype == dtype and wide.dtype == torch.float32
    assert narrow.shape == wide.shape == (5, config.vocab_size)
    assert torch.equal(narrow.float(), wide)
    assert torch.equal(narrow.argmax(dim=-1), wide.argmax(dim=-1))


def test_default_dtype_per_device(backend, cpu_caps):
    assert resolve_dtype(None, backend) == torch.float32
    assert resolve_dtype("bf16", backend) == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", backend)


@pytest.mark.parametrize("variant", ["llama", "llama_bias"])
def test_gguf_conversion_of_tiny_llama_matches_transformers(variant, checkpoint, backend, tmp_path):
    """A tiny GQA Llama written as llama.cpp writes it (q/k rows permuted, biases included) loads
    back to the original model: the un-permutation is right for q heads and for KV heads."""
    _, hf = checkpoint(variant)
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    model, config, _ = load_model(path, backend, "float32", with_tokenizer=False)
    assert config.num_kv_heads == 2 and config.attention_bias == (variant == "llama_bias")
    prompt = _prompt()
    ours = PagedSequence(model).step(prompt, all_logits=True)
    torch.testing.assert_close(ours, _hf_logits(hf, prompt), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_gguf_qwen_architectures_match_transformers(variant, checkpoint, backend, tmp_path):
    """qwen2 (q/k/v biases, tied embeddings) and qwen3 (q/k RMSNorm, head size apart from
    hidden / heads) GGUF files as llama.cpp writes them (no q/k permutation) load back to the
    original model."""
    _, hf = checkpoint(variant)
    path = write_gguf(hf, tmp_path / "tiny.gguf", arch=variant)
    model, config, _ = load_model(path, backend, "float32", with_tokenizer=False)
    assert (
        config.architecture == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[variant]
    )
    assert config.qk_norm == (variant == "qwen3") and config.attention_bias == (variant == "qwen2")
    cfg = hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert config.head_dim == head_dim
    prompt = _prompt()
    ours = PagedSequence(model).step(prompt, all_logits=True)
    torch.testing.assert_close(ours, _hf_logits(hf, prompt), atol=LOGIT_ATOL, rtol=0)
