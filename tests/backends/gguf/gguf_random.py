"""Random valid GGUF blocks for the tests: random bytes with every fp16 field made finite."""

from __future__ import annotations

import numpy as np
import torch

from backends.cpu.gguf import block_type

# Byte offsets of each type's fp16 fields within a block.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
QTYPES = tuple(FP16_FIELDS)


def random_blocks(qtype: str, rows: int, cols: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """uint8 [rows, bytes_per_row]: uniform random bytes, fp16 fields set to N(0, scale) values
    (finite, both signs, subnormals rare), so every code and packed scale bit is exercised."""
    bt = block_type(qtype)
    rng = np.random.default_rng(seed)
    nb = cols // bt.block_size
    b = rng.integers(0, 256, size=(rows, nb, bt.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = (rng.standard_normal((rows, nb)) * scale).astype(np.float16)
        b[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return torch.from_numpy(b.reshape(rows, nb * bt.type_size))
