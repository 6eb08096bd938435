"""Paged attention for one layer: write the new K/V into the cache (fused with the rotary embedding
when the layer is given one), then attend over it."""

from __future__ import annotations

import torch
from torch import nn

from engine.batch import ForwardBatch
from engine.layers.rotary import RotaryEmbedding
from hal.backend import Backend


class Attention(nn.Module):
    """Causal attention of this rank's heads over its paged KV cache (prefill and decode alike)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: Backend,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        kv_scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads: {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
            )
        self.backend = backend
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        self.kv_scale = kv_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output [num_tokens, num_heads * head_dim]. With `rotary`, query and key are
        rotated by `positions` (default batch.positions) in the same backend op that writes the
        cache (one launch on a fused backend); without, they arrive rotated."""
        # query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens, num_kv_heads, head_dim]
        # kv_cache: K and V [num_blocks, block_size, num_kv_heads, head_dim]
        key_cache, value_cache = kv_cache
        if rotary is not None:
            positions = batch.positions if positions is None else positions
            query, _ = rotary.forward_write_kv(
                positions, query, key, value, key_cache, value_cache, batch.slot_mapping,
                self.kv_scale,
            )  # fmt: skip
        else:
            self.backend.write_kv(
                key, value, key_cache, value_cache, batch.slot_mapping, kv_scale=self.kv_scale
            )
        return self.attend(query, batch, kv_cache)

    def attend(
        self, query: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Attention of `query` (rotated, [num_tokens, num_heads, head_dim]) over the cache, whose
        new tokens' K/V are already written: [num_tokens, num_heads * head_dim]."""
        key_cache, value_cache = kv_cache
        out = self.backend.attention(
            query,
            key_cache,
            value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            self.scale,
            sliding_window=self.sliding_window,
            soft_cap=self.soft_cap,
            kv_scale=self.kv_scale,
            max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len,
        )
        return out.reshape(query.shape[0], self.num_heads * self.head_dim)
