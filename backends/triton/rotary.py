"""Triton rotary position embedding, NeoX and GPT-J styles, on the first rotary_dim of each head.

Math (`backends.cpu.rotary.rotary`): with c, s = cos_sin_cache[position] halves, pair i = (x[i],
x[i + r/2]) (NeoX) or (x[2i], x[2i + 1]) (GPT-J) becomes (x1 c_i - x2 s_i, x2 c_i + x1 s_i), in
fp32, rounded to the input dtype; dims past rotary_dim r are copied. Each output element reads
itself and its pair partner, so one elementwise pass covers both styles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.quant import cast_rtne, check_float, interpreting


@triton.jit
def _rotary_kernel(
    x_ptr,
    y_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_x_token,
    stride_x_head,
    stride_y_token,
    stride_y_head,
    stride_cs_row,
    n_tokens,
    n_heads,
    head_dim,
    rotary_dim,
    IS_NEOX: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    tok_ok = tok < n_tokens
    half = rotary_dim // 2
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        i = tl.where(first, d, d - half)
    else:
        first = (d % 2) == 0
        partner = tl.where(first, d + 1, d - 1)
        i = d // 2
    rot = d < rotary_dim
    partner = tl.where(rot, partner, d)
    pos = tl.load(positions_ptr + tok, mask=tok_ok, other=0).to(tl.int64)  # [BLOCK_T]
    cs_row = cos_sin_ptr + pos[:, None] * stride_cs_row  # [BLOCK_T, 1]
    cos = tl.load(cs_row + i[None, :], mask=tok_ok[:, None] & rot[None, :], other=1.0)
    sin = tl.load(cs_row + half + i[None, :], mask=tok_ok[:, None] & rot[None, :], other=0.0)
    sin = tl.where(first, -sin, sin)  # [BLOCK_T, BLOCK_D]: x * c - partner * s, or + for the 2nd
    mask = tok_ok[:, None, None] & (head < n_heads)[None, :, None] & (d < head_dim)[None, None, :]
    base = tok.to(tl.int64)[:, None, None] * stride_x_token + head[None, :, None] * stride_x_head
    x = tl.load(x_ptr + base + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + base + partner[None, None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * cos.to(tl.float32)[:, None, :] + xp * sin.to(tl.float32)[:, None, :]
    y = tl.where(rot[None, None, :], y, x)
    out = y_ptr + tok.to(tl.int64)[:, None, None] * stride_y_token
    out += head[None, :, None] * stride_y_head + d[None, None, :]
    tl.store(out, cast_rtne(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _launch(x, positions, cache, is_neox: bool) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim] -> a new rotated tensor of the same shape and dtype
    n_tokens, n_heads, head_dim = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_d = max(triton.next_power_of_2(head_dim), 2)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 4096 // block_d))
    budget = 32768 if interpreting() else 4096  # elements per program
    block_t = min(triton.next_power_of_2(n_tokens), max(1, budget // (block_h * block_d)))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(n_heads, block_h))
    _rotary_kernel[grid](
        x, y, positions, cache, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        cache.stride(0), n_tokens, n_heads, head_dim, cache.shape[1], IS_NEOX=is_neox,
        INTERPRET=interpreting(), BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )  # fmt: skip
    return y


def rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim of each head of query and key; return new (query, key).

    positions: int [num_tokens]; query: [num_tokens, num_heads, head_dim]; key: [num_tokens,
    num_kv_heads, head_dim]; cos_sin_cache: fp32 [max_position, rotary_dim], cos then sin halves.
    Positions are not range-checked (that would read them back to the host).
    """
    if positions.dim() != 1 or positions.dtype.is_floating_point:
        raise ValueError(
            f"positions: expected an integer [num_tokens] tensor, got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    n = positions.shape[0]
    for name, t in (("query", query), ("key", key)):
        if t.dim() != 3 or t.shape[0] != n:
            raise ValueError(
                f"{name}: expected [num_tokens={n}, heads, head_dim], got {tuple(t.shape)}"
            )
        check_float(name, t)
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"key: head_dim {key.shape[2]} differs from query's {query.shape[2]}")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected 2-D, got shape {tuple(cos_sin_cache.shape)}")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > query.shape[2]:
        raise ValueError(
            f"cos_sin_cache: rotary_dim {rotary_dim} must be even and <= head_dim {query.shape[2]}"
        )
    cache = cos_sin_cache.to(torch.float32)
    if cache.stride(1) != 1:
        cache = cache.contiguous()
    return _launch(query, positions, cache, is_neox), _launch(key, positions, cache, is_neox)
