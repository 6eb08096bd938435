"""Triton paged, varlen, causal attention: one kernel for prefill, chunked prefill and decode.

Math (`backends.cpu.attention.paged_attention`): query token j of sequence s (query_len q_s,
total KV length L_s) sits at position p = L_s - q_s + j and attends to KV positions k <= p (and
p - k < w with a sliding window w); head h reads KV head h // (num_heads / num_kv_heads).
Scores are scale * q.k, soft-capped as cap * tanh(score / cap) when asked; out = softmax(scores) V.
The kernel is FlashAttention-2's online softmax (Dao, 2023) over the paged cache, laid out like
vLLM's unified Triton attention: a program takes block_q query tokens of one sequence times the
group = num_heads / num_kv_heads query heads that share one KV head (BLOCK_M = block_q * group
rows), finds its sequence by a binary search over query_start_loc (no host sync, so decode can
be captured in a graph), and walks the block table BLOCK_N tokens at a time. Soft-cap, window,
group and lengths are runtime values (not specialized), so serving compiles few variants.
Scores and the softmax are fp32; bf16/fp16 inputs multiply in their dtype with fp32
accumulation, the probabilities rounded to that dtype before P @ V; fp32 inputs use IEEE fp32
dots (no TF32). An FP8 cache is decoded exactly and kv_scale folded into the score scale and the
output. Under TRITON_INTERPRET=1 every dot runs in fp32 (bf16 `tl.dot` is wrong in the
interpreter, Triton issue #11584). Rows past query_start_loc[-1] come back as zeros.
"""

from __future__ import annotations

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
    d_ok = offs_d < head_dim
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
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        block = tl.load(bt_row + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
        slot = block * stride_kc_block + (offs_n % block_size).to(tl.int64) * stride_kc_slot
        slot += kv_head.to(tl.int64) * stride_kc_head  # [BLOCK_N]
        kv_mask = n_ok[None, :] & d_ok[:, None]
        k = tl.load(key_cache_ptr + slot[None, :] + offs_d[:, None], mask=kv_mask, other=0)
        v = tl.load(value_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask.T, other=0)
        if IS_FP8:
            k = fp8_decode(k, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)
            v = fp8_decode(v, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF)
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * qk_scale  # [M, N]
        if soft_cap > 0:
            s = soft_cap * _tanh(s / soft_cap)
        visible = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        in_window = (q_pos[:, None] - offs_n[None, :]) < sliding_window
        visible = visible & ((sliding_window <= 0) | in_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc * (out_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    o_row = (q_start + q_tok).to(tl.int64) * stride_o_token + head.to(tl.int64) * stride_o_head
    tl.store(out_ptr + o_row[:, None] + offs_d[None, :],
             cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


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
           sliding_window, soft_cap, kv_scale) -> None:  # fmt: skip
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


def _blocks(
    num_tokens: int, num_seqs: int, group: int, head_dim_p2: int, fp32: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_M, block_q, BLOCK_N, num_stages). On a GPU a decode batch (one token per sequence)
    takes 16 rows, a batch with prefill 64 (32 with fp32 operands or head_dim > 128, whose tiles
    are twice as large); under the interpreter, where each program and each op cost Python time
    while numpy does the arithmetic, 128 x 512 tiles keep the number of steps small."""
    if interpreting():
        block_m = max(128, triton.next_power_of_2(group))
        return block_m, block_m // group, 512, 1
    big = fp32 or head_dim_p2 > 128
    block_m = 16 if num_tokens <= num_seqs else (32 if big else 64)
    block_m = max(block_m, triton.next_power_of_2(group))
    block_n = (16 if fp32 and head_dim_p2 > 128 else 32) if big else 64
    return block_m, block_m // group, block_n, 1 if big else 2


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
) -> torch.Tensor:
    """The `Backend.attention` contract: query [num_tokens, num_heads, head_dim], caches
    [num_blocks, block_size, num_kv_heads, head_dim], block_tables int [num_seqs, max_blocks],
    seq_lens int [num_seqs], query_start_loc int [num_seqs + 1]. Returns [num_tokens, num_heads,
    head_dim] in query's dtype."""
    _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
           sliding_window, soft_cap, kv_scale)  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or head_dim == 0:
        return out
    q = query if query.stride(2) == 1 else query.contiguous()
    is_fp8 = key_cache.dtype in FP8_CODECS
    kv = 1.0 if kv_scale is None or not is_fp8 else float(kv_scale)
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    fp32_dots = interpreting() or query.dtype == torch.float32
    block_m, block_q, block_n, num_stages = _blocks(
        num_tokens, num_seqs, group, head_dim_p2, query.dtype == torch.float32
    )
    # Each sequence's q-blocks start at query_start_loc[s] // block_q + s, so this many programs
    # cover every sequence without reading query_start_loc back to the host.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    dot_dtype = tl.float32 if fp32_dots else _TL_DTYPES[query.dtype]
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    _attention_kernel[grid](
        q, raw(key_cache), raw(value_cache), out, bt, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), key_cache.stride(0),
        key_cache.stride(1), key_cache.stride(2), bt.stride(0), num_seqs, head_dim, block_size,
        float(scale) * kv, kv, float(soft_cap or 0.0), int(sliding_window or 0), group, block_q,
        IS_FP8=is_fp8, DOT_DTYPE=dot_dtype, INPUT_PRECISION="ieee" if fp32_dots else "tf32",
        INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM_P2=head_dim_p2, num_warps=4, num_stages=num_stages,
        **fp8_codec(key_cache.dtype if is_fp8 else torch.float8_e4m3fn),
    )  # fmt: skip
    return out
