"""Triton paged, varlen, causal attention: a decode path (GQA-packed, split-KV) and a general
kernel for prefill and chunked prefill, behind one `attention()` entry point.

Math (`backends.cpu.attention.paged_attention`): query token j of sequence s (query_len q_s,
total KV length L_s) sits at position p = L_s - q_s + j and attends to KV positions k <= p (and
p - k < w with a sliding window w); head h reads KV head h // (num_heads / num_kv_heads).
Scores are scale * q.k, soft-capped as cap * tanh(score / cap) when asked; out = softmax(scores) V.
Both kernels are FlashAttention-2's online softmax (Dao, 2023) over the paged cache, with the
group = num_heads / num_kv_heads query heads that share a KV head packed as rows of one program
(GQA packing: each KV tile is read once per KV head, not once per query head).
- General kernel (vLLM's unified Triton attention layout): a program takes block_q query tokens of
  one sequence times the group (BLOCK_M rows), finds its sequence by a binary search over
  query_start_loc and walks the block table BLOCK_N tokens at a time.
- Decode kernel (flash-decoding, Dao et al. 2023): a program takes one sequence, one KV head and
  one of `num_splits` equal shares of the visible KV range, reading BLOCK_N tokens (several pages
  looked up in the block table) per step. With one split it writes the output; with more, each
  writes its normalised partial output and log2-sum-exp and `_reduce_kernel` combines them:
  out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M), M = max_i lse_i.
Neither reads a tensor value on the host, so both can be captured in a CUDA graph; the number of
splits depends only on shapes, the SM count and the optional `max_seq_len` hint.
Scores and the softmax are fp32; bf16/fp16 inputs multiply in their dtype with fp32
accumulation, the probabilities rounded to that dtype before P @ V; fp32 inputs use IEEE fp32
dots (no TF32). An FP8 cache is decoded exactly and kv_scale folded into the score scale and the
output. Under TRITON_INTERPRET=1 every dot runs in fp32 (bf16 `tl.dot` is wrong in the
interpreter, Triton issue #11584). Rows past query_start_loc[-1] come back as zeros.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.quant import (
    FLOAT_DTYPES,
    FP8_CODECS,
    cast_rtne,
    fp8_codec,
    fp8_decode,
    interpreting,
    raw,
)

MAX_HEAD_DIM = 256  # HEAD_DIM_P2 tiles past 256 would not fit a program's registers
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_LOG2E = 1.4426950408889634

# A batch whose longest query (max_query_len, when the caller passes it) is at most this many
# tokens takes the decode kernel: a few query tokens per sequence (decode, speculative decoding)
# fit one tile of rows, and splitting the KV range pays off. Without the hint only a batch of one
# token per sequence (num_tokens == num_seqs) is known to be decode without reading lengths.
DECODE_MAX_QUERY_LEN = 8
# Split-KV: split until there are about this many decode programs per SM, each reading at least
# MIN_SPLIT_TOKENS KV tokens, and never more than MAX_SPLITS splits.
SPLIT_PROGRAMS_PER_SM = 2  # H100 autotune 2026-11-26: 1x32k best at 4/SM, 16x8k and 64x4k at 1-2
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode path. block_n: KV tokens per step (a power of two >= 16;
    block_n / block_size pages are looked up per step); num_splits None: `num_splits()` chooses."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n: {self.block_n} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: {self.num_warps} must be one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")
        if self.num_splits is not None and not 1 <= self.num_splits <= 1024:
            raise ValueError(f"num_splits: {self.num_splits} must be in 1..1024 or None")


# The decode tuning table: (operand width, smem class) -> config. "narrow" is bf16/fp16/FP8
# operands with head_dim <= 128; "wide" is fp32 operands or head_dim 256 (twice the bytes per
# tile); "fp32_256" both. "big_smem" GPUs (sm_90: 227 KiB of shared memory per block) can buffer
# more stages than the rest (~100 KiB on sm_86/89). Re-derive the sm_90 rows on a new GPU with
# `python bench/attention.py decode --autotune`.
DECODE_CONFIGS: dict[tuple[str, str], DecodeConfig] = {
    ("narrow", "big_smem"): DecodeConfig(block_n=128, num_warps=4, num_stages=2),  # H100 tuned
    ("narrow", "small_smem"): DecodeConfig(block_n=64, num_warps=4, num_stages=2),
    ("wide", "big_smem"): DecodeConfig(block_n=32, num_warps=4, num_stages=3),
    ("wide", "small_smem"): DecodeConfig(block_n=32, num_warps=4, num_stages=2),
    ("fp32_256", "big_smem"): DecodeConfig(block_n=16, num_warps=4, num_stages=2),
    ("fp32_256", "small_smem"): DecodeConfig(block_n=16, num_warps=4, num_stages=1),
}
# Under the interpreter each step costs Python time while numpy does the arithmetic.
INTERPRET_DECODE_CONFIG = DecodeConfig(block_n=256, num_warps=4, num_stages=1)
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
def _find_seq(query_start_loc_ptr, q_block, num_seqs, block_q):
    # The last sequence s whose first q-block, query_start_loc[s] // block_q + s, is <= q_block
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // block_q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _head_dim_mask(offs_d, head_dim, EVEN_D: tl.constexpr, HEAD_DIM_P2: tl.constexpr):
    # A compile-time bound when head_dim is a power of two, so loads along head_dim vectorize.
    if EVEN_D:
        return offs_d < HEAD_DIM_P2
    else:
        return offs_d < head_dim


@triton.jit
def _attend_tile(q, k, v, m_i, l_i, acc, visible, qk_scale, soft_cap, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):  # fmt: skip
    # One online-softmax step in log2 units. q: [M, D]; k, v: [N, D]; visible: [M, N].
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=INPUT_PRECISION) * qk_scale
    if soft_cap > 0:
        s = soft_cap * _tanh(s / soft_cap)
    s = tl.where(visible, s * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc += tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, offs_d, d_ok, block_size,
                  stride_kc_block, stride_kc_slot, kv_head_off, IS_FP8: tl.constexpr,
                  MAN_BITS: tl.constexpr, EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
                  NAN_CODE: tl.constexpr, FNUZ: tl.constexpr, HAS_INF: tl.constexpr):  # fmt: skip
    # K and V [N, D] of KV positions offs_n: each token's page from the block table.
    block = tl.load(bt_row + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
    slot = block * stride_kc_block + (offs_n % block_size).to(tl.int64) * stride_kc_slot
    slot += kv_head_off  # [N]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(key_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    v = tl.load(value_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if IS_FP8:
        k = fp8_decode(k, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)
        v = fp8_decode(v, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)
    return k, v


# Runtime ints that need no specialization (Triton would otherwise compile one variant per value
# of 1 and per divisibility by 16): fewer compiles for the many shapes serving sees.
@triton.jit(
    do_not_specialize=[
        "num_seqs", "head_dim", "block_size", "sliding_window", "group", "block_q",
    ]
)  # fmt: skip
def _attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_bt_row,
    num_seqs,
    head_dim,
    block_size,
    qk_scale,  # scale (times kv_scale for an FP8 cache)
    out_scale,  # 1 (kv_scale for an FP8 cache)
    soft_cap,  # 0: none
    sliding_window,  # 0: none
    group,  # query heads per KV head
    block_q,  # query tokens per program: BLOCK_M // group
    IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of both dots
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == HEAD_DIM_P2
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, block_q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // block_q + seq)
    if q_block_local * block_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # rows: block_q tokens x group heads; m -> token m // group, head kv_head * group + m % group
    offs_m = tl.arange(0, BLOCK_M)
    q_tok = q_block_local * block_q + offs_m // group  # within the sequence
    head = kv_head * group + offs_m % group
    row_ok = (offs_m < block_q * group) & (q_tok < q_len)
    q_pos = context_len + q_tok  # [BLOCK_M] absolute positions
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D, HEAD_DIM_P2)
    q_row = (q_start + q_tok).to(tl.int64) * stride_q_token + head.to(tl.int64) * stride_q_head
    q = tl.load(query_ptr + q_row[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(DOT_DTYPE)  # fmt: skip

    # KV range this q-block can see: up to its last token's position, from its first token's
    # window start (rounded down to a tile) with a sliding window.
    last_tok = tl.minimum((q_block_local + 1) * block_q, q_len) - 1
    kv_end = context_len + last_tok + 1
    kv_start = 0
    if sliding_window > 0:
        first_pos = context_len + q_block_local * block_q
        kv_start = tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_row
    kv_head_off = kv_head.to(tl.int64) * stride_kc_head
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, offs_d, d_ok,
                             block_size, stride_kc_block, stride_kc_slot, kv_head_off, IS_FP8,
                             MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)  # fmt: skip
        visible = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        in_window = (q_pos[:, None] - offs_n[None, :]) < sliding_window
        visible = visible & ((sliding_window <= 0) | in_window)
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, visible, qk_scale, soft_cap,
                                     DOT_DTYPE, INPUT_PRECISION)  # fmt: skip

    out = acc * (out_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    o_row = (q_start + q_tok).to(tl.int64) * stride_o_token + head.to(tl.int64) * stride_o_head
    tl.store(out_ptr + o_row[:, None] + offs_d[None, :],
             cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit(
    do_not_specialize=[
        "num_heads", "head_dim", "block_size", "sliding_window", "group", "block_q", "num_splits",
    ]
)  # fmt: skip
def _decode_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    part_out_ptr,  # fp32 [num_tokens, num_heads, num_splits, head_dim] (SPLIT only)
    part_lse_ptr,  # fp32 [num_tokens, num_heads, num_splits], log2 units (SPLIT only)
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_bt_row,
    num_heads,
    head_dim,
    block_size,
    qk_scale,
    out_scale,
    soft_cap,
    sliding_window,
    group,
    block_q,
    num_splits,
    IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for _reduce_kernel
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    # grid: (num_seqs, num_kv_heads, num_splits)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    context_len = tl.load(seq_lens_ptr + seq) - q_len
    offs_m = tl.arange(0, BLOCK_M)
    head = kv_head * group + offs_m % group
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D, HEAD_DIM_P2)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_row
    kv_head_off = kv_head.to(tl.int64) * stride_kc_head
    # Usually one pass (a decode token); a longer query is taken block_q tokens at a time.
    for q0 in range(0, q_len, block_q):
        q_tok = q0 + offs_m // group
        row_ok = (offs_m < block_q * group) & (q_tok < q_len)
        q_pos = context_len + q_tok
        row = (q_start + q_tok).to(tl.int64)
        q_off = row * stride_q_token + head.to(tl.int64) * stride_q_head
        q = tl.load(query_ptr + q_off[:, None] + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)  # fmt: skip
        # This split's equal share, in whole tiles, of the KV range the chunk can see.
        kv_end = context_len + tl.minimum(q0 + block_q, q_len)
        kv_start = 0
        if sliding_window > 0:
            kv_start = tl.maximum(context_len + q0 - sliding_window + 1, 0)
        per_split = tl.cdiv(tl.cdiv(kv_end - kv_start, num_splits), BLOCK_N) * BLOCK_N
        lo = kv_start + split * per_split
        hi = tl.minimum(lo + per_split, kv_end)

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, offs_d,
                                 d_ok, block_size, stride_kc_block, stride_kc_slot, kv_head_off,
                                 IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ,
                                 HAS_INF)  # fmt: skip
            visible = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            in_window = (q_pos[:, None] - offs_n[None, :]) < sliding_window
            visible = visible & ((sliding_window <= 0) | in_window)
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, visible, qk_scale, soft_cap,
                                         DOT_DTYPE, INPUT_PRECISION)  # fmt: skip

        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        if SPLIT:
            part = (row * num_heads + head) * num_splits + split  # [BLOCK_M]
            lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(part_lse_ptr + part, lse, mask=row_ok)
            tl.store(part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
                     acc / l_safe[:, None], mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
        else:
            out = acc * (out_scale / l_safe)[:, None]
            o_off = row * stride_o_token + head.to(tl.int64) * stride_o_head
            tl.store(out_ptr + o_off[:, None] + offs_d[None, :],
                     cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET),
                     mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["num_heads", "head_dim", "num_splits"])
def _reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    query_start_loc_ptr,
    stride_o_token,
    stride_o_head,
    num_heads,
    head_dim,
    num_splits,
    out_scale,
    INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    # grid: (num_seqs, num_heads); combines the splits of every query token of the sequence
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D, HEAD_DIM_P2)
    for t in range(0, q_end - q_start):
        row = q_start.to(tl.int64) + t
        part = (row * num_heads + head) * num_splits + offs_s  # [SPLITS_P2]
        lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, axis=0)
        w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
        o = tl.load(part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        total = tl.sum(w, axis=0)
        out = tl.sum(w[:, None] * o, axis=0) * (out_scale / tl.where(total > 0, total, 1.0))
        o_off = row * stride_o_token + head.to(tl.int64) * stride_o_head
        tl.store(out_ptr + o_off + offs_d, cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET),
                 mask=d_ok)  # fmt: skip


def input_reasons(
    query: torch.Tensor, key_cache: torch.Tensor, kv_scale: float | None = None
) -> list[str]:
    """Why the kernel cannot take these inputs (empty: it can); backends fall back on them."""
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


def _blocks(
    num_tokens: int, num_seqs: int, group: int, head_dim_p2: int, fp32: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_M, block_q, BLOCK_N, num_stages) of the general kernel. On a GPU a batch with
    prefill takes 64 rows (32 with fp32 operands or head_dim > 128, whose tiles are twice as
    large); under the interpreter, where each program and each op cost Python time while numpy
    does the arithmetic, 128 x 512 tiles keep the number of steps small."""
    if interpreting():
        block_m = max(128, triton.next_power_of_2(group))
        return block_m, block_m // group, 512, 1
    big = fp32 or head_dim_p2 > 128
    block_m = 16 if num_tokens <= num_seqs else (32 if big else 64)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_n = (16 if fp32 and head_dim_p2 > 128 else 32) if big else 64
    return block_m, block_m // group, block_n, 1 if big else 2


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


