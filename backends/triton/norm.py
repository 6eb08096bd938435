"""Triton RMSNorm, optionally fused with the residual add (Liger-Kernel's RMSNorm layout) and with
the per-token FP8 quantize of its output (`rms_norm_quant_fp8`: what an FP8 linear reads next).

Math (`backends.cpu.norm.rms_norm`): h = x + residual rounded to x's dtype; y = h * rsqrt(mean(h^2)
+ eps) * weight computed in fp32 and rounded to x's dtype. Returns y, or (y, h) with a residual.
The quantizing variant encodes that rounded y exactly as `quantize_fp8(y, per_token=True)` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import (
    ONE_TILE_MAX_COLS,
    cast_rtne,
    check_float,
    div_by_row_scale,
    dynamic_row_scale,
    fp8_codec,
    fp8_encode,
    fp8_encode_mode,
    interpreting,
    quantize_fp8,
    row_blocks,
)


@triton.jit
def _rstd(sum_sq, n_cols, eps):
    # 1 / sqrt(mean + eps) from the fp64 sum of the squares. Each square of a bf16 / fp16 value is
    # exact in fp32, and their fp64 sum is exact (or rounded far below fp32's precision) in any
    # order, so the mean does not depend on how the compiler spreads the row over threads: it
    # picks different layouts for the plain and the quantizing build (8 vs 16 values per
    # thread), and with an fp32 sum rstd differed by an ulp in some rows, flipping a few near-
    # ties of y's rounding (1-9 of 8.4M FP8 codes at 2048 x 4096 on an H200).
    return tl.math.rsqrt((sum_sq / n_cols).to(tl.float32) + eps)


@triton.jit
def _norm_input(x_ptr, residual_ptr, h_ptr, rows64, cols, mask, stride_x_row, stride_r_row,
                stride_h_row, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr,
                INTERPRET: tl.constexpr):  # fmt: skip
    # h = x (+ residual, rounded to x's dtype and stored when STORE_H) of a tile, as fp32
    x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows64 * stride_r_row + cols[None, :], mask=mask, other=0.0)
        hx = cast_rtne(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        if STORE_H:
            tl.store(h_ptr + rows64 * stride_h_row + cols[None, :], hx, mask=mask)
        h = hx.to(tl.float32)
    else:
        h = x.to(tl.float32)
    return h


@triton.jit
def _norm_output(h, rstd, weight_ptr, y_ptr, scale_ptr, rows, row_ok, rows64, cols, mask,
                 stride_y_row, n_cols, qmax, X_DTYPE: tl.constexpr, QUANT: tl.constexpr,
                 MAN_BITS: tl.constexpr, EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
                 NAN_CODE: tl.constexpr, FNUZ: tl.constexpr, HAS_INF: tl.constexpr,
                 ENCODE_NATIVE: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    # y = h * rstd * weight rounded to x's dtype, stored, or (QUANT) its per-token FP8 codes
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0)
    _norm_output_w(h, rstd, w, y_ptr, scale_ptr, rows, row_ok, rows64, cols, mask, stride_y_row,
                   qmax, X_DTYPE, QUANT, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF,
                   ENCODE_NATIVE, INTERPRET)  # fmt: skip


@triton.jit
def _norm_output_w(h, rstd, w, y_ptr, scale_ptr, rows, row_ok, rows64, cols, mask, stride_y_row,
                   qmax, X_DTYPE: tl.constexpr, QUANT: tl.constexpr, MAN_BITS: tl.constexpr,
                   EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, NAN_CODE: tl.constexpr,
                   FNUZ: tl.constexpr, HAS_INF: tl.constexpr, ENCODE_NATIVE: tl.constexpr,
                   INTERPRET: tl.constexpr):  # fmt: skip
    # `_norm_output` with the weight row already loaded (w: [BLOCK_N], 0 past n_cols)
    y = cast_rtne(h * rstd[:, None] * w.to(tl.float32)[None, :], X_DTYPE, INTERPRET)
    if QUANT:  # y as the model holds it, then quantize_fp8's per-token math
        yf = y.to(tl.float32)
        scale = dynamic_row_scale(yf, rows, row_ok, scale_ptr, qmax)
        z = div_by_row_scale(yf, scale, INTERPRET)
        q = fp8_encode(z, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE)
        tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], q, mask=mask)
    else:
        tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y, mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    h_ptr,
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_h_row,
    scale_ptr,  # QUANT: fp32 [rows] per-token scales
    n_rows,
    n_cols,
    eps,
    qmax,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,  # y_ptr holds FP8 codes (uint8) of y; a row is one tile
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    ENCODE_NATIVE: tl.constexpr,  # fp8_encode's NATIVE
    ONE_TILE: tl.constexpr,  # n_cols <= BLOCK_N: the row read once, kept in registers
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        h = _norm_input(x_ptr, residual_ptr, h_ptr, rows64, cols, mask, stride_x_row,
                        stride_r_row, stride_h_row, HAS_RESIDUAL, True, INTERPRET)  # fmt: skip
        rstd = _rstd(tl.sum((h * h).to(tl.float64), axis=1), n_cols, eps)
        _norm_output(h, rstd, weight_ptr, y_ptr, scale_ptr, rows, row_ok, rows64, cols, mask,
                     stride_y_row, n_cols, qmax, X_DTYPE, QUANT, MAN_BITS, EXP_BIAS, FP8_MAX,
                     NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE, INTERPRET)  # fmt: skip
    else:
        # Pass 1: sum of squares of h (and h itself stored, rounded to x's dtype).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            h = _norm_input(x_ptr, residual_ptr, h_ptr, rows64, cols, mask, stride_x_row,
                            stride_r_row, stride_h_row, HAS_RESIDUAL, True, INTERPRET)  # fmt: skip
            acc += (h * h).to(tl.float64)
        rstd = _rstd(tl.sum(acc, axis=1), n_cols, eps)  # [BLOCK_M]
        # Pass 2: y = h * rstd * weight. h is recomputed from x (and residual), not read back
        # from h_ptr: another thread of this program may have stored it, with no barrier between.
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            h = _norm_input(x_ptr, residual_ptr, h_ptr, rows64, cols, mask, stride_x_row,
                            stride_r_row, stride_h_row, HAS_RESIDUAL, False, INTERPRET)  # fmt: skip
            _norm_output(h, rstd, weight_ptr, y_ptr, scale_ptr, rows, row_ok, rows64, cols, mask,
                         stride_y_row, n_cols, qmax, X_DTYPE, QUANT, MAN_BITS, EXP_BIAS, FP8_MAX,
                         NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE, INTERPRET)  # fmt: skip


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    # [..., hidden] -> [rows, hidden] with unit stride along hidden (a view when possible)
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(1) == 1 or hidden <= 1 else t2.contiguous()


def _check(x, weight, eps, residual) -> None:
    if x.dim() == 0:
        raise ValueError("x: expected [..., hidden], got a 0-dim tensor")
    check_float("x", x)
    hidden = x.shape[-1]
    if tuple(weight.shape) != (hidden,):
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected [{hidden}] (x's last dim)")
    check_float("weight", weight)
    if not eps > 0:
        raise ValueError(f"eps: {eps} must be > 0")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}"
            )
        check_float("residual", residual)


def _launch(x2, weight, eps, residual, y, scale, fp8_dtype, max_block_n) -> torch.Tensor:
    # x2: [rows, hidden]; y: [rows, hidden] in x's dtype, or its FP8 codes (uint8) with scale.
    # Returns h (the residual sum), or y without a residual.
    n_rows, hidden = x2.shape
    r2 = _rows(residual, hidden) if residual is not None else x2
    h = torch.empty(n_rows, hidden, dtype=x2.dtype, device=x2.device) if residual is not None else y
    codec = fp8_codec(fp8_dtype or torch.float8_e4m3fn)
    native = fp8_encode_mode(fp8_dtype, x2.device) if fp8_dtype is not None else 0
    if n_rows and hidden:
        block_m, block_n = row_blocks(n_rows, hidden, max_block_n=max_block_n)
        _rms_norm_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, weight.contiguous(), y, h, x2.stride(0), r2.stride(0), y.stride(0),
            h.stride(0), scale if scale is not None else x2, n_rows, hidden, float(eps),
            float(codec["FP8_MAX"]), HAS_RESIDUAL=residual is not None,
            QUANT=fp8_dtype is not None, ENCODE_NATIVE=native, ONE_TILE=hidden <= block_n,
            INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=8 if block_n >= 4096 else 4, **codec, **pdl_args(x2.device, "norm"),
        )  # fmt: skip
    return h


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in x's dtype; with residual,
    h = x + residual first and (y, h) returned. x, residual: [..., hidden]; weight: [hidden]."""
    _check(x, weight, eps, residual)
    hidden = x.shape[-1]
    x2 = _rows(x, hidden)
    y = torch.empty(x2.shape[0], hidden, dtype=x.dtype, device=x.device)
    h = _launch(x2, weight, eps, residual, y, None, None, 8192)
    y = y.reshape(x.shape)
    return y if residual is None else (y, h.reshape(x.shape))


def rms_norm_quant_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fp8_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """quantize_fp8(rms_norm(x, weight, eps, residual), fp8_dtype, per_token=True), bit for bit,
    in one launch: x, residual [T, hidden] -> (q fp8 [T, hidden], scale fp32 [T, 1]), plus h
    with a residual. Rows longer than one tile (16,384 values; 4,096 under the interpreter)
    run the two ops."""
    _check(x, weight, eps, residual)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [T, hidden] tensor, got shape {tuple(x.shape)}")
    fp8_codec(fp8_dtype)  # raises, naming the dtype, when it is not an FP8 format
    rows, hidden = x.shape
    if row_blocks(rows, hidden, ONE_TILE_MAX_COLS)[1] < hidden:
        out = rms_norm(x, weight, eps, residual)
        y, h = out if residual is not None else (out, None)
        q, scale = quantize_fp8(y, fp8_dtype, per_token=True)
        return (q, scale) if h is None else (q, scale, h)
    x2 = _rows(x, hidden)
    q = torch.empty(rows, hidden, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    h = _launch(x2, weight, eps, residual, q.view(torch.uint8), scale, fp8_dtype,
                ONE_TILE_MAX_COLS)  # fmt: skip
    return (q, scale) if residual is None else (q, scale, h)
