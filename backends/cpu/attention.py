"""Reference paged, varlen, causal attention: one op for prefill, chunked prefill and decode.

Written for clarity: each sequence's K/V is gathered from its block table, then an explicit
softmax(scale * Q K^T (soft-capped) + mask) V per head, accumulated in fp32 (fp64 stays fp64).
"""

from __future__ import annotations

import torch

from backends.cpu.kv_cache import gather_kv
from backends.cpu.quant import compute_dtype


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
    """Shape and argument checks of the attention contract; they read no tensor values, so no
    device -> host synchronisation (GPU backends and graph capture use them too)."""
    if query.dim() != 3:
        raise ValueError(
            f"query: expected [num_tokens, num_heads, head_dim], got {tuple(query.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache/value_cache: expected equal [num_blocks, block_size, num_kv_heads, "
            f"head_dim] shapes, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
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
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc: shape {tuple(query_start_loc.shape)}, expected [num_seqs + 1] with "
            f"num_seqs = len(seq_lens) = {num_seqs}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables: shape {tuple(block_tables.shape)}, expected [{num_seqs}, max_blocks]"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: {sliding_window} must be >= 1 or None")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap: {soft_cap} must be > 0 or None")


def attention_mask(
    query_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """bool [query_len, seq_len]: query j (position p = seq_len - query_len + j) sees KV k iff
    k <= p and, with a window w, p - k < w."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= (q_pos - k_pos) < sliding_window
    return allowed


def paged_attention(
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
    """The `Backend.attention` contract. Returns [num_tokens, num_heads, head_dim] in query's dtype.

    Rows past query_start_loc[-1] (padding for a captured batch size) are returned as zeros.
    """
    check_inputs(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sliding_window, soft_cap,
    )  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    group = num_heads // key_cache.shape[2]  # query heads per KV head
    starts = [int(v) for v in query_start_loc.tolist()]
    lens = [int(v) for v in seq_lens.tolist()]
    steps = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if starts[0] != 0 or starts[-1] > num_tokens or any(d < 0 for d in steps):
        raise ValueError(
            f"query_start_loc: must start at 0, be non-decreasing and end <= num_tokens "
            f"{num_tokens}; got {starts}"
        )
    cd = compute_dtype(query.dtype)
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=cd, device=query.device)
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        query_len = q_end - q_start
        if seq_len < query_len:
            raise ValueError(
                f"seq_lens[{s}]: {seq_len} is shorter than the sequence's {query_len} query tokens"
            )
        if query_len == 0:
            continue
        # k, v: [seq_len, num_kv_heads, head_dim] -> [seq_len, num_heads, head_dim] (GQA)
        k = gather_kv(key_cache, block_tables[s], seq_len, kv_scale, cd).to(query.device)
        v = gather_kv(value_cache, block_tables[s], seq_len, kv_scale, cd).to(query.device)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        q = query[q_start:q_end].to(cd)  # [query_len, num_heads, head_dim]
        scores = scale * torch.einsum("qhd,khd->hqk", q, k)  # [num_heads, query_len, seq_len]
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        mask = attention_mask(query_len, seq_len, sliding_window, query.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out.to(query.dtype)
