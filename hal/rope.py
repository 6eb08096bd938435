"""Rotary position tables: inverse frequencies and the cos/sin cache, per HF's rope_scaling.

Plain position math shared by the engine (which builds the cache) and every backend (which applies
it); bit for bit with transformers in fp32 for default, linear and llama3 scaling.
"""

from __future__ import annotations

import math

import torch

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
