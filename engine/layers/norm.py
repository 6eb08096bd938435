"""RMSNorm through the backend, with the residual add fused in (replicated on every rank)."""

from __future__ import annotations

import torch
from torch import nn

from engine.parallel import TensorSource, load_tensor
from hal.backend import Backend


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (size `hidden_size`)."""

    def __init__(self, hidden_size: int, eps: float, backend: Backend, dtype: torch.dtype) -> None:
        super().__init__()
        self.backend = backend
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, device=backend.device, dtype=dtype), requires_grad=False
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: rms_norm(x). With it: (rms_norm(x + residual), x + residual)."""
        return self.backend.rms_norm(x, self.weight, self.eps, residual)

    def load(self, source: TensorSource, name: str) -> None:
        load_tensor(self.weight, source, name, tuple(self.weight.shape))
