"""The CPU engine's "c" attention: decode-like batches (each sequence's last 1 to 8 tokens: decode
steps, speculative steps) on fp32 paged caches through the C kernel
(`ckernels.load_attention_kernel`, `csrc/decode_attention.c`), reading K and V straight from the
pages; every other call (prefill or mixed batches, bf16 / fp16 / FP8, no kernel here) goes to the
batched SDPA path (`sdpa.sdpa_attention`). Both are tested against the reference loop
(`attention.paged_attention`)."""

from __future__ import annotations

import torch

from backends.cpu.attention import check_inputs
from backends.cpu.ckernels import ATTENTION_MAX_QUERY, load_attention_kernel
from backends.cpu.sdpa import sdpa_attention


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def c_attention(
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
    kernel=None,
) -> torch.Tensor:
    """The `Backend.attention` contract (`kernel`: the loaded kernel, else looked up).
    Returns [num_tokens, num_heads, head_dim]."""
    kernel = kernel or load_attention_kernel()[0]
    check_inputs(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sliding_window, soft_cap,
    )  # fmt: skip
    if (
        kernel is not None
        # a few tokens a sequence: maybe decode or a speculative step (the kernel checks)
        and query.shape[0] <= ATTENTION_MAX_QUERY * seq_lens.shape[0]
        and query.dtype == torch.float32
        and key_cache.dtype == torch.float32
        and value_cache.dtype == torch.float32
        and query.is_contiguous()
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
        and query.is_cpu
        and key_cache.is_cpu
        and value_cache.is_cpu
        and block_tables.stride(-1) == 1
    ):
        # an int32 table keeps its row stride (the kernel takes it); others are converted
        tables = block_tables if block_tables.dtype == torch.int32 else _int32(block_tables)
        out = kernel.run(
            query, key_cache, value_cache, tables, _int32(seq_lens), _int32(query_start_loc),
            scale, sliding_window, soft_cap,
        )  # fmt: skip
        if out is not None:
            return out
    return sdpa_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
        sliding_window, soft_cap, kv_scale,
    )  # fmt: skip
