"""Triton 4-bit weight-only GEMM on the HAL's canonical int4 layout and on a packed layout made
once at load (`repack_int4_for_triton`): split-K FMA kernels for decode, tensor-core kernels.

Math (`backends.cpu.linear.int4_linear`): y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] with
W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n], g = g_idx[k] if given else k // group_size;
q[k, n] is nibble k % 8 (bits 4 * (k % 8)) of qweight[k // 8, n] (GPTQ order). Accumulation is
fp32 and the result is rounded once to x's dtype. Rounding, exactly:
- (q - zeros) is formed exactly in fp32 from the nibble's bits (0x4B000000 | q is 2^23 + q).
- When a K tile lies inside one group (no g_idx, the tile's K a divisor of group_size) the tile's
  dot product is taken with the exact integers (q - z) and multiplied by the group's scale after:
  the weight is never rounded. x enters the dot in its own dtype (exact), products are exact and
  only the fp32 accumulation rounds. fp32 x under TF32 (`allow_tf32`) has x rounded to TF32.
  The packed FMA kernel does the same per int32 word (8 k of one group) for any group size that
  is a multiple of 8.
- Otherwise (g_idx, i.e. desc_act, or group sizes the tile cannot align to) the scale is gathered
  per k in the kernel (K is not permuted) and w = (q - z) * s is formed in fp32; the FMA kernel
  uses it in fp32, the tensor-core kernel rounds it once to x's dtype (fp16 / bf16) for the dot.
  The packed layout sorts desc_act channels by group at load (x's columns are permuted to
  match), so GPTQ's equal-sized groups take the per-group path there too.
- Under TRITON_INTERPRET=1 bf16 dots run in fp32 (the interpreter's bf16 tl.dot is wrong).
The packed layout (`Int4Packed`) is the transpose, qweight [N, K/8], so a program streams whole
K rows of a few output columns with wide loads, as the dense GEMV (backends/triton/gemv.py) does.
Split-K is atomic-free: each split writes fp32 partials and a small kernel sums them in a fixed
order, adds the bias and rounds. The block sizes come from tables keyed on M (`DEFAULT_CONFIGS`,
`PACKED_CONFIGS`); a vendor backend passes its own (`configs=`), and `bench/int4_gemm.py
--autotune` measures both. For large M, `dequantize_packed_triton` writes the packed weight out
densely ((q - z) * s in fp32, rounded once) for a dense GEMM (cuBLAS) to take.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton import int4_gluon, int4_tc
from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import cast_rtne, check_float, interpreting

_MAGIC = tl.constexpr(8388608.0)  # 2^23: the fp32 whose low mantissa bits hold a small integer
_MAGIC_BITS = tl.constexpr(0x4B000000)  # its bit pattern
# 0xF as a kernel argument, not a literal: ptxas then keeps the shifted masks in registers
# instead of rebuilding one (a MOV) before every and-or of the packed kernels.
_NIBBLE_MASK = 0xF
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


# (max_m, config): the first entry whose max_m >= M serves M. The canonical layout's table,
# measured on an H100 80GB (Triton 3.6, bf16, G = 128, both 8B MLP shapes) by
# `python bench/int4_gemm.py --autotune`, which prints replacements.
ConfigTable = Sequence[tuple[int, Int4Config]]
DEFAULT_CONFIGS: tuple[tuple[int, Int4Config], ...] = (
    (1, Int4Config("fma", 1, 64, 128, split_k=8, num_warps=4, num_stages=4)),
    (2, Int4Config("fma", 2, 64, 128, split_k=8, num_warps=4, num_stages=4)),
    (8, Int4Config("dot", 16, 64, 64, split_k=4, num_warps=4, num_stages=3)),
    (16, Int4Config("dot", 16, 64, 128, split_k=4, num_warps=4, num_stages=3)),
    (64, Int4Config("dot", 64, 64, 128, split_k=4, num_warps=4, num_stages=3)),
    (2**62, Int4Config("dot", 128, 64, 64, split_k=1, num_warps=4, num_stages=3)),
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
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    # out[i] = sum_s partial[s, i] (+ bias[i % N]) over the flattened [M, N], in split order.
    # SPLITS (a power of two >= n_split) unrolls the loop, so every split's load is in flight
    # at once instead of one DRAM round trip per split.
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = offs < n_elems
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptr = partial_ptr + offs  # 64-bit pointer steps: split * M * N may pass 2^31
    for sp in tl.static_range(SPLITS):
        live = ok & (tl.full((BLOCK,), sp, tl.int32) < n_split)
        acc += tl.load(ptr, mask=live, other=0.0)
        ptr += n_elems
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % n_cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


@triton.jit
def _nibble(words, hi, mask, i: tl.constexpr):
    # (2^23 + q * 16^j, 16^-j) for nibble i of uint32 words: one and-or drops the nibble into
    # the mantissa of 2^23 at bit 4j (from words, j = i, for i < 5; from hi = words >> 12,
    # j = i - 3, for the top three, whose bits would reach the exponent). fma(raw, c, -2^23 c)
    # is then the exact integer q (a power-of-two scale and an exact difference): no shifts.
    if i < 5:
        raw = ((words & (mask << (4 * i))) | _MAGIC_BITS).to(tl.float32, bitcast=True)
        c = 1.0 / (1 << (4 * i))
    else:
        raw = ((hi & (mask << (4 * (i - 3)))) | _MAGIC_BITS).to(tl.float32, bitcast=True)
        c = 1.0 / (1 << (4 * (i - 3)))
    return raw, c


@triton.jit
def _interleave8(w0, w1, w2, w3, w4, w5, w6, w7):
    # [BN, BR] x 8 -> [BN, 8 * BR] with column 8r + i from w_i[:, r] (k order within each word)
    even = tl.interleave(tl.interleave(w0, w4), tl.interleave(w2, w6))
    odd = tl.interleave(tl.interleave(w1, w5), tl.interleave(w3, w7))
    return tl.interleave(even, odd)


@triton.jit
def _group_of(k, k_ok, g_idx_ptr, group_size, n_words, HAS_G_IDX: tl.constexpr):
    # The group of each k (k past the end: an in-bounds one, its weight is masked to 0).
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + k, mask=k_ok, other=0)
    else:
        g = tl.minimum(k, n_words * 8 - 1) // group_size
    return g


@triton.jit
def _dot_weight(
    words,
    hi,
    nibble_mask,
    i: tl.constexpr,
    z,
    s,
    zs,
    r,
    r_ok,
    s_rows,
    z_rows,
    g_idx_ptr,
    group_size,
    n_words,
    SCALE_MODE: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    # Nibble i of a [BN, BR] word tile as dot operand: mode 0 the exact integers q - z (one
    # fma; the scale comes after the dot); 1 q * s - z * s per word; 2 (q - z) * s per k.
    raw, c = _nibble(words, hi, nibble_mask, i)
    if SCALE_MODE == 0:
        w = tl.fma(raw, c, -_MAGIC * c - z)
    elif SCALE_MODE == 1:
        w = tl.fma(tl.fma(raw, c, -_MAGIC * c), s, zs)
    else:
        gk = _group_of(r * 8 + i, r_ok, g_idx_ptr, group_size, n_words, HAS_G_IDX)
        si = tl.load(s_rows[:, None] + gk[None, :]).to(tl.float32)
        zi = tl.load(z_rows[:, None] + gk[None, :]).to(tl.float32)
        w = (tl.fma(raw, c, -_MAGIC * c) - zi) * si
    return w.to(DOT_DTYPE)


@triton.jit(do_not_specialize=["n_rows"])
def _int4_packed_kernel(
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
    nibble_mask,
    USE_DOT: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The packed layout: qweight [N, K/8], each output column's K contiguous (nibble i of word r
    # is k = 8r + i), scales / zeros [N, groups]. One program: BLOCK_N weight rows (output
    # columns) against BLOCK_M rows of x over one K split, streaming [BLOCK_N, BLOCK_R] words.
    # SCALE_MODE 0: the tile lies in one group (one scale per row n); 1: one group per word
    # (gathered per word); 2: per k (g_idx or groups that split words).
    # "fma" (BLOCK_M = 1): t[n, r] = sum_i x[8r + i] * (q - z), exact integer weights, scaled
    # per word; the K reduction over r waits for the end. "dot": the swapped product
    # W_tile [BN, BK] @ x_tile.T [BK, BM] on tensor cores.
    nibble_mask = nibble_mask.to(tl.uint32)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    blocks_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m  # neighbours share a weight tile (L2 hits)
    pid_n = (pid % per_group) // size_m
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < n_cols
    m_ok = rm < n_rows
    # Rows past the end re-read the last row (in bounds, never stored): loads need no N mask.
    rn_in = tl.minimum(rn, n_cols - 1).to(tl.int64)
    rm_in = tl.minimum(rm, n_rows - 1).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    w_ptrs = qweight_ptr + rn_in[:, None] * stride_qw_row + rr[None, :]  # [BN, BR]
    s_rows = scales_ptr + rn_in * stride_s_row  # [BN]
    z_rows = zeros_ptr + rn_in * stride_z_row
    if USE_DOT:
        rk = tl.arange(0, 8 * BLOCK_R)
        x_ptrs = x_ptr + rm_in[None, :] * stride_x_row + rk[:, None]  # [BK, BM]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_row = x_ptr + pid_m.to(tl.int64) * stride_x_row
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    r_start = pid_k * words_per_split
    r_end = tl.minimum(r_start + words_per_split, n_words)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + rr  # [BR]
        r_ok = r < r_end
        if EVEN_K:
            words = tl.load(w_ptrs + r0, eviction_policy="evict_first")
        else:
            words = tl.load(w_ptrs + r0, mask=r_ok[None, :], other=0, eviction_policy="evict_first")
        words = words.to(tl.uint32, bitcast=True)  # logical shifts
        hi = words >> 12
        if SCALE_MODE == 0:
            g = (r0 * 8) // group_size
            s = tl.load(s_rows + g).to(tl.float32)[:, None]  # [BN, 1]
            z = tl.load(z_rows + g).to(tl.float32)[:, None]
        elif SCALE_MODE == 1:
            rc = r if EVEN_K else tl.minimum(r, n_words - 1)  # in bounds, and known contiguous
            g = (rc * 8 // group_size)[None, :]  # [1, BR]
            s = tl.load(s_rows[:, None] + g).to(tl.float32)  # [BN, BR]
            z = tl.load(z_rows[:, None] + g).to(tl.float32)
        else:
            s = 1.0  # gathered per k below
            z = 0.0
        if USE_DOT:
            if EVEN_K:
                xt = tl.load(x_ptrs + r0 * 8)
            else:
                xt = tl.load(x_ptrs + r0 * 8, mask=(r0 * 8 + rk < r_end * 8)[:, None], other=0.0)
            zs = -z * s  # mode 1: w = q * s + zs
            wt = _interleave8(
                _dot_weight(words, hi, nibble_mask, 0, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 1, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 2, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 3, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 4, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 5, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 6, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
                _dot_weight(words, hi, nibble_mask, 7, z, s, zs, r, r_ok, s_rows, z_rows,
                            g_idx_ptr, group_size, n_words, SCALE_MODE, HAS_G_IDX, DOT_DTYPE),
            )  # fmt: skip
            part = tl.dot(wt, xt.to(DOT_DTYPE), input_precision=INPUT_PRECISION)  # [BN, BM]
            if SCALE_MODE == 0:
                acc += part * s
            else:
                acc += part
        else:
            # t[n, r] = sum_i x[8r + i] * q: 3 instructions per weight (and-or, 2 fma); the zero
            # enters per word as z * sum_i x[8r + i], the scale per word after.
            t = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            xs = tl.zeros((1, BLOCK_R), dtype=tl.float32)
            for i in tl.static_range(8):
                k = r * 8 + i
                if EVEN_K:
                    xi = tl.load(x_row + k).to(tl.float32)[None, :]
                else:
                    xi = tl.load(x_row + k, mask=r_ok, other=0.0).to(tl.float32)[None, :]
                raw, c = _nibble(words, hi, nibble_mask, i)
                q = tl.fma(raw, c, -_MAGIC * c)
                if SCALE_MODE == 2:
                    gk = _group_of(k, r_ok, g_idx_ptr, group_size, n_words, HAS_G_IDX)
                    si = tl.load(s_rows[:, None] + gk[None, :]).to(tl.float32)
                    zi = tl.load(z_rows[:, None] + gk[None, :]).to(tl.float32)
                    t += xi * ((q - zi) * si)
                else:
                    t += xi * q
                    xs += xi
            if SCALE_MODE == 2:
                acc += t
            else:
                acc += (t - z * xs) * s
    if USE_DOT:
        y = acc  # [BN, BM]
    else:
        y = tl.sum(acc, axis=1)[:, None]  # [BN, 1]
    mask = n_ok[:, None] & m_ok[None, :]
    if FINAL:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn_in).to(tl.float32)[:, None]
        out = out_ptr + rm.to(tl.int64)[None, :] * stride_out_row + rn[:, None]
        tl.store(out, cast_rtne(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = out_ptr + pid_k * stride_out_split + rm.to(tl.int64)[None, :] * stride_out_row
        tl.store(out + rn[:, None], y, mask=mask)


# -- launcher ------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    check_float("x", x)
    m, k = x.shape
    if k % 8:
        raise ValueError(f"x: K={k} is not a multiple of 8 (8 nibbles per int32 word)")
    return m, k


def _check_qweight(qweight: torch.Tensor) -> None:
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype != torch.int32:
        what = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else (
            type(qweight).__name__)  # fmt: skip
        raise ValueError(
            f"qweight: expected int32 [K / 8, N] (or an Int4Packed), got {what}; "
            "repack the checkpoint into the canonical layout (hal.backend dequantize_int4)"
        )


def _check_quant(scales, zeros, group_size, g_idx, k: int, n: int) -> None:
    """scales / zeros [K / G, N] and g_idx [K] against the canonical layout's K and N."""
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


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [N={n}]")
        check_float("bias", bias)


