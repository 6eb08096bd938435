"""GGUF block GEMM fallback on CUDA: the reference dequantization (the ggml block formulas, run
on the device in fp32), then one dense cuBLAS GEMM. The fused Triton kernel is
`backends.triton.gguf`; this serves the inputs it cannot take. Code here may assume CUDA.
"""

from __future__ import annotations

import torch

from backends.cpu.gguf import check_blocks, dequantize_gguf
from backends.cuda.linear import linear

__all__ = ["check_blocks", "gguf_linear_dequant"]


def gguf_linear_dequant(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: str,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias with W = dequantize_gguf(blocks) (fp32, bit-identical to the reference)
    rounded once to x's dtype, then cuBLAS. x: [..., K]; blocks: uint8 [N, bytes_per_row] on x's
    device; returns [..., N] in x's dtype."""
    if blocks.device != x.device:
        raise ValueError(f"blocks: on {blocks.device}, x on {x.device}; put both on one device")
    w = dequantize_gguf(blocks, qtype, (out_features, in_features))  # fp32 [N, K]
    return linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype), allow_tf32)
