"""Triton rotary position embedding (NeoX and GPT-J) on q and k in one launch, optionally fused with
the paged KV-cache write of the rotated k and of v (one launch per layer for a decode step).

Math (`backends.cpu.rotary.rotary`): with c, s = cos_sin_cache[position] halves, pair i = (x[i],
x[i + r/2]) (NeoX) or (x[2i], x[2i + 1]) (GPT-J) becomes (x1 c_i - x2 s_i, x2 c_i + x1 s_i), in
fp32, rounded to the input dtype; dims past rotary_dim r are copied. Each output element reads
itself and its pair partner, so one elementwise pass covers both styles. Kernels compile without
FMA contraction (`enable_fp_fusion=False`): each product and the sum are rounded as the reference
rounds them, so q and k match it bit for bit. The cache write is `backends.triton.kv_cache`'s:
the rotated k as returned (rounded to key's dtype) and v, stored as fp8(x / kv_scale) in an FP8
cache (`backends.triton.quant.fp8_encode`) or rounded to the cache dtype; slot -1 is skipped.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from backends.triton.kv_cache import _check_caches, kv_cache_value
from backends.triton.pdl import grid_wait, let_next_start, pdl_args
from backends.triton.quant import (
    FP8_CODECS,
    cast_rtne,
    check_float,
    fp8_codec,
    interpreting,
    raw,
)

# HAL_ROTARY_EARLY=1: each program loads its tokens' positions and their cos / sin rows before the
# PDL wait (host-copied positions and a constant table, which the qkv GEMM still running then
# does not write), so after the wait only q / k / v are loaded: one dependent load (position,
# then its row) fewer on the path. 2 x H200, TP=2 batch-1 decode alternated in one call
# (twenty-fourth session): 2.60 / 2.59 ms on against 2.61 / 2.61 / 2.61 off, within the spread
# between runs: off.
EARLY = os.environ.get("HAL_ROTARY_EARLY", "0") == "1"
# HAL_ROTARY_EARLY_TRIGGER (on; =0 off): the rotary + KV write kernel lets the next one (the
# attention) start before its PDL wait (`pdl.let_next_start`), so the attention's programs are
# resident, reading their lengths, block tables and earlier pages (attention_ws.EARLY_PAGES), while
# the qkv GEMM ends. Right because every attention kernel reads only host-copied metadata and
# pages of earlier steps before its own wait, which neither the GEMM nor this kernel writes. 2 x
# H200, TP=2 batch-1 decode alternated in one call (thirty-fourth session): 2.58 / 2.58 ms off,
# 2.54 / 2.55 on (with EARLY_PAGES).
EARLY_TRIGGER = os.environ.get("HAL_ROTARY_EARLY_TRIGGER", "1") != "0"


@triton.jit
def _pairing(rotary_dim, IS_NEOX: tl.constexpr, BLOCK_D: tl.constexpr):
    # Per dim d: whether it is the first of its pair, its partner's dim (itself past rotary_dim)
    # and its frequency index.
    d = tl.arange(0, BLOCK_D)
    half = rotary_dim // 2
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        i = tl.where(first, d, d - half)
    else:
        first = (d % 2) == 0
        partner = tl.where(first, d + 1, d - 1)
        i = d // 2
    return first, tl.where(d < rotary_dim, partner, d), i


@triton.jit
def _cos_sin(positions_ptr, cos_sin_ptr, stride_cs_row, n_tokens, rotary_dim,
             IS_NEOX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    # cos and the signed sin ([BLOCK_T, BLOCK_D] fp32) of this program's tokens: out = x * cos +
    # partner * sin (sin negated on the first of a pair); 1 and 0 past rotary_dim.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_tokens
    first, _, i = _pairing(rotary_dim, IS_NEOX, BLOCK_D)
    rot = tl.arange(0, BLOCK_D) < rotary_dim
    pos = tl.load(positions_ptr + tok, mask=tok_ok, other=0).to(tl.int64)  # [BLOCK_T]
    cs_row = cos_sin_ptr + pos[:, None] * stride_cs_row  # [BLOCK_T, 1]
    cos = tl.load(cs_row + i[None, :], mask=tok_ok[:, None] & rot[None, :], other=1.0)
    sin = tl.load(cs_row + rotary_dim // 2 + i[None, :], mask=tok_ok[:, None] & rot[None, :],
                  other=0.0)  # fmt: skip
    return cos.to(tl.float32), tl.where(first, -sin, sin).to(tl.float32)


@triton.jit
def _rotate_tile(
    x_ptr,
    out_ptr,
    stride_x_token,
    stride_x_head,
    cos,  # fp32 [BLOCK_T, BLOCK_D] (`_cos_sin`)
    sin,
    head_tile,
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
    """Rotate x[this program's tokens, the heads of head_tile] into out (contiguous, x's shape).
    Returns the stored values (out's dtype) and their mask, [BLOCK_T, BLOCK_H, BLOCK_D]."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    tok_ok = tok < n_tokens
    _, partner, _ = _pairing(rotary_dim, IS_NEOX, BLOCK_D)
    rot = d < rotary_dim
    mask = tok_ok[:, None, None] & (head < n_heads)[None, :, None] & (d < head_dim)[None, None, :]
    tok64 = tok.to(tl.int64)[:, None, None]
    base = tok64 * stride_x_token + head[None, :, None] * stride_x_head
    x = tl.load(x_ptr + base + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + base + partner[None, None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * cos[:, None, :] + xp * sin[:, None, :]
    y = cast_rtne(tl.where(rot[None, None, :], y, x), out_ptr.dtype.element_ty, INTERPRET)
    out = tok64 * (n_heads * head_dim) + head[None, :, None] * head_dim + d[None, None, :]
    tl.store(out_ptr + out, y, mask=mask)
    return y, mask


@triton.jit
def _write_cache(
    cache_ptr,
    x,
    X_DTYPE: tl.constexpr,
    mask,
    slot_mapping_ptr,
    head_tile,
    n_tokens,
    n_slots,  # num_blocks * block_size
    n_kv_heads,
    head_dim,
    kv_scale,
    IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Store x [BLOCK_T, BLOCK_H, BLOCK_D] (this program's tokens, the heads of head_tile) at
    each token's slot of the contiguous cache, encoded as the cache stores it; slot -1
    (padding) and slots past the cache are skipped."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_mapping_ptr + tok, mask=tok < n_tokens, other=-1).to(tl.int64)
    live = (slot >= 0) & (slot < n_slots)
    stored = kv_cache_value(x, X_DTYPE, cache_ptr.dtype.element_ty, kv_scale, IS_FP8, MAN_BITS,
                            EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, INTERPRET)  # fmt: skip
    # A slot holds n_kv_heads * head_dim values.
    dst = slot[:, None, None] * (n_kv_heads * head_dim) + head[None, :, None] * head_dim
    tl.store(cache_ptr + dst + d[None, None, :], stored, mask=mask & live[:, None, None])


@triton.jit
def _load_tile(
    x_ptr,
    stride_x_token,
    stride_x_head,
    head_tile,
    n_tokens,
    n_heads,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x[this program's tokens, the heads of head_tile] and its mask, both [BLOCK_T, BLOCK_H,
    BLOCK_D]."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (tok < n_tokens)[:, None, None] & (head < n_heads)[None, :, None]
    mask = mask & (d < head_dim)[None, None, :]
    src = tok.to(tl.int64)[:, None, None] * stride_x_token + head[None, :, None] * stride_x_head
    return tl.load(x_ptr + src + d[None, None, :], mask=mask, other=0.0), mask


@triton.jit
def _key_tile(
    k_ptr, k_out_ptr, key_cache_ptr, cos, sin, slot_mapping_ptr, stride_k_token,
    stride_k_head, head_tile, n_tokens, n_kv_heads, head_dim, rotary_dim, n_slots,
    kv_scale, IS_NEOX: tl.constexpr, WRITE_KV: tl.constexpr, IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr, EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr, FNUZ: tl.constexpr, HAS_INF: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rotate k's tile into k_out; with WRITE_KV also store those values in the key cache."""
    k, mask = _rotate_tile(k_ptr, k_out_ptr, stride_k_token, stride_k_head, cos, sin, head_tile,
                           n_tokens, n_kv_heads, head_dim, rotary_dim, IS_NEOX, INTERPRET,
                           BLOCK_T, BLOCK_H, BLOCK_D)  # fmt: skip
    if WRITE_KV:
        _write_cache(key_cache_ptr, k, k_out_ptr.dtype.element_ty, mask, slot_mapping_ptr,
                     head_tile, n_tokens, n_slots, n_kv_heads, head_dim, kv_scale, IS_FP8,
                     MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, INTERPRET, BLOCK_T,
                     BLOCK_H, BLOCK_D)  # fmt: skip


@triton.jit
def _value_tile(
    v_ptr, value_cache_ptr, slot_mapping_ptr, stride_v_token, stride_v_head, head_tile, n_tokens,
    n_kv_heads, head_dim, n_slots, kv_scale, IS_FP8: tl.constexpr, MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, NAN_CODE: tl.constexpr, FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Store v's tile in the value cache."""
    v, mask = _load_tile(v_ptr, stride_v_token, stride_v_head, head_tile, n_tokens, n_kv_heads,
                         head_dim, BLOCK_T, BLOCK_H, BLOCK_D)  # fmt: skip
    _write_cache(value_cache_ptr, v, v_ptr.dtype.element_ty, mask, slot_mapping_ptr, head_tile,
                 n_tokens, n_slots, n_kv_heads, head_dim, kv_scale, IS_FP8, MAN_BITS, EXP_BIAS,
                 FP8_MAX, NAN_CODE, FNUZ, HAS_INF, INTERPRET, BLOCK_T, BLOCK_H,
                 BLOCK_D)  # fmt: skip


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_out_ptr,
    key_cache_ptr,
    value_cache_ptr,
    positions_ptr,
    cos_sin_ptr,
    slot_mapping_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cs_row,
    n_tokens,
    n_heads,
    n_kv_heads,
    head_dim,
    rotary_dim,
    n_q_tiles,  # head tiles of q along grid axis 1, then those of k, then (WRITE_KV) of v
    n_kv_tiles,
    n_slots,  # num_blocks * block_size
    kv_scale,
    IS_NEOX: tl.constexpr,
    WRITE_KV: tl.constexpr,
    IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,  # q heads per program
    BLOCK_HKV: tl.constexpr,  # k or v heads per program
    BLOCK_D: tl.constexpr,
    EARLY: tl.constexpr,  # cos and sin loaded before the PDL wait (EARLY)
    EARLY_TRIGGER: tl.constexpr,  # the next kernel may start before the wait (EARLY_TRIGGER)
    PDL: tl.constexpr,
):
    tile = tl.program_id(1)
    if EARLY_TRIGGER:
        let_next_start(PDL)
    if not EARLY:
        grid_wait(PDL)
    cos = tl.full((BLOCK_T, BLOCK_D), 1.0, dtype=tl.float32)
    sin = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if tile < n_q_tiles + n_kv_tiles:  # q and k tiles rotate; v tiles only copy
        cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, stride_cs_row, n_tokens, rotary_dim,
                            IS_NEOX, BLOCK_T, BLOCK_D)  # fmt: skip
    if EARLY:
        grid_wait(PDL)
    # Each branch is one call: names bound inside a runtime `if` must agree in type across its
    # branches, and q tiles are BLOCK_HQ wide where k and v tiles are BLOCK_HKV.
    if tile < n_q_tiles:
        _rotate_tile(q_ptr, q_out_ptr, stride_q_token, stride_q_head, cos, sin, tile, n_tokens,
                     n_heads, head_dim, rotary_dim, IS_NEOX, INTERPRET, BLOCK_T, BLOCK_HQ,
                     BLOCK_D)  # fmt: skip
    elif tile < n_q_tiles + n_kv_tiles:
        _key_tile(k_ptr, k_out_ptr, key_cache_ptr, cos, sin, slot_mapping_ptr, stride_k_token,
                  stride_k_head, tile - n_q_tiles, n_tokens,
                  n_kv_heads, head_dim, rotary_dim, n_slots, kv_scale, IS_NEOX, WRITE_KV, IS_FP8,
                  MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, INTERPRET, BLOCK_T,
                  BLOCK_HKV, BLOCK_D)  # fmt: skip
    elif WRITE_KV:
        _value_tile(v_ptr, value_cache_ptr, slot_mapping_ptr, stride_v_token, stride_v_head,
                    tile - n_q_tiles - n_kv_tiles, n_tokens, n_kv_heads, head_dim, n_slots,
                    kv_scale, IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF,
                    INTERPRET, BLOCK_T, BLOCK_HKV, BLOCK_D)  # fmt: skip


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 else t.contiguous()


def _check_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """Validate `rotary`'s inputs; return the cos/sin cache as fp32 with unit column stride."""
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
    return cache if cache.stride(1) == 1 else cache.contiguous()


def _launch(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cache: torch.Tensor,
    is_neox: bool,
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # query: [num_tokens, num_heads, head_dim]; key: [num_tokens, num_kv_heads, head_dim];
    # kv: (value, key_cache, value_cache, slot_mapping, kv_scale) to write, or None
    query, key = _unit_last(query), _unit_last(key)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    n_tokens, n_heads, head_dim = query.shape
    n_kv_heads = key.shape[1]
    if n_tokens == 0 or head_dim == 0 or n_heads + n_kv_heads == 0:
        return q_out, k_out
    block_d = max(triton.next_power_of_2(head_dim), 2)
    max_h = max(1, 4096 // block_d)
    block_hq = min(triton.next_power_of_2(max(n_heads, 1)), max_h)
    block_hkv = min(triton.next_power_of_2(max(n_kv_heads, 1)), max_h)
    budget = 32768 if interpreting() else 4096  # elements per program (of a q tile)
    block_t = min(triton.next_power_of_2(n_tokens), max(1, budget // (block_hq * block_d)))
    n_q_tiles, n_kv_tiles = triton.cdiv(n_heads, block_hq), triton.cdiv(n_kv_heads, block_hkv)
    write = kv is not None
    if kv is None:  # rotary only: placeholders for the cache arguments, which stay unread
        value, key_cache, value_cache, slot_mapping, scale = key, k_out, k_out, positions, 1.0
    else:
        value, key_cache, value_cache, slot_mapping, scale = kv
    value = _unit_last(value)
    n_slots = key_cache.shape[0] * key_cache.shape[1]
    is_fp8 = key_cache.dtype in FP8_CODECS
    codec = fp8_codec(key_cache.dtype if is_fp8 else torch.float8_e4m3fn)
    grid = (triton.cdiv(n_tokens, block_t), n_q_tiles + (2 if write else 1) * n_kv_tiles)
    _rotary_kernel[grid](
        query, key, value, q_out, k_out, raw(key_cache), raw(value_cache), positions, cache,
        slot_mapping, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), cache.stride(0),
        n_tokens, n_heads, n_kv_heads, head_dim, cache.shape[1], n_q_tiles, n_kv_tiles, n_slots,
        scale, IS_NEOX=is_neox, WRITE_KV=write, IS_FP8=is_fp8, INTERPRET=interpreting(),
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_D=block_d,
        enable_fp_fusion=False, EARLY=EARLY, EARLY_TRIGGER=EARLY_TRIGGER and write, **codec,
        **pdl_args(query.device, "rotary"),
    )  # fmt: skip
    return q_out, k_out


def rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim of each head of query and key (one launch); return new
    (query, key).

    positions: int [num_tokens]; query: [num_tokens, num_heads, head_dim]; key: [num_tokens,
    num_kv_heads, head_dim]; cos_sin_cache: fp32 [max_position, rotary_dim], cos then sin halves.
    Positions are not range-checked (that would read them back to the host).
    """
    cache = _check_rotary(positions, query, key, cos_sin_cache)
    return _launch(positions, query, key, cache, is_neox, None)


def rotary_write_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary(positions, query, key, ...)`, then `kv_cache.write_kv` of the rotated key and
    value, in one launch; returns the rotated (query, key), the same bits as the two ops.

    value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads,
    head_dim], contiguous; slot_mapping: int [num_tokens], each valid slot unique, -1 skips the
    token. With an FP8 cache, stored = fp8(x / kv_scale) (kv_scale defaults to 1.0). Positions
    and slots are not range-checked on the host (no sync); slots past the cache are skipped.
    """
    cache = _check_rotary(positions, query, key, cos_sin_cache)
    _check_caches(key_cache, value_cache)
    if slot_mapping.dim() != 1 or slot_mapping.dtype.is_floating_point:
        raise ValueError(
            f"slot_mapping: expected an integer [num_tokens] tensor, got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    expected = (slot_mapping.shape[0], key_cache.shape[2], key_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)}, expected [num_tokens, num_kv_heads, head_dim] = "
                f"{list(expected)} (num_tokens = len(slot_mapping), heads and head_dim the cache's)"
            )
    check_float("value", value)
    scale = 1.0 if kv_scale is None else float(kv_scale)
    if key_cache.dtype in FP8_CODECS and not scale > 0:
        raise ValueError(f"kv_scale: {kv_scale} must be > 0")
    kv = (value, key_cache, value_cache, slot_mapping, scale)
    return _launch(positions, query, key, cache, is_neox, kv)