def _check_inputs(x, qweight, scales, zeros, group_size, g_idx, bias) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    check_float("x", x)
    _check_qweight(qweight)
    m, k = _check_x(x)
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"x: K={k} differs from qweight's K = 8 * rows = {qweight.shape[0] * 8}")
    _check_quant(scales, zeros, group_size, g_idx, k, n)
    _check_bias(bias, n)
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


def _dot_dtype(x: torch.Tensor, allow_tf32: bool) -> tuple[object, str | None]:
    """(tl dtype of the dot operands, input_precision) for x's dtype."""
    bf16_interp = interpreting() and x.dtype == torch.bfloat16
    dot_dtype = tl.float32 if bf16_interp else _TL_DTYPE[x.dtype]
    # fp32 dots: exact products ("ieee") unless the backend's TF32 policy allows "tf32".
    precision = "tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee"
    return dot_dtype, precision if dot_dtype == tl.float32 else None


def _reduce_splits(dest, b, out, split, m, n, has_bias) -> None:
    # 128 outputs per program: a decode-sized [1, N] still spreads over many SMs.
    block = 128 if m * n <= (1 << 20) else 1024
    _split_reduce_kernel[(triton.cdiv(m * n, block),)](
        dest, b, out, split, m * n, n, HAS_BIAS=has_bias, INTERPRET=interpreting(), BLOCK=block,
        SPLITS=triton.next_power_of_2(split), **pdl_args(dest.device, "gemm"),
    )  # fmt: skip


