"""Decode-sized (M <= 16) W8A8 GEMM in Triton: int8 x int8 with exact int32 accumulation, streaming
each weight byte once, then the reference's fp32 epilogue (scales, bias, one rounding).

Math (hal `Backend.int8_linear`, `backends.cpu.linear.int8_linear`): acc = x_q @ w_q.T in int32,
y = rtne_out(((float32(acc) * x_scale[m]) * w_scale[n]) + bias[n]), each fp32 operation rounded
on its own (the kernels compile with fp fusion off: no FMA contracts the epilogue), so the result
equals the reference's bit for bit while |acc| < 2^31 (always when K < 131072: |x w| <= 2^14).
Two kernels, as in `backends.triton.gemv` (same `GemvConfig`, same launch plan):
- "fma" (one row of x per program, M <= 2): a [BLOCK_N, BLOCK_K] int32 accumulator of products of
  int8 values widened to int32 first (Triton's int8 * int8 stays int8 and wraps), summed over K
  once at the end; CUDA-core integer multiply-adds only.
- "dot" (all M rows in one program): w_tile [BLOCK_N, BLOCK_K] @ x_tile.T [BLOCK_K, 16] on int8
  tensor cores with an int32 accumulator ("swap AB": the weight fills the MMA's M side). The
  interpreter's int8 tl.dot is an integer numpy matmul (exact), so CI runs this path as it is.
Split-K writes int32 partials [S, M, N] (exact); a second kernel sums them, then scales.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from backends.cpu.linear import _check_quantized
from backends.triton.gemv import (
    GemvConfig,
    _check_device,
    _epilogue,
    _scale_mode,
    _sm_count,
    m_bucket,
    split_plan,
)
from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import FLOAT_DTYPES, interpreting

MAX_M = 16  # the largest M this kernel takes; beyond it torch._int_mm (no padding) wins
FMA_MAX_M = 2  # the heuristic's CUDA-core path; from M = 3 on, tensor cores
DOT_MIN_BLOCK_K = 32  # int8 MMA instructions take k = 32 (mma.sync m16n8k32, wgmma k32)
_REDUCE_BLOCK = 1024
_MAX_GRID = 65535  # CUDA's limit on grid axes 1 and 2

# (M bucket, N, K) -> config; M bucket = next power of two of M (`gemv.m_bucket`). Measured
# overrides of `heuristic_config` (`python bench/int8_gemv.py --autotune` on the device prints
# lines to paste); none measured yet, so every shape takes the heuristic.
Int8ConfigKey = tuple[int, int, int]
Int8ConfigTable = Mapping[Int8ConfigKey, GemvConfig]
DEFAULT_CONFIGS: dict[Int8ConfigKey, GemvConfig] = {}


def heuristic_config(m: int) -> GemvConfig:
    """The launch shape for shapes the table lacks (H100 class): 8 weight rows x 512 bytes per
    tile on CUDA cores for M <= 2 (the FP8 GEMV's measured best at M = 1, same bytes per row),
    tensor cores from M = 3 on (M integer multiply-adds per byte would be ALU-bound). split_k 0:
    split K while the grid has < 4 programs per SM (`gemv.split_plan`)."""
    if m <= FMA_MAX_M:
        return GemvConfig("fma", 8, 512, num_warps=4, num_stages=1)
    return GemvConfig("dot", 32, 256, num_warps=4, num_stages=4)


def pick_config(m: int, n: int, k: int, configs: Int8ConfigTable | None = None) -> GemvConfig:
    """The table's config for this shape (DEFAULT_CONFIGS unless a backend passes its own)."""
    table = DEFAULT_CONFIGS if configs is None else configs
    cfg = table.get((m_bucket(m), n, k))
    return cfg if cfg is not None else heuristic_config(m)


# -- kernels -------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_rows", "num_splits"])
def _int8_small_m_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    x_scale_ptr,
    w_scale_ptr,
    out_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    n_k,
    stride_x_row,
    stride_x_col,
    stride_w_row,
    stride_w_col,
    stride_out_row,
    k_per_split,
    num_splits,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_SCALE: tl.constexpr,
    W_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    # One program: BLOCK_M rows of x against BLOCK_N weight rows over one K split; row blocks of
    # one weight block are neighbours on axis 0, so the second reads the weight from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the end read row N-1 / M-1 (in bounds, never stored): only K's tail is masked.
    w_rows = tl.minimum(offs_n, n_cols - 1).to(tl.int64)
    x_rows = tl.minimum(offs_m, n_rows - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_w_row + offs_k[None, :] * stride_w_col  # [BN, BK]
    if USE_DOT:
        x_ptrs = x_ptr + x_rows[None, :] * stride_x_row + offs_k[:, None] * stride_x_col  # [BK, BM]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        x_ptrs = x_ptr + x_rows[:, None] * stride_x_row + offs_k[None, :] * stride_x_col  # [1, BK]
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, n_k)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0 * stride_w_col, eviction_policy="evict_first")
            x = tl.load(x_ptrs + k0 * stride_x_col)
        else:
            k_ok = (k0 + offs_k) < k_end
            w = tl.load(w_ptrs + k0 * stride_w_col, mask=k_ok[None, :], other=0,
                        eviction_policy="evict_first")  # fmt: skip
            if USE_DOT:
                x = tl.load(x_ptrs + k0 * stride_x_col, mask=k_ok[:, None], other=0)
            else:
                x = tl.load(x_ptrs + k0 * stride_x_col, mask=k_ok[None, :], other=0)
        if USE_DOT:
            acc = tl.dot(w, x, acc, out_dtype=tl.int32)  # int8 tensor cores, exact int32
        else:
            acc2 += w.to(tl.int32) * x.to(tl.int32)  # widened first: int8 * int8 would wrap
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[:, None]  # [BN, 1] int32
    if num_splits == 1:
        _epilogue(acc.to(tl.float32), offs_n, offs_m, out_ptr, bias_ptr, x_scale_ptr,
                  w_scale_ptr, n_rows, n_cols, stride_out_row, HAS_BIAS, X_SCALE, W_SCALE,
                  INTERPRET)  # fmt: skip
    else:
        # partial: int32 [S, M, N], contiguous
        part = partial_ptr + (pid_k * n_rows + offs_m.to(tl.int64))[None, :] * n_cols
        mask = (offs_n < n_cols)[:, None] & (offs_m < n_rows)[None, :]
        tl.store(part + offs_n[:, None], acc, mask=mask)


