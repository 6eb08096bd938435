"""Paged, varlen, causal attention on CUDA: FlashAttention-2 when installed, else torch SDPA.

Code in this file may assume CUDA. Both paths implement `hal.backend.Backend.attention`; the
reference is `backends.cpu.attention.paged_attention`. A decode batch (one query token per
sequence) runs without host synchronisation, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from backends.cpu.attention import check_inputs as reference_checks
from hal.errors import HalError

logger = logging.getLogger(__name__)

# The SDPA decode path gathers each token's whole block-table row of K and V; it works through
# the batch in chunks of at most this many gathered elements per tensor (256 MiB of bf16).
GATHER_BUDGET = 1 << 27
# Upstream FlashAttention-2 reads a paged cache only when block_size is a multiple of 256
# (flash_api.cpp: "Paged KV cache block size must be divisible by 256").
FLASH_PAGED_BLOCK_MULTIPLE = 256
FLASH_MAX_HEAD_DIM = 256


def check_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    """The reference's shape checks (no device -> host synchronisation) plus num_seqs >= 1."""
    if seq_lens.dim() != 1 or seq_lens.shape[0] < 1:
        raise ValueError(
            f"seq_lens: expected [num_seqs] with num_seqs >= 1, got {tuple(seq_lens.shape)}"
        )
    reference_checks(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sliding_window, soft_cap,
    )  # fmt: skip