# -- the packed layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Packed:
    """A 4-bit weight W [N, K] repacked for this backend (`repack_int4_for_triton`): each output
    column's K contiguous, so decode streams whole rows like a dense GEMV.

    qweight int32 [N, K/8]: nibble i (bits 4i) of word r of row n is the code at packed k = 8r + i;
    scales [N, groups] (the checkpoint's dtype) and zeros uint8 [N, groups] (order "pairs":
    transposed views of [groups, N] storage, strides (1, N)); packed k belongs to
    group k // group_size, or g_idx[k] when g_idx is set (group_size 0); perm int64 [K]: packed k
    holds the checkpoint's input channel perm[k] (desc_act), None when the order is unchanged.
    order "pairs" (`backends.triton.int4_tc`): the same words read in k order are a weight whose
    channels are also shuffled inside each 128-k chunk, which `perm` includes (so every kernel
    here and `dequantize_packed` read it unchanged); the tensor-core kernel reads x in
    `pairs_perm` order instead (the desc_act sort alone, None when unchanged). Pairs words may
    be tiled (`repack_int4_for_triton(..., tile_rows=R)`, R a power of two dividing N): qweight
    int32 [N / R, K / 128, R, 16] (`int4_tc.tile_pairs`), the same words regrouped so the
    tensor-core kernel streams each step's R x 64 bytes contiguously; the dequantize kernel
    reads either form, the k-order kernels (fp32 x) and `dequantize_packed` untile a copy.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    order: str = "k"
    pairs_perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int4_tc.word_strides(self.qweight)[0]  # row-major or tiled words

    @property
    def in_features(self) -> int:
        q = self.qweight  # words per row: [N, K/8], or tiled [N / R, K / 128, R, 16]
        return (q.shape[1] * q.shape[3] if q.dim() == 4 else q.shape[1]) * 8


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [N, K/8], nibble i of word r = codes[:, 8r + i], in int32
    arithmetic one nibble at a time (no wide copy of a large weight); the top nibble enters
    as a signed value, which gives its two's complement bits."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int32, device=codes.device)
    for i in range(7):
        words += codes[:, i::8].to(torch.int32) << (4 * i)
    top = codes[:, 7::8].to(torch.int32)
    return words + torch.where(top >= 8, top - 16, top) * (1 << 28)


def _codes(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 codes [K, N] of a canonical qweight int32 [K/8, N]."""
    codes = torch.empty(qweight.shape[0] * 8, qweight.shape[1], dtype=torch.uint8,
                        device=qweight.device)  # fmt: skip
    for i in range(8):
        codes[i::8] = ((qweight >> (4 * i)) & 0xF).to(torch.uint8)
    return codes


