"""The CPU engine's fast GEMM: torch's own kernel in the input dtype (oneDNN; AMX/AVX-512 bf16).

Same contract as `linear.linear` (the oracle it is tested against). For bf16/fp16 inputs torch's
CPU kernels accumulate in fp32 internally and round the result once, so the error bound is the
dtype's unit roundoff on the output, as for the reference; only the summation order differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
