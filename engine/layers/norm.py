"""RMSNorm through the backend, with the residual add fused in (replicated on every rank)."""

from __future__ import annotations

import torch
from torch import nn

from engine.parallel import ParallelContext, TensorSource, load_tensor
from engine.quantization.base import QuantizedActivation
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
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        quant_dtype=None,
        reduce: ParallelContext | None = None,
    ):
        """Without residual: rms_norm(x). With it: (rms_norm(x + residual), x + residual).
        quant_dtype (an FP8 dtype): the normed rows come quantized per token, as a
        QuantizedActivation for the FP8 linear that reads them (one fused backend op).
        reduce: x is a tensor-parallel partial sum; it is all-reduced over that group first (in
        the same launch as the add and the norm where the collectives can fuse them)."""
        if reduce is not None:
            if residual is not None:
                fused = reduce.all_reduce_rms_norm(x, residual, self.weight, self.eps, quant_dtype)
                if fused is not None:
                    if quant_dtype is None:
                        return fused
                    return QuantizedActivation(fused[0], fused[1], x.dtype), fused[2]
            x = reduce.all_reduce(x)
        if quant_dtype is None:
            return self.backend.rms_norm(x, self.weight, self.eps, residual)
        out = self.backend.rms_norm_quant_fp8(x, self.weight, self.eps, quant_dtype, residual)
        qa = QuantizedActivation(out[0], out[1], x.dtype)
        return qa if residual is None else (qa, out[2])

    def load(self, source: TensorSource, name: str) -> None:
        load_tensor(self.weight, source, name, tuple(self.weight.shape))
