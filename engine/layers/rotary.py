"""Rotary position embedding: the fp32 cos/sin cache, built once, applied by the backend (alone,
or fused with the paged KV-cache write of the rotated key)."""

from __future__ import annotations

import torch
from torch import nn

from hal.backend import Backend
from hal.rope import build_cos_sin_cache


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position; one instance is shared by every layer of a model.

    `scaling` is the Hugging Face rope scaling dict (rope_type default, linear or llama3) or None.
    """

    def __init__(
        self,
        rotary_dim: int,
        max_position: int,
        base: float,
        backend: Backend,
        scaling: dict | None = None,
        is_neox: bool = True,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.is_neox = is_neox
        # The cache is plain math on positions (no kernel), so the reference builder serves all.
        cache = build_cos_sin_cache(rotary_dim, max_position, base, scaling)
        # cos_sin_cache: fp32 [max_position, rotary_dim]
        self.register_buffer("cos_sin_cache", cache.to(backend.device), persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; query: [num_tokens, heads, head_dim]; key: [.., kv_heads, ..]
        return self.backend.rotary(positions, query, key, self.cos_sin_cache, self.is_neox)

    def forward_write_kv(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, then the rotated key and `value` written into the paged cache (slot -1
        skips), as one backend op (`Backend.rotary_write_kv`); returns the rotated (query, key)."""
        # value: [num_tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, ..]
        return self.backend.rotary_write_kv(
            positions,
            query,
            key,
            value,
            self.cos_sin_cache,
            self.is_neox,
            key_cache,
            value_cache,
            slot_mapping,
            kv_scale,
        )
