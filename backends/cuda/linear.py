"""GEMMs on CUDA through torch: cuBLAS dense (TF32 policy), FP8 `_scaled_mm`, INT8 `_int_mm`,
and dequantize-then-GEMM fallbacks for FP8, INT8 and 4-bit weights.

Code in this file may assume CUDA. The reference is `backends.cpu.linear`; scales are applied in
the reference's order, so the INT8 path matches it bit for bit wherever int32 does not overflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from backends.cpu.linear import (
    _check_bias,
    _check_quantized,
    _scaled_output,
    check_fp8_block_scales,
    is_block_scaled,
)
from backends.cpu.quant import is_fp8
from backends.cuda.quant import dequantize_int4

# torch._scaled_mm: K and N multiples of 16 (Blas.cpp: "Expected trailing dimension of mat1 to be
# divisible by 16", "mat2 shape ... must be divisible by 16"); M is free.
SCALED_MM_ALIGN = 16
# torch._int_mm: M > 16 ("self.size(0) needs to be greater than 16"), K and N multiples of 8.
INT_MM_MIN_M = 17
INT_MM_ALIGN = 8


@contextlib.contextmanager
def fp32_matmul_precision(allow_tf32: bool) -> Iterator[None]:
    """Scope torch's fp32 matmul precision: "high" lets cuBLAS use TF32, "highest" forbids it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def full_precision_reductions() -> Iterator[None]:
    """Scope cuBLAS to fp32 reductions for bf16 / fp16 GEMMs (torch lets it reduce split-K
    partials in the half dtype by default: extra roundings no bound of ours counts)."""
    m = torch.backends.cuda.matmul
    names = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")
    previous = [getattr(m, name) for name in names]
    for name in names:
        setattr(m, name, False)
    try:
        yield
    finally:
        for name, value in zip(names, previous, strict=True):
            setattr(m, name, value)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # Zero-pad a 2-D tensor up to [rows, cols]; a no-op when it already has that shape.
    if tuple(x.shape) == (rows, cols):
        return x
    out = torch.zeros(rows, cols, dtype=x.dtype, device=x.device)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# -- dense ----------------------------------------------------------------------------------------
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """y = x @ weight.T + bias on cuBLAS. x: [..., K]; weight: [N, K]. fp32 may use TF32."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x/weight: expected [..., K] and [N, K], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    _check_bias(bias, weight.shape[0])
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    with fp32_matmul_precision(allow_tf32):
        return F.linear(x, weight, bias)


def scaled_mm_input_reasons(x_q: torch.Tensor, w_q: torch.Tensor) -> list[str]:
    """Why torch._scaled_mm cannot take these FP8 operands on NVIDIA (empty: it can)."""
    ok = (torch.float8_e4m3fn, torch.float8_e5m2)
    if x_q.dtype not in ok or w_q.dtype not in ok:
        return [
            f"FP8 tensor cores compute e4m3fn and e5m2, got {x_q.dtype} x {w_q.dtype} "
            "(e4m3fnuz is AMD's encoding)"
        ]
    if x_q.dtype == w_q.dtype == torch.float8_e5m2:
        return ["cuBLASLt multiplies no e5m2 x e5m2 pair"]
    return []


# -- FP8 ------------------------------------------------------------------------------------------
def fp8_linear_scaled_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    rowwise: bool = False,
) -> torch.Tensor:
    """y = (x_q * x_scale) @ (w_q * w_scale).T + bias on FP8 tensor cores (torch._scaled_mm).

    Per-tensor scales go into the kernel. Per-token / per-channel scales use the row-wise kernel
    when `rowwise` (Hopper) and the output is bf16 with no bias (its requirements: scales fp32
    [M, 1] and [1, N], bf16 out); otherwise the kernel writes fp32 and the scales and bias follow
    in fp32, in the reference's order. K and N are zero-padded to multiples of 16.
    """
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, is_fp8, "an FP8 format")
    m, k = x_q.shape
    n = w_q.shape[0]
    kp, np_ = _round_up(k, SCALED_MM_ALIGN), _round_up(n, SCALED_MM_ALIGN)
    a = _pad_to(x_q, m, kp)
    b = _pad_to(w_q, np_, kp).t()  # [Kp, Np], column-major as _scaled_mm wants
    x_s = x_scale.to(torch.float32)
    w_s = w_scale.to(torch.float32)
    per_tensor = x_s.numel() == 1 and w_s.numel() == 1
    if per_tensor and bias is None:
        y = torch._scaled_mm(a, b, scale_a=x_s, scale_b=w_s, out_dtype=out_dtype)
        return y[:, :n]
    if not per_tensor and rowwise and bias is None and out_dtype == torch.bfloat16:
        scale_a = x_s.expand(m, 1).contiguous()  # [M, 1]
        scale_b = _pad_to(w_s.expand(n, 1), np_, 1).reshape(1, np_).contiguous()  # [1, Np]
        y = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        return y[:, :n]
    one = torch.ones(1, dtype=torch.float32, device=x_q.device)
    if per_tensor:
        acc = torch._scaled_mm(a, b, scale_a=x_s, scale_b=w_s, out_dtype=torch.float32)
        return _scaled_output(acc[:, :n], one, one, bias, out_dtype)
    acc = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return _scaled_output(acc[:, :n], x_s, w_s, bias, out_dtype)


BLOCK_SCALED_MM_BLOCK = 128  # cuBLASLt's block sizes: 1x128 activations, 128x128 weights
BLOCK_SCALED_MM_ALIGN = 4  # M and the number of K blocks: multiples of 4 (cuBLASLt alignment)


def block_scaled_mm_input_reasons(x_q, x_scale, w_q, w_scale) -> list[str]:
    """Why cuBLASLt's block-scaled FP8 GEMM cannot take these block-scaled inputs (empty: it
    can): e4m3fn operands, blocks of 128 columns, 128 weight rows per scale, K blocks a multiple
    of 4."""
    reasons = []
    if x_q.dtype != torch.float8_e4m3fn or w_q.dtype != torch.float8_e4m3fn:
        reasons.append(f"operands {x_q.dtype} x {w_q.dtype}, block scaling takes e4m3fn")
    k, g, n = x_q.shape[-1], x_scale.shape[-1], w_q.shape[0]
    if k != g * BLOCK_SCALED_MM_BLOCK:
        reasons.append(f"blocks of K / G = {k} / {g} columns, not 128")
    if n != w_scale.shape[0] * BLOCK_SCALED_MM_BLOCK:
        reasons.append(f"{n} rows / {w_scale.shape[0]} scale rows is not 128 rows per scale")
    if g % BLOCK_SCALED_MM_ALIGN:
        reasons.append(f"G = {g} K blocks is not a multiple of {BLOCK_SCALED_MM_ALIGN}")
    return reasons


def fp8_block_linear_scaled_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled fp8_linear on cuBLASLt's block-scaled FP8 GEMM (torch._scaled_mm with
    x_scale [M, K / 128] and w_scale [N / 128, K / 128]): each 128-column block's sum scaled in
    fp32 inside the kernel. M is zero-padded to a multiple of 4; the scales go in outer-dim-major
    (token-major for x, block-row-major for w) as cuBLASLt reads them. With a bias or an fp32
    output the kernel writes fp32 and the bias follows in fp32, one rounding at the end."""
    check_fp8_block_scales(x_q, x_scale, w_q, w_scale, bias)
    why = block_scaled_mm_input_reasons(x_q, x_scale, w_q, w_scale)
    if why:
        raise ValueError("block-scaled _scaled_mm cannot take these inputs: " + "; ".join(why))
    m, g = x_q.shape[0], x_scale.shape[1]
    mp = _round_up(max(m, 1), BLOCK_SCALED_MM_ALIGN)
    a = _pad_to(x_q, mp, x_q.shape[1])
    if mp == m:  # [M, G] with the token index fastest: one transposing copy
        sa = x_scale.to(torch.float32).t().contiguous().t()
    else:  # the padded rows' scales are 1 (their codes are 0)
        sa = torch.ones(g, mp, dtype=torch.float32, device=x_q.device).t()
        sa[:m] = x_scale
    sb = w_scale.to(torch.float32).contiguous().t()  # [G, N / 128] view of [N / 128, G]
    direct = bias is None and out_dtype in (torch.bfloat16, torch.float16)
    y = torch._scaled_mm(
        a, w_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype if direct else torch.float32
    )[:m]
    if direct:
        return y
    one = torch.ones(1, dtype=torch.float32, device=x_q.device)
    return _scaled_output(y, one, one, bias, out_dtype)


