"""Triton paged, varlen, causal attention: a decode path (GQA-packed, split-KV) and a general
kernel for prefill and chunked prefill, behind one `attention()` entry point.

Math (`backends.cpu.attention.paged_attention`): query token j of sequence s (query_len q_s,
total KV length L_s) sits at position p = L_s - q_s + j and attends to KV positions k <= p (and
p - k < w with a sliding window w); head h reads KV head h // (num_heads / num_kv_heads).
Scores are scale * q.k, soft-capped as cap * tanh(score / cap) when asked; out = softmax(scores) V.
Both kernels are FlashAttention-2's online softmax (Dao, 2023) over the paged cache, in log2 units
(log2(e) folded into the score scale, exp2), with the group = num_heads / num_kv_heads query heads
that share a KV head packed as rows of one program (GQA packing: each KV tile is read once per KV
head, not once per query head). Tiles every row sees whole take an unmasked step; only the
diagonal (and window-edge, and last) tiles are masked.
- General kernel (this file; vLLM's unified Triton attention layout): a program takes block_q
  query tokens of one sequence times the group (BLOCK_M rows), finds its sequence by a binary
  search over query_start_loc and walks the block table BLOCK_N tokens at a time up to its last
  token's position (causal: later tiles are never visited). Programs run heaviest first (the
  last q-blocks of a sequence see the most keys). Tiles: `PREFILL_CONFIGS`.
- Decode kernel (`attention_decode.py`; flash-decoding, Dao et al. 2023): a program takes one
  sequence, one KV head and one of `num_splits` whole-tile shares of the visible KV range; with
  more than one split a combine kernel merges the partial outputs by their log-sum-exp.
Neither reads a tensor value on the host, so both can be captured in a CUDA graph; the number of
splits depends only on shapes, the SM count and the optional `max_seq_len` hint.
Scores and the softmax are fp32; bf16/fp16 inputs multiply in their dtype with fp32
accumulation, the probabilities rounded to that dtype before P @ V; fp32 inputs use IEEE fp32
dots (no TF32). An FP8 cache is decoded exactly and kv_scale folded into the score scale and the
output. Under TRITON_INTERPRET=1 every dot runs in fp32 (bf16 `tl.dot` is wrong in the
interpreter, Triton issue #11584). Rows past query_start_loc[-1] come back as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.attention_common import BIG_SMEM_MIN_CC as BIG_SMEM_MIN_CC
from backends.triton.attention_common import MAX_HEAD_DIM as MAX_HEAD_DIM
from backends.triton.attention_common import (
    _attend_tile,
    _head_dim_mask,
    _load_kv_tile,
    _scaled_q,
    table_key,
)
from backends.triton.attention_common import _capability as _capability
from backends.triton.attention_common import _check as _check
from backends.triton.attention_common import _launch_common as _launch_common
from backends.triton.attention_common import _sm_count as _sm_count
from backends.triton.attention_common import input_reasons as input_reasons
from backends.triton.attention_decode import DECODE_CONFIGS as DECODE_CONFIGS
from backends.triton.attention_decode import DECODE_MAX_QUERY_LEN as DECODE_MAX_QUERY_LEN
from backends.triton.attention_decode import DECODE_WIDE_BATCH as DECODE_WIDE_BATCH
from backends.triton.attention_decode import INTERPRET_DECODE_CONFIG as INTERPRET_DECODE_CONFIG
from backends.triton.attention_decode import MAX_SPLITS as MAX_SPLITS
from backends.triton.attention_decode import MIN_SPLIT_TOKENS as MIN_SPLIT_TOKENS
from backends.triton.attention_decode import SPLIT_PROGRAMS_PER_SM as SPLIT_PROGRAMS_PER_SM
from backends.triton.attention_decode import DecodeConfig as DecodeConfig
from backends.triton.attention_decode import _decode as _decode
from backends.triton.attention_decode import decode_attention as decode_attention
from backends.triton.attention_decode import decode_config as decode_config
from backends.triton.attention_decode import decode_splits as decode_splits
from backends.triton.attention_decode import num_splits as num_splits
from backends.triton.attention_decode import takes_decode_path as takes_decode_path
from backends.triton.quant import cast_rtne, interpreting, raw


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the general kernel. block_m: rows per program (query tokens x the
    group's heads; raised to the group's power of two when smaller); block_n: KV tokens per step;
    both powers of two >= 16."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}: {v} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: {self.num_warps} must be one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")

    def smem_bytes(self, head_dim_p2: int, elem_bytes: int) -> int:
        """Shared memory the tiles need, about: the q tile plus the buffered K and V tiles (the
        bench prunes configs with it before compiling). The K/V addresses come from a block-table
        load, so Triton's pipeliner gives each of the two loads half the stages: (num_stages - 1)
        // 2 K/V buffers (at least one)."""
        buffers = max(1, (self.num_stages - 1) // 2)
        return (self.block_m + 2 * buffers * self.block_n) * head_dim_p2 * elem_bytes


# The general kernel's tuning table, keyed like DECODE_CONFIGS (`table_key`). The sm_90 "narrow"
# row is the FlashAttention-2 Hopper shape (128 x 64, 8 warps, 3 stages); re-derive it with
# `python bench/attention.py prefill --autotune`. The others keep the tiles measured before
# (64 x 64 rows x keys, 32 x 32 for twice-as-wide operands, one stage when those would not fit).
PREFILL_CONFIGS: dict[tuple[str, str], PrefillConfig] = {
    # H200 prefill autotune 2026-11-27 (fourteenth session): 128 x 128, 8 warps, 5 stages (the
    # first count that keeps a K/V tile in flight during the math; 225 KiB of shared memory) is
    # best over the 4 shapes; 1 x 4096 / 8192 334 / 373 -> 354 / 418 TFLOP/s, 8 x 1024 207 -> 200.
    ("narrow", "big_smem"): PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=5),
    ("narrow", "small_smem"): PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    ("wide", "big_smem"): PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    ("wide", "small_smem"): PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
    ("fp32_256", "big_smem"): PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
    ("fp32_256", "small_smem"): PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
}
# Under the interpreter, where each program and each op cost Python time while numpy does the
# arithmetic, 128 x 512 tiles keep the number of steps small.
INTERPRET_PREFILL_CONFIG = PrefillConfig(block_m=128, block_n=512, num_warps=4, num_stages=1)
# Rows of a program when a batch without the decode hint has one token per sequence at most.
DECODE_LIKE_BLOCK_M = 16


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


