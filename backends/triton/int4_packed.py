"""Triton 4-bit weight-only GEMM on a chunk-strided layout made once at load (`repack_int4`):
each output column's K is contiguous and, inside every 128-k chunk, nibble i of word j holds
k = 128c + 16i + j, so one shift-and-mask gives 16 consecutive k of a row: no interleaving, and
x is read in plain 16-element runs by the CUDA-core (M = 1) and tensor-core kernels alike.

Math is `backends.cpu.linear.int4_linear`'s (W[n, k] = (q - z) * s, fp32 accumulation, one
rounding to x's dtype). Exactness: (q - z) is formed exactly in fp32 from the nibble's bits
(0x4B000000 | q is 2^23 + q). With 128-k chunks inside one group (group size a multiple of 128,
or one group) a chunk's products use the exact integers and its scale multiplies after; with
groups of 16..64 k the scale is taken per 16-k run; otherwise (uneven desc_act groups) per k.
The tensor-core kernel rounds (q - z) * s to x's dtype in the two latter cases, as the canonical
kernel does. Under TRITON_INTERPRET=1 bf16 dots run in fp32 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.int4_gemm import (
    ConfigTable,
    Int4Config,
    _check_bias,
    _check_quant,
    _check_qweight,
    _check_x,
    _dot_dtype,
    _reduce_splits,
    _split,
    pick_config,
)
from backends.triton.quant import cast_rtne, interpreting

CHUNK_K = 128  # k per chunk: 16 int32 words of 8 nibbles
CHUNK_WORDS = CHUNK_K // 8
_MAGIC = tl.constexpr(8388608.0)  # 2^23
_MAGIC_BITS = tl.constexpr(0x4B000000)
_NIBBLE_MASK = 0xF  # an argument, not a literal (ptxas keeps it in a register)

# (max_m, config) for this layout: block_k is unused (a program takes CHUNK_K per step, times
# num_stages-deep pipelining by Triton). Measured by `python bench/int4_gemm.py --autotune`.
STRIDED_CONFIGS: tuple[tuple[int, Int4Config], ...] = (
    (1, Int4Config("fma", 1, 64, 128, split_k=0, num_warps=4, num_stages=3)),
    (16, Int4Config("dot", 16, 64, 128, split_k=0, num_warps=4, num_stages=3)),
    (64, Int4Config("dot", 64, 64, 128, split_k=0, num_warps=4, num_stages=3)),
    (2**62, Int4Config("dot", 128, 128, 128, split_k=1, num_warps=8, num_stages=3)),
)


@dataclass(frozen=True)
class Int4Strided:
    """A 4-bit weight W [N, K] in the chunk-strided layout.

    qweight int32 [N, Kp / 8] (Kp = K rounded up to 128; codes past K are zero and x is masked
    there): word 16c + j of row n holds, in nibble i, the code of packed k = 128c + 16i + j.
    scales [groups, N] (the checkpoint's dtype) and zeros uint8 [groups, N] as in the canonical
    layout. mode 0: a chunk lies in one group (k // group_size at the chunk's start); 1: a 16-k run
    lies in one group; 2: g_idx int32 [Kp] gives each packed k's group. perm int64 [K]: packed k
    holds the checkpoint's input channel perm[k] (desc_act), None when unchanged.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    in_features: int
    group_size: int
    mode: int
    perm: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def nbytes(self) -> int:
        """Bytes this weight holds in device memory."""
        ts = (self.qweight, self.scales, self.zeros, self.perm, self.g_idx)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _codes(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical qweight int32 [K/8, N] -> uint8 codes [K, N]."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    codes = torch.empty(k, n, dtype=torch.uint8, device=qweight.device)
    for i in range(8):
        codes[i::8] = ((qweight >> (4 * i)) & 0xF).to(torch.uint8)
    return codes


def _pack_strided(codes_t: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, Kp] (Kp a multiple of 128) -> int32 [N, Kp / 8], chunk-strided."""
    n, kp = codes_t.shape
    c = codes_t.reshape(n, kp // CHUNK_K, 8, CHUNK_WORDS)  # [N, chunk, nibble i, word j]
    words = torch.zeros(n, kp // CHUNK_K, CHUNK_WORDS, dtype=torch.int32, device=codes_t.device)
    for i in range(7):
        words += c[:, :, i, :].to(torch.int32) << (4 * i)
    top = c[:, :, 7, :].to(torch.int32)  # enters signed: its two's complement bits
    words += torch.where(top >= 8, top - 16, top) * (1 << 28)
    return words.reshape(n, kp // 8)


def repack_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> Int4Strided:
    """Once, at load: the canonical layout (qweight int32 [K/8, N], scales / zeros [K/G, N],
    optional g_idx [K]) -> Int4Strided, losslessly (the same codes, scales and zeros, moved).

    With g_idx (desc_act) the input channels are sorted by group (stable) and `int4_strided_linear`
    permutes x's columns to match; groups of equal size then take the per-group path. Reads
    g_idx back to the host (a sync: load time only).
    """
    _check_qweight(qweight)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    _check_quant(scales, zeros, group_size, g_idx, k, n)
    num_groups = scales.shape[0]
    codes = _codes(qweight)  # [K, N]
    perm = None
    per_k = None  # [K] group of each packed k, when not uniform
    gs = group_size
    if g_idx is not None:
        g = g_idx.to(torch.int64)
        if k and (int(g.min()) < 0 or int(g.max()) >= num_groups):
            raise ValueError(f"g_idx: values must lie in 0..{num_groups - 1}")
        order = torch.sort(g, stable=True).indices
        g_sorted = g[order]
        if not bool((order == torch.arange(k, device=order.device)).all()):
            perm, codes = order, codes[order]
        counts = torch.bincount(g_sorted, minlength=num_groups)
        if k % num_groups == 0 and bool((counts == k // num_groups).all()):
            gs = k // num_groups
        else:
            gs, per_k = 0, g_sorted
    kp = triton.cdiv(k, CHUNK_K) * CHUNK_K
    codes_t = torch.zeros(n, kp, dtype=torch.uint8, device=codes.device)
    codes_t[:, :k] = codes.t()
    if per_k is None and (num_groups == 1 or gs % CHUNK_K == 0):
        mode = 0
    elif per_k is None and gs % 16 == 0:
        mode = 1
    else:
        mode = 2
        if per_k is None:
            per_k = torch.arange(k, device=codes.device) // gs
    g_pad = None
    if per_k is not None:
        g_pad = torch.zeros(kp, dtype=torch.int32, device=codes.device)
        g_pad[:k] = per_k.to(torch.int32)
    return Int4Strided(
        _pack_strided(codes_t), scales.contiguous(), zeros.contiguous(), k, max(gs, 1), mode,
        perm, g_pad,
    )  # fmt: skip


def unpack_int4(p: Int4Strided) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K] in packed k order, group int64 [K] of each packed k): the inverse of
    the packing, for tests and checks."""
    n, kp = p.out_features, p.qweight.shape[1] * 8
    w = p.qweight.reshape(n, kp // CHUNK_K, CHUNK_WORDS)
    codes = torch.empty(n, kp // CHUNK_K, 8, CHUNK_WORDS, dtype=torch.uint8, device=w.device)
    for i in range(8):
        codes[:, :, i, :] = ((w >> (4 * i)) & 0xF).to(torch.uint8)
    codes = codes.reshape(n, kp)[:, : p.in_features]
    if p.g_idx is not None:
        groups = p.g_idx[: p.in_features].to(torch.int64)
    else:
        groups = torch.arange(p.in_features, device=w.device) // p.group_size
    return codes, groups


@triton.jit(do_not_specialize=["n_rows"])
def _strided_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    stride_x_row,
    stride_qw_row,
    stride_out_split,
    stride_out_row,
    n_rows,
    n_cols,
    k_true,
    num_groups,
    group_size,
    chunks_per_split,
    n_chunks,
    nibble_mask,
    USE_DOT: tl.constexpr,
    MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # One program: BLOCK_N output columns x BLOCK_M rows of x over one K split, a 128-k chunk
    # ([BLOCK_N, 16] words) per step. "fma" (BLOCK_M = 1): t[n, j] += x[k] * (q - z) on CUDA
    # cores, reduced over j at the end; "dot": 8 tensor-core products [BN, 16] @ [16, BM] per
    # chunk, one per nibble.
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
    rn_in = tl.minimum(rn, n_cols - 1)  # rows past the end re-read the last (never stored)
    rm_in = tl.minimum(rm, n_rows - 1).to(tl.int64)
    rj = tl.arange(0, 16)
    w_rows = qweight_ptr + rn_in.to(tl.int64)[:, None] * stride_qw_row + rj[None, :]  # [BN, 16]
    if USE_DOT:
        x_cols = x_ptr + rm_in[None, :] * stride_x_row  # [1, BM]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_row = x_ptr + pid_m.to(tl.int64) * stride_x_row
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, n_chunks)
    for c in range(c_start, c_end):
        words = tl.load(w_rows + c * 16, eviction_policy="evict_first")  # c < c_end: in bounds
        words = words.to(tl.uint32, bitcast=True)
        kb = c * 128
        if MODE == 0:
            g = kb // group_size
            s = tl.load(scales_ptr + g * n_cols + rn_in).to(tl.float32)[:, None]  # [BN, 1]
            z = tl.load(zeros_ptr + g * n_cols + rn_in).to(tl.float32)[:, None]
        if USE_DOT:
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            t = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            xs = tl.zeros((1, 16), dtype=tl.float32)
        for i in tl.static_range(8):
            kk = kb + i * 16 + rj  # [16] packed k of this nibble
            bits = ((words >> (4 * i)) & nibble_mask) | _MAGIC_BITS
            qm = bits.to(tl.float32, bitcast=True)  # 2^23 + q, exact
            if MODE == 1:
                gi = tl.minimum((kb + i * 16) // group_size, num_groups - 1)
                si = tl.load(scales_ptr + gi * n_cols + rn_in).to(tl.float32)[:, None]
                zi = tl.load(zeros_ptr + gi * n_cols + rn_in).to(tl.float32)[:, None]
            elif MODE == 2:
                gk = tl.load(g_idx_ptr + kk)  # [16], padded to Kp
                sz = gk[None, :] * n_cols + rn_in[:, None]  # [BN, 16]
                si = tl.load(scales_ptr + sz).to(tl.float32)
                zi = tl.load(zeros_ptr + sz).to(tl.float32)
            if USE_DOT:
                if EVEN_K:
                    xt = tl.load(x_cols + kk[:, None])  # [16, BM]
                else:
                    xt = tl.load(x_cols + kk[:, None], mask=(kk < k_true)[:, None], other=0.0)
                if MODE == 0:
                    w = (qm - (_MAGIC + z)).to(DOT_DTYPE)  # the exact integers q - z
                    part += tl.dot(w, xt.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
                else:
                    w = ((qm - (_MAGIC + zi)) * si).to(DOT_DTYPE)
                    acc += tl.dot(w, xt.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            else:
                if EVEN_K:
                    xi = tl.load(x_row + kk).to(tl.float32)[None, :]  # [1, 16]
                else:
                    xi = tl.load(x_row + kk, mask=kk < k_true, other=0.0).to(tl.float32)[None, :]
                q = tl.fma(qm, xi, -_MAGIC * xi)  # q * x: one rounding
                if MODE == 0:
                    t += q
                    xs += xi
                else:
                    acc += (q - zi * xi) * si
        if MODE == 0:
            if USE_DOT:
                acc += part * s
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


def int4_strided_linear(
    x: torch.Tensor,
    p: Int4Strided,
    bias: torch.Tensor | None = None,
    *,
    allow_tf32: bool = False,
    configs: ConfigTable | None = None,
    config: Int4Config | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W an Int4Strided; fp32 accumulation, in x's dtype.

    x: [M, K] fp32/bf16/fp16; bias [N]. `configs` replaces STRIDED_CONFIGS (keyed on M),
    `config` forces one launch shape (block_k is ignored: a step is one 128-k chunk)."""
    if not isinstance(p, Int4Strided):
        raise ValueError(f"p: expected an Int4Strided (repack_int4), got {type(p).__name__}")
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
    cfg = config if config is not None else pick_config(
        m, STRIDED_CONFIGS if configs is None else configs
    )  # fmt: skip
    if cfg.kernel == "fma" and cfg.block_m != 1:
        raise ValueError(
            f"config: block_m={cfg.block_m}; the strided layout's fma kernel takes one row of x "
            "per program (block_m 1)"
        )
    xc = x if x.stride(1) == 1 else x.contiguous()
    if p.perm is not None:
        xc = xc.index_select(1, p.perm)  # [M, K] in the packed channel order
    n_chunks = p.qweight.shape[1] // CHUNK_WORDS
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = _split(cfg, tiles, n_chunks * CHUNK_K, CHUNK_K, x.device)
    per_split = triton.cdiv(n_chunks, split)
    split = triton.cdiv(n_chunks, per_split)  # no empty split
    final = split == 1
    dest = out if final else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    dot_dtype, precision = _dot_dtype(x, allow_tf32)
    qw = p.qweight
    b = bias.contiguous() if bias is not None else qw  # a dummy pointer when absent
    gi = p.g_idx if p.g_idx is not None else qw
    _strided_kernel[(tiles, split)](
        xc, qw, p.scales, p.zeros, gi, b, dest, xc.stride(0), qw.stride(0),
        0 if final else dest.stride(0), dest.stride(-2), m, n, k, p.scales.shape[0],
        p.group_size, per_split, n_chunks, _NIBBLE_MASK,
        USE_DOT=cfg.kernel == "dot", MODE=p.mode, EVEN_K=k % CHUNK_K == 0,
        HAS_BIAS=bias is not None, FINAL=final, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        INTERPRET=interpreting(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not final:
        _reduce_splits(dest, b, out, split, m, n, bias is not None)
    return out
