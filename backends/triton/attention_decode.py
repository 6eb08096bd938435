"""The decode path of the Triton paged attention (flash-decoding: GQA-packed rows, split-KV and a
combine kernel), its tuning table and its split-count model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from backends.triton import attention_ws, attention_ws_persistent
from backends.triton.attention_common import (
    FP8_NOT,
    _attend_tile,
    _check,
    _head_dim_mask,
    _launch_common,
    _load_kv_tile,
    _scaled_q,
    _sm_count,
    table_key,
)
from backends.triton.pdl import grid_wait, let_next_start, pdl_args
from backends.triton.quant import cast_rtne, interpreting, raw
from hal.env import parse_dims

logger = logging.getLogger(__name__)

# A batch whose longest query (max_query_len, when the caller passes it) is at most this many
# tokens takes the decode kernel: a few query tokens per sequence (decode, speculative decoding)
# fit one tile of rows, and splitting the KV range pays off. Without the hint only a batch of one
# token per sequence (num_tokens == num_seqs) is known to be decode without reading lengths.
DECODE_MAX_QUERY_LEN = 8
# Split-KV model (`num_splits`): at most PROGRAMS_PER_SM decode programs are resident on an SM
# (one wave: splits never spill into a second); a second program on an SM adds only
# SPLIT_SHARED_GAIN of a program's throughput (the SM's share of bandwidth is nearly taken by
# one); splitting at all costs SPLIT_COST_TILES tile times (partial writes, the combine launch);
# each split reads at least MIN_SPLIT_TOKENS KV tokens; at most MAX_SPLITS splits. Re-fit with
# `python bench/attention.py decode --autotune` (it prints the constants that best predict the
# measured best split counts).
SPLIT_PROGRAMS_PER_SM = 2
# H200 graph-replay autotune 2026-11-27 (fourteenth session; 15 shapes, batch 1-256, contexts
# 512-32k, 5-stage tiles): fitted 2 / 0.1 / 4 tiles; with 64-token tiles they pick the measured
# best count at every shape swept (a cost of 1 tile split 16 x 1024 in two: 0.51 of copy
# against 0.57-0.63 whole). The ninth session's H100 fit for 128-token 3-stage tiles had cost 1.
SPLIT_SHARED_GAIN = 0.1
SPLIT_COST_TILES = 4.0
# HAL_ATTN_SPLIT_TOKENS=N replaces MIN_SPLIT_TOKENS (for measuring: at 256 the model leaves
# 1 x 512 unsplit, eight programs of serial tiles; at 64 it makes eight one-tile splits and a
# combine; SDPA leads there by a hundredth of copy).
MIN_SPLIT_TOKENS = int(os.environ.get("HAL_ATTN_SPLIT_TOKENS", "256"))
if MIN_SPLIT_TOKENS < 16:
    raise ValueError(f"HAL_ATTN_SPLIT_TOKENS={MIN_SPLIT_TOKENS}: must be at least 16 KV tokens")
MAX_SPLITS = 128
MAX_GRID_SEQS = 65535  # sequences ride the grid's second axis (CUDA's limit there)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode path. block_n: KV tokens per step (a power of two >= 16;
    block_n / block_size pages are looked up per step); num_splits None: `num_splits()` chooses
    the grid's split count (from max_seq_len, or the model's longest when CUDA graphs capture);
    each sequence then uses as many of them as hold min_split_tokens (default one tile) each:
    splits past a short sequence's range write no partials, the combine reads only those that
    hold some, and a chunk one split holds is written whole (no combine). A larger minimum cost
    batch-1 graphs time (H100, ninth session: 256 tokens per split made a 200-token sequence
    one serial split of two tiles, 8.9 us per layer against 7.1 with two one-tile splits)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None
    min_split_tokens: int | None = None  # None: one block_n tile
    fp8_pairs: bool = True  # a native FP8 cache as int16 pairs, else bytes (see _FP8_PAIRS)

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n: {self.block_n} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: {self.num_warps} must be one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")
        if self.num_splits is not None and not 1 <= self.num_splits <= 1024:
            raise ValueError(f"num_splits: {self.num_splits} must be in 1..1024 or None")
        if self.min_split_tokens is not None and self.min_split_tokens < 1:
            raise ValueError(f"min_split_tokens: {self.min_split_tokens} must be >= 1 or None")


# The decode tuning table, keyed by `table_key` (operand width, smem class). Re-derive the sm_90
# rows on a new GPU with `python bench/attention.py decode --autotune`. Stages: the K/V loads'
# addresses come from a block-table load, so Triton's pipeliner splits num_stages between the
# two; up to 4 the next tile's K/V is issued after this tile's math and waited for at once (no
# overlap), from 5 it stays in flight during the math (TTGIR: async_wait num 3, not 0).
# narrow / big_smem: H200 graph replays 2026-11-27 (fourteenth session, bf16 cache, 15 shapes
# batch 1-256): 64 tokens / 4 warps / 5 stages reaches 0.965 of each shape's best tile
# (geometric mean; 70 KiB of shared memory, three programs per SM); 1 x 32k 0.57 -> 0.70 of
# copy, 4 x 8k 0.56 -> 0.67, 16 x 8k 0.89 -> 0.95 against the 3-stage 128-token tile.
DECODE_CONFIGS: dict[tuple[str, str], DecodeConfig] = {
    ("narrow", "big_smem"): DecodeConfig(block_n=64, num_warps=4, num_stages=5),
    ("narrow", "small_smem"): DecodeConfig(block_n=64, num_warps=4, num_stages=2),
    ("wide", "big_smem"): DecodeConfig(block_n=32, num_warps=4, num_stages=3),
    ("wide", "small_smem"): DecodeConfig(block_n=32, num_warps=4, num_stages=2),
    ("fp32_256", "big_smem"): DecodeConfig(block_n=16, num_warps=4, num_stages=2),
    ("fp32_256", "small_smem"): DecodeConfig(block_n=16, num_warps=4, num_stages=1),
}


def tile_override(value: str | None) -> DecodeConfig | None:
    """HAL_ATTN_DECODE_TILE=NxWxS (block_n x num_warps x num_stages): the decode tile that
    replaces the table's narrow / big_smem default (the tile of small batches whose split count
    the model picks: batch-1 decode among them), for measuring another tile in the engine (e.g.
    32x4x5 at TP=2 batch 1); unset or empty: None, the table stands."""
    dims = parse_dims("HAL_ATTN_DECODE_TILE", value, "NxWxS (block_n x num_warps x num_stages)",
                      "32x4x5")  # fmt: skip
    return None if dims is None else DecodeConfig(*dims)


_TILE = tile_override(os.environ.get("HAL_ATTN_DECODE_TILE"))
if _TILE is not None:
    DECODE_CONFIGS[("narrow", "big_smem")] = _TILE

# Batches whose num_seqs x num_kv_heads programs fill the GPU several times over (no split-KV
# there) take smaller programs, more of them resident per SM: (table key, FP8 cache) -> ((at
# least this many programs per SM, config), ...), first match wins. H100 graph-replay sweep
# 2026-11-27 (docs/benchmarks.md "seventh session"): bf16 cache 256 x 160 94 -> 73 us, within 1%
# of the default elsewhere at batch >= 64; FP8 cache 0.87-0.92x the default's time at batch >=
# 64, 256 x 160 95 -> 66 us. Since FP8 tiles load as int16 pairs (no byte loads from shared
# memory), 32-token tiles on 1 warp lead from 7 programs per SM (H100 2026-11-27, eighth session:
# 256 x 160 / 512 / 1024 48 / 116 / 214 us against 60 / 126 / 230, 128 x 1024 112 against 119;
# with the byte loads they had run 1.5x slower at 4k). bf16: 3 stages 0.3-1.4% faster than 2 at
# all 7 shapes of batch 64-256 x 512-8k (H100, ninth session). CUDA graphs fix the config
# without the context.
DECODE_WIDE_BATCH: dict[tuple[str, str, bool], tuple[tuple[int, DecodeConfig], ...]] = {
    # bf16: 16-token tiles (one page each) on 1 warp from 7 programs per SM (H200 graph replays,
    # twenty-third session, `bench/attention.py wide`, us against (64, 2, 3)): 256 x 160 53 / 63,
    # 256 x 256 76 / 80, 256 x 512 134 / 139, 512 x 160 99 / 113, 512 x 256 142 / 147, 128 x
    # 1024 130 / 132; at 64 x 512 (3.9 per SM) 48 / 41, so the 64-token tier stays below 7.
    ("narrow", "big_smem", False): (
        (7, DecodeConfig(block_n=16, num_warps=1, num_stages=3)),
        (3, DecodeConfig(block_n=64, num_warps=2, num_stages=3)),
    ),
    # FP8: from 3 per SM 5 stages keep a tile in flight (H200 graph replays, twenty-fourth
    # session, `bench/attention.py wide`, us against 2 stages): 64 x 1024 57 / 61, 64 x 2048
    # 101 / 109. From 7 per SM one-page tiles loaded as bytes (fp8_pairs=False: 8 KB of shared
    # memory, so more programs resident) on 5 stages, against the int16-pair (32, 1, 3) tile
    # (H200, twenty-fifth session, us): 512 x 144 74 / 83, 256 x 160 42 / 45, 512 x 256 109 /
    # 116, 256 x 512 98 / 106, 128 x 1024 93 / 101; as pairs the same tile runs 77 / 45 / 118 /
    # 110 / 107. Below 7 per SM pairs stay (64 x 1024: (64, 2, 5) 56 / bytes 57).
    ("narrow", "big_smem", True): (
        (7, DecodeConfig(block_n=16, num_warps=1, num_stages=5, fp8_pairs=False)),
        (3, DecodeConfig(block_n=64, num_warps=2, num_stages=5)),
        # below the tiers: 128 tokens, 5 stages (H200, fourteenth session, e4m3fn cache, 6
        # shapes of batch 1-32: 1.05-1.17x the ninth session's 2 stages, e.g. 16 x 1024 0.25 ->
        # 0.30 of copy, 1 x 32k 0.34 -> 0.38)
        (0, DecodeConfig(block_n=128, num_warps=4, num_stages=5)),
    ),
}
# A batch the split model leaves whole (one split) with at most one program per SM: every SM runs
# one program, so a tile that needs more shared memory costs no residency. (table key) -> config.
# H200 graph replays, fourteenth session (one split, bf16 cache): 128 tokens / 4 warps / 5 stages
# against the 64-token default: 16 x 512 0.45 against 0.42 of copy, 16 x 1024 0.62 against
# 0.57, 4 x 512 0.13 (two 64-token splits 0.11-0.12).
DECODE_ONE_WAVE: dict[tuple[str, str], DecodeConfig] = {
    ("narrow", "big_smem"): DecodeConfig(block_n=128, num_warps=4, num_stages=5),
}
# A batch with at least this fraction of one program per SM (12-16 sequences x 8 KV heads =
# 96-128 programs on 132 SMs) runs whole on the one-wave tile at every context, even where the
# split model (fitted on the 64-token tile) would split it in two. H200 graph replays, fraction of
# copy, twenty-first session: 16 x 4096 / 8192 / 32k 0.83 / 0.93 / 1.01 -> 0.88 / 0.97 / 1.03 (rule
# on / off in one call); 12 x 1024 / 4096 / 8192 / 32k 0.50 / 0.68 / 0.76 / 0.85 split in two ->
# 0.51 / 0.79 / 0.87 / 0.94 whole (`.scratch` sweep of tiles x splits; SDPA 0.56 / 0.81 / 0.87 /
# 0.96). At 10 (0.61 per SM) the model's three 64-token splits stay best from 4k up.
ONE_WAVE_NEAR_FULL = 0.7
# HAL_ATTN_EARLY_META (on; =0 off): the decode and combine kernels read a sequence's
# query_start_loc and seq_lens before the PDL wait for the kernel before them, so that load leaves
# the chain that follows the wait (query, block table, K / V). Right when no kernel that may still
# be running writes them: the engine copies them from the host before a step's first kernel, and
# a kernel that does not trigger its dependents early (any torch kernel) has finished before this
# one starts. 2 x H200, TP=2 batch-1 decode (twenty-second session, alternated in one call):
# 2.60-2.61 -> 2.59 ms alone, 2.57-2.59 with HAL_ONESHOT_EARLY_EPOCH.
EARLY_META = os.environ.get("HAL_ATTN_EARLY_META", "1") != "0"
# HAL_ATTN_EARLY_TRIGGER=1: the decode and combine kernels let the next kernel start before their
# PDL wait (`pdl.let_next_start`), so the o_proj GEMM after them is resident, with its first
# weight tiles loading, for the whole attention (~10 us a layer at batch 1) instead of only
# during the combine. Right because the kernels that follow the attention read only weights (and
# the combine host-copied lengths) before their own wait, and the one-shot all-reduce after the
# GEMM starts only once that GEMM passed its wait (the attention finished). 2 x H200, TP=2
# batch-1 decode alternated in one call (twenty-third session): 2.59 / 2.65 / 2.58 ms on against
# 2.66 / 2.59 / 2.60 / 2.60 off, no gain beyond the spread: off.
EARLY_TRIGGER = os.environ.get("HAL_ATTN_EARLY_TRIGGER", "0") == "1"
# Under the interpreter each step costs Python time while numpy does the arithmetic.
INTERPRET_DECODE_CONFIG = DecodeConfig(block_n=256, num_warps=4, num_stages=1)


@triton.jit
def _chunk_splits(context_len, q0, q_len, block_q, sliding_window, num_splits, min_split_tiles,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    # The KV range [kv_start, kv_end) the query chunk starting at token q0 sees, the tokens per
    # split (whole BLOCK_N tiles counted from kv_start: only the last split may end inside a
    # tile) and how many splits hold any: the range in num_splits parts of at least
    # min_split_tiles tiles each, so a short sequence uses fewer splits than the grid has (one
    # split: split 0 writes the output itself and the reduce skips the chunk).
    kv_end = context_len + tl.minimum(q0 + block_q, q_len)
    kv_start = 0
    if sliding_window > 0:
        kv_start = tl.maximum(context_len + q0 - sliding_window + 1, 0)
    tiles = tl.cdiv(kv_end - kv_start, BLOCK_N)
    per_split = tl.maximum(tl.cdiv(tiles, num_splits), min_split_tiles) * BLOCK_N
    used = tl.cdiv(kv_end - kv_start, per_split)
    return kv_start, kv_end, per_split, used


@triton.jit
def _seq_meta(query_start_loc_ptr, seq_lens_ptr, seq, EARLY_META: tl.constexpr,
              EARLY_TRIGGER: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    # (first query row, query length, context length before the query) of sequence seq, and the
    # PDL wait: after it, or with EARLY_META before it (see EARLY_META); with EARLY_TRIGGER the
    # next kernel may start first (see EARLY_TRIGGER).
    if EARLY_TRIGGER:
        let_next_start(PDL)
    if not EARLY_META:
        grid_wait(PDL)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    context_len = tl.load(seq_lens_ptr + seq) - q_len
    if EARLY_META:
        grid_wait(PDL)
    return q_start, q_len, context_len


@triton.jit(
    do_not_specialize=[
        "num_tokens", "num_heads", "head_dim", "sliding_window", "group", "block_q", "num_splits",
        "min_split_tiles",
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
    num_tokens,
    num_heads,
    head_dim,
    s_scale,  # see _attend_tile
    cap_log2,
    out_scale,  # 1 (kv_scale for an FP8 cache)
    sliding_window,  # 0: none
    group,
    block_q,
    num_splits,  # the grid's splits: the most any sequence uses
    min_split_tiles,  # a split of a sequence holds at least this many tiles (see _chunk_splits)
    IS_FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    Q_SCALED: tl.constexpr,  # q times s_scale before the dot (see _scaled_q)
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for _reduce_kernel
    PAGE_SIZE: tl.constexpr,  # the cache's block_size
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    EARLY_META: tl.constexpr,  # the sequence's lengths read before the PDL wait (EARLY_META)
    EARLY_TRIGGER: tl.constexpr,  # the next kernel may start before the wait (EARLY_TRIGGER)
    FP8_PAIRS: tl.constexpr,  # DecodeConfig.fp8_pairs
    PDL: tl.constexpr,
):
    # grid: (num_kv_heads, num_seqs, num_splits). A sequence's KV-head programs read the same
    # pages and launch next to each other (H200, fourteenth session, against sequences first:
    # batch 256 x 512 / 1024 / 4096 0.889 / 0.965 / 1.010 -> 0.903 / 0.977 / 1.034 of copy, 64 x
    # 512 0.749 -> 0.768, the rest within 1%).
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    q_start, q_len, context_len = _seq_meta(query_start_loc_ptr, seq_lens_ptr, seq, EARLY_META,
                                            EARLY_TRIGGER, PDL)  # fmt: skip
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
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        q, tile_scale = _scaled_q(q, s_scale, Q_SCALED, DOT_DTYPE)
        kv_start, kv_end, per_split, used = _chunk_splits(context_len, q0, q_len, block_q,
                                                          sliding_window, num_splits,
                                                          min_split_tiles, BLOCK_N)  # fmt: skip
        lo = kv_start + split * per_split
        hi = tl.minimum(lo + per_split, kv_end)
        # Whole tiles every row of the chunk sees (keys <= its first token's position, no
        # window) take the unmasked step; the rest (the tail, windows) the masked one.
        full_end = lo
        if sliding_window == 0:
            seen_by_all = tl.maximum(tl.minimum(hi, context_len + q0 + 1) - lo, 0)
            full_end = lo + seen_by_all // BLOCK_N * BLOCK_N

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
        for start in range(lo, full_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, offs_n < hi,
                                 offs_d, d_ok, stride_kc_block, stride_kc_slot, kv_head_off,
                                 False, EVEN_D, PAGE_SIZE, IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX,
                                 NAN_CODE, FNUZ, HAS_INF, FP8_PAIRS)  # fmt: skip
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, None, tile_scale, cap_log2, False,
                                         SOFT_CAP, DOT_DTYPE, INPUT_PRECISION)  # fmt: skip
        for start in range(full_end, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, bt_row, offs_n, n_ok, offs_d,
                                 d_ok, stride_kc_block, stride_kc_slot, kv_head_off, True,
                                 EVEN_D, PAGE_SIZE, IS_FP8, MAN_BITS, EXP_BIAS, FP8_MAX,
                                 NAN_CODE, FNUZ, HAS_INF, FP8_PAIRS)  # fmt: skip
            visible = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            in_window = (q_pos[:, None] - offs_n[None, :]) < sliding_window
            visible = visible & ((sliding_window <= 0) | in_window)
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, visible, tile_scale, cap_log2,
                                         True, SOFT_CAP, DOT_DTYPE, INPUT_PRECISION)  # fmt: skip

        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        if SPLIT & (used > 1):  # partials of the splits that hold any of the range
            part = (row * num_heads + head) * num_splits + split  # [BLOCK_M]
            lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
            part_ok = row_ok & (split + 0 * offs_m < used)
            tl.store(part_lse_ptr + part, lse, mask=part_ok)
            tl.store(part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
                     acc / l_safe[:, None], mask=part_ok[:, None] & d_ok[None, :])  # fmt: skip
        elif split == 0:  # one split holds the chunk's range (or no split-KV): the output
            out = acc * (out_scale / l_safe)[:, None]
            o_off = row * stride_o_token + head.to(tl.int64) * stride_o_head
            tl.store(out_ptr + o_off[:, None] + offs_d[None, :],
                     cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET),
                     mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    # Padding rows past the last sequence's query come back zero (out is not zero-filled: one
    # fill launch per layer saved); the last program of the grid writes them.
    last = (seq == tl.num_programs(1) - 1) & (kv_head == tl.num_programs(0) - 1)
    if last & (split == tl.num_programs(2) - 1):
        zero = tl.zeros((HEAD_DIM_P2,), dtype=out_ptr.dtype.element_ty)
        first_pad = (q_start + q_len).to(tl.int64)
        for i in range(0, num_tokens - first_pad):
            for h in range(0, num_heads):
                o_row = (first_pad + i) * stride_o_token + h * stride_o_head
                tl.store(out_ptr + o_row + offs_d, zero, mask=d_ok)


@triton.jit(
    do_not_specialize=[
        "num_heads", "head_dim", "num_splits", "min_split_tiles", "sliding_window", "block_q",
    ]
)  # fmt: skip
def _reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_o_token,
    stride_o_head,
    num_heads,
    head_dim,
    num_splits,
    min_split_tiles,
    sliding_window,
    block_q,
    out_scale,
    INTERPRET: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    EARLY_META: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
    PDL: tl.constexpr,
):
    # grid: (num_seqs, num_heads); combines the splits of every query token of the sequence
    # whose chunk used more than one (the decode kernel wrote the others whole)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start, q_len, context_len = _seq_meta(query_start_loc_ptr, seq_lens_ptr, seq, EARLY_META,
                                            EARLY_TRIGGER, PDL)  # fmt: skip
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D, HEAD_DIM_P2)
    for t in range(0, q_len):
        used = _chunk_splits(context_len, t // block_q * block_q, q_len, block_q, sliding_window,
                             num_splits, min_split_tiles, BLOCK_N)[3]  # fmt: skip
        if used > 1:
            s_ok = offs_s < used
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


def num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_kv_len: int,
    num_sms: int,
    block_n: int = 128,
    programs_per_sm: int | None = None,
    split_cost_tiles: float | None = None,
    shared_gain: float | None = None,
) -> int:
    """Split-KV factor of the decode path from shapes alone (no tensor values, graph-safe).

    The longest sequence has `tiles` block_n tiles; s splits make programs * s programs of
    ceil(tiles / s) tiles each, k = ceil(programs * s / num_sms) of them on the busiest SM, which
    runs them at (1 + shared_gain * (k - 1)) times one program's rate: time = k * ceil(tiles /
    s) / (1 + shared_gain * (k - 1)) + split_cost_tiles (s > 1). Candidates: s in 1..min(MAX_SPLITS,
    max_kv_len // MIN_SPLIT_TOKENS) whose programs fit one wave of programs_per_sm per SM; the
    least time wins (ties: fewer splits). Defaults: the module's SPLIT_* constants. So a batch
    with about one program per SM already (16 x 8 KV heads on 132 SMs) splits only when its
    context is long, and a small batch splits until every SM holds one program."""
    per_sm = SPLIT_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    cost = SPLIT_COST_TILES if split_cost_tiles is None else split_cost_tiles
    gain = SPLIT_SHARED_GAIN if shared_gain is None else shared_gain
    programs = max(1, num_seqs * num_kv_heads)
    sms = max(1, num_sms)
    if programs >= per_sm * sms:  # a full wave already: splits only add partial writes and a
        return 1  # combine (H100: 256 x 4k at 8 splits ran 0.85 of copy bandwidth, at 1 0.99)
    tiles = max(1, -(-max_kv_len // block_n))
    limit = max(1, min(MAX_SPLITS, max_kv_len // MIN_SPLIT_TOKENS, tiles))
    best, best_time = 1, float("inf")
    for s in range(1, limit + 1):
        if s > 1 and programs * s > per_sm * sms:
            break
        k = -(-programs * s // sms)
        time = k * -(-tiles // s) / (1 + gain * (k - 1)) + (cost if s > 1 else 0.0)
        if time < best_time:
            best, best_time = s, time
    return best


def decode_config(
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_fp8: bool = False,
    programs: int | None = None,
    max_kv_len: int | None = None,
) -> DecodeConfig:
    """The tuning table's entry for this head_dim, query dtype and device; with programs (num_seqs
    x num_kv_heads) the wide-batch entry for an FP8 (kv_fp8) or float cache where one applies,
    and with max_kv_len too (the longest KV range a launch is sized for) the one-wave entry of a
    float cache (with num_splits=1) when the table's tile would run unsplit with at most one
    program per SM, or the batch nearly fills one wave (ONE_WAVE_NEAR_FULL)."""
    if interpreting():
        return INTERPRET_DECODE_CONFIG
    key = table_key(head_dim, dtype, device)
    if programs is not None:
        sms = _sm_count(device)
        for min_per_sm, cfg in DECODE_WIDE_BATCH.get((*key, kv_fp8), ()):
            if programs / sms >= min_per_sm:
                return cfg
        one_wave = DECODE_ONE_WAVE.get(key)
        if one_wave is not None and not kv_fp8 and max_kv_len is not None and programs <= sms:
            near_full = programs >= ONE_WAVE_NEAR_FULL * sms
            if near_full or num_splits(programs, 1, max_kv_len, sms,
                                       DECODE_CONFIGS[key].block_n) == 1:  # fmt: skip
                return dataclasses.replace(one_wave, num_splits=1)
    return DECODE_CONFIGS[key]


def takes_decode_path(num_tokens: int, num_seqs: int, max_query_len: int | None = None) -> bool:
    """Whether `attention` routes the batch to the decode kernel (shapes and hints only)."""
    if max_query_len is not None:
        return max_query_len <= DECODE_MAX_QUERY_LEN
    return num_tokens == num_seqs


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


def decode_splits(
    num_seqs: int,
    num_kv_heads: int,
    block_size: int,
    max_blocks: int,
    cfg: DecodeConfig,
    device: torch.device,
    max_seq_len: int | None = None,
) -> int:
    """The split count `decode_attention` launches with for these shapes and this config."""
    if cfg.num_splits:
        return cfg.num_splits
    max_kv_len = max_seq_len or max_blocks * block_size
    return num_splits(num_seqs, num_kv_heads, max_kv_len, _sm_count(device), cfg.block_n)


def _decode(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len,
            config) -> torch.Tensor:  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if num_seqs > MAX_GRID_SEQS:
        raise ValueError(
            f"{num_seqs} sequences in one decode launch: at most {MAX_GRID_SEQS} (the grid's "
            "second axis); split the batch"
        )
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or head_dim == 0:
        return out
    c = _launch_common(query, key_cache, scale, kv_scale, soft_cap)
    kv_fp8, max_kv_len = c["fp8_mode"] != FP8_NOT, max_seq_len or block_tables.shape[1] * block_size
    if config is None and not interpreting():
        # The warp-specialized kernels (see attention_ws and attention_ws_persistent)
        why = attention_ws.call_reason(query, key_cache, value_cache, num_seqs, sliding_window,
                                       soft_cap, kv_scale, max_query_len)  # fmt: skip
        if why is None:
            sms, programs = _sm_count(query.device), num_seqs * num_kv_heads
            kernel = attention_ws.route(programs, max_kv_len, block_size, sms)
            try:
                if kernel == "persistent":
                    return attention_ws_persistent.decode(query, key_cache, value_cache,
                                                          block_tables, seq_lens, c["s_scale"],
                                                          out)  # fmt: skip
                if kernel == "ws":
                    splits = attention_ws.num_splits(programs, max_kv_len, block_size, sms)
                    ws_args = (query, key_cache, value_cache, block_tables, seq_lens,
                               query_start_loc)  # fmt: skip
                    return attention_ws.decode(*ws_args, c["s_scale"], out, splits)
            except CompilationError as e:  # this Triton's Gluon cannot build it: keep ours
                attention_ws.BROKEN = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
                logger.warning(
                    "decode attention: the warp-specialized kernel did not build (%s); the "
                    "Triton kernel runs instead",
                    attention_ws.BROKEN,
                )
    cfg = config or decode_config(
        head_dim, query.dtype, query.device, kv_fp8, num_seqs * num_kv_heads, max_kv_len
    )
    # Rows: the group's heads times up to max_query_len tokens (1 without the hint), at least the
    # 16 rows tl.dot needs.
    q_tokens = min(max_query_len or 1, DECODE_MAX_QUERY_LEN)
    block_m = max(16, triton.next_power_of_2(group * q_tokens))
    splits = decode_splits(num_seqs, num_kv_heads, block_size, block_tables.shape[1], cfg,
                           query.device, max_seq_len)  # fmt: skip
    q = query if query.stride(2) == 1 else query.contiguous()
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    if splits > 1:
        part_out = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32,
                               device=query.device)  # fmt: skip
        part_lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32,
                               device=query.device)  # fmt: skip
    else:
        part_out = part_lse = out  # never touched: SPLIT is off
    min_tiles = -(-(cfg.min_split_tokens or 1) // cfg.block_n)
    _decode_kernel[(num_kv_heads, num_seqs, splits)](
        q, raw(key_cache), raw(value_cache), out, part_out, part_lse, bt, seq_lens,
        query_start_loc, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), bt.stride(0), num_tokens,
        num_heads, head_dim, c["s_scale"], c["cap_log2"], c["out_scale"],
        int(sliding_window or 0), group, block_m // group, splits, min_tiles, IS_FP8=c["fp8_mode"],
        SOFT_CAP=c["soft_cap"], DOT_DTYPE=c["dot_dtype"], Q_SCALED=c["q_scaled"],
        INPUT_PRECISION=c["input_precision"], INTERPRET=interpreting(), EVEN_D=c["even_d"],
        SPLIT=splits > 1, PAGE_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM_P2=c["head_dim_p2"], EARLY_META=EARLY_META, EARLY_TRIGGER=EARLY_TRIGGER,
        FP8_PAIRS=cfg.fp8_pairs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **c["codec"],
        **pdl_args(query.device, "attention"),
    )  # fmt: skip
    if splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, seq_lens, query_start_loc, out.stride(0), out.stride(1),
            num_heads, head_dim, splits, min_tiles, int(sliding_window or 0), block_m // group,
            c["out_scale"], INTERPRET=interpreting(), EVEN_D=c["even_d"], BLOCK_N=cfg.block_n,
            SPLITS_P2=triton.next_power_of_2(splits), HEAD_DIM_P2=c["head_dim_p2"],
            EARLY_META=EARLY_META, EARLY_TRIGGER=EARLY_TRIGGER, num_warps=4,
            **pdl_args(query.device, "attention"),
        )  # fmt: skip
    return out
