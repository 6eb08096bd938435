"""Triton SiLU-and-mul, the gate of SwiGLU MLPs, and its variant fused with the per-token FP8
quantize of its output (`silu_and_mul_quant_fp8`: what an FP8 down projection reads).

Math (`backends.cpu.activation.silu_and_mul`): x [..., 2d] -> silu(x[..., :d]) * x[..., d:] with
silu(g) = g / (1 + exp(-g)), computed in fp32 and rounded once to x's dtype; the quantizing variant
encodes that rounded value exactly as `quantize_fp8(y, per_token=True)` does.
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
    row_blocks,
)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    y_ptr,
    stride_x_row,
    stride_y_row,
    n_rows,
    n_cols,  # d: half of x's last dim
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row
    gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_rows + n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_y_row + cols[None, :]
    tl.store(out, cast_rtne(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _silu_and_mul_row(x_rows, cols, mask, n_cols, X_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    # silu(gate) * up of a [BLOCK_M, BLOCK_N] tile, rounded to x's dtype, as fp32 (masked lanes 0)
    gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_rows + n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return cast_rtne(gate / (1.0 + tl.exp(-gate)) * up, X_DTYPE, INTERPRET).to(tl.float32)


@triton.jit
def _silu_and_mul_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    stride_x_row,
    stride_q_row,
    n_rows,
    n_cols,  # d: half of x's last dim
    qmax,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    ENCODE_NATIVE: tl.constexpr,  # fp8_encode's NATIVE
    ONE_TILE: tl.constexpr,  # n_cols <= BLOCK_N: the row once, kept in registers
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q_row
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        yf = _silu_and_mul_row(x_rows, cols, mask, n_cols, X_DTYPE, INTERPRET)
        scale = dynamic_row_scale(yf, rows, row_ok, scale_ptr, qmax)
        z = div_by_row_scale(yf, scale, INTERPRET)
        q = fp8_encode(z, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE)
        tl.store(q_rows + cols[None, :], q, mask=mask)
    else:  # the row's absmax over BLOCK_N chunks, then the chunks again (recomputed) to codes
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            acc = tl.maximum(acc, tl.abs(_silu_and_mul_row(x_rows, cols, mask, n_cols, X_DTYPE,
                                                           INTERPRET)))  # fmt: skip
        scale = dynamic_row_scale(tl.max(acc, axis=1)[:, None], rows, row_ok, scale_ptr, qmax)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            yf = _silu_and_mul_row(x_rows, cols, mask, n_cols, X_DTYPE, INTERPRET)
            z = div_by_row_scale(yf, scale, INTERPRET)
            q = fp8_encode(z, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE)
            tl.store(q_rows + cols[None, :], q, mask=mask)


def _check(x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"x: last dim must be even (gate and up halves), got shape {tuple(x.shape)}"
        )
    check_float("x", x)


# GPU launch of silu_and_mul_quant_fp8: a row per program, read once and kept in registers up to
# this many columns (~32 values per thread: up to 16 warps), else in chunks of it (two passes,
# the second recomputing each chunk). H100, 14336 columns (bench/fused_quant.py --sweep): whole
# rows 12.0 us at M = 256, chunks of 2048 on 8 / 16 warps 13.6 / 12.3, of 1024 13.5 / 13.0.
SILU_QUANT_CHUNK = ONE_TILE_MAX_COLS


def silu_and_mul_quant_fp8(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    chunk: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """quantize_fp8(silu_and_mul(x), fp8_dtype, per_token=True), bit for bit, in one launch:
    x [T, 2d] -> (q fp8 [T, d], scale fp32 [T, 1]). chunk / num_warps override the GPU launch
    (powers of two; for benchmarks)."""
    _check(x)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [T, 2d] tensor, got shape {tuple(x.shape)}")
    codec = fp8_codec(fp8_dtype)
    rows, d = x.shape[0], x.shape[1] // 2
    if interpreting():
        block_m, block_n = row_blocks(rows, d, chunk or ONE_TILE_MAX_COLS)
        warps = 4
    else:
        block_m = 1
        block_n = min(triton.next_power_of_2(max(d, 1)), chunk or SILU_QUANT_CHUNK)
        warps = num_warps or min(16, max(4, block_n // 256))
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(rows, d, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows and d:
        _silu_and_mul_quant_kernel[(triton.cdiv(rows, block_m),)](
            x2, q.view(torch.uint8), scale, x2.stride(0), d, rows, d, float(codec["FP8_MAX"]),
            ENCODE_NATIVE=fp8_encode_mode(fp8_dtype, x.device), ONE_TILE=d <= block_n,
            INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **codec,
            **pdl_args(x.device, "activation"),
        )  # fmt: skip
    return q, scale


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2d] -> silu(x[..., :d]) * x[..., d:] in x's dtype."""
    _check(x)
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty(n_rows, d, dtype=x.dtype, device=x.device)
    if n_rows and d:
        block_m, block_n = row_blocks(n_rows, d)
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(d, block_n))
        _silu_and_mul_kernel[grid](
            x2, y, x2.stride(0), y.stride(0), n_rows, d, INTERPRET=interpreting(),
            BLOCK_M=block_m, BLOCK_N=block_n, **pdl_args(x.device, "activation"),
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], d)