def _decode_kv(x: torch.Tensor, kv_scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    # Cache values -> real values in `dtype`: an FP8 cache holds x / kv_scale (reference decode_kv).
    if x.dtype == dtype:
        return x
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2):
        scale = 1.0 if kv_scale is None else float(kv_scale)
        return (x.to(torch.float32) * scale).to(dtype)
    return x.to(dtype)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    """softmax(scale * q k^T [soft-capped], masked) v over the last two dims.

    q: [..., num_kv_heads, rows, head_dim]; k, v: [..., num_kv_heads, keys, head_dim];
    mask: bool, broadcastable to [..., num_kv_heads, rows, keys] (True = attend).
    """
    if soft_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA has no soft-cap: the explicit softmax, in fp32.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = soft_cap * torch.tanh(scores / soft_cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def _token_seq_and_position(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query token: its sequence, its position, and whether it is a real (non-padding) row.

    Token t of sequence s sits at p = seq_lens[s] - query_start_loc[s + 1] + t. All int64 [T].
    """
    qsl = query_start_loc.to(torch.int64)
    t = torch.arange(num_tokens, device=qsl.device)
    seq = torch.searchsorted(qsl[1:].contiguous(), t, right=True)
    is_real = seq < seq_lens.shape[0]
    seq = seq.clamp(max=seq_lens.shape[0] - 1)
    pos = seq_lens.to(torch.int64)[seq] - qsl[1:][seq] + t
    return seq, pos, is_real


def _sdpa_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    kv_scale: float | None,
) -> torch.Tensor:
    # Every query token gathers its sequence's whole block-table row: static shapes, no sync.
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    max_keys = block_tables.shape[1] * block_size
    seq, pos, is_real = _token_seq_and_position(query_start_loc, seq_lens, num_tokens)
    k_pos = torch.arange(max_keys, device=query.device)
    # mask: [T, 1, 1, L]; k <= p keeps keys of this sequence only (p < seq_lens[s]).
    mask = k_pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        mask &= (pos[:, None] - k_pos[None, :]) < sliding_window
    mask = mask[:, None, None, :]
    tables = block_tables.to(torch.int64)[seq]  # [T, max_blocks]
    out = torch.empty_like(query)
    chunk = max(1, GATHER_BUDGET // max(1, max_keys * num_kv_heads * head_dim))
    for a in range(0, num_tokens, chunk):
        b = min(num_tokens, a + chunk)
        # k, v: [c, max_blocks, block_size, Hkv, D] -> [c, Hkv, L, D]
        k = key_cache[tables[a:b]].flatten(1, 2).transpose(1, 2)
        v = value_cache[tables[a:b]].flatten(1, 2).transpose(1, 2)
        k = _decode_kv(k, kv_scale, query.dtype)
        v = _decode_kv(v, kv_scale, query.dtype)
        # GQA without repeating K/V: a KV head's `group` query heads are its query rows.
        q = query[a:b].reshape(b - a, num_kv_heads, group, head_dim)
        o = _attend(q, k, v, mask[a:b], scale, soft_cap)  # [c, Hkv, group, D]
        out[a:b] = o.reshape(b - a, num_heads, head_dim)
    return torch.where(
        is_real[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device)
    )


def _sdpa_per_sequence(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    kv_scale: float | None,
) -> torch.Tensor:
    # Prefill and mixed batches: one SDPA call per sequence on exactly its cached tokens. Reading
    # the lengths costs one device -> host sync, so this path cannot be captured in a graph.
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise HalError(
            "attention: sdpa handles a batch with several query tokens per sequence by syncing "
            "with the host, which CUDA graph capture forbids; capture decode steps only "
            "(one query token per sequence)"
        )
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    starts = [int(v) for v in query_start_loc.tolist()]
    lens = [int(v) for v in seq_lens.tolist()]
    if (
        starts[0] != 0
        or starts[-1] > num_tokens
        or any(b < a for a, b in zip(starts[:-1], starts[1:], strict=True))
    ):
        raise ValueError(
            f"query_start_loc: must start at 0, be non-decreasing and end <= num_tokens "
            f"{num_tokens}; got {starts}"
        )
    out = torch.zeros_like(query)
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        query_len = q_end - q_start
        if seq_len < query_len:
            raise ValueError(
                f"seq_lens[{s}]: {seq_len} is shorter than the sequence's {query_len} query tokens"
            )
        if query_len == 0:
            continue
        num_needed = -(-seq_len // block_size)
        if num_needed > block_tables.shape[1]:
            raise ValueError(
                f"block_tables: seq_len {seq_len} needs {num_needed} blocks of {block_size}, "
                f"the row has {block_tables.shape[1]}"
            )
        blocks = block_tables[s, :num_needed].to(torch.int64)
        # k, v: [seq_len, Hkv, D] -> [Hkv, seq_len, D]
        k = key_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        v = value_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        k = _decode_kv(k, kv_scale, query.dtype)
        v = _decode_kv(v, kv_scale, query.dtype)
        # q: [query_len, H, D] -> [Hkv, group * query_len, D], row g * query_len + j
        q = query[q_start:q_end].reshape(query_len, num_kv_heads, group, head_dim)
        q = q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * query_len, head_dim)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos  # [query_len, seq_len]
        if sliding_window is not None:
            mask &= (q_pos - k_pos) < sliding_window
        mask = mask.repeat(group, 1)  # [group * query_len, seq_len]
        o = _attend(q, k, v, mask, scale, soft_cap)  # [Hkv, group * query_len, D]
        o = o.reshape(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
        out[q_start:q_end] = o.reshape(query_len, num_heads, head_dim)
    return out


def sdpa_attention(
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
    """The attention contract on torch SDPA over the gathered paged KV. Padding rows are zeros.

    A batch with as many query tokens as sequences (decode) runs batched with no host sync
    (graph-capturable); any other batch runs one SDPA call per sequence.
    """
    check_inputs(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sliding_window, soft_cap,
    )  # fmt: skip
    args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, soft_cap, kv_scale)  # fmt: skip
    if query.shape[0] == seq_lens.shape[0]:
        return _sdpa_decode(*args)
    return _sdpa_per_sequence(*args)


# -- FlashAttention-2 ---------------------------------------------------------------------------
def flash_attn_input_reasons(
    query: torch.Tensor, key_cache: torch.Tensor, kv_scale: float | None
) -> list[str]:
    """Why flash_attn cannot take these particular inputs (empty: it can)."""
    reasons = []
    if query.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash_attn computes in float16 or bfloat16 only, query is {query.dtype}")
    if key_cache.dtype != query.dtype:
        reasons.append(
            f"flash_attn reads the KV cache in the query dtype, the cache is {key_cache.dtype}"
        )
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > FLASH_MAX_HEAD_DIM:
        reasons.append(
            f"flash_attn needs head_dim a multiple of 8 and <= {FLASH_MAX_HEAD_DIM}, got {head_dim}"
        )
    return reasons


def _gather_packed_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    total: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged KV of every sequence packed back to back: [total, Hkv, D] each.

    cu_seqlens_k: int32 [num_seqs + 1]; rows past cu_seqlens_k[-1] (when `total` is an upper bound)
    hold copies that the kernel never reads.
    """
    num_seqs, max_blocks = block_tables.shape
    block_size = key_cache.shape[1]
    cu = cu_seqlens_k.to(torch.int64)
    i = torch.arange(total, device=key_cache.device)
    seq = torch.searchsorted(cu[1:].contiguous(), i, right=True).clamp(max=num_seqs - 1)
    offset = (i - cu[seq]).clamp(0, max_blocks * block_size - 1)
    blocks = block_tables.to(torch.int64)[seq, offset // block_size]
    slots = blocks * block_size + offset % block_size  # [total]
    flat_k = key_cache.reshape(-1, *key_cache.shape[2:])
    flat_v = value_cache.reshape(-1, *value_cache.shape[2:])
    return flat_k[slots], flat_v[slots]


def flash_attn_attention(
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
    """The attention contract on flash_attn.flash_attn_varlen_func (flash-attn >= 2.6).

    Causal masks are bottom-right aligned (flash-attn >= 2.1), which is the contract's
    p = seq_len - query_len + j. A window w keeps keys with p - k < w: window_size=(w - 1, 0).
    The query length bound is exact for decode (1) and T - S + 1 otherwise (each sequence has at
    least one query token); the key length bound is the block-table width. Neither needs a sync.
    Rows past query_start_loc[-1] (padding) are left unwritten, unlike the reference's zeros.
    """
    from flash_attn import flash_attn_varlen_func  # imported when chosen, not at registration

    check_inputs(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sliding_window, soft_cap,
    )  # fmt: skip
    why = flash_attn_input_reasons(query, key_cache, kv_scale)
    if why:
        raise ValueError("; ".join(why))
    num_tokens = query.shape[0]
    num_seqs, max_blocks = block_tables.shape
    block_size = key_cache.shape[1]
    max_seqlen_q = 1 if num_tokens == num_seqs else num_tokens - num_seqs + 1
    max_seqlen_k = max_blocks * block_size
    cu_seqlens_q = query_start_loc.to(torch.int32)
    cu_seqlens_k = torch.zeros(num_seqs + 1, dtype=torch.int32, device=query.device)
    cu_seqlens_k[1:] = torch.cumsum(seq_lens.to(torch.int32), dim=0)
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    kwargs = dict(softmax_scale=scale, causal=True, window_size=window, softcap=soft_cap or 0.0)
    if block_size % FLASH_PAGED_BLOCK_MULTIPLE == 0:
        return flash_attn_varlen_func(
            query, key_cache, value_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, block_table=block_tables.to(torch.int32), **kwargs,
        )  # fmt: skip
    # Smaller blocks: pack each sequence's KV contiguously. The exact total needs one sync, so a
    # graph capture packs into the static upper bound num_seqs * max_seqlen_k instead.
    if torch.cuda.is_current_stream_capturing():
        total = num_seqs * max_seqlen_k
    else:
        total = int(cu_seqlens_k[-1])
    k, v = _gather_packed_kv(key_cache, value_cache, block_tables, cu_seqlens_k, total)
    return flash_attn_varlen_func(
        query, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs
    )
