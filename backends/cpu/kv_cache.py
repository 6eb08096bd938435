"""Reference paged KV-cache ops: write new tokens, copy blocks (copy-on-write), swap, gather.

Cache layout per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim], in the
model dtype or an FP8 dtype holding fp8(x / kv_scale) (saturating at the format's max).
"""

from __future__ import annotations

import torch

from backends.cpu.quant import compute_dtype, is_fp8, to_fp8


def _check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4:
        raise ValueError(
            "key_cache: expected [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(key_cache.shape)}"
        )
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(
            f"value_cache: {tuple(value_cache.shape)} {value_cache.dtype} differs from key_cache "
            f"{tuple(key_cache.shape)} {key_cache.dtype}"
        )


def _check_kv_scale(kv_scale: float | None) -> float:
    scale = 1.0 if kv_scale is None else float(kv_scale)
    if not scale > 0:
        raise ValueError(f"kv_scale: {kv_scale} must be > 0")
    return scale


def encode_kv(x: torch.Tensor, cache_dtype: torch.dtype, kv_scale: float | None) -> torch.Tensor:
    """Values as the cache stores them: fp8(x / kv_scale) for an FP8 cache, else x cast."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    scale = _check_kv_scale(kv_scale)
    return to_fp8(x.to(compute_dtype(x.dtype)) / scale, cache_dtype)


def decode_kv(
    stored: torch.Tensor, kv_scale: float | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Cache contents back to real values in `dtype`: stored * kv_scale for FP8, else a cast."""
    if not is_fp8(stored.dtype):
        return stored.to(dtype)
    return stored.to(dtype) * _check_kv_scale(kv_scale)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
) -> None:
    """Scatter tokens into the paged cache in place; slot = block * block_size + offset, -1 skips.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: int [num_tokens]. With an FP8
    cache, stored = fp8(x / kv_scale) (kv_scale defaults to 1.0); otherwise kv_scale is unused.
    """
    _check_cache_pair(key_cache, value_cache)
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    expected = (slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1, num_kv_heads, head_dim)
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)}, expected [num_tokens, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}], num_tokens = len(slot_mapping)"
            )
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    if bool((slots < -1).any()) or bool((slots >= num_blocks * block_size).any()):
        raise ValueError(
            f"slot_mapping: slots must be -1 (skip) or lie in 0..{num_blocks * block_size - 1}"
        )
    live = slots[valid]
    if live.unique().numel() != live.numel():
        raise ValueError("slot_mapping: a slot appears twice; each token needs its own slot")
    blocks, offsets = live // block_size, live % block_size
    key_cache[blocks, offsets] = encode_kv(key[valid], key_cache.dtype, kv_scale)
    value_cache[blocks, offsets] = encode_kv(value[valid], value_cache.dtype, kv_scale)


def _check_block_pairs(
    src: torch.Tensor, dst: torch.Tensor, num_src: int, num_dst: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if src.dim() != 1 or src.shape != dst.shape:
        raise ValueError(
            f"src/dst: expected two 1-D tensors of equal length, got {tuple(src.shape)} and "
            f"{tuple(dst.shape)}"
        )
    s, d = src.to(torch.int64), dst.to(torch.int64)
    if s.numel() and (s.min() < 0 or s.max() >= num_src):
        raise ValueError(f"src: block ids must lie in 0..{num_src - 1}")
    if d.numel() and (d.min() < 0 or d.max() >= num_dst):
        raise ValueError(f"dst: block ids must lie in 0..{num_dst - 1}")
    if d.unique().numel() != d.numel():
        raise ValueError("dst: a destination block appears twice")
    return s, d


def copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """For each cache [num_blocks, ...], copy block src[i] to dst[i] in place.

    All sources are read before any destination is written (a gather, then a scatter).
    """
    for i, cache in enumerate(caches):
        if cache.dim() < 2:
            raise ValueError(f"caches[{i}]: expected [num_blocks, ...], got {tuple(cache.shape)}")
        s, d = _check_block_pairs(src, dst, cache.shape[0], cache.shape[0])
        cache[d.to(cache.device)] = cache[s.to(cache.device)].clone()


def swap_blocks(
    src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Copy blocks src[i] of `src_cache` to blocks dst[i] of `dst_cache`, across devices
    (swap out: GPU -> CPU, swap in: CPU -> GPU). Both caches share the per-block shape and dtype."""
    if src_cache.shape[1:] != dst_cache.shape[1:] or src_cache.dtype != dst_cache.dtype:
        raise ValueError(
            f"dst_cache: per-block shape {tuple(dst_cache.shape[1:])} {dst_cache.dtype} differs "
            f"from src_cache {tuple(src_cache.shape[1:])} {src_cache.dtype}"
        )
    s, d = _check_block_pairs(src, dst, src_cache.shape[0], dst_cache.shape[0])
    blocks = src_cache[s.to(src_cache.device)].to(dst_cache.device)
    dst_cache[d.to(dst_cache.device)] = blocks


def gather_kv(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    kv_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One sequence's first `seq_len` cached tokens, decoded: [seq_len, num_kv_heads, head_dim].

    block_table: int [max_blocks]; token t lives in block block_table[t // block_size] at offset
    t % block_size.
    """
    num_blocks, block_size = cache.shape[:2]
    num_needed = -(-seq_len // block_size)
    if num_needed > block_table.shape[0]:
        raise ValueError(
            f"block_tables: seq_len {seq_len} needs {num_needed} blocks of {block_size}, "
            f"the row has {block_table.shape[0]}"
        )
    blocks = block_table[:num_needed].to(torch.int64)
    if num_needed and (blocks.min() < 0 or blocks.max() >= num_blocks):
        raise ValueError(f"block_tables: block ids must lie in 0..{num_blocks - 1}")
    tokens = cache[blocks.to(cache.device)].flatten(0, 1)[:seq_len]
    return decode_kv(tokens, kv_scale, dtype)
