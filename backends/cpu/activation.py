"""Reference SiLU-and-mul, the gate of SwiGLU MLPs, computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.cpu.quant import compute_dtype


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2d] -> silu(x[..., :d]) * x[..., d:] in x's dtype."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"x: last dim must be even (gate and up halves), got shape {tuple(x.shape)}"
        )
    d = x.shape[-1] // 2
    xc = x.to(compute_dtype(x.dtype))
    return (F.silu(xc[..., :d]) * xc[..., d:]).to(x.dtype)
