"""Triton RMSNorm, optionally fused with the residual add (Liger-Kernel's RMSNorm layout).

Math (`backends.cpu.norm.rms_norm`): h = x + residual rounded to x's dtype; y = h * rsqrt(mean(h^2)
+ eps) * weight computed in fp32 and rounded to x's dtype. Returns y, or (y, h) with a residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.quant import cast_rtne, check_float, interpreting, row_blocks


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
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    # Pass 1: sum of squares of h (and h itself stored, rounded to x's dtype).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + rows64 * stride_r_row + cols[None, :], mask=mask, other=0.0)
            hx = cast_rtne(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
            tl.store(h_ptr + rows64 * stride_h_row + cols[None, :], hx, mask=mask)
            h = hx.to(tl.float32)
        else:
            h = x.to(tl.float32)
        acc += h * h
    rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)  # [BLOCK_M]
    # Pass 2: y = h * rstd * weight. h is recomputed from x (and residual), not read back from
    # h_ptr: another thread of this program may have stored it, with no barrier in between.
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + rows64 * stride_r_row + cols[None, :], mask=mask, other=0.0)
            hx = cast_rtne(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
            h = hx.to(tl.float32)
        else:
            h = x.to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = h * rstd[:, None] * w[None, :]
        tl.store(y_ptr + rows64 * stride_y_row + cols[None, :],
                 cast_rtne(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)  # fmt: skip


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    # [..., hidden] -> [rows, hidden] with unit stride along hidden (a view when possible)
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(1) == 1 or hidden <= 1 else t2.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in x's dtype; with residual,
    h = x + residual first and (y, h) returned. x, residual: [..., hidden]; weight: [hidden]."""
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
    x2 = _rows(x, hidden)
    n_rows = x2.shape[0]
    y = torch.empty(n_rows, hidden, dtype=x.dtype, device=x.device)
    r2 = _rows(residual, hidden) if residual is not None else x2
    h = torch.empty_like(y) if residual is not None else y
    if n_rows and hidden:
        block_m, block_n = row_blocks(n_rows, hidden, max_block_n=8192)
        _rms_norm_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2, weight.contiguous(), y, h, x2.stride(0), r2.stride(0), y.stride(0),
            h.stride(0), n_rows, hidden, float(eps), HAS_RESIDUAL=residual is not None,
            INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=8 if block_n >= 4096 else 4,
        )  # fmt: skip
    y = y.reshape(x.shape)
    return y if residual is None else (y, h.reshape(x.shape))