def repack_int4_for_triton(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    order: str = "k",
    tile_rows: int = 0,
) -> Int4Packed:
    """Once, at load: the canonical layout (qweight int32 [K/8, N], scales / zeros [K/G, N],
    optional g_idx [K]) -> Int4Packed, losslessly (the same codes, scales and zeros, moved).
    order "k" (nibble i of word r is k = 8r + i) or "pairs" (the tensor-core kernel's order,
    `backends.triton.int4_tc`; K and the group size, after the desc_act sort, multiples of 128:
    else a ValueError saying why; `pairs_reason` asks first). tile_rows > 0 with order "pairs"
    (a power of two dividing N): the words in tiles of that many rows (`int4_tc.tile_pairs`; 0,
    another number or an N it does not divide: row-major).

    Without g_idx the weight is transposed. With g_idx (desc_act) the input channels are sorted
    by group (stable), so each group's channels are contiguous and `int4_linear` permutes x's
    columns to match; when every group then holds K / groups channels the per-group fast path
    serves it, otherwise the sorted g_idx stays and scales are gathered per k. Reads g_idx
    back to the host (a sync: load time only).
    """
    if order not in ("k", "pairs"):
        raise ValueError(f"order: {order!r} is not 'k' or 'pairs'")
    _check_qweight(qweight)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    _check_quant(scales, zeros, group_size, g_idx, k, n)
    st, zt = scales.t().contiguous(), zeros.t().contiguous()  # [N, groups]
    if order == "pairs":
        why = pairs_reason(k, scales.shape[0], group_size, g_idx)
        if why:
            raise ValueError(f"order: 'pairs' cannot take this weight: {why}; use order 'k'")
        # [N, groups] views of [groups, N] storage: a step of the pairs kernels reads one group's
        # scales and zeros for a block of rows, now one contiguous run (Gluon kernel, H200: +0.01
        # to +0.03 of copy bandwidth at M = 1-8; docs/benchmarks.md, eighteenth session)
        st, zt = scales.contiguous().t(), zeros.contiguous().t()
    if g_idx is None and order == "k":
        return Int4Packed(qweight.t().contiguous(), st, zt, group_size)
    sort, g_sorted, uniform = _sort_groups(g_idx, k, scales.shape[0])
    codes = _codes(qweight)  # [K, N]
    if sort is not None:
        codes = codes[sort]
    sort_kept = None if sort is None or _is_identity(sort) else sort
    if order == "pairs":
        pos = int4_tc.pairs_positions(k, codes.device)
        perm = pos if sort_kept is None else sort_kept[pos]
        words = _pack_rows(codes[pos].t().contiguous())
        if tile_rows > 0 and n % tile_rows == 0 and not tile_rows & (tile_rows - 1):
            words = int4_tc.tile_pairs(words, tile_rows)
        return Int4Packed(words, st, zt, k // scales.shape[0], perm=perm, order="pairs",
                          pairs_perm=sort_kept)  # fmt: skip
    return Int4Packed(
        _pack_rows(codes.t().contiguous()), st, zt,  # [N, K/8]
        group_size=k // scales.shape[0] if uniform else 0,
        perm=sort_kept,
        g_idx=None if uniform else g_sorted.to(torch.int32),
    )  # fmt: skip


