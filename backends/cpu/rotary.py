"""Reference rotary position embedding (NeoX and GPT-J styles) and its cos/sin cache.

`compute_inv_freq` follows transformers' `modeling_rope_utils` operation for operation, so the
cache matches transformers bit for bit in fp32 (rope types default, linear and llama3).
"""

from __future__ import annotations

import torch

from backends.cpu.quant import compute_dtype
from hal.rope import ROPE_TYPES, build_cos_sin_cache, compute_inv_freq  # noqa: F401 (re-exported)


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


def check_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    check_range: bool = True,
) -> int:
    """The rotary contract's input checks (shared with the CPU engine's native path); returns
    rotary_dim. The range check reads the positions' extremes back to the host in one call."""
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
    if check_range and n:
        low, high = (int(v) for v in torch.aminmax(positions))
        if low < 0 or high >= max_position:
            raise ValueError(
                f"positions: values must lie in 0..{max_position - 1} (the cache's max_position)"
            )
    return rotary_dim


def rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    check_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim of each head of query and key; return new (query, key).

    positions: int64 [num_tokens]; query: [num_tokens, num_heads, head_dim]; key: [num_tokens,
    num_kv_heads, head_dim]; cos_sin_cache: [max_position, rotary_dim]. NeoX pairs (x[i],
    x[i + d/2]); GPT-J pairs (x[2i], x[2i + 1]). Pair i rotates by angle p * inv_freq[i].
    check_range=False skips the positions range check, which reads them back to the host (not
    allowed inside a captured CUDA graph); the device's own index check still applies.
    """
    rotary_dim = check_rotary(positions, query, key, cos_sin_cache, check_range)
    cd = compute_dtype(query.dtype)
    cs = cos_sin_cache.to(cd)[positions.to(torch.int64)]  # [num_tokens, rotary_dim]
    cos = cs[:, None, : rotary_dim // 2]
    sin = cs[:, None, rotary_dim // 2 :]
    return _rotate(query, cos, sin, is_neox), _rotate(key, cos, sin, is_neox)
