"""Triton 4-bit weight-only GEMM on the HAL's canonical int4 layout: a bandwidth-bound split-K
FMA kernel for decode (small M) and a dequantize-into-registers tensor-core kernel for prefill.

Math (`backends.cpu.linear.int4_linear`): y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] with
W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n], g = g_idx[k] if given else k // group_size;
q[k, n] is nibble k % 8 (bits 4 * (k % 8)) of qweight[k // 8, n] (GPTQ order). Accumulation is
fp32 and the result is rounded once to x's dtype. Rounding, exactly:
- (q - zeros) is formed exactly in fp32 from the nibble's bits (0x4B000000 | q is 2^23 + q).
- When a K tile lies inside one group (no g_idx, the tile's K a divisor of group_size) the tile's
  dot product is taken with the exact integers (q - z) and multiplied by the group's scale after:
  the weight is never rounded. x enters the dot in its own dtype (exact), products are exact and
  only the fp32 accumulation rounds. fp32 x under TF32 (`allow_tf32`) has x rounded to TF32.
- Otherwise (g_idx, i.e. desc_act, or group sizes the tile cannot align to) the scale is gathered
  per k in the kernel (K is not permuted) and w = (q - z) * s is formed in fp32; the FMA kernel
  uses it in fp32, the tensor-core kernel rounds it once to x's dtype (fp16 / bf16) for the dot.
- Under TRITON_INTERPRET=1 bf16 dots run in fp32 (the interpreter's bf16 tl.dot is wrong).
Split-K is atomic-free: each split writes fp32 partials and a small kernel sums them in a fixed
order, adds the bias and rounds. The block sizes come from a table keyed on M (`DEFAULT_CONFIGS`);
a vendor backend passes its own (`configs=`), and `bench/int4_gemm.py --autotune` measures one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.quant import cast_rtne, check_float, interpreting

_MAGIC = tl.constexpr(8388608.0)  # 2^23: the fp32 whose low mantissa bits hold a small integer
_MAGIC_BITS = tl.constexpr(0x4B000000)  # its bit pattern
KERNELS = ("fma", "dot")
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class Int4Config:
    """One launch shape. kernel "fma": CUDA-core GEMV-style (block_m rows of x at a time, fp32
    FMAs, the K reduction deferred to the end); "dot": dequantized tiles into tl.dot (block_m
    >= 16). block_k: k per tile (a power of two, >= 8; >= 16 for "dot"). split_k: K splits
    (0: enough to give every SM two programs)."""

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel: {self.kernel!r} is not one of {', '.join(KERNELS)}")
        least_k = 16 if self.kernel == "dot" else 8
        least_mn = 16 if self.kernel == "dot" else 1
        for name, value, least in (
            ("block_m", self.block_m, least_mn),
            ("block_n", self.block_n, least_mn),
            ("block_k", self.block_k, least_k),
        ):
            if value < least or value & (value - 1):
                raise ValueError(
                    f"{name}: {value} must be a power of two >= {least} for kernel {self.kernel!r}"
                )
        if self.split_k < 0:
            raise ValueError(f"split_k: {self.split_k} must be >= 0 (0 picks one per device)")


# (max_m, config): the first entry whose max_m >= M serves M. Starting points for H100 / H200
# (8B MLP shapes, G = 128); `python bench/int4_gemm.py --autotune` measures replacements.
ConfigTable = Sequence[tuple[int, Int4Config]]
DEFAULT_CONFIGS: tuple[tuple[int, Int4Config], ...] = (
    (1, Int4Config("fma", 1, 128, 128, num_warps=4, num_stages=4)),
    (2, Int4Config("fma", 2, 128, 128, num_warps=4, num_stages=4)),
    (4, Int4Config("fma", 4, 64, 128, num_warps=4, num_stages=4)),
    (16, Int4Config("dot", 16, 64, 128, num_warps=4, num_stages=4)),
    (64, Int4Config("dot", 64, 64, 128, num_warps=4, num_stages=4)),
    (256, Int4Config("dot", 64, 128, 64, num_warps=4, num_stages=4)),
    (2**62, Int4Config("dot", 128, 128, 64, split_k=1, num_warps=8, num_stages=3)),
)


def pick_config(m: int, configs: ConfigTable | None = None) -> Int4Config:
    """The table's config for M rows (DEFAULT_CONFIGS unless a backend passes its own)."""
    table = DEFAULT_CONFIGS if configs is None else configs
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    if not table:
        raise ValueError("configs: the table is empty")
    return table[-1][1]


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one at a time: no device to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _int4_fma_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    stride_x_row,
    stride_qw_row,
    stride_s_row,
    stride_z_row,
    stride_out_split,
    stride_out_row,
    n_rows,
    n_cols,
    n_words,
    group_size,
    words_per_split,
    PER_K_SCALES: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program: BLOCK_M rows of x against BLOCK_N columns over one K split. Word tiles
    # [BLOCK_R, BLOCK_N] are read once (coalesced along N); nibble i of row r is k = 8r + i, so
    # the 8 nibbles are 8 shifts of the same tile against x gathered at k = 8r + i. The products
    # pile up in acc3 [BLOCK_M, BLOCK_R, BLOCK_N]; the reduction over r happens once at the end.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < n_rows
    n_ok = rn < n_cols
    x_rows = x_ptr + rm.to(tl.int64)[:, None, None] * stride_x_row  # [BM, 1, 1]
    acc3 = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), dtype=tl.float32)
    r_start = pid_k * words_per_split
    r_end = tl.minimum(r_start + words_per_split, n_words)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + rr
        r_ok = r < r_end
        w_mask = r_ok[:, None] & n_ok[None, :]
        words = tl.load(qweight_ptr + r.to(tl.int64)[:, None] * stride_qw_row + rn[None, :],
                        mask=w_mask, other=0)  # fmt: skip
        x_mask = m_ok[:, None, None] & r_ok[None, :, None]
        if not PER_K_SCALES:
            # The whole tile is in group g: dot with the exact (q - z), scale once.
            g = (r0 * 8 // group_size).to(tl.int64)
            s = tl.load(scales_ptr + g * stride_s_row + rn, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g * stride_z_row + rn, mask=n_ok, other=0).to(tl.float32)
            zb = (z + _MAGIC)[None, :]  # [1, BN]: 2^23 + z
            part = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(8):
            k = r * 8 + i  # [BR]
            xi = tl.load(x_rows + k[None, :, None], mask=x_mask, other=0.0).to(tl.float32)
            qf = (((words >> (4 * i)) & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True)
            if PER_K_SCALES:
                if HAS_G_IDX:
                    gk = tl.load(g_idx_ptr + k, mask=r_ok, other=0).to(tl.int64)
                else:
                    gk = (k // group_size).to(tl.int64)
                s = tl.load(scales_ptr + gk[:, None] * stride_s_row + rn[None, :], mask=w_mask,
                            other=0.0).to(tl.float32)  # fmt: skip
                z = tl.load(zeros_ptr + gk[:, None] * stride_z_row + rn[None, :], mask=w_mask,
                            other=0).to(tl.float32)  # fmt: skip
                w = (qf - (z + _MAGIC)) * s  # [BR, BN]
                acc3 += xi * w[None, :, :]
            else:
                part += xi * (qf - zb)[None, :, :]
        if not PER_K_SCALES:
            acc3 += part * s[None, None, :]
    acc = tl.sum(acc3, axis=1)  # [BM, BN]
    mask = m_ok[:, None] & n_ok[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_out_row + rn[None, :]
        tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = out_ptr + pid_k * stride_out_split + rm.to(tl.int64)[:, None] * stride_out_row
        tl.store(out + rn[None, :], acc, mask=mask)


@triton.jit
def _int4_dot_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    stride_x_row,
    stride_qw_row,
    stride_s_row,
    stride_z_row,
    stride_out_split,
    stride_out_row,
    n_rows,
    n_cols,
    n_k,
    group_size,
    k_per_split,
    PER_K_SCALES: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Tiles ordered GROUP_M row-blocks at a time, so neighbouring programs share weight tiles
    # in L2. The weight tile [BLOCK_K, BLOCK_N] is rebuilt in registers: each k reads its word
    # qweight[k // 8, n] (the 8 reads of one word coalesce in L1), shifts out nibble k % 8.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    blocks_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < n_rows
    n_ok = rn < n_cols
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, n_k)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        k_ok = k < k_end
        w_mask = k_ok[:, None] & n_ok[None, :]
        xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        words = tl.load(qweight_ptr + (k // 8).to(tl.int64)[:, None] * stride_qw_row + rn[None, :],
                        mask=w_mask, other=0)  # fmt: skip
        qf = (((words >> (4 * (k % 8))[:, None]) & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True)
        if PER_K_SCALES:
            if HAS_G_IDX:
                gk = tl.load(g_idx_ptr + k, mask=k_ok, other=0).to(tl.int64)
            else:
                gk = (k // group_size).to(tl.int64)
            s = tl.load(scales_ptr + gk[:, None] * stride_s_row + rn[None, :], mask=w_mask,
                        other=0.0).to(tl.float32)  # fmt: skip
            z = tl.load(zeros_ptr + gk[:, None] * stride_z_row + rn[None, :], mask=w_mask,
                        other=0).to(tl.float32)  # fmt: skip
            w = ((qf - (z + _MAGIC)) * s).to(DOT_DTYPE)  # one rounding to x's dtype
            acc += tl.dot(xt.to(DOT_DTYPE), w, input_precision=INPUT_PRECISION)
        else:
            g = (k0 // group_size).to(tl.int64)
            s = tl.load(scales_ptr + g * stride_s_row + rn, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g * stride_z_row + rn, mask=n_ok, other=0).to(tl.float32)
            w = (qf - (z + _MAGIC)[None, :]).to(DOT_DTYPE)  # exact: |q - z| <= 15
            part = tl.dot(xt.to(DOT_DTYPE), w, input_precision=INPUT_PRECISION)
            acc += part * s[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_out_row + rn[None, :]
        tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = out_ptr + pid_k * stride_out_split + rm.to(tl.int64)[:, None] * stride_out_row
        tl.store(out + rn[None, :], acc, mask=mask)


@triton.jit
def _split_reduce_kernel(
    partial_ptr,
    bias_ptr,
    out_ptr,
    n_split,
    n_elems,
    n_cols,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[i] = sum_s partial[s, i] (+ bias[i % N]) over the flattened [M, N], in split order.
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = offs < n_elems
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptr = partial_ptr + offs  # 64-bit pointer steps: split * M * N may pass 2^31
    for _ in range(n_split):
        acc += tl.load(ptr, mask=ok, other=0.0)
        ptr += n_elems
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % n_cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


# -- launcher ------------------------------------------------------------------------------------
def _check_inputs(x, qweight, scales, zeros, group_size, g_idx, bias) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    check_float("x", x)
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(
            f"qweight: expected int32 [K / 8, N], got {qweight.dtype} {tuple(qweight.shape)}; "
            "repack the checkpoint into the canonical layout (hal.backend dequantize_int4)"
        )
    m, k = x.shape
    n = qweight.shape[1]
    if k % 8:
        raise ValueError(f"x: K={k} is not a multiple of 8 (8 nibbles per int32 word)")
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"x: K={k} differs from qweight's K = 8 * rows = {qweight.shape[0] * 8}")
    check_float("scales", scales)
    if scales.dim() != 2 or scales.shape[1] != n or tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(
            f"scales/zeros: shapes {tuple(scales.shape)} and {tuple(zeros.shape)}, "
            f"expected the same [K / group_size, N={n}]"
        )
    if zeros.dtype != torch.uint8:
        raise ValueError(
            f"zeros: dtype {zeros.dtype}, expected torch.uint8 (unpacked, no offset); "
            "convert at load"
        )
    num_groups = scales.shape[0]
    if g_idx is None:
        if group_size <= 0 or k % group_size or k // group_size != num_groups:
            raise ValueError(
                f"group_size: {group_size} must be positive and divide K={k} into the "
                f"{num_groups} groups that scales/zeros have (per-channel: group_size = K)"
            )
    else:
        if tuple(g_idx.shape) != (k,) or g_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"g_idx: expected int32 [K={k}], got {g_idx.dtype} {tuple(g_idx.shape)}"
            )
        # A range check reads the values back (a device sync, impossible in graph capture), so
        # it runs where that is free; on a GPU the loader validates g_idx once.
        if g_idx.device.type == "cpu" and k and (g_idx.min() < 0 or g_idx.max() >= num_groups):
            raise ValueError(f"g_idx: values must lie in 0..{num_groups - 1}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [N={n}]")
        check_float("bias", bias)
    return m, n, k


def _uniform_block_k(block_k: int, group_size: int, least: int) -> int | None:
    """The K tile that keeps each tile inside one group (a power of two dividing group_size,
    at most block_k), or None when none >= `least` exists (then scales are gathered per k)."""
    pow2 = group_size & -group_size  # the largest power of two dividing group_size
    bk = min(block_k, pow2)
    return bk if bk >= least else None


def _split(config: Int4Config, tiles: int, k: int, block_k: int, device: torch.device) -> int:
    k_tiles = triton.cdiv(k, block_k)
    if config.split_k:
        return max(1, min(config.split_k, k_tiles))
    want = triton.cdiv(2 * _sm_count(device), max(tiles, 1))
    return max(1, min(want, k_tiles, 32))


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    allow_tf32: bool = False,
    configs: ConfigTable | None = None,
    config: Int4Config | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W in the canonical int4 layout, fp32 accumulation, in x's dtype.

    x: [M, K] fp32/bf16/fp16; qweight int32 [K/8, N]; scales [K/G, N] float; zeros uint8
    [K/G, N]; g_idx int32 [K] (optional, desc_act); bias [N]. `configs` replaces the M-keyed
    tuning table, `config` forces one launch shape; `allow_tf32` lets fp32 dots use TF32.
    """
    m, n, k = _check_inputs(x, qweight, scales, zeros, group_size, g_idx, bias)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    cfg = config if config is not None else pick_config(m, configs)
    xc = x if x.stride(1) == 1 else x.contiguous()
    qw = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    sc = scales if scales.stride(1) == 1 else scales.contiguous()
    zs = zeros if zeros.stride(1) == 1 else zeros.contiguous()
    gi = g_idx.contiguous() if g_idx is not None else qw  # a dummy pointer when absent
    b = bias.contiguous() if bias is not None else qw
    least = 16 if cfg.kernel == "dot" else 8
    uniform = None if g_idx is not None else _uniform_block_k(cfg.block_k, group_size, least)
    block_k = uniform if uniform is not None else cfg.block_k
    block_m = min(cfg.block_m, triton.next_power_of_2(m)) if cfg.kernel == "fma" else cfg.block_m
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, cfg.block_n)
    split = _split(cfg, tiles, k, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per split
    split = triton.cdiv(k, k_per_split)  # no empty split
    final = split == 1
    dest = out if final else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    stride_split = 0 if final else dest.stride(0)
    common = dict(
        PER_K_SCALES=uniform is None, HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None,
        FINAL=final, INTERPRET=interpreting(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.kernel == "fma":
        grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
        _int4_fma_kernel[grid](
            xc, qw, sc, zs, gi, b, dest, xc.stride(0), qw.stride(0), sc.stride(0), zs.stride(0),
            stride_split, n, m, n, k // 8, max(group_size, 1), k_per_split // 8,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_k // 8, **common,
        )  # fmt: skip
    else:
        bf16_interp = interpreting() and x.dtype == torch.bfloat16
        dot_dtype = tl.float32 if bf16_interp else _TL_DTYPE[x.dtype]
        # fp32 dots: exact products ("ieee") unless the backend's TF32 policy allows "tf32".
        precision = "tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee"
        precision = precision if dot_dtype == tl.float32 else None
        grid = (tiles, split)
        _int4_dot_kernel[grid](
            xc, qw, sc, zs, gi, b, dest, xc.stride(0), qw.stride(0), sc.stride(0), zs.stride(0),
            stride_split, n, m, n, k, max(group_size, 1), k_per_split, DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=block_k, GROUP_M=8, **common,
        )  # fmt: skip
    if not final:
        block = 1024
        _split_reduce_kernel[(triton.cdiv(m * n, block),)](
            dest, b, out, split, m * n, n, HAS_BIAS=bias is not None, INTERPRET=interpreting(),
            BLOCK=block,
        )  # fmt: skip
    return out