def fp8_linear_dequant(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The FP8 GEMM without FP8 tensor cores: operands upcast to fp32, one cuBLAS GEMM, scales.

    TF32 stays off: fp8 values are exact in fp32, so the only rounding is the fp32 accumulation.
    Block-scaled inputs (x_scale [M, G], w_scale [N / R, G]) dequantize each operand by its block
    scales first (one fp32 rounding per element), then one GEMM.
    """
    if is_block_scaled(x_scale, w_scale):
        check_fp8_block_scales(x_q, x_scale, w_q, w_scale, bias)
        (m, k), n, g = x_q.shape, w_q.shape[0], x_scale.shape[1]
        x = x_q.to(torch.float32).reshape(m, g, k // g) * x_scale.to(torch.float32)[:, :, None]
        ws = w_scale.to(torch.float32).repeat_interleave(n // w_scale.shape[0], dim=0)
        w = w_q.to(torch.float32).reshape(n, g, k // g) * ws[:, :, None]
        with fp32_matmul_precision(False):
            acc = x.reshape(m, k) @ w.reshape(n, k).t()
        one = torch.ones(1, dtype=torch.float32, device=x_q.device)
        return _scaled_output(acc, one, one, bias, out_dtype)
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, is_fp8, "an FP8 format")
    with fp32_matmul_precision(False):
        acc = x_q.to(torch.float32) @ w_q.to(torch.float32).t()  # [M, N]
    return _scaled_output(acc, x_scale, w_scale, bias, out_dtype)


# -- INT8 -----------------------------------------------------------------------------------------
def int8_linear_int_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 on int8 tensor cores: torch._int_mm (int32 accumulator), then the scales in fp32.

    M is zero-padded to 17 when <= 16 and K, N to multiples of 8; the weight goes in as the
    transposed view of [N, K] (column-major), the layout cuBLASLt's IMMA kernel is fast with.
    """
    _check_quantized(
        x_q, x_scale, w_q, w_scale, bias, lambda d: d == torch.int8, "torch.int8"
    )  # fmt: skip
    m, k = x_q.shape
    n = w_q.shape[0]
    mp = max(m, INT_MM_MIN_M)
    kp, np_ = _round_up(k, INT_MM_ALIGN), _round_up(n, INT_MM_ALIGN)
    acc = torch._int_mm(_pad_to(x_q, mp, kp), _pad_to(w_q, np_, kp).t())  # int32 [Mp, Np]
    return _scaled_output(acc[:m, :n].to(torch.float32), x_scale, w_scale, bias, out_dtype)


def int8_linear_dequant(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 without int8 tensor cores: the integer product in fp32 on cuBLAS (TF32 off), then the
    scales. Exact while every partial sum stays below 2^24 (K * 127 * 128 < 2^24, K < 1032);
    beyond that, fp32 accumulation rounding applies."""
    _check_quantized(
        x_q, x_scale, w_q, w_scale, bias, lambda d: d == torch.int8, "torch.int8"
    )  # fmt: skip
    with fp32_matmul_precision(False):
        acc = x_q.to(torch.float32) @ w_q.to(torch.float32).t()  # [M, N]
    return _scaled_output(acc, x_scale, w_scale, bias, out_dtype)


# -- INT4 -----------------------------------------------------------------------------------------
def int4_linear_dequant(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias with W dequantized (fp32 math, one rounding) to x's dtype, then cuBLAS.

    x: [M, K]; returns [M, N] in x's dtype. The fallback of the fused Triton kernel
    (`backends.triton.int4_gemm`) for inputs it cannot take.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    k = qweight.shape[0] * 8 if qweight.dim() == 2 else -1
    if x.shape[1] != k:
        raise ValueError(f"x: K={x.shape[1]} differs from qweight's K = 8 * rows = {k}")
    w = dequantize_int4(qweight, scales, zeros, group_size, g_idx, out_dtype=x.dtype)  # [N, K]
    return linear(x, w, bias, allow_tf32)


def lora_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch):
    """`Backend.lora_add` as two GEMMs in the model's dtype over every slot: h = (x a^T) * mask
    (the mask zeroes the columns outside each token's slot: exact zeros), y += h b^T (`addmm_`,
    fp32 accumulation). h, and on the H200 h b^T before its add into y, are rounded to the dtype
    once more than in the reference (the conformance bound allows two such roundings). The mask
    is made once a step per width (batch.cache: a CUDA graph capture records it, so replays
    remake it from the static slots)."""
    key = ("mask", a.shape[0])
    mask = batch.cache.get(key)
    if mask is None:
        col_slot = torch.arange(a.shape[0], device=a.device) // batch.rank % batch.num_slots
        mask = batch.token_slots.long()[:, None] == col_slot[None, :]
        mask = batch.cache[key] = mask.to(x.dtype)
    # fp32 adapters: no TF32; bf16 / fp16: no half-precision split-K sums (the H200 thorough
    # conformance run drew K = 1100, rank 1, where they left 1.2x the bound). The GEMMs are small.
    with fp32_matmul_precision(False), full_precision_reductions():
        return y.addmm_((x @ a.t()) * mask, b.t())
