"""Pieces both Triton attention kernels share: the online-softmax step, the paged K/V tile load,
the input checks and the launch arguments (`backends.triton.attention` documents the math).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from backends.triton.quant import (
    FLOAT_DTYPES,
    FP8_CODECS,
    fp8_codec,
    fp8_decode,
    interpreting,
    native_fp8,
)

MAX_HEAD_DIM = 256  # HEAD_DIM_P2 tiles past 256 would not fit a program's registers
LOG2E = 1.4426950408889634
# IS_FP8 modes of the KV loads: not FP8; decoded from the bits (`fp8_decode`: any format, the
# interpreter); the hardware conversion of sm_89+ NVIDIA GPUs for e4m3fn / e5m2 (a few cvt
# instructions per pair of values instead of ~10 integer ops per value).
FP8_NOT, FP8_CODEC, FP8_NATIVE_E4M3, FP8_NATIVE_E5M2 = 0, 1, 2, 3
_NATIVE_KV = {torch.float8_e4m3fn: FP8_NATIVE_E4M3, torch.float8_e5m2: FP8_NATIVE_E5M2}
_E4M3_NATIVE = tl.constexpr(FP8_NATIVE_E4M3)  # the kernels read only constexpr globals
_E5M2_NATIVE = tl.constexpr(FP8_NATIVE_E5M2)
# HAL_ATTN_FP8_PAIRS=0 (on by default; a DecodeConfig's fp8_pairs=False does the same for its
# launches): native FP8 tiles load as bytes and widen in the dot's
# operand registers (Triton's mixed-precision path: byte loads from shared memory, no second trip
# through it) instead of as int16 pairs widened, joined and stored back for the dot. Offline sm_90
# compile (Triton 3.6) of the 16-token, 1-warp tile: 8.3 KB of shared memory against 12.4, 8
# shared stores against 80, but 216 shared loads against 64; the H100's eighth session found the
# byte loads 1.5x slower at 4k. For the wide-batch FP8 tiers, where ~31 programs per SM compete
# for shared memory (twenty-fourth session: FP8 at 0.40 of copy, 512 x 144). Not yet measured.
_FP8_PAIRS = tl.constexpr(os.environ.get("HAL_ATTN_FP8_PAIRS", "1") != "0")
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Native FP8 caches under bf16 queries run both dots in fp16 (False: in bf16, as bf16 caches do;
# bench/attention.py compares the two).
FP8_FP16_DOTS = True
# sm_90 and newer have 227 KiB of shared memory per block (sm_86/89 about 100 KiB): room for
# larger tiles and more pipeline stages. Both tuning tables are keyed by this class.
BIG_SMEM_MIN_CC = (9, 0)


@triton.jit
def _tanh(x):
    # Accurate in fp32 near 0, where the soft-cap multiplies the error by cap: an odd Taylor series
    # to x^9 for |x| < 0.25 (truncation < 0.2 ulp), else (1 - e^-2|x|) / (1 + e^-2|x|).
    a = tl.abs(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    return tl.where(a < 0.25, series, tl.where(x < 0, -big, big))


@triton.jit
def _head_dim_mask(offs_d, head_dim, EVEN_D: tl.constexpr, HEAD_DIM_P2: tl.constexpr):
    # A compile-time bound when head_dim is a power of two, so loads along head_dim vectorize.
    if EVEN_D:
        return offs_d < HEAD_DIM_P2
    else:
        return offs_d < head_dim


@triton.jit
def _attend_tile(q, k, v, m_i, l_i, acc, visible, s_scale, cap_log2, MASKED: tl.constexpr,
                 SOFT_CAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):  # fmt: skip
    # One online-softmax step in log2 units. q: [M, D]; k, v: [N, D]; visible: [M, N] (MASKED).
    # Without a soft-cap s_scale = scale * log2(e), so the score needs one multiply; with one,
    # s_scale = scale / cap and cap_log2 = cap * log2(e): cap * tanh(score / cap) * log2(e).
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=INPUT_PRECISION) * s_scale
    if SOFT_CAP:
        s = cap_log2 * _tanh(s)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key is visible
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc += tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _scaled_q(q, s_scale, Q_SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # q as the first dot's operand and the factor its scores still need. Q_SCALED (a native FP8
    # cache under bf16 queries, whose dots run in fp16: FP8 converts to fp16 in one instruction
    # and to bf16 in three) folds s_scale into q before its fp16 rounding, so no |q| below
    # 65504 / s_scale (~5e5 at head_dim 128) can overflow, and the tiles multiply by 1.
    if Q_SCALED:
        return (q.to(tl.float32) * s_scale).to(DOT_DTYPE), 1.0
    else:
        return q.to(DOT_DTYPE), s_scale


@triton.jit
def _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, offs_d, d_ok,
                  stride_kc_block, stride_kc_slot, kv_head_off, MASK_N: tl.constexpr,
                  EVEN_D: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_FP8: tl.constexpr,
                  MAN_BITS: tl.constexpr, EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
                  NAN_CODE: tl.constexpr, FNUZ: tl.constexpr, HAS_INF: tl.constexpr,
                  PAIRS: tl.constexpr = True):  # fmt: skip
    # K and V [N, D] of KV positions offs_n, each token's page from the block table. PAGE_SIZE
    # (the cache's block_size) is a compile-time constant, so page and slot are a shift and a
    # mask for power-of-two pages; the N tokens of a tile share N / PAGE_SIZE table entries, whose
    # repeated loads are one cached line. MASK_N off: a whole tile below the visible end, loaded
    # without a mask (and without any mask when head_dim is a power of two). PAIRS (and
    # _FP8_PAIRS): a native FP8 cache loads as int16 pairs, else as bytes (see _FP8_PAIRS).
    page = offs_n // PAGE_SIZE
    native: tl.constexpr = (IS_FP8 == _E4M3_NATIVE) or (IS_FP8 == _E5M2_NATIVE)
    if _FP8_PAIRS and PAIRS and native and EVEN_D and offs_d.shape[0] >= 16:
        return _load_kv_tile_pairs(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, page,
                                   stride_kc_block, stride_kc_slot, kv_head_off, MASK_N,
                                   PAGE_SIZE, offs_d.shape[0], IS_FP8 == _E5M2_NATIVE)  # fmt: skip
    if MASK_N:
        block = tl.load(bt_row + page, mask=n_ok, other=0).to(tl.int64)
    else:
        block = tl.load(bt_row + page).to(tl.int64)
    slot = block * stride_kc_block + (offs_n % PAGE_SIZE).to(tl.int64) * stride_kc_slot
    ptrs = slot[:, None] + kv_head_off + offs_d[None, :]  # [N, D]
    if MASK_N:
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(key_cache_ptr + ptrs, mask=kv_mask, other=0)
        v = tl.load(value_cache_ptr + ptrs, mask=kv_mask, other=0)
    elif EVEN_D:
        k = tl.load(key_cache_ptr + ptrs)
        v = tl.load(value_cache_ptr + ptrs)
    else:
        k = tl.load(key_cache_ptr + ptrs, mask=d_ok[None, :], other=0)
        v = tl.load(value_cache_ptr + ptrs, mask=d_ok[None, :], other=0)
    if IS_FP8 == _E4M3_NATIVE:  # hardware cvt to fp16 (exact), then the dot's dtype
        k = k.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        v = v.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif IS_FP8 == _E5M2_NATIVE:
        k = k.to(tl.float8e5, bitcast=True).to(tl.float16)
        v = v.to(tl.float8e5, bitcast=True).to(tl.float16)
    elif IS_FP8:  # decoded from the bits (any format, any device, the interpreter)
        k = fp8_decode(k, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)
        v = fp8_decode(v, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)
    return k, v


@triton.jit
def _fp8x2_to_f16(pairs, E5M2: tl.constexpr):
    # int16 holding two e4m3fn (e5m2) codes, low byte first in memory -> the two fp16 values, by
    # one cvt.rn.f16x2.e4m3x2 (e5m2x2) of sm_89+ (exact), the low byte into the low half
    if E5M2:
        w = tl.inline_asm_elementwise("cvt.rn.f16x2.e5m2x2 $0, $1;", "=r,h", [pairs],
                                      dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        w = tl.inline_asm_elementwise("cvt.rn.f16x2.e4m3x2 $0, $1;", "=r,h", [pairs],
                                      dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _load_kv_tile_pairs(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, page,
                        stride_kc_block, stride_kc_slot, kv_head_off, MASK_N: tl.constexpr,
                        PAGE_SIZE: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
                        E5M2: tl.constexpr):  # fmt: skip
    # Native FP8 K and V read as int16 pairs along head_dim and widened in registers, so the dots
    # get fp16 tiles (their operand loads from shared memory are then whole rows, not bytes).
    if MASK_N:
        block = tl.load(bt_row + page, mask=n_ok, other=0).to(tl.int64)
    else:
        block = tl.load(bt_row + page).to(tl.int64)
    slot = block * stride_kc_block + (offs_n % PAGE_SIZE).to(tl.int64) * stride_kc_slot
    offs_p = tl.arange(0, HEAD_DIM_P2 // 2)
    ptrs = (slot[:, None] + kv_head_off) // 2 + offs_p[None, :]  # [N, D / 2] int16 pairs
    kp = key_cache_ptr.to(tl.pointer_type(tl.int16))
    vp = value_cache_ptr.to(tl.pointer_type(tl.int16))
    if MASK_N:
        k = tl.load(kp + ptrs, mask=n_ok[:, None], other=0)
        v = tl.load(vp + ptrs, mask=n_ok[:, None], other=0)
    else:
        k = tl.load(kp + ptrs)
        v = tl.load(vp + ptrs)
    n: tl.constexpr = offs_n.shape[0]
    k = tl.reshape(_fp8x2_to_f16(k, E5M2), (n, HEAD_DIM_P2))
    v = tl.reshape(_fp8x2_to_f16(v, E5M2), (n, HEAD_DIM_P2))
    return k, v


def input_reasons(
    query: torch.Tensor, key_cache: torch.Tensor, kv_scale: float | None = None
) -> list[str]:
    """Why the kernels cannot take these inputs (empty: they can); backends fall back on them."""
    reasons = []
    if query.dim() == 3 and query.shape[2] > MAX_HEAD_DIM:
        reasons.append(f"head_dim {query.shape[2]} > {MAX_HEAD_DIM}")
    if query.dtype not in FLOAT_DTYPES:
        reasons.append(f"query dtype {query.dtype} is not float32, bfloat16 or float16")
    if key_cache.dtype not in FP8_CODECS and key_cache.dtype != query.dtype:
        reasons.append(
            f"cache dtype {key_cache.dtype} is neither the query's {query.dtype} nor an FP8 format"
        )
    return reasons


def _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
           sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len) -> None:  # fmt: skip
    if query.dim() != 3:
        raise ValueError(
            f"query: expected [num_tokens, num_heads, head_dim], got {tuple(query.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache/value_cache: expected equal [num_blocks, block_size, num_kv_heads, "
            f"head_dim] shapes, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"value_cache: dtype {value_cache.dtype} differs from {key_cache.dtype}")
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(
            f"key_cache: head_dim {key_cache.shape[3]} differs from query's {head_dim}"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads: {num_heads} query heads is not a multiple of num_kv_heads {num_kv_heads}"
        )
    why = input_reasons(query, key_cache, kv_scale)
    if why:
        raise ValueError("attention: " + "; ".join(why))
    if key_cache.stride() != value_cache.stride() or key_cache.stride(3) != 1:
        raise ValueError(
            f"key_cache/value_cache: strides {key_cache.stride()} and {value_cache.stride()} must "
            "match, with unit stride along head_dim"
        )
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if num_seqs < 1:
        raise ValueError(
            f"seq_lens: expected [num_seqs] with num_seqs >= 1, got {tuple(seq_lens.shape)}"
        )
    if tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc: shape {tuple(query_start_loc.shape)}, expected [num_seqs + 1] with "
            f"num_seqs = len(seq_lens) = {num_seqs}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables: shape {tuple(block_tables.shape)}, expected [{num_seqs}, max_blocks]"
        )
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):  # fmt: skip
        if t.dtype.is_floating_point:
            raise ValueError(f"{name}: dtype {t.dtype} is not an integer type")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: {sliding_window} must be >= 1 or None")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap: {soft_cap} must be > 0 or None")
    if kv_scale is not None and not kv_scale > 0:
        raise ValueError(f"kv_scale: {kv_scale} must be > 0 or None")
    for name, hint in (("max_query_len", max_query_len), ("max_seq_len", max_seq_len)):
        if hint is not None and (not isinstance(hint, int) or hint < 1):
            raise ValueError(
                f"{name}: {hint!r} must be a Python int >= 1 (a host-side bound, never a tensor) "
                "or None"
            )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs one program at a time
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def table_key(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """(operand width, smem class) of both tuning tables. "narrow": bf16/fp16/FP8 operands with
    head_dim <= 128; "wide": fp32 operands or head_dim 256 (twice the bytes per tile);
    "fp32_256": both. "big_smem": compute capability >= BIG_SMEM_MIN_CC; else "small_smem"."""
    fp32, big_d = dtype == torch.float32, triton.next_power_of_2(max(head_dim, 1)) > 128
    width = "fp32_256" if fp32 and big_d else ("wide" if fp32 or big_d else "narrow")
    return width, "big_smem" if _capability(device) >= BIG_SMEM_MIN_CC else "small_smem"


def _launch_common(query, key_cache, scale, kv_scale, soft_cap=None) -> dict:
    """Launch arguments both kernels share: the folded score scales (`_attend_tile`), the output
    scale, the FP8 codec, the dot dtype and the head_dim tile."""
    is_fp8 = key_cache.dtype in FP8_CODECS
    kv = 1.0 if kv_scale is None or not is_fp8 else float(kv_scale)
    fp8_mode = FP8_NOT
    if is_fp8:
        native = native_fp8(key_cache.device)
        fp8_mode = _NATIVE_KV.get(key_cache.dtype, FP8_CODEC) if native else FP8_CODEC
    fp32_dots = interpreting() or query.dtype == torch.float32
    # A natively converted FP8 cache under bf16 queries: both dots in fp16 (see _scaled_q).
    q_scaled = FP8_FP16_DOTS and fp8_mode != FP8_CODEC and is_fp8 and query.dtype == torch.bfloat16
    q_scaled = q_scaled and not fp32_dots
    head_dim = query.shape[2]
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    qk_scale = float(scale) * kv
    cap = float(soft_cap or 0.0)
    return dict(
        qk_scale=qk_scale, out_scale=kv, fp8_mode=fp8_mode, head_dim_p2=head_dim_p2,
        s_scale=qk_scale / cap if cap > 0 else qk_scale * LOG2E, cap_log2=cap * LOG2E,
        soft_cap=cap > 0,
        # "ieee": 16-bit operands ignore it, and Triton's HIP backend takes "tf32" on gfx942 only.
        even_d=head_dim == head_dim_p2, input_precision="ieee",
        dot_dtype=tl.float32 if fp32_dots else tl.float16 if q_scaled else _TL_DTYPES[query.dtype],
        q_scaled=q_scaled,
        codec=fp8_codec(key_cache.dtype if is_fp8 else torch.float8_e4m3fn),
    )  # fmt: skip