def num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """Split-KV factor of the decode path from shapes alone (no tensor values, graph-safe): split
    each (sequence, KV head) program's KV range until about SPLIT_PROGRAMS_PER_SM programs per SM
    run, keeping at least MIN_SPLIT_TOKENS tokens of the longest sequence per split."""
    programs = num_seqs * num_kv_heads
    wanted = -(-SPLIT_PROGRAMS_PER_SM * num_sms // programs)
    by_length = max(1, max_kv_len // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    """The tuning table's entry for this head_dim, query dtype and device."""
    if interpreting():
        return INTERPRET_DECODE_CONFIG
    fp32, big_d = dtype == torch.float32, triton.next_power_of_2(head_dim) > 128
    width = "fp32_256" if fp32 and big_d else ("wide" if fp32 or big_d else "narrow")
    smem = "big_smem" if _capability(device) >= BIG_SMEM_MIN_CC else "small_smem"
    return DECODE_CONFIGS[(width, smem)]


def takes_decode_path(num_tokens: int, num_seqs: int, max_query_len: int | None = None) -> bool:
    """Whether `attention` routes the batch to the decode kernel (shapes and hints only)."""
    if max_query_len is not None:
        return max_query_len <= DECODE_MAX_QUERY_LEN
    return num_tokens == num_seqs


def _launch_common(query, key_cache, scale, kv_scale) -> dict:
    is_fp8 = key_cache.dtype in FP8_CODECS
    kv = 1.0 if kv_scale is None or not is_fp8 else float(kv_scale)
    fp32_dots = interpreting() or query.dtype == torch.float32
    head_dim = query.shape[2]
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    return dict(
        qk_scale=float(scale) * kv, out_scale=kv, is_fp8=is_fp8, head_dim_p2=head_dim_p2,
        # "ieee": 16-bit operands ignore it, and Triton's HIP backend takes "tf32" on gfx942 only.
        even_d=head_dim == head_dim_p2, input_precision="ieee",
        dot_dtype=tl.float32 if fp32_dots else _TL_DTYPES[query.dtype],
        codec=fp8_codec(key_cache.dtype if is_fp8 else torch.float8_e4m3fn),
    )  # fmt: skip


def attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_scale: float | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The `Backend.attention` contract: query [num_tokens, num_heads, head_dim], caches
    [num_blocks, block_size, num_kv_heads, head_dim], block_tables int [num_seqs, max_blocks],
    seq_lens int [num_seqs], query_start_loc int [num_seqs + 1]. Returns [num_tokens, num_heads,
    head_dim] in query's dtype.

    Optional host-side hints (Python ints, never read from tensors): max_query_len, the longest
    query of the batch (<= DECODE_MAX_QUERY_LEN routes to the decode kernel; without it only
    num_tokens == num_seqs does), and max_seq_len, the longest seq_len (sizes split-KV; without
    it the block-table width stands in). A wrong hint costs speed, never correctness.
    """
    _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
           sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len)  # fmt: skip
    if takes_decode_path(query.shape[0], seq_lens.shape[0], max_query_len):
        return _decode(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                       scale, sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len,
                       None)  # fmt: skip
    return _general(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                    scale, sliding_window, soft_cap, kv_scale)  # fmt: skip


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_scale: float | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """The attention contract on the decode kernel whatever the batch (correct for any query
    lengths; fast for a few tokens per sequence). config overrides the tuning table (tests force
    splits with it; `bench/attention.py decode --autotune` searches it)."""
    _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
           sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len)  # fmt: skip
    return _decode(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                   scale, sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len,
                   config)  # fmt: skip


def _decode(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len,
            config) -> torch.Tensor:  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or head_dim == 0:
        return out
    c = _launch_common(query, key_cache, scale, kv_scale)
    cfg = config or decode_config(head_dim, query.dtype, query.device)
    # Rows: the group's heads times up to max_query_len tokens (1 without the hint), at least the
    # 16 rows tl.dot needs.
    q_tokens = min(max_query_len or 1, DECODE_MAX_QUERY_LEN)
    block_m = max(16, triton.next_power_of_2(group * q_tokens))
    max_kv_len = max_seq_len or block_tables.shape[1] * block_size
    splits = cfg.num_splits or num_splits(num_seqs, num_kv_heads, max_kv_len,
                                          _sm_count(query.device))  # fmt: skip
    q = query if query.stride(2) == 1 else query.contiguous()
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    if splits > 1:
        part_out = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32,
                               device=query.device)  # fmt: skip
        part_lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32,
                               device=query.device)  # fmt: skip
    else:
        part_out = part_lse = out  # never touched: SPLIT is off
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, raw(key_cache), raw(value_cache), out, part_out, part_lse, bt, seq_lens,
        query_start_loc, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), bt.stride(0), num_heads,
        head_dim, block_size, c["qk_scale"], c["out_scale"], float(soft_cap or 0.0),
        int(sliding_window or 0), group, block_m // group, splits, IS_FP8=c["is_fp8"],
        DOT_DTYPE=c["dot_dtype"], INPUT_PRECISION=c["input_precision"],
        INTERPRET=interpreting(), EVEN_D=c["even_d"], SPLIT=splits > 1, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, HEAD_DIM_P2=c["head_dim_p2"], num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **c["codec"],
    )  # fmt: skip
    if splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, query_start_loc, out.stride(0), out.stride(1), num_heads,
            head_dim, splits, c["out_scale"], INTERPRET=interpreting(), EVEN_D=c["even_d"],
            SPLITS_P2=triton.next_power_of_2(splits), HEAD_DIM_P2=c["head_dim_p2"], num_warps=4,
        )  # fmt: skip
    return out


def _general(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
             sliding_window, soft_cap, kv_scale) -> torch.Tensor:  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or head_dim == 0:
        return out
    c = _launch_common(query, key_cache, scale, kv_scale)
    block_m, block_q, block_n, num_stages = _blocks(
        num_tokens, num_seqs, group, c["head_dim_p2"], query.dtype == torch.float32
    )
    q = query if query.stride(2) == 1 else query.contiguous()
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    # Each sequence's q-blocks start at query_start_loc[s] // block_q + s, so this many programs
    # cover every sequence without reading query_start_loc back to the host.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _attention_kernel[grid](
        q, raw(key_cache), raw(value_cache), out, bt, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), bt.stride(0), num_seqs, head_dim, block_size,
        c["qk_scale"], c["out_scale"], float(soft_cap or 0.0), int(sliding_window or 0), group,
        block_q, IS_FP8=c["is_fp8"], DOT_DTYPE=c["dot_dtype"],
        INPUT_PRECISION=c["input_precision"], INTERPRET=interpreting(), EVEN_D=c["even_d"],
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM_P2=c["head_dim_p2"], num_warps=4,
        num_stages=num_stages, **c["codec"],
    )  # fmt: skip
    return out
