"""Paged KV-cache writes and block copies on CUDA, capture-safe (no host synchronisation).

Code in this file may assume CUDA. The stored values are the reference's (`encode_kv` with a
true division), so a write matches `backends.cpu.kv_cache.write_kv` bit for bit.
"""

from __future__ import annotations

import torch

from backends.cuda.quant import encode_kv


def _raw(t: torch.Tensor) -> torch.Tensor:
    # FP8 moves as raw bytes: torch.where and index_copy_ have no float8 kernels on CUDA.
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def _check_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    # Shape and dtype checks only: value checks (slot range) would need a device -> host sync.
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache/value_cache: expected two [num_blocks, block_size, num_kv_heads, head_dim] "
            f"tensors of one shape, got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"value_cache: dtype {value_cache.dtype} differs from {key_cache.dtype}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError(
            "key_cache/value_cache: must be contiguous (writes go through a flat view)"
        )
    if slot_mapping.dim() != 1 or slot_mapping.dtype.is_floating_point:
        raise ValueError(
            f"slot_mapping: expected an integer [num_tokens] tensor, got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    expected = (slot_mapping.shape[0], key_cache.shape[2], key_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)}, expected [num_tokens, num_kv_heads, head_dim] = "
                f"{list(expected)}"
            )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
) -> None:
    """Scatter tokens into the paged cache in place; slot -1 skips the token (padding).

    key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim]; slot_mapping: int [num_tokens]. Each valid slot must be unique.
    """
    _check_write(key, value, key_cache, value_cache, slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    slots = slot_mapping.to(device=key_cache.device, dtype=torch.int64)
    valid = slots >= 0  # [num_tokens]
    # Padding tokens cannot be dropped without a sync (boolean indexing), so each one rewrites a
    # slot with the value it gets anyway: the first valid token's slot and value (duplicate
    # indices carrying identical values are order-independent), or, in an all-padding batch,
    # slot 0 with its own current contents.
    # Index with a 1-element tensor: a 0-dim index would be read back to the host as an int.
    first = torch.argmax(valid.to(torch.int32)).reshape(1)  # 0 when nothing is valid
    any_valid = valid.any()
    target = torch.where(valid, slots, torch.where(any_valid, slots[first], 0))
    flat_k = key_cache.view(-1, *key_cache.shape[2:])  # [num_slots, num_kv_heads, head_dim]
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    for src, flat in ((key, flat_k), (value, flat_v)):
        stored = encode_kv(src, flat.dtype, kv_scale)  # [num_tokens, num_kv_heads, head_dim]
        stored, flat = _raw(stored), _raw(flat)
        fill = torch.where(any_valid, stored[first], flat[:1])  # [1, num_kv_heads, head_dim]
        rows = torch.where(valid[:, None, None], stored, fill)
        flat.index_copy_(0, target, rows)


def copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """For each cache [num_blocks, ...], copy block src[i] to dst[i] in place (copy-on-write).

    All sources are read before any destination is written. Block ids are range-checked when
    they arrive on the host (the scheduler's usual case), where that costs no device sync.
    """
    if src.dim() != 1 or src.shape != dst.shape:
        raise ValueError(
            f"src/dst: expected two 1-D tensors of equal length, got {tuple(src.shape)} and "
            f"{tuple(dst.shape)}"
        )
    for i, cache in enumerate(caches):
        if cache.dim() < 2:
            raise ValueError(f"caches[{i}]: expected [num_blocks, ...], got {tuple(cache.shape)}")
        num_blocks = cache.shape[0]
        for name, ids in (("src", src), ("dst", dst)):
            if ids.device.type == "cpu" and ids.numel():
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= num_blocks:
                    raise ValueError(f"{name}: block ids must lie in 0..{num_blocks - 1}")
        s = src.to(device=cache.device, dtype=torch.int64)
        d = dst.to(device=cache.device, dtype=torch.int64)
        raw = _raw(cache)
        raw.index_copy_(0, d, raw.index_select(0, s))
