"""Bit packing of quantized checkpoints: unpack b-bit codes from int32 words along either dim, and
pack 4-bit codes into the HAL's canonical int4 layout (int32 [K / 8, N], row 8r + i at bits 4i).
"""

from __future__ import annotations

import torch

# AWQ's GEMM packing: nibble j of a word holds column AWQ_ORDER[j] of its group of 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None):
    """int32 words -> uint8 codes with `dim` widened 32 / bits times.

    Element i of each word's group sits at bits `bits * i`; with `order`, slot j holds element
    order[j] (AWQ). Arithmetic shift then mask reads the right field even from negative words.
    """
    if words.dtype != torch.int32:
        raise ValueError(f"words: dtype {words.dtype}, expected torch.int32")
    per_word = 32 // bits
    mask = (1 << bits) - 1
    fields = [(words >> (bits * j)) & mask for j in range(per_word)]  # slot j
    if order is not None:
        inverse = [order.index(i) for i in range(per_word)]
        fields = [fields[inverse[i]] for i in range(per_word)]  # element i
    dim = dim % words.dim()
    stacked = torch.stack(fields, dim=dim + 1)  # [..., words along dim, per_word, ...]
    shape = list(words.shape)
    shape[dim] *= per_word
    return stacked.reshape(shape).to(torch.uint8)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, N] in 0..15 -> canonical int32 [K / 8, N]; row 8r + i at bits 4i of word r."""
    k, n = codes.shape
    if k % 8:
        raise ValueError(f"codes: K={k} rows is not a multiple of 8 (8 nibbles per word)")
    c = codes.to(torch.int64).reshape(k // 8, 8, n)
    words = torch.zeros(k // 8, n, dtype=torch.int64, device=codes.device)
    for i in range(8):
        words |= c[:, i, :] << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
