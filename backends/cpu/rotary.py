"""Reference rotary position embedding (NeoX and GPT-J styles) and its cos/sin cache.

`compute_inv_freq` follows transformers' `modeling_rope_utils` operation for operation, so the
cache matches transformers bit for bit in fp32 (rope types default, linear and llama3).
"""

from __future__ import annotations

import math

import torch

from backends.cpu.quant import compute_dtype

ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: type {rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
    return rope_type


def _param(scaling: dict, key: str, rope_type: str) -> float:
    if key not in scaling:
        raise ValueError(
            f"rope_scaling: type {rope_type!r} needs {key!r}; got keys {sorted(scaling)}"
        )
    return scaling[key]


def compute_inv_freq(
    rotary_dim: int, base: float, scaling: dict | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """fp32 [rotary_dim / 2] inverse frequencies, as transformers computes them."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: {rotary_dim} must be a positive even number")
    if not base > 0:
        raise ValueError(f"base: {base} must be > 0")
    rope_type = _rope_type(scaling)
    dim = rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    inv_freq = 1.0 / (base**exponent)
    if rope_type == "linear":
        factor = _param(scaling, "factor", rope_type)
        if not factor > 0:
            raise ValueError(f"rope_scaling: factor {factor} must be > 0")
        inv_freq /= factor
    elif rope_type == "llama3":
        factor, low_freq_factor, high_freq_factor, old_context_len = (
            _param(scaling, key, rope_type) for key in _LLAMA3_KEYS
        )
        if not high_freq_factor > low_freq_factor > 0:
            raise ValueError(
                f"rope_scaling: need high_freq_factor ({high_freq_factor}) > low_freq_factor "
                f"({low_freq_factor}) > 0"
            )
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium_freq, smoothed, inv_freq_llama)
    return inv_freq


def build_cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float,
    scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """fp32 [max_position, rotary_dim]: cos(p * inv_freq) in the first half, sin in the second.

    `scaling` is a Hugging Face rope_scaling / rope_parameters dict ("rope_type" or "type" key).
    """
    if max_position <= 0:
        raise ValueError(f"max_position: {max_position} must be > 0")
    device = torch.device(device) if device is not None else None
    inv_freq = compute_inv_freq(rotary_dim, base, scaling, device)  # [rotary_dim / 2]
    positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, rotary_dim / 2] (compute dtype)
    half = cos.shape[-1]
    rot_dim = 2 * half
    xc = x.to(cos.dtype)
    if is_neox:
        x1, x2 = xc[..., :half], xc[..., half:rot_dim]
    else:
        x1, x2 = xc[..., 0:rot_dim:2], xc[..., 1:rot_dim:2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    rotated = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)
    return torch.cat((rotated, xc[..., rot_dim:]), dim=-1).to(x.dtype)


def rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim of each head of query and key; return new (query, key).

    positions: int64 [num_tokens]; query: [num_tokens, num_heads, head_dim]; key: [num_tokens,
    num_kv_heads, head_dim]; cos_sin_cache: [max_position, rotary_dim]. NeoX pairs (x[i],
    x[i + d/2]); GPT-J pairs (x[2i], x[2i + 1]). Pair i rotates by angle p * inv_freq[i].
    """
    if positions.dim() != 1:
        raise ValueError(f"positions: expected [num_tokens], got shape {tuple(positions.shape)}")
    n = positions.shape[0]
    for name, t in (("query", query), ("key", key)):
        if t.dim() != 3 or t.shape[0] != n:
            raise ValueError(
                f"{name}: expected [num_tokens={n}, heads, head_dim], got {tuple(t.shape)}"
            )
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"key: head_dim {key.shape[2]} differs from query's {query.shape[2]}")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected 2-D, got shape {tuple(cos_sin_cache.shape)}")
    max_position, rotary_dim = cos_sin_cache.shape
    if rotary_dim % 2 or rotary_dim > query.shape[2]:
        raise ValueError(
            f"cos_sin_cache: rotary_dim {rotary_dim} must be even and <= head_dim {query.shape[2]}"
        )
    if n and (positions.min() < 0 or positions.max() >= max_position):
        raise ValueError(
            f"positions: values must lie in 0..{max_position - 1} (the cache's max_position)"
        )
    cd = compute_dtype(query.dtype)
    cs = cos_sin_cache.to(cd)[positions.to(torch.int64)]  # [num_tokens, rotary_dim]
    cos = cs[:, None, : rotary_dim // 2]
    sin = cs[:, None, rotary_dim // 2 :]
    return _rotate(query, cos, sin, is_neox), _rotate(key, cos, sin, is_neox)
