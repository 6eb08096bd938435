"""Triton SiLU-and-mul, the gate of SwiGLU MLPs.

Math (`backends.cpu.activation.silu_and_mul`): x [..., 2d] -> silu(x[..., :d]) * x[..., d:] with
silu(g) = g / (1 + exp(-g)), computed in fp32 and rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.quant import cast_rtne, check_float, interpreting, row_blocks


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
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row
    gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_rows + n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_y_row + cols[None, :]
    tl.store(out, cast_rtne(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2d] -> silu(x[..., :d]) * x[..., d:] in x's dtype."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"x: last dim must be even (gate and up halves), got shape {tuple(x.shape)}"
        )
    check_float("x", x)
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
            BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], d)
