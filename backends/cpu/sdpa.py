"""Batched paged attention for the CPU engine: one padded gather and one SDPA call per step.

Same contract and math as `attention.paged_attention` (the oracle it is tested against), but all
sequences at once: KV is gathered through the block tables into [num_seqs, max_seq_len] with a
mask for causality, the window and padding, then torch's scaled_dot_product_attention (its CPU
flash kernel) runs over the batch. Soft-capping needs the scores, so it takes the explicit path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.cpu.attention import check_inputs
from backends.cpu.kv_cache import decode_kv
from backends.cpu.quant import compute_dtype


@dataclass
class _Plan:
    """What one step's metadata gives every layer: padded query rows, the mask, the KV gather.
    Keyed by the metadata's values (copies), not its tensors' identity: the engine refills the
    same host buffers in place through numpy, which torch's version counters do not see."""

    key: tuple
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    block_tables: torch.Tensor
    rows: torch.Tensor  # [num_seqs, max_q]: the token row of each padded query
    valid_q: torch.Tensor  # [num_seqs, max_q]
    out_rows: torch.Tensor  # rows[valid_q]
    mask: torch.Tensor | None  # [num_seqs, 1, max_q, max_kv]; None: nothing is masked
    tables: torch.Tensor  # int64 block ids to gather, num_seqs * num_blocks
    max_kv: int
    # Every sequence has max_q queries, in token order (decode steps, equal prefills): the
    # padded rows are the tokens themselves, so no gather of queries or scatter of outputs.
    dense_rows: bool

    def matches(self, key, seq_lens, query_start_loc, block_tables) -> bool:
        return (
            key == self.key
            and torch.equal(seq_lens, self.seq_lens)
            and torch.equal(query_start_loc, self.query_start_loc)
            and torch.equal(block_tables, self.block_tables)
        )


_last_plan: _Plan | None = None  # the engine runs one step's layers back to back


def _plan(block_tables, seq_lens, query_start_loc, num_tokens, block_size, sliding_window):
    global _last_plan
    device = block_tables.device
    key = (num_tokens, block_size, sliding_window, device, tuple(block_tables.shape),
           seq_lens.dtype, query_start_loc.dtype, block_tables.dtype)  # fmt: skip
    plan = _last_plan
    if plan is not None and plan.matches(key, seq_lens, query_start_loc, block_tables):
        return plan
    qsl = query_start_loc.to(device=device, dtype=torch.long)
    q_lens = qsl[1:] - qsl[:-1]  # [num_seqs]
    lens = seq_lens.to(device=device, dtype=torch.long)
    if bool((lens < q_lens).any()) or int(qsl[0]) != 0 or int(qsl[-1]) > num_tokens:
        raise ValueError(
            f"query_start_loc / seq_lens inconsistent: starts {qsl.tolist()}, seq_lens "
            f"{lens.tolist()}, num_tokens {num_tokens}"
        )
    num_seqs = lens.shape[0]
    if num_seqs == 0 or int(qsl[-1]) == 0:
        return None
    max_q, max_kv = int(q_lens.max()), int(lens.max())

    # Pad queries to [num_seqs, max_q]: row j of sequence s is token qsl[s] + j when j < q_len.
    j = torch.arange(max_q, device=device)
    valid_q = j[None, :] < q_lens[:, None]  # [num_seqs, max_q]
    rows = (qsl[:-1, None] + j[None, :]).clamp(max=max(int(qsl[-1]) - 1, 0))

    # Query j sits at position lens - q_len + j; it sees k <= p (and p - k < window).
    q_pos = (lens - q_lens)[:, None] + j[None, :]  # [num_seqs, max_q]
    k_pos = torch.arange(max_kv, device=device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [num_seqs, max_q, max_kv]
    if sliding_window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[None, None, :]) < sliding_window
    # Padding rows see key 0 only so softmax stays finite; they are dropped below.
    allowed |= (~valid_q)[:, :, None] & (k_pos == 0)[None, None, :]
    num_blocks = -(-max_kv // block_size)
    tables = block_tables[:, :num_blocks].reshape(-1).long()
    dense_rows = num_seqs * max_q == num_tokens and bool(valid_q.all())
    mask = None if bool(allowed.all()) else allowed[:, None]  # e.g. batch-1 decode
    _last_plan = _Plan(
        key, seq_lens.clone(), query_start_loc.clone(), block_tables.clone(), rows, valid_q,
        rows[valid_q], mask, tables, max_kv, dense_rows,
    )  # fmt: skip
    return _last_plan


def _gather(cache: torch.Tensor, plan: _Plan, kv_scale, dtype):
    # cache: [num_blocks, block_size, kv_heads, head_dim] -> [num_seqs, max_len, kv_heads, dim]
    # index_select on the block axis is a plain row gather (much cheaper than advanced indexing).
    x = cache.index_select(0, plan.tables)  # [num_seqs * num_blocks, block_size, heads, dim]
    x = x.reshape(plan.rows.shape[0], -1, *x.shape[2:])[:, : plan.max_kv]
    return decode_kv(x, kv_scale, dtype)


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
    """The `Backend.attention` contract, batched. Returns [num_tokens, num_heads, head_dim]."""
    check_inputs(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sliding_window, soft_cap,
    )  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    plan = _plan(block_tables, seq_lens, query_start_loc, num_tokens, key_cache.shape[1],
                 sliding_window)  # fmt: skip
    # SDPA's CPU kernels accumulate bf16/fp16 in fp32 internally, so the inputs stay in their own
    # dtype (the reference upcasts first; the difference is within the dtype's tolerance).
    # The soft-cap path computes the scores explicitly, in fp32.
    cd = compute_dtype(query.dtype) if soft_cap is not None else query.dtype
    if plan is None:
        return torch.zeros_like(query)
    num_seqs = plan.rows.shape[0]
    if plan.dense_rows:  # queries already [num_seqs, max_q] in token order
        q = query.to(cd).reshape(num_seqs, -1, num_heads, head_dim)
    else:
        q = query.to(cd)[plan.rows]  # [num_seqs, max_q, num_heads, head_dim]
    k = _gather(key_cache, plan, kv_scale, cd).transpose(1, 2)
    v = _gather(value_cache, plan, kv_scale, cd).transpose(1, 2)
    qh = q.transpose(1, 2)  # [num_seqs, num_heads, max_q, head_dim]
    mask = plan.mask
    if soft_cap is None:
        o = F.scaled_dot_product_attention(
            qh, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads
        )
    else:
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = scale * (qh @ k.transpose(-1, -2))
        scores = soft_cap * torch.tanh(scores / soft_cap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v
    o = o.transpose(1, 2)  # [num_seqs, max_q, num_heads, head_dim]
    if plan.dense_rows:
        return o.reshape(num_tokens, num_heads, head_dim).to(query.dtype)
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=cd, device=query.device)
    out[plan.out_rows] = o[plan.valid_q]
    return out.to(query.dtype)
