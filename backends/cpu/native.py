"""The CPU engine's fast paths: GEMM in the input dtype (oneDNN; AMX/AVX-512 bf16) and KV-cache
writes/copies as single index_copy_ calls.

Same contracts as `linear.linear` and `kv_cache.write_kv`/`copy_blocks` (the oracles they are tested
against; the KV ops are bitwise equal). For bf16/fp16 inputs torch's
CPU kernels accumulate in fp32 internally and round the result once, so the error bound is the
dtype's unit roundoff on the output, as for the reference; only the summation order differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.cpu.kv_cache import _check_block_pairs, encode_kv
from backends.cpu.linear import _check_bias, _check_gemm


def native_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ weight.T + bias in x's dtype. x: [..., K]; weight: [N, K] (same dtype as x)."""
    _check_gemm(x, weight, "x", "weight")
    _check_bias(bias, weight.shape[0])
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def native_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
) -> None:
    """`Backend.write_kv` as one index_copy_ per cache over the flattened slots (bitwise equal
    to `kv_cache.write_kv`, which checks the same inputs and is the oracle)."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if key.shape != value.shape or key.shape != (slot_mapping.shape[0], num_kv_heads, head_dim):
        raise ValueError(
            f"key/value: shapes {tuple(key.shape)}/{tuple(value.shape)}, expected "
            f"[num_tokens={slot_mapping.shape[0]}, {num_kv_heads}, {head_dim}]"
        )
    slots = slot_mapping.to(torch.int64)
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= num_blocks * block_size):
        raise ValueError(
            f"slot_mapping: slots must be -1 (skip) or lie in 0..{num_blocks * block_size - 1}"
        )
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    if slots.unique().numel() != slots.numel():
        raise ValueError("slot_mapping: a slot appears twice; each token needs its own slot")
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    for cache, x in ((key_cache, key), (value_cache, value)):
        stored = encode_kv(x, cache.dtype, kv_scale)
        if cache.element_size() == 1:  # index_copy_ has no fp8 kernel: move the bytes
            cache, stored = cache.view(torch.uint8), stored.view(torch.uint8)
        cache.view(flat).index_copy_(0, slots, stored)


def native_copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """`Backend.copy_blocks`: every source block is read before any destination is written."""
    for cache in caches:
        s, d = _check_block_pairs(src, dst, cache.shape[0], cache.shape[0])
        if s.numel():
            flat = cache.view(torch.uint8) if cache.element_size() == 1 else cache
            flat.index_copy_(0, d, flat.index_select(0, s))
