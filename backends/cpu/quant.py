"""Reference quantize/dequantize: FP8 (any format), symmetric INT8, group-wise INT4 and its packing.

Deterministic: divisions are true divisions in fp32 (fp64 inputs stay fp64) and rounding is
round-half-to-even (`torch.round`), so every backend can match these bit for bit.
"""

from __future__ import annotations

import torch

from hal.capabilities import FP8_FORMATS

# The floor of every dynamic scale's absmax, so an all-zero row or group never divides by zero.
SCALE_EPS = 1e-12
INT8_MAX = 127.0
INT4_LEVELS = 15.0  # codes 0..15
INT4_SYMMETRIC_ZERO = 8

_FP8_DTYPES = {dtype: name for name, (dtype, _) in FP8_FORMATS.items()}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the reference: float64 stays float64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp8_max(fp8_dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 format (448 e4m3fn, 240 e4m3fnuz, 57344 e5m2)."""
    if fp8_dtype not in _FP8_DTYPES:
        valid = ", ".join(str(d).replace("torch.", "") for d in _FP8_DTYPES)
        raise ValueError(f"fp8_dtype: {fp8_dtype} is not an FP8 format; valid: {valid}")
    return float(torch.finfo(fp8_dtype).max)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8_DTYPES


def to_fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast: clamp to +-fp8_max, then round to nearest even in the format."""
    m = fp8_max(fp8_dtype)
    return x.clamp(-m, m).to(fp8_dtype)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [M, K] tensor, got shape {tuple(x.shape)}")


def _static_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    # A given scale is per tensor ([1]) or per row ([M, 1]); returned as fp32 in that shape.
    if tuple(scale.shape) not in ((1,), (rows, 1)):
        raise ValueError(
            f"scale: shape {tuple(scale.shape)} is neither [1] (per tensor) nor [{rows}, 1] "
            "(per token)"
        )
    return scale.to(torch.float32)


def _dynamic_scale(x: torch.Tensor, qmax: float, per_token: bool) -> torch.Tensor:
    # x: [M, K] in the compute dtype -> fp32 [M, 1] or [1]
    absmax = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax().reshape(1)
    return (absmax.clamp(min=SCALE_EPS) / qmax).to(torch.float32)


def quantize_fp8(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 [M, K], scale fp32 [1] or [M, 1]); q = fp8(clamp(x / scale)).

    Static when `scale` is given, else scale = max(absmax, SCALE_EPS) / fp8_max per tensor or row.
    """
    _check_2d("x", x)
    m = fp8_max(fp8_dtype)
    xc = x.to(compute_dtype(x.dtype))
    s = _static_scale(scale, x.shape[0]) if scale is not None else _dynamic_scale(xc, m, per_token)
    q = to_fp8(xc / s.to(xc.dtype), fp8_dtype)
    return q, s


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x = q * scale, scale broadcast as [1] or [rows, 1]; computed in fp32."""
    if not is_fp8(q.dtype):
        raise ValueError(f"q: dtype {q.dtype} is not an FP8 format")
    _check_2d("q", q)
    s = _static_scale(scale, q.shape[0])
    return (q.to(compute_dtype(out_dtype)) * s.to(compute_dtype(out_dtype))).to(out_dtype)


def quantize_int8(
    x: torch.Tensor, scale: torch.Tensor | None = None, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scale = max(absmax, SCALE_EPS) / 127 per tensor or row (unless given),
    q = clamp(round_half_even(x / scale), -128, 127). Returns (q int8, scale fp32)."""
    _check_2d("x", x)
    xc = x.to(compute_dtype(x.dtype))
    s = (
        _static_scale(scale, x.shape[0])
        if scale is not None
        else _dynamic_scale(xc, INT8_MAX, per_token)
    )
    q = torch.round(xc / s.to(xc.dtype)).clamp(-128, 127).to(torch.int8)
    return q, s


# -- INT4 ------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [K, N] in 0..15 -> int32 [K / 8, N]; nibble i of word r holds row 8r + i (bits 4i)."""
    _check_2d("q", q)
    k, n = q.shape
    if k % 8:
        raise ValueError(f"q: K={k} rows is not a multiple of 8 (8 nibbles per int32 word)")
    codes = q.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("q: int4 codes must lie in 0..15")
    codes = codes.reshape(k // 8, 8, n)
    words = torch.zeros(k // 8, n, dtype=torch.int64, device=q.device)
    for i in range(8):
        words |= codes[:, i, :] << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> uint8 codes [K, N]; the inverse of `pack_int4`."""
    _check_2d("qweight", qweight)
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight: dtype {qweight.dtype}, expected torch.int32")
    # Arithmetic shift then mask reads the right nibble even from negative words.
    nibbles = [(qweight >> (4 * i)) & 0xF for i in range(8)]  # each [K / 8, N]
    return torch.stack(nibbles, dim=1).reshape(-1, qweight.shape[1]).to(torch.uint8)


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise 4-bit quantization of weight [N, K] -> (qweight int32 [K/8, N], scales [K/G, N]
    in weight's dtype, zeros uint8 [K/G, N]).

    Asymmetric: lo = min(group min, 0), hi = max(group max, 0) (the GPTQ range, so codes never
    overflow), scale = max(hi - lo, SCALE_EPS) / 15, zero = clamp(round(-lo / scale), 0, 15).
    Symmetric: scale = max(absmax, SCALE_EPS) / 7.5, zero = 8. q = clamp(round(w / scale) + zero,
    0, 15), using the scale as stored in weight's dtype, so dequantization sees the same scale.
    """
    _check_2d("weight", weight)
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size: {group_size} must be positive and divide K={k}")
    if k % 8:
        raise ValueError(f"weight: K={k} is not a multiple of 8 (8 nibbles per int32 word)")
    wc = weight.to(compute_dtype(weight.dtype)).reshape(n, k // group_size, group_size)
    if symmetric:
        scale = wc.abs().amax(dim=2).clamp(min=SCALE_EPS) / 7.5  # [N, K/G]
    else:
        lo = wc.amin(dim=2).clamp(max=0.0)
        hi = wc.amax(dim=2).clamp(min=0.0)
        scale = (hi - lo).clamp(min=SCALE_EPS) / INT4_LEVELS
    # Round the scale to its storage dtype first: the codes must fit the scale that is stored.
    scale = scale.to(weight.dtype).to(wc.dtype)
    if symmetric:
        zero = torch.full_like(scale, INT4_SYMMETRIC_ZERO)
    else:
        zero = torch.round(-lo / scale).clamp(0, INT4_LEVELS)
    q = (torch.round(wc / scale[..., None]) + zero[..., None]).clamp(0, INT4_LEVELS)
    q = q.reshape(n, k).t().to(torch.uint8)  # [K, N]
    return pack_int4(q), scale.t().contiguous().to(weight.dtype), zero.t().to(torch.uint8)


def group_index(
    k: int, group_size: int, num_groups: int, g_idx: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """int64 [K]: the group of each input row, g_idx[k] if given else k // group_size."""
    if g_idx is None:
        if group_size <= 0 or k % group_size or k // group_size != num_groups:
            raise ValueError(
                f"group_size: {group_size} with K={k} gives {k / max(group_size, 1):g} groups, "
                f"but scales/zeros have {num_groups} rows"
            )
        return torch.arange(k, device=device) // group_size
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx: shape {tuple(g_idx.shape)}, expected [{k}]")
    g = g_idx.to(torch.int64)
    if k and (g.min() < 0 or g.max() >= num_groups):
        raise ValueError(f"g_idx: values must lie in 0..{num_groups - 1}")
    return g


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Canonical layout -> weight [N, K]: W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n],
    g = g_idx[k] if given else k // group_size. Returns `out_dtype` (default: scales' dtype)."""
    q = unpack_int4(qweight)  # [K, N]
    k, n = q.shape
    if scales.dim() != 2 or scales.shape[1] != n or tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(
            f"scales/zeros: shapes {tuple(scales.shape)} and {tuple(zeros.shape)}, "
            f"expected the same [K / group_size, {n}]"
        )
    g = group_index(k, group_size, scales.shape[0], g_idx, q.device)
    out_dtype = out_dtype or scales.dtype
    # (q - z) is a small exact integer, so one rounding to out_dtype happens at the end.
    cd = torch.float64 if torch.float64 in (scales.dtype, out_dtype) else torch.float32
    w = (q.to(cd) - zeros.to(cd)[g]) * scales.to(cd)[g]  # [K, N]
    return w.t().to(out_dtype)