def _is_identity(perm: torch.Tensor) -> bool:
    return bool((perm == torch.arange(perm.numel(), device=perm.device)).all())


def _sort_groups(g_idx, k: int, num_groups: int):
    """(sort, sorted g_idx, uniform) for desc_act: the stable sort of the input channels by group
    (None without g_idx), and whether every group then holds K / groups channels. Reads g_idx
    back to the host (a sync: load time only)."""
    if g_idx is None:
        return None, None, True
    g = g_idx.to(torch.int64)
    if k and (int(g.min()) < 0 or int(g.max()) >= num_groups):
        raise ValueError(f"g_idx: values must lie in 0..{num_groups - 1}")
    sort = torch.sort(g, stable=True).indices  # [K]
    g_sorted = g[sort]
    counts = torch.bincount(g_sorted, minlength=num_groups)
    uniform = k % num_groups == 0 and bool((counts == k // num_groups).all())
    return sort, g_sorted, uniform


def pairs_reason(k: int, num_groups: int, group_size: int, g_idx=None) -> str | None:
    """Why a canonical weight cannot take the "pairs" order, else None (with g_idx: whether its
    groups, sorted, are equal and a multiple of 128 long; reads g_idx back, load time only)."""
    if g_idx is not None:
        _, _, uniform = _sort_groups(g_idx, k, num_groups)
        if not uniform:
            return "desc_act groups of unequal sizes"
        group_size = k // max(num_groups, 1)
    return int4_tc.pairs_unsupported(k, group_size)


def dequantize_packed(p: Int4Packed) -> torch.Tensor:
    """W float32 [N, K] in the checkpoint's channel order from an Int4Packed (torch ops, on its
    device): the fallback when the kernel cannot take an input, and the check of the repack."""
    n, k = p.out_features, p.in_features
    shifts = torch.arange(8, device=p.qweight.device, dtype=torch.int32) * 4
    words = int4_tc.untile_pairs(p.qweight)
    codes = ((words[:, :, None] >> shifts) & 0xF).reshape(n, k)  # [N, K] packed order
    if p.g_idx is not None:
        g = p.g_idx.to(torch.int64)
    else:
        g = torch.arange(k, device=codes.device) // p.group_size
    w = (codes.float() - p.zeros.float()[:, g]) * p.scales.float()[:, g]
    if p.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, p.perm] = w  # packed k holds the checkpoint's channel perm[k]
    return out


# -- dequantize the packed layout (large M: dequantize once, then a dense GEMM) ------------------
@triton.jit
def _dequant_word(words, i: tl.constexpr, z, s):
    # Nibble i of a [BN, BR] int32 word tile as (q - z) * s in fp32: q - z is exact, the
    # product rounds once (the torch reference's fp32 math, operation for operation).
    q = ((words >> (4 * i)) & 0xF).to(tl.float32)
    return (q - z) * s


@triton.jit
def _int4_dequant_packed_kernel(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    perm_ptr,
    out_ptr,
    stride_qw_row,
    stride_qw_tile,  # words: `int4_tc.word_strides` (row-major or tiled)
    stride_qw_chunk,
    tile_shift,
    stride_s_row,
    stride_s_group,
    stride_z_row,
    stride_z_group,
    stride_out_row,
    n_cols,
    n_words,
    group_size,
    SCALE_MODE: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    PERMUTE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program: BLOCK_N weight rows (output features n) x BLOCK_R words (8 * BLOCK_R packed
    # k). Loads [BN, BR] words (each row's K contiguous), stores [BN, 8 * BR] weights, in packed
    # k order (k = 8r + i, contiguous) or, with PERMUTE, at the checkpoint's column perm[k].
    # SCALE_MODE 0: the tile lies in one group (one scale per row); 1: one group per word
    # (gathered per word, before the interleave); 2: per k (g_idx, or groups that split words).
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    n_ok = rn < n_cols
    # Rows and words past the end re-read the last one (in bounds; never stored).
    rn_in = tl.minimum(rn, n_cols - 1).to(tl.int64)
    r_in = tl.minimum(r, n_words - 1)
    w_rows = (rn_in >> tile_shift) * stride_qw_tile + (rn_in & ((1 << tile_shift) - 1)) * (
        stride_qw_row
    )
    w_cols = (r_in // 16) * stride_qw_chunk + r_in % 16
    words = tl.load(qweight_ptr + w_rows[:, None] + w_cols[None, :])  # [BN, BR]
    s_rows = scales_ptr + rn_in * stride_s_row  # [BN]
    z_rows = zeros_ptr + rn_in * stride_z_row
    k = tl.program_id(1) * (8 * BLOCK_R) + tl.arange(0, 8 * BLOCK_R)  # [BK] packed k
    k_ok = k < n_words * 8
    if SCALE_MODE == 2:
        if HAS_G_IDX:
            g = tl.load(g_idx_ptr + k, mask=k_ok, other=0)
        else:
            g = tl.minimum(k, n_words * 8 - 1) // group_size
        s = tl.load(s_rows[:, None] + g[None, :] * stride_s_group).to(tl.float32)  # [BN, BK]
        z = tl.load(z_rows[:, None] + g[None, :] * stride_z_group).to(tl.float32)
        q = _interleave8(
            words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF,
            (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF,
        )  # fmt: skip
        w = (q.to(tl.float32) - z) * s
    else:
        if SCALE_MODE == 0:
            g = (tl.program_id(1) * (8 * BLOCK_R)) // group_size
            s = tl.load(s_rows + g * stride_s_group).to(tl.float32)[:, None]  # [BN, 1]
            z = tl.load(z_rows + g * stride_z_group).to(tl.float32)[:, None]
        else:
            g = (r_in * 8 // group_size)[None, :]  # [1, BR]
            s = tl.load(s_rows[:, None] + g * stride_s_group).to(tl.float32)  # [BN, BR]
            z = tl.load(z_rows[:, None] + g * stride_z_group).to(tl.float32)
        w = _interleave8(
            _dequant_word(words, 0, z, s), _dequant_word(words, 1, z, s),
            _dequant_word(words, 2, z, s), _dequant_word(words, 3, z, s),
            _dequant_word(words, 4, z, s), _dequant_word(words, 5, z, s),
            _dequant_word(words, 6, z, s), _dequant_word(words, 7, z, s),
        )  # fmt: skip
    if PERMUTE:
        col = tl.load(perm_ptr + k, mask=k_ok, other=0)  # packed k -> the checkpoint's channel
    else:
        col = k
    out = out_ptr + rn.to(tl.int64)[:, None] * stride_out_row + col[None, :]
    tl.store(out, cast_rtne(w, out_ptr.dtype.element_ty, INTERPRET),
             mask=n_ok[:, None] & k_ok[None, :])  # fmt: skip


# Tile of the dequantize kernel: 16 rows x 32 words (256 k): each row's 128 bytes of words is one
# cache line, each program writes 16 x 256 weights (8 KiB in bf16).
DEQUANT_BLOCK_N = 16
DEQUANT_BLOCK_R = 32


def _dequant_scale_mode(p: Int4Packed, block_r: int) -> int:
    """The dequantize kernel's SCALE_MODE for tiles of block_r words: 0 when each tile lies in
    one group, 1 when each word does, 2 per k (g_idx, or groups that split words)."""
    if p.g_idx is not None or p.group_size % 8:
        return 2
    return 0 if p.group_size % (8 * block_r) == 0 else 1


def dequantize_packed_triton(
    p: Int4Packed, dtype: torch.dtype, *, checkpoint_order: bool = False
) -> torch.Tensor:
    """W [N, K] in `dtype` (fp32/bf16/fp16) from an Int4Packed: w = (q - z) * s in fp32, rounded
    once (to nearest even) to `dtype`, bit for bit `dequantize_packed(p).to(dtype)` (which rounds
    the same fp32 value once) and the weight `backends.cuda.linear.int4_linear_dequant` builds.

    Columns are in the PACKED channel order by default: with p.perm set (desc_act) column k is
    the checkpoint's channel perm[k], so y = x[:, perm] @ W.T, as `int4_linear` permutes x. That
    is the cheaper side: permuting x moves M * K values, a scattered store would move N * K.
    `checkpoint_order=True` stores column k at perm[k] instead (the checkpoint's order).
    """
    if not isinstance(p, Int4Packed):
        raise ValueError(
            f"p: expected an Int4Packed (repack_int4_for_triton), got {type(p).__name__}"
        )
    if dtype not in _TL_DTYPE:
        raise ValueError(
            f"dtype: {dtype} is not one of float32, bfloat16, float16; dequantize_packed(p) "
            "gives float32 on any device (cast that)"
        )
    n, k = p.out_features, p.in_features
    out = torch.empty(n, k, dtype=dtype, device=p.qweight.device)  # [N, K]
    if n == 0 or k == 0:
        return out
    n_words = k // 8
    block_n = min(DEQUANT_BLOCK_N, triton.next_power_of_2(n))
    block_r = min(DEQUANT_BLOCK_R, triton.next_power_of_2(n_words))
    mode = _dequant_scale_mode(p, block_r)
    qw = p.qweight if p.qweight.stride(-1) == 1 else p.qweight.contiguous()
    sc, zs = p.scales, p.zeros  # any strides ([N, groups] views for the pairs order)
    permute = checkpoint_order and p.perm is not None
    gi = p.g_idx if p.g_idx is not None else qw  # a dummy pointer when absent
    pm = p.perm if permute else qw
    grid = (triton.cdiv(n, block_n), triton.cdiv(n_words, block_r))
    _int4_dequant_packed_kernel[grid](
        qw, sc, zs, gi, pm, out, *int4_tc.word_strides(qw)[1], sc.stride(0), sc.stride(1),
        zs.stride(0), zs.stride(1), out.stride(0), n,
        n_words, max(p.group_size, 1), SCALE_MODE=mode, HAS_G_IDX=p.g_idx is not None,
        PERMUTE=permute, INTERPRET=interpreting(), BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return out


# (max_m, config) for the packed layout; its "fma" takes one row of x per program (block_m 1).
# NVIDIA H100 80GB HBM3, 2026-11-26, `python bench/int4_gemm.py --autotune --layouts packed`
# (bf16, G = 128, both 8B MLP shapes): 0.43 of copy bandwidth at M = 1, 0.31-0.33 at M = 2-16.
PACKED_CONFIGS: tuple[tuple[int, Int4Config], ...] = (
    (1, Int4Config("fma", 1, 128, 128, split_k=0, num_warps=8, num_stages=1)),
    (16, Int4Config("dot", 16, 64, 128, split_k=4, num_warps=4, num_stages=3)),
    (64, Int4Config("dot", 64, 64, 128, split_k=4, num_warps=4, num_stages=3)),
    (2**62, Int4Config("dot", 64, 64, 64, split_k=0, num_warps=4, num_stages=3)),
)


def _packed_scale_mode(p: Int4Packed, cfg: Int4Config) -> tuple[int, int]:
    """(SCALE_MODE, block_k): 0 with a K tile inside one group, 1 with one group per word,
    2 per k (g_idx, or groups that split words). The tensor-core kernel shrinks its tile to a
    group where it can, so the dot sees the exact integers q - z."""
    gs = p.group_size
    if p.g_idx is not None:
        return 2, cfg.block_k
    if gs % cfg.block_k == 0:
        return 0, cfg.block_k
    if cfg.kernel == "dot":
        bk = _uniform_block_k(cfg.block_k, gs, 16)
        if bk is not None:
            return 0, bk
    return (1 if gs % 8 == 0 else 2), cfg.block_k


def _int4_linear_packed(x, p: Int4Packed, bias, allow_tf32, configs, config,
                        pairs_configs=None) -> torch.Tensor:  # fmt: skip
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a tensor, got {type(x).__name__}")
    m, k = _check_x(x)
    n = p.out_features
    if p.in_features != k:
        raise ValueError(f"x: K={k} differs from the packed weight's K={p.in_features}")
    _check_bias(bias, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    tc = isinstance(config, int4_tc.Int4PairsConfig)
    if tc and p.order != "pairs":
        raise ValueError("config: an Int4PairsConfig needs a weight repacked with order 'pairs'")
    if p.order == "pairs" and (tc or config is None) and x.dtype in (torch.bfloat16,
                                                                      torch.float16):  # fmt: skip
        xc = x if p.pairs_perm is None else x.index_select(1, p.pairs_perm)
        xc = xc if xc.stride(1) == 1 else xc.contiguous()
        if not tc and m <= int4_gluon.MAX_M and int4_gluon.usable(xc) is None:
            # Decode sizes on NVIDIA: the Gluon mma.sync kernel reads the same words faster.
            int4_gluon.launch_gluon(xc, p.qweight, p.scales, p.zeros, p.group_size, bias, out,
                                    int4_gluon.pick_config(m, n), _sm_count(x.device),
                                    _reduce_splits)  # fmt: skip
            return out
        cfg = config if tc else int4_tc.pick_pairs_config(m, pairs_configs)
        int4_tc.launch_pairs(xc, p.qweight, p.scales, p.zeros, p.group_size, bias, out, cfg,
                             _sm_count(x.device), _reduce_splits)  # fmt: skip
        return out
    if tc:
        raise ValueError(f"config: the pairs kernel takes bfloat16 or float16 x, not {x.dtype}")
    cfg = config if config is not None else pick_config(m, PACKED_CONFIGS if configs is None
                                                        else configs)  # fmt: skip
    if cfg.kernel == "fma" and cfg.block_m != 1:
        raise ValueError(
            f"config: block_m={cfg.block_m}; the packed layout's fma kernel takes one row of x "
            "per program (block_m 1)"
        )
    xc = x if x.stride(1) == 1 else x.contiguous()
    if p.perm is not None:
        xc = xc.index_select(1, p.perm)  # [M, K] in the packed channel order
    mode, block_k = _packed_scale_mode(p, cfg)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = _split(cfg, tiles, k, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per split
    split = triton.cdiv(k, k_per_split)
    final = split == 1
    dest = out if final else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    dot_dtype, precision = _dot_dtype(x, allow_tf32)
    qw = int4_tc.untile_pairs(p.qweight)  # (tiled pairs words with fp32 x: a copy, rare)
    sc, zs = p.scales.contiguous(), p.zeros.contiguous()  # (pairs-order views: a copy, rare)
    b = bias.contiguous() if bias is not None else qw  # a dummy pointer when absent
    gi = p.g_idx if p.g_idx is not None else qw
    _int4_packed_kernel[(tiles, split)](
        xc, qw, sc, zs, gi, b, dest, xc.stride(0), qw.stride(0), sc.stride(0), zs.stride(0),
        0 if final else dest.stride(0), dest.stride(-2), m, n, k // 8,
        max(p.group_size, 1), k_per_split // 8, _NIBBLE_MASK,
        USE_DOT=cfg.kernel == "dot", SCALE_MODE=mode, HAS_G_IDX=p.g_idx is not None,
        EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None, FINAL=final, DOT_DTYPE=dot_dtype,
        INPUT_PRECISION=precision, INTERPRET=interpreting(), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_R=block_k // 8, GROUP_M=8, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if not final:
        _reduce_splits(dest, b, out, split, m, n, bias is not None)
    return out


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor | Int4Packed,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int | None = None,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    allow_tf32: bool = False,
    configs: ConfigTable | None = None,
    config: Int4Config | int4_tc.Int4PairsConfig | None = None,
    pairs_configs=None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W in the canonical int4 layout or packed (`Int4Packed`), fp32
    accumulation, in x's dtype.

    x: [M, K] fp32/bf16/fp16; canonical: qweight int32 [K/8, N], scales [K/G, N] float, zeros
    uint8 [K/G, N], g_idx int32 [K] (optional, desc_act); packed: qweight an Int4Packed and
    scales / zeros / group_size / g_idx None. bias [N]. `configs` replaces the M-keyed tuning
    table of the layout (DEFAULT_CONFIGS / PACKED_CONFIGS), `config` forces one launch shape;
    `allow_tf32` lets fp32 dots use TF32. A packed weight in the "pairs" order runs the
    tensor-core kernel (`int4_tc`) for bf16 / fp16 x, tuned by `pairs_configs` (default
    int4_tc.PAIRS_CONFIGS) or forced by an Int4PairsConfig; fp32 x takes the other kernels. On
    NVIDIA GPUs with Gluon, M <= 8 runs `int4_gluon` instead (same words; HAL_INT4_GLUON=0 or
    a forced config keeps the pairs kernel).
    """
    if isinstance(qweight, Int4Packed):
        given = [name for name, v in (("scales", scales), ("zeros", zeros),
                 ("group_size", group_size), ("g_idx", g_idx)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{', '.join(given)}: must be None with an Int4Packed weight (it carries them)"
            )
        return _int4_linear_packed(x, qweight, bias, allow_tf32, configs, config, pairs_configs)
    if scales is None or zeros is None or group_size is None:
        raise ValueError("scales, zeros, group_size: required with a canonical int32 qweight")
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
        dot_dtype, precision = _dot_dtype(x, allow_tf32)
        grid = (tiles, split)
        _int4_dot_kernel[grid](
            xc, qw, sc, zs, gi, b, dest, xc.stride(0), qw.stride(0), sc.stride(0), zs.stride(0),
            stride_split, n, m, n, k, max(group_size, 1), k_per_split, DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=block_k, GROUP_M=8, **common,
        )  # fmt: skip
    if not final:
        _reduce_splits(dest, b, out, split, m, n, bias is not None)
    return out
