"""Block-scaled FP8 GEMM in Triton: the GEMM of FP8 checkpoints with 128 x 128 weight blocks
(quant_method "fp8" with weight_block_size, compressed-tensors FP8 block; DeepSeek-V3, Qwen3-FP8).

Math (hal `Backend.fp8_linear`, block-scaled case; reference `backends.cpu.linear.fp8_linear`):
K splits into G blocks of B = K / G columns; x_scale [M, G] holds one scale per token per block,
w_scale [N / R, G] one per R consecutive output rows per block (a checkpoint's 128 x 128 weight
blocks: R = 128), and
    y[m, n] = sum_g (sum_{k in block g} x_q[m, k] * w_q[n, k]) * x_scale[m, g] * w_scale[n // R, g]
with the inner sums exact products accumulated in fp32, each block's sum scaled in fp32 before it
joins the fp32 total (DeepSeek-V3's "promotion" every 128 K: an FP8 tensor-core accumulator keeps
~14 bits, so it never runs longer than one block), then + bias and one rounding to out_dtype.

One kernel, two orientations: M > 32 runs output tiles [BLOCK_M, BLOCK_N] (x as the MMA's M
side); decode sizes "swap" (the weight tile [BLOCK_N, B] fills the MMA's M side, the few tokens
its N side). When the tiles cannot fill the GPU, K splits across programs, fp32 partials summed
in split order by `gemv`'s reduce kernel (no atomics: bit-reproducible). On sm_89+ NVIDIA GPUs
same-format e4m3fn / e5m2 operands meet in an FP8 tensor-core dot; everywhere else (other
formats, ROCm, the interpreter) the codes are decoded exactly into fp16 (which holds every FP8
value) for an fp16 dot, products still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.cpu.linear import _check_quantized, check_fp8_block_scales
from backends.cpu.quant import is_fp8
from backends.triton.gemv import (
    _CODEC,
    _NATIVE_MODE,
    _NOT_FP8,
    _REDUCE_BLOCK,
    _check_device,
    _sm_count,
    _split_k_reduce_kernel,
    _to_float,
)
from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import FLOAT_DTYPES, cast_rtne, fp8_codec, interpreting, native_fp8, raw

SWAP_MAX_M = 32  # up to here the weight fills the MMA's M side and K splits across programs
MIN_BLOCK = 16  # tl.dot's smallest K; B must be a power of two >= this
FP8_DOT_MIN_K = 32  # an FP8 tensor-core dot's smallest K
ROWWISE_MIN_K_TILE = 32  # fp8_rowwise_linear's smallest K tile (K must be a multiple)


@dataclass(frozen=True)
class Fp8BlockConfig:
    """One launch shape. swap: weight rows on the MMA's M side (decode); block_m: tokens per
    tile; block_n: output rows per tile; split: K splits (0: enough to fill the device);
    group_m: row tiles walked together (L2 reuse of weight tiles at large M)."""

    swap: bool
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 4
    split: int = 0
    group_m: int = 8

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: {value} must be a power of two >= 16")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps: {self.num_warps} must be a power of two >= 1")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")
        if self.split < 0:
            raise ValueError(f"split: {self.split} must be >= 0 (0 picks one per device)")
        if self.group_m < 1:
            raise ValueError(f"group_m: {self.group_m} must be >= 1")


def pick_config(m: int) -> Fp8BlockConfig:
    """The launch shape for M tokens (H100 sweep, `python bench/fp8_block.py --sweep`, on the 8B
    linears): swapped 16 x 128 tiles, 3 stages, to M = 16 (within 10% of each shape's best);
    32-token swapped tiles to M = 32; then 64 x 128 output tiles, 4 warps, 4 stages (the best at
    every M from 64 to 4096; 128 x 128 with 8 warps ran 1.2-1.4x slower)."""
    if m <= 16:
        return Fp8BlockConfig(True, 16, 128, num_warps=4, num_stages=3)
    if m <= SWAP_MAX_M:
        return Fp8BlockConfig(True, 32, 64, num_warps=4, num_stages=4)
    return Fp8BlockConfig(False, 64, 128, num_warps=4, num_stages=4)


def split_plan(cfg: Fp8BlockConfig, tiles: int, n_blocks: int, sm_count: int) -> tuple[int, int]:
    """(splits, blocks per split). split 0 doubles the splits while the grid is short of its
    target (swapped decode tiles: 4 programs per SM; output tiles: one per SM, each a full SM's
    work) and each split keeps >= 4 K blocks."""
    want = cfg.split
    if not want:
        target = (4 if cfg.swap else 1) * sm_count
        want = 1
        while tiles * want < target and n_blocks >= 8 * want:
            want *= 2
    per_split = triton.cdiv(n_blocks, min(want, max(n_blocks, 1)))
    return triton.cdiv(max(n_blocks, 1), per_split), per_split


def block_reasons(x_q: torch.Tensor, x_scale: torch.Tensor) -> list[str]:
    """Why the kernel cannot take these block-scaled inputs (empty: it can): the block size
    B = K / G must be a power of two >= 16 (one tile of K per block)."""
    if x_q.dim() != 2 or x_scale.dim() != 2 or x_scale.shape[1] < 1:
        return []  # fp8_block_linear says what is wrong with the shapes
    k, g = x_q.shape[1], x_scale.shape[1]
    b = k // g if k % g == 0 else 0
    if b < MIN_BLOCK or b & (b - 1):
        return [f"block size K / G = {k} / {g} is not a power of two >= {MIN_BLOCK}"]
    return []


# -- kernel --------------------------------------------------------------------------------------
@triton.jit
def _store(
    y,
    m_idx,
    n_idx,
    ptr,
    bias_ptr,
    n_rows,
    n_cols,
    stride_row,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    FINAL: tl.constexpr,
):
    # y: fp32 tile indexed by broadcastable m_idx / n_idx. FINAL: + bias, rounded into out[m, n];
    # else fp32 into a partial slab [M, N] (ptr already at this split's slab).
    ok = (m_idx < n_rows) & (n_idx < n_cols)
    dest = ptr + m_idx.to(tl.int64) * stride_row + n_idx
    if FINAL:
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + n_idx, mask=n_idx < n_cols, other=0.0).to(tl.float32)
        tl.store(dest, cast_rtne(y, ptr.dtype.element_ty, INTERPRET), mask=ok)
    else:
        tl.store(dest, y, mask=ok)


@triton.jit(do_not_specialize=["n_rows", "num_splits"])
def _fp8_block_kernel(
    x_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    stride_x_row,
    stride_w_row,
    stride_xs_row,
    stride_xs_blk,
    stride_ws_row,
    stride_ws_blk,
    stride_out_row,
    rows_per_scale,
    blocks_per_split,
    n_blocks,
    num_splits,
    SWAP: tl.constexpr,
    DOT_FP8: tl.constexpr,
    X_FP8: tl.constexpr,
    W_FP8: tl.constexpr,
    X_MAN_BITS: tl.constexpr,
    X_EXP_BIAS: tl.constexpr,
    X_FP8_MAX: tl.constexpr,
    X_NAN_CODE: tl.constexpr,
    X_FNUZ: tl.constexpr,
    X_HAS_INF: tl.constexpr,
    W_MAN_BITS: tl.constexpr,
    W_EXP_BIAS: tl.constexpr,
    W_FP8_MAX: tl.constexpr,
    W_NAN_CODE: tl.constexpr,
    W_FNUZ: tl.constexpr,
    W_HAS_INF: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROWWISE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    # ROWWISE: one scale per token and per weight row (or per tensor: row strides 0) for all of
    # K: the K tiles accumulate in the MMA (loop-carried, so wgmma pipelines) and the scales
    # apply once at the end. Else one K tile per scale block, each block's sum scaled.
    # Axis 0: output tiles, GROUP_M row tiles at a time per column tile (a weight tile read from
    # DRAM serves its neighbours from L2); axis 1: K splits (swap only).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the end read row M-1 / N-1 (in bounds, never stored), so no load needs a mask:
    # K is exactly n_blocks * BLOCK_K.
    x_rows = tl.minimum(offs_m, n_rows - 1).to(tl.int64)
    w_rows = tl.minimum(offs_n, n_cols - 1).to(tl.int64)
    x_ptrs = x_ptr + x_rows[:, None] * stride_x_row + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + w_rows[:, None] * stride_w_row + offs_k[None, :]  # [BN, BK]
    xs_ptrs = x_scale_ptr + x_rows * stride_xs_row
    ws_ptrs = w_scale_ptr + (w_rows // rows_per_scale) * stride_ws_row
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_start = pid_k * blocks_per_split
    g_end = tl.minimum(g_start + blocks_per_split, n_blocks)
    for g in range(g_start, g_end):
        k0 = g * BLOCK_K  # < 2^31: the row offsets above are int64
        x = tl.load(x_ptrs + k0)
        w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        if DOT_FP8:  # same native format, loaded as such: FP8 tensor cores
            xd = x
            wd = w
        else:  # exact decode into fp16, fp16 tensor cores
            xd = _to_float(x, tl.float16, X_FP8, X_MAN_BITS, X_EXP_BIAS, X_FP8_MAX, X_NAN_CODE,
                           X_FNUZ, X_HAS_INF)  # fmt: skip
            wd = _to_float(w, tl.float16, W_FP8, W_MAN_BITS, W_EXP_BIAS, W_FP8_MAX, W_NAN_CODE,
                           W_FNUZ, W_HAS_INF)  # fmt: skip
        if ROWWISE:
            if SWAP:
                acc = tl.dot(wd, tl.trans(xd), acc)
            else:
                acc = tl.dot(xd, tl.trans(wd), acc)
        else:
            xs = tl.load(xs_ptrs + g * stride_xs_blk).to(tl.float32)  # [BM]
            ws = tl.load(ws_ptrs + g * stride_ws_blk).to(tl.float32)  # [BN]
            if SWAP:
                acc += tl.dot(wd, tl.trans(xd)) * xs[None, :] * ws[:, None]
            else:
                acc += tl.dot(xd, tl.trans(wd)) * xs[:, None] * ws[None, :]
    if ROWWISE:  # the reference's order: sum * x_scale * w_scale (a split's share likewise)
        xs = tl.load(xs_ptrs).to(tl.float32)
        ws = tl.load(ws_ptrs).to(tl.float32)
        if SWAP:
            acc = acc * xs[None, :] * ws[:, None]
        else:
            acc = acc * xs[:, None] * ws[None, :]
    if SWAP:
        m_idx, n_idx = offs_m[None, :], offs_n[:, None]
    else:
        m_idx, n_idx = offs_m[:, None], offs_n[None, :]
    if num_splits == 1:
        _store(acc, m_idx, n_idx, out_ptr, bias_ptr, n_rows, n_cols, stride_out_row, HAS_BIAS,
               INTERPRET, True)  # fmt: skip
    else:  # partial: fp32 [S, M, N], contiguous
        slab = partial_ptr + pid_k.to(tl.int64) * n_rows * n_cols
        _store(acc, m_idx, n_idx, slab, bias_ptr, n_rows, n_cols, n_cols, HAS_BIAS, INTERPRET,
               False)  # fmt: skip


# -- launcher ------------------------------------------------------------------------------------
def fp8_block_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8BlockConfig | None = None,
) -> torch.Tensor:
    """y = sum_g (x_q[:, g] @ w_q[:, g].T) * x_scale[:, g] * w_scale[:, g].T + bias.

    x_q: fp8 [M, K]; x_scale: fp32 [M, G]; w_q: fp8 [N, K] (any FP8 format, may differ from
    x_q's); w_scale: fp32 [N / R, G], R consecutive rows sharing a scale (any strides);
    K = G * B with B a power of two >= 16; bias: [N]. Returns [M, N] in out_dtype (fp32, bf16 or
    fp16). `config` forces a launch shape, else `pick_config`.
    """
    check_fp8_block_scales(x_q, x_scale, w_q, w_scale, bias)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not one of float32, bfloat16, float16")
    why = block_reasons(x_q, x_scale)
    if why:
        raise ValueError(f"x_scale: {why[0]} (the kernel runs one K tile per block)")
    _check_device(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    (m, k), n, g = x_q.shape, w_q.shape[0], x_scale.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.expand(m, n))
    return _launch(x_q, x_scale, w_q, w_scale, bias, out, k // g, n // w_scale.shape[0], g,
                   False, config or pick_config(m))  # fmt: skip


def _launch(x_q, x_scale, w_q, w_scale, bias, out, block_k, rows_per_scale, n_blocks, rowwise,
            cfg) -> torch.Tensor:  # fmt: skip
    m, n = x_q.shape[0], w_q.shape[0]
    x = x_q if x_q.stride(1) == 1 else x_q.contiguous()
    w = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    xs, ws = x_scale.to(torch.float32), w_scale.to(torch.float32)
    if rowwise:  # [1] / [rows, 1] scales: a row stride of 0 broadcasts one value
        xs, ws = xs.reshape(-1, 1), ws.reshape(-1, 1)
        xs_row, ws_row = (int(t.shape[0] > 1) * t.stride(0) for t in (xs, ws))
    else:
        xs_row, ws_row = xs.stride(0), ws.stride(0)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    splits, per_split = split_plan(cfg, tiles, n_blocks, _sm_count(x_q.device))
    native = native_fp8(x_q.device)
    x_mode, w_mode = (_NATIVE_MODE.get(t.dtype, _CODEC) if native else _CODEC for t in (x_q, w_q))
    # FP8 wgmma takes K >= 32 per dot; smaller blocks decode to fp16
    dot_fp8 = x_mode == w_mode != _CODEC and x_mode != _NOT_FP8 and block_k >= FP8_DOT_MIN_K
    if not dot_fp8:  # codes travel as their uint8 bits, converted in the kernel
        x, w = raw(x), raw(w)
    # else loaded in their FP8 type: tiles go to shared memory as they are and the MMAs of
    # successive K tiles pipeline (Triton 3.6 waits for each one when an operand was bitcast)
    partial = torch.empty((splits, m, n) if splits > 1 else (1,), dtype=torch.float32,
                          device=x_q.device)  # fmt: skip
    dummy = out  # stands in for an absent bias (never read)
    interpret = interpreting()
    _fp8_block_kernel[(tiles, splits)](
        x, w, xs, ws, dummy if bias is None else bias, out, partial, m, n,
        x.stride(0), w.stride(0), xs_row, xs.stride(1), ws_row, ws.stride(1),
        out.stride(0), rows_per_scale, per_split, n_blocks, splits,
        SWAP=cfg.swap, DOT_FP8=dot_fp8, X_FP8=x_mode, W_FP8=w_mode,
        **{f"X_{key}": value for key, value in fp8_codec(x_q.dtype).items()},
        **{f"W_{key}": value for key, value in fp8_codec(w_q.dtype).items()},
        HAS_BIAS=bias is not None, INTERPRET=interpret, ROWWISE=rowwise, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device, "gemm"),
    )  # fmt: skip
    if splits > 1:
        _split_k_reduce_kernel[(triton.cdiv(n, _REDUCE_BLOCK), m)](
            partial, out, dummy if bias is None else bias, dummy, dummy, m, n, splits, m * n,
            out.stride(0), HAS_BIAS=bias is not None, X_SCALE=0, W_SCALE=0, INTERPRET=interpret,
            BLOCK=_REDUCE_BLOCK, num_warps=4, **pdl_args(x.device, "gemm"),
        )  # fmt: skip
    return out


def rowwise_reasons(x_q: torch.Tensor) -> list[str]:
    """Why `fp8_rowwise_linear` cannot take these operands (empty: it can): K must be a multiple
    of 32 (its K tiles: 128, 64 or 32 columns, no tail)."""
    k = x_q.shape[-1] if x_q.dim() else 0
    return [] if k and k % ROWWISE_MIN_K_TILE == 0 else [f"K={k} is not a multiple of 32"]


def fp8_rowwise_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8BlockConfig | None = None,
) -> torch.Tensor:
    """y = (x_q @ w_q.T) * x_scale * w_scale.T + bias: the per-tensor / per-token and
    per-channel `fp8_linear` (hal contract) on the same kernel, K tiles accumulated in the MMA.

    x_q: fp8 [M, K], K a multiple of 32; x_scale: [1] or [M, 1]; w_q: fp8 [N, K]; w_scale: [1]
    or [N, 1]; bias: [N]. Returns [M, N] in out_dtype (fp32, bf16 or fp16).
    """
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, is_fp8, "an FP8 format")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not one of float32, bfloat16, float16")
    why = rowwise_reasons(x_q)
    if why:
        raise ValueError(f"x_q: {why[0]} (the kernel has no K tail)")
    _check_device(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    (m, k), n = x_q.shape, w_q.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    block_k = next(b for b in (128, 64, 32) if k % b == 0)
    return _launch(x_q, x_scale, w_q, w_scale, bias, out, block_k, 1, k // block_k, True,
                   config or pick_config(m))  # fmt: skip
