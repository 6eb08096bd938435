"""Reference RMSNorm, optionally fused with the residual add, computed in fp32."""

from __future__ import annotations

import torch

from backends.cpu.quant import compute_dtype


def check_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> None:
    """The RMSNorm contract's input checks (shared with the CPU engine's native path)."""
    hidden = x.shape[-1]
    if tuple(weight.shape) != (hidden,):
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected [{hidden}] (x's last dim)")
    if not eps > 0:
        raise ValueError(f"eps: {eps} must be > 0")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}"
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, returned in x's dtype.

    With residual: h = x + residual (rounded to x's dtype); returns (rms_norm(h), h).
    """
    # x, residual: [..., hidden]; weight: [hidden]
    check_norm(x, weight, eps, residual)
    cd = compute_dtype(x.dtype)
    if residual is not None:
        x = (x.to(cd) + residual.to(cd)).to(x.dtype)
    h = x.to(cd)
    variance = h.pow(2).mean(dim=-1, keepdim=True)
    y = (h * torch.rsqrt(variance + eps) * weight.to(cd)).to(x.dtype)
    return y if residual is None else (y, x)
