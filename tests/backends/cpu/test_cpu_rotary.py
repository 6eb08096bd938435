"""CPU reference rotary embedding vs explicit rotation formulas, and its cache vs transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from backends.cpu.rotary import build_cos_sin_cache, compute_inv_freq, rotary


def _cache64(rotary_dim: int, max_position: int, base: float) -> torch.Tensor:
    rows = []
    for p in range(max_position):
        angles = [p * base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]
        rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
    return torch.tensor(rows, dtype=torch.float64)


def _explicit(x: torch.Tensor, positions, cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    out = x.clone()
    half = cache.shape[1] // 2
    for t, p in enumerate(positions.tolist()):
        for h in range(x.shape[1]):
            for i in range(half):
                c, s = float(cache[p, i]), float(cache[p, half + i])
                a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
                out[t, h, a] = x[t, h, a] * c - x[t, h, b] * s
                out[t, h, b] = x[t, h, b] * c + x[t, h, a] * s
    return out


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [12, 8])  # full and partial rotary (head_dim 12)
def test_rotary_matches_explicit_rotation(is_neox: bool, rotary_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    cache = _cache64(rotary_dim, 20, 10000.0)
    positions = torch.tensor([0, 3, 19, 7, 7])
    q = torch.randn(5, 4, 12, generator=g, dtype=torch.float64)
    k = torch.randn(5, 2, 12, generator=g, dtype=torch.float64)
    q_out, k_out = rotary(positions, q, k, cache, is_neox=is_neox)
    torch.testing.assert_close(q_out, _explicit(q, positions, cache, is_neox), rtol=0, atol=1e-13)
    torch.testing.assert_close(k_out, _explicit(k, positions, cache, is_neox), rtol=0, atol=1e-13)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(q_out[0], q[0])  # position 0 is the identity rotation


def test_neox_and_gptj_differ_by_a_permutation() -> None:
    g = torch.Generator().manual_seed(1)
    cache = _cache64(8, 10, 10000.0)
    positions = torch.tensor([1, 5, 9])
    x = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pairs -> halves
    neox, _ = rotary(positions, x[..., perm], x[..., perm], cache, is_neox=True)
    gptj, _ = rotary(positions, x, x, cache, is_neox=False)
    torch.testing.assert_close(neox, gptj[..., perm], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_neox_matches_transformers_apply(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    cache = build_cos_sin_cache(16, 32, 10000.0)
    positions = torch.randint(0, 32, (6,), generator=g)
    q = torch.randn(6, 4, 16, generator=g).to(dtype)
    k = torch.randn(6, 2, 16, generator=g).to(dtype)
    q_out, k_out = rotary(positions, q, k, cache)
    assert q_out.dtype == k_out.dtype == dtype
    cos, sin = cache[positions, :8].repeat(1, 2), cache[positions, 8:].repeat(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(q.float(), k.float(), cos, sin, unsqueeze_dim=1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q_out.float(), q_hf, rtol=tol, atol=tol)
    torch.testing.assert_close(k_out.float(), k_hf, rtol=tol, atol=tol)


def _config(rope_parameters: dict, head_dim: int = 32, **extra) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
        max_position_embeddings=512, rope_parameters=rope_parameters, **extra,
    )  # fmt: skip


LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128, "rope_theta": 500000.0,
}  # fmt: skip
HF_CASES = [
    ({"rope_type": "default", "rope_theta": 10000.0}, 32),
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 32),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6, "partial_rotary_factor": 0.5}, 16),
    (LLAMA3, 32),
]


@pytest.mark.parametrize(("params", "rotary_dim"), HF_CASES)
def test_cos_sin_cache_matches_transformers_bit_for_bit(params: dict, rotary_dim: int) -> None:
    config = _config(dict(params))
    rope_type = params["rope_type"]
    if rope_type == "default":
        hf_inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        hf_inv, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    ours = compute_inv_freq(rotary_dim, params["rope_theta"], params)
    assert ours.dtype == torch.float32 and torch.equal(ours, hf_inv)

    cache = build_cos_sin_cache(rotary_dim, 300, params["rope_theta"], params)
    assert cache.shape == (300, rotary_dim) and cache.dtype == torch.float32
    if rotary_dim == 32:  # Llama's rotary module covers the full head_dim
        emb = LlamaRotaryEmbedding(config)
        cos, sin = emb(torch.zeros(1, 300, 32), torch.arange(300)[None])
        assert torch.equal(cache[:, :16], cos[0, :, :16]) and torch.equal(
            cache[:, 16:], sin[0, :, :16]
        )


def test_llama3_scaling_exercises_all_three_bands() -> None:
    base = compute_inv_freq(32, 500000.0)
    scaled = compute_inv_freq(32, 500000.0, LLAMA3)
    ratio = (base / scaled).tolist()
    assert any(r == 1.0 for r in ratio) and any(r == 8.0 for r in ratio)
    assert any(1.0 < r < 8.0 for r in ratio)
    legacy = {**LLAMA3, "type": "llama3"}  # the older "type" key
    del legacy["rope_type"]
    assert torch.equal(compute_inv_freq(32, 500000.0, legacy), scaled)


def test_rotary_rejects_bad_input() -> None:
    cache = build_cos_sin_cache(8, 16, 10000.0)
    q, k = torch.zeros(3, 4, 8), torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match=r"positions: values must lie in 0\.\.15"):
        rotary(torch.tensor([0, 16, 2]), q, k, cache)
    with pytest.raises(ValueError, match="rotary_dim 8 must be even and <= head_dim 6"):
        rotary(torch.tensor([0, 1, 2]), q[..., :6], k[..., :6], cache)
    with pytest.raises(ValueError, match="key: head_dim 4 differs"):
        rotary(torch.tensor([0, 1, 2]), q, k[..., :4], cache)
    with pytest.raises(ValueError, match="'yarn' is not one of default, linear, llama3"):
        build_cos_sin_cache(8, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs 'low_freq_factor'"):
        build_cos_sin_cache(8, 16, 10000.0, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rotary_dim: 7"):
        build_cos_sin_cache(7, 16, 10000.0)