@triton.jit(do_not_specialize=["n_rows", "num_splits", "split_step"])
def _int8_split_k_reduce_kernel(
    partial_ptr,
    out_ptr,
    bias_ptr,
    x_scale_ptr,
    w_scale_ptr,
    n_rows,
    n_cols,
    num_splits,
    split_step,
    stride_out_row,
    HAS_BIAS: tl.constexpr,
    X_SCALE: tl.constexpr,
    W_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    # out[m, n] = epilogue(sum over s of partial[s, m, n]): integer sums, exact in any order.
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    n_ok = offs_n < n_cols
    ptr = partial_ptr + row.to(tl.int64) * n_cols + offs_n
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for _ in range(num_splits):
        acc += tl.load(ptr, mask=n_ok, other=0)
        ptr += split_step  # M * N
    offs_m = row + tl.arange(0, 1)
    _epilogue(acc.to(tl.float32)[:, None], offs_n, offs_m, out_ptr, bias_ptr, x_scale_ptr,
              w_scale_ptr, n_rows, n_cols, stride_out_row, HAS_BIAS, X_SCALE, W_SCALE,
              INTERPRET)  # fmt: skip


# -- launcher ------------------------------------------------------------------------------------
def _check_config(cfg: GemvConfig) -> None:
    if cfg.kernel == "dot" and cfg.block_k < DOT_MIN_BLOCK_K:
        raise ValueError(
            f"config: block_k={cfg.block_k} is below {DOT_MIN_BLOCK_K}, the k of an int8 MMA; "
            f"use block_k >= {DOT_MIN_BLOCK_K} with kernel 'dot'"
        )


def int8_linear_small_m(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemvConfig | None = None,
    configs: Int8ConfigTable | None = None,
) -> torch.Tensor:
    """y = (x_q @ w_q.T in int32) * x_scale * w_scale.T + bias, the hal `int8_linear` contract.

    x_q: int8 [M, K] with M <= 16; x_scale: [1] or [M, 1]; w_q: int8 [N, K] (any strides;
    contiguous rows stream fastest); w_scale: [1] or [N, 1]; bias: [N] (added in fp32). Returns
    [M, N] in out_dtype (fp32, bf16 or fp16), equal to `backends.cpu.linear.int8_linear`'s.
    `config` forces a launch shape, else the table (`configs`, default DEFAULT_CONFIGS) or
    `heuristic_config` picks one.
    """
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, lambda d: d == torch.int8, "torch.int8")
    (m, k), n = x_q.shape, w_q.shape[0]
    if m > MAX_M:
        raise ValueError(
            f"x_q: M={m} rows, more than {MAX_M}, the most int8_linear_small_m takes; use "
            "torch._int_mm (backends.cuda.linear.int8_linear_int_mm) for larger M"
        )
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not one of float32, bfloat16, float16")
    _check_device(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    cfg = config or pick_config(m, n, k, configs)
    _check_config(cfg)
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    interpret = interpreting()
    splits, k_per_split = split_plan(cfg, m, n, k, _sm_count(x_q.device))
    # int32 partials [S, M, N] (a 1-element stand-in without split-K keeps one compiled kernel)
    partial = torch.empty((splits, m, n) if splits > 1 else (1,), dtype=torch.int32,
                          device=x_q.device)  # fmt: skip
    x_s_mode, x_s = _scale_mode(x_scale)
    w_s_mode, w_s = _scale_mode(w_scale)
    # enable_fp_fusion=False: the epilogue's multiply and add round separately, as torch's do.
    flags = dict(HAS_BIAS=bias is not None, X_SCALE=x_s_mode, W_SCALE=w_s_mode,
                 INTERPRET=interpret, enable_fp_fusion=False)  # fmt: skip
    bias_arg = out if bias is None else bias  # `out` stands in for the absent bias (never read)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), splits)
    if max(grid[1:]) > _MAX_GRID:
        raise ValueError(
            f"config: block_n={cfg.block_n} gives {grid[1]} column blocks and split_k {splits} "
            f"splits; each must be <= {_MAX_GRID} (use a larger block_n / block_k)"
        )
    _int8_small_m_kernel[grid](
        x_q, w_q, bias_arg, x_s, w_s, out, partial,
        m, n, k, x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0),
        k_per_split, splits,
        USE_DOT=cfg.kernel == "dot", EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags, **pdl_args(x_q.device, "gemm"),
    )  # fmt: skip
    if splits > 1:
        _int8_split_k_reduce_kernel[(triton.cdiv(n, _REDUCE_BLOCK), m)](
            partial, out, bias_arg, x_s, w_s, m, n, splits, m * n, out.stride(0),
            BLOCK=_REDUCE_BLOCK, num_warps=4, **flags, **pdl_args(x_q.device, "gemm"),
        )  # fmt: skip
    return out


def int8_small_m_reasons(x_q: torch.Tensor, max_m: int = MAX_M) -> list[str]:
    """Why `int8_linear` should not take these inputs here (empty: it should): M > max_m."""
    m = x_q.shape[0] if x_q.dim() == 2 else 0  # other shapes: int8_linear_small_m says why
    return [f"M={m} > {max_m}"] if m > max_m else []
