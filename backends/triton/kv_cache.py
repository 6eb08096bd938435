"""Triton paged KV-cache writes (optionally into an FP8 cache) and block copies (copy-on-write).

Math (`backends.cpu.kv_cache`): token t with slot s = slot_mapping[t] >= 0 goes to block s //
block_size, offset s % block_size; slot -1 is skipped (padding). An FP8 cache stores
fp8(clamp(x / kv_scale)) (one correctly rounded fp32 division, round to nearest even: bit for
bit the reference); another cache dtype stores x rounded to it. No value is read back to the host
(capture-safe); slots outside the cache are skipped rather than written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import (
    FP8_CODECS,
    cast_rtne,
    check_float,
    fp8_codec,
    fp8_encode,
    interpreting,
    raw,
)


@triton.jit
def kv_cache_value(
    x,
    X_DTYPE: tl.constexpr,
    CACHE_DTYPE: tl.constexpr,
    kv_scale,
    IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """x (in X_DTYPE) as a cache of CACHE_DTYPE stores it: uint8 bits of fp8(x / kv_scale), one
    correctly rounded fp32 division (IS_FP8), x itself, or x rounded to CACHE_DTYPE."""
    if IS_FP8:
        xf = x.to(tl.float32)
        scale = tl.zeros_like(xf) + kv_scale
        return fp8_encode(tl.math.div_rn(xf, scale), MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ,
                          HAS_INF, 0)  # fmt: skip
    elif X_DTYPE == CACHE_DTYPE:
        return x
    else:
        return cast_rtne(x.to(tl.float32), CACHE_DTYPE, INTERPRET)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_value_token,
    n_tokens,
    n_cols,  # num_kv_heads * head_dim: one cache slot
    n_slots,  # num_blocks * block_size
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
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slot_mapping_ptr + tok, mask=tok < n_tokens, other=-1).to(tl.int64)
    live = (slot >= 0) & (slot < n_slots)
    mask = live[:, None] & (cols[None, :] < n_cols)
    tok64 = tok.to(tl.int64)[:, None]
    dst = slot[:, None] * n_cols + cols[None, :]  # the caches are contiguous
    k = tl.load(key_ptr + tok64 * stride_key_token + cols[None, :], mask=mask, other=0.0)
    v = tl.load(value_ptr + tok64 * stride_value_token + cols[None, :], mask=mask, other=0.0)
    k_out = kv_cache_value(k, key_ptr.dtype.element_ty, key_cache_ptr.dtype.element_ty, kv_scale,
                           IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF,
                           INTERPRET)  # fmt: skip
    v_out = kv_cache_value(v, value_ptr.dtype.element_ty, value_cache_ptr.dtype.element_ty,
                           kv_scale, IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF,
                           INTERPRET)  # fmt: skip
    tl.store(key_cache_ptr + dst, k_out, mask=mask)
    tl.store(value_cache_ptr + dst, v_out, mask=mask)


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache/value_cache: expected two [num_blocks, block_size, num_kv_heads, head_dim] "
            f"tensors of one shape, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"value_cache: dtype {value_cache.dtype} differs from {key_cache.dtype}")
    if key_cache.dtype not in FP8_CODECS:
        check_float("key_cache", key_cache)
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache/value_cache: must be contiguous (slots are addressed flat)")


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
) -> None:
    """Scatter tokens into the paged cache in place; slot -1 skips the token (padding).

    key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim], contiguous; slot_mapping: int [num_tokens], each valid slot unique.
    """
    _check_caches(key_cache, value_cache)
    if slot_mapping.dim() != 1 or slot_mapping.dtype.is_floating_point:
        raise ValueError(
            f"slot_mapping: expected an integer [num_tokens] tensor, got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    expected = (slot_mapping.shape[0], num_kv_heads, head_dim)
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)}, expected [num_tokens, num_kv_heads, head_dim] = "
                f"{list(expected)}"
            )
        check_float(name, t)
    is_fp8 = key_cache.dtype in FP8_CODECS
    scale = 1.0 if kv_scale is None else float(kv_scale)
    if is_fp8 and not scale > 0:
        raise ValueError(f"kv_scale: {kv_scale} must be > 0")
    n_tokens, n_cols = key.shape[0], num_kv_heads * head_dim
    if n_tokens == 0 or n_cols == 0:
        return
    # [num_tokens, num_kv_heads * head_dim] views with unit stride along a token's values
    k2 = key.reshape(n_tokens, n_cols)
    v2 = value.reshape(n_tokens, n_cols)
    k2 = k2 if k2.stride(1) == 1 else k2.contiguous()
    v2 = v2 if v2.stride(1) == 1 else v2.contiguous()
    codec = fp8_codec(key_cache.dtype if is_fp8 else torch.float8_e4m3fn)
    block_n = min(triton.next_power_of_2(n_cols), 4096 if interpreting() else 1024)
    budget = 32768 if interpreting() else 1024
    block_t = min(triton.next_power_of_2(n_tokens), max(1, budget // block_n))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(n_cols, block_n))
    _write_kv_kernel[grid](
        k2, v2, raw(key_cache), raw(value_cache), slot_mapping, k2.stride(0), v2.stride(0),
        n_tokens, n_cols, num_blocks * block_size, scale, IS_FP8=is_fp8, INTERPRET=interpreting(),
        BLOCK_T=block_t, BLOCK_N=block_n, **codec, **pdl_args(key.device, "kv"),
    )  # fmt: skip


@triton.jit
def _copy_rows_kernel(
    src_ptr,
    src_index_ptr,
    dst_ptr,
    dst_index_ptr,
    n_cols,
    SRC_INDEXED: tl.constexpr,  # row i of src is src_index[i], else i
    DST_INDEXED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    s = i.to(tl.int64)
    d = i.to(tl.int64)
    if SRC_INDEXED:
        s = tl.load(src_index_ptr + i).to(tl.int64)
    if DST_INDEXED:
        d = tl.load(dst_index_ptr + i).to(tl.int64)
    x = tl.load(src_ptr + s * n_cols + cols, mask=mask)
    tl.store(dst_ptr + d * n_cols + cols, x, mask=mask)


def copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """For each contiguous cache [num_blocks, ...], copy block src[i] to dst[i] in place.

    All sources are read before any destination is written (a gather into a scratch buffer, then
    a scatter), so overlapping src and dst behave as the reference's. Block ids on the host are
    range-checked (no device sync); on the device they are trusted.
    """
    if src.dim() != 1 or src.shape != dst.shape:
        raise ValueError(
            f"src/dst: expected two 1-D tensors of equal length, got {tuple(src.shape)} and "
            f"{tuple(dst.shape)}"
        )
    if src.dtype.is_floating_point or dst.dtype.is_floating_point:
        raise ValueError(f"src/dst: expected integer block ids, got {src.dtype} and {dst.dtype}")
    n = src.shape[0]
    for i, cache in enumerate(caches):
        if cache.dim() < 2:
            raise ValueError(f"caches[{i}]: expected [num_blocks, ...], got {tuple(cache.shape)}")
        if not cache.is_contiguous():
            raise ValueError(f"caches[{i}]: must be contiguous (blocks are copied flat)")
        num_blocks = cache.shape[0]
        for name, ids in (("src", src), ("dst", dst)):
            if ids.device.type == "cpu" and ids.numel():
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= num_blocks:
                    raise ValueError(f"{name}: block ids must lie in 0..{num_blocks - 1}")
        if n == 0 or cache.numel() == 0:
            continue
        flat = raw(cache).view(num_blocks, -1)  # [num_blocks, block_numel]
        n_cols = flat.shape[1]
        s = src.to(device=cache.device)
        d = dst.to(device=cache.device)
        scratch = torch.empty(n, n_cols, dtype=flat.dtype, device=cache.device)
        block_n = min(triton.next_power_of_2(n_cols), 65536 if interpreting() else 4096)
        grid = (n, triton.cdiv(n_cols, block_n))
        _copy_rows_kernel[grid](flat, s, scratch, s, n_cols, SRC_INDEXED=True, DST_INDEXED=False,
                                BLOCK_N=block_n)  # fmt: skip
        _copy_rows_kernel[grid](scratch, d, flat, d, n_cols, SRC_INDEXED=False, DST_INDEXED=True,
                                BLOCK_N=block_n)  # fmt: skip
