"""Quantize / dequantize on CUDA with the reference's math, bit for bit (`backends.cpu.quant`).

Code in this file may assume CUDA. One difference in form: every division takes its divisor as a
tensor on x's device. CUDA computes `tensor / python_scalar` as a multiplication by the scalar's
reciprocal (ATen's div_true_kernel_cuda, "if the second arg is a CPU scalar"), which can differ
from a true division by one ulp; the CPU divides truly.
"""

from __future__ import annotations

import torch

from backends.cpu.quant import (
    INT4_LEVELS,
    INT4_SYMMETRIC_ZERO,
    INT8_MAX,
    SCALE_EPS,
    compute_dtype,
    fp8_max,
    is_fp8,
    pack_int4,
    to_fp8,
    unpack_int4,
)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    # A 0-dim tensor on like's device: division by it is a true division on CUDA too.
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [M, K] tensor, got shape {tuple(x.shape)}")


def _static_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    if tuple(scale.shape) not in ((1,), (rows, 1)):
        raise ValueError(
            f"scale: shape {tuple(scale.shape)} is neither [1] (per tensor) nor [{rows}, 1] "
            "(per token)"
        )
    return scale.to(torch.float32)


def _dynamic_scale(x: torch.Tensor, qmax: float, per_token: bool) -> torch.Tensor:
    # x: [M, K] in the compute dtype -> fp32 [M, 1] or [1]
    absmax = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax().reshape(1)
    return (absmax.clamp(min=SCALE_EPS) / _const(qmax, absmax)).to(torch.float32)


def quantize_fp8(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 [M, K], scale fp32 [1] or [M, 1]); q = fp8(clamp(x / scale))."""
    _check_2d("x", x)
    m = fp8_max(fp8_dtype)
    xc = x.to(compute_dtype(x.dtype))
    s = _static_scale(scale, x.shape[0]) if scale is not None else _dynamic_scale(xc, m, per_token)
    return to_fp8(xc / s.to(xc.dtype), fp8_dtype), s


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x = q * scale, scale broadcast as [1] or [rows, 1]; computed in fp32 (fp64 for fp64 out)."""
    if not is_fp8(q.dtype):
        raise ValueError(f"q: dtype {q.dtype} is not an FP8 format")
    _check_2d("q", q)
    cd = compute_dtype(out_dtype)
    return (q.to(cd) * _static_scale(scale, q.shape[0]).to(cd)).to(out_dtype)


def quantize_int8(
    x: torch.Tensor, scale: torch.Tensor | None = None, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scale = max(absmax, eps) / 127, q = clamp(round(x / scale), -128, 127)."""
    _check_2d("x", x)
    xc = x.to(compute_dtype(x.dtype))
    s = (
        _static_scale(scale, x.shape[0])
        if scale is not None
        else _dynamic_scale(xc, INT8_MAX, per_token)
    )
    q = torch.round(xc / s.to(xc.dtype)).clamp(-128, 127).to(torch.int8)
    return q, s


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise 4-bit quantization of weight [N, K] into the canonical layout (qweight int32
    [K/8, N], scales [K/G, N] in weight's dtype, zeros uint8 [K/G, N]); see the reference."""
    _check_2d("weight", weight)
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size: {group_size} must be positive and divide K={k}")
    if k % 8:
        raise ValueError(f"weight: K={k} is not a multiple of 8 (8 nibbles per int32 word)")
    wc = weight.to(compute_dtype(weight.dtype)).reshape(n, k // group_size, group_size)
    if symmetric:
        scale = wc.abs().amax(dim=2).clamp(min=SCALE_EPS) / _const(7.5, wc)  # [N, K/G]
    else:
        lo = wc.amin(dim=2).clamp(max=0.0)
        hi = wc.amax(dim=2).clamp(min=0.0)
        scale = (hi - lo).clamp(min=SCALE_EPS) / _const(INT4_LEVELS, wc)
    scale = scale.to(weight.dtype).to(wc.dtype)  # the codes must fit the scale that is stored
    if symmetric:
        zero = torch.full_like(scale, INT4_SYMMETRIC_ZERO)
    else:
        zero = torch.round(-lo / scale).clamp(0, INT4_LEVELS)
    q = (torch.round(wc / scale[..., None]) + zero[..., None]).clamp(0, INT4_LEVELS)
    q = q.reshape(n, k).t().to(torch.uint8)  # [K, N]
    return pack_int4(q), scale.t().contiguous().to(weight.dtype), zero.t().to(torch.uint8)


def encode_kv(x: torch.Tensor, cache_dtype: torch.dtype, kv_scale: float | None) -> torch.Tensor:
    """Values as the cache stores them: fp8(x / kv_scale) for an FP8 cache, else x cast."""
    if cache_dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2):
        return x.to(cache_dtype)
    scale = 1.0 if kv_scale is None else float(kv_scale)
    if not scale > 0:
        raise ValueError(f"kv_scale: {kv_scale} must be > 0")
    xc = x.to(compute_dtype(x.dtype))
    return to_fp8(xc / _const(scale, xc), cache_dtype)


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Canonical 4-bit layout -> weight [N, K], the reference math without host-side value checks
    (so it can run inside a captured graph): W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n]."""
    q = unpack_int4(qweight)  # uint8 [K, N]
    k, n = q.shape
    if scales.dim() != 2 or scales.shape[1] != n or tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(
            f"scales/zeros: shapes {tuple(scales.shape)} and {tuple(zeros.shape)}, "
            f"expected the same [K / group_size, {n}]"
        )
    num_groups = scales.shape[0]
    if g_idx is None:
        if group_size <= 0 or k % group_size or k // group_size != num_groups:
            raise ValueError(
                f"group_size: {group_size} with K={k} does not give the {num_groups} groups "
                "that scales/zeros have"
            )
        g = torch.arange(k, device=q.device) // group_size
    else:
        if tuple(g_idx.shape) != (k,):
            raise ValueError(f"g_idx: shape {tuple(g_idx.shape)}, expected [{k}]")
        g = g_idx.to(device=q.device, dtype=torch.int64)
    out_dtype = out_dtype or scales.dtype
    cd = torch.float64 if torch.float64 in (scales.dtype, out_dtype) else torch.float32
    w = (q.to(cd) - zeros.to(cd)[g]) * scales.to(cd)[g]  # [K, N]
    return w.t().to(out_dtype)