# Runtime ints that need no specialization (Triton would otherwise compile one variant per value
# of 1 and per divisibility by 16): fewer compiles for the many shapes serving sees.
@triton.jit(do_not_specialize=["num_seqs", "head_dim", "sliding_window", "group", "block_q"])
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
    s_scale,  # see _attend_tile (scale times kv_scale for an FP8 cache, folded)
    cap_log2,
    out_scale,  # 1 (kv_scale for an FP8 cache)
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
    SOFT_CAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of both dots
    Q_SCALED: tl.constexpr,  # q times s_scale before the dot (see _scaled_q)
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == HEAD_DIM_P2
    PAGE_SIZE: tl.constexpr,  # the cache's block_size
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    # Heaviest first: causal q-blocks late in a sequence see the most keys.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
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
                other=0.0)  # fmt: skip
    q, tile_scale = _scaled_q(q, s_scale, Q_SCALED, DOT_DTYPE)

    # KV range this q-block can see: up to its last token's position, from its first token's
    # window start (rounded down to a tile) with a sliding window. Keys up to its first token's
    # position are seen by every row: whole tiles there take the unmasked step (none with a
    # window, whose start edge differs per row).
    first_pos = context_len + q_block_local * block_q
    last_tok = tl.minimum((q_block_local + 1) * block_q, q_len) - 1
    kv_end = context_len + last_tok + 1
    kv_start = 0
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    if sliding_window > 0:
        kv_start = tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        full_end = kv_start

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_row
    kv_head_off = kv_head.to(tl.int64) * stride_kc_head
    for start in range(kv_start, full_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, offs_n < kv_end,
                             offs_d, d_ok, stride_kc_block, stride_kc_slot, kv_head_off, False,
                             EVEN_D, PAGE_SIZE, IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE,
                             FNUZ, HAS_INF)  # fmt: skip
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, None, tile_scale, cap_log2, False,
                                     SOFT_CAP, DOT_DTYPE, INPUT_PRECISION)  # fmt: skip
    for start in range(full_end, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, offs_d, d_ok,
                             stride_kc_block, stride_kc_slot, kv_head_off, True, EVEN_D,
                             PAGE_SIZE, IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ,
                             HAS_INF)  # fmt: skip
        visible = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        in_window = (q_pos[:, None] - offs_n[None, :]) < sliding_window
        visible = visible & ((sliding_window <= 0) | in_window)
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, visible, tile_scale, cap_log2, True,
                                     SOFT_CAP, DOT_DTYPE, INPUT_PRECISION)  # fmt: skip

    out = acc * (out_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    o_row = (q_start + q_tok).to(tl.int64) * stride_o_token + head.to(tl.int64) * stride_o_head
    tl.store(out_ptr + o_row[:, None] + offs_d[None, :],
             cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """The general kernel's tuning-table entry for this head_dim, query dtype and device."""
    if interpreting():
        return INTERPRET_PREFILL_CONFIG
    return PREFILL_CONFIGS[table_key(head_dim, dtype, device)]


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


def general_attention(
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
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """The attention contract on the general kernel whatever the batch. config overrides the
    tuning table (tests force small tiles with it; `bench/attention.py prefill --autotune`
    searches it)."""
    _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
           sliding_window, soft_cap, kv_scale, None, None)  # fmt: skip
    return _general(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                    scale, sliding_window, soft_cap, kv_scale, config)  # fmt: skip


def _general(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
             sliding_window, soft_cap, kv_scale, config=None) -> torch.Tensor:  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    cfg = config or prefill_config(head_dim, query.dtype, query.device)
    block_m, num_warps = cfg.block_m, cfg.num_warps
    if config is None and num_tokens <= seq_lens.shape[0] and not interpreting():
        # one token per sequence: few rows, many programs
        block_m, num_warps = DECODE_LIKE_BLOCK_M, min(num_warps, 4)
    options = dict(num_warps=num_warps, num_stages=cfg.num_stages)
    return _launch_general(query, key_cache, value_cache, block_tables, seq_lens,
                           query_start_loc, scale, sliding_window, soft_cap, kv_scale, block_m,
                           cfg.block_n, options)  # fmt: skip


def _launch_general(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                    scale, sliding_window, soft_cap, kv_scale, block_m: int, block_n: int,
                    options: dict) -> torch.Tensor:  # fmt: skip
    """Launch `_attention_kernel` with block_m rows (raised to hold the whole group) x block_n
    keys and the compile options (num_warps, num_stages, vendor hints); the ROCm backend calls it
    with AMD tiles. Inputs already checked."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or head_dim == 0:
        return out
    c = _launch_common(query, key_cache, scale, kv_scale, soft_cap)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    q = query if query.stride(2) == 1 else query.contiguous()
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    # Each sequence's q-blocks start at query_start_loc[s] // block_q + s, so this many programs
    # cover every sequence without reading query_start_loc back to the host.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _attention_kernel[grid](
        q, raw(key_cache), raw(value_cache), out, bt, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), bt.stride(0), num_seqs, head_dim,
        c["s_scale"], c["cap_log2"], c["out_scale"], int(sliding_window or 0), group, block_q,
        IS_FP8=c["fp8_mode"], SOFT_CAP=c["soft_cap"], DOT_DTYPE=c["dot_dtype"],
        Q_SCALED=c["q_scaled"], INPUT_PRECISION=c["input_precision"], INTERPRET=interpreting(),
        EVEN_D=c["even_d"],
        PAGE_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM_P2=c["head_dim_p2"],
        **options, **c["codec"],
    )  # fmt: skip
    return out
