"""4-bit weight-only GEMM on tensor cores for the "pairs" nibble order of the packed layout: the
dequantized tile goes from registers straight into the MMA (0.49-0.64 of copy bandwidth at decode
sizes on an H100 with the words tiled by rows, 0.36-0.46 on an H200 in about the same time: not
DRAM-bound there; 1.15-1.7x the k-order kernels: docs/benchmarks.md).

The order (`repack_int4_for_triton(..., order="pairs")`): qweight int32 [N, K/8] as in the
packed layout, but inside each 128-k chunk (16 words of a row) nibble i (0-3) of word j holds
k = 32 i + 2 j and nibble i + 4 holds k = 32 i + 2 j + 1. One shift and one and-or then put the
codes of k and k + 1 into the two halves of a 32-bit register, each as the bf16 (fp16) number
128 + q (1024 + q): exactly the (k, k + 1) pair a thread holds of an MMA operand, so Triton keeps
the words in the operand layout and no dequantized tile goes through shared memory. One bf16x2
(f16x2) fma then subtracts 128 + z (1024 + z), leaving the exact integers q - z; four dots of
K = 32 take a chunk against x's 32-row slices, and the chunk's sum is scaled once by its group's
scale (groups are whole chunks: the group size is a multiple of 128). Math, rounding and split-K
as in `backends.triton.int4_gemm` (fp32 accumulation, one rounding at the end; split-K partials
summed in a fixed order by its reduce kernel). On NVIDIA GPUs the pair is built with inline PTX
(lop3 + fma.rn.bf16x2); elsewhere (ROCm, the interpreter) with plain Triton ops, same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import cast_rtne, interpreting

CHUNK = 128  # k per chunk of the pairs order; the group size must be a multiple of it
_WORDS = CHUNK // 8  # words per row per chunk
ROW_MAJOR_SHIFT = 40  # `word_strides`' tile shift for row-major words: every row in tile 0
# (128 + q as bf16 / 1024 + q as fp16 in both halves, its value, 1.0 in both halves, PTX type)
_MAGIC = {
    torch.bfloat16: (0x43004300, 128, 0x3F803F80, "bf16x2"),
    torch.float16: (0x64006400, 1024, 0x3C003C00, "f16x2"),
}
_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Build the pairs with inline PTX on NVIDIA GPUs (False: the plain Triton ops ROCm runs, for tests).
USE_PTX = True


@dataclass(frozen=True)
class Int4PairsConfig:
    """One launch shape of the pairs kernel: block_m rows of x (>= 16, the MMA's N side) against
    block_n weight rows (>= 16); split_k K splits (0: as many as keep the grid within one wave
    of `programs_per_sm` programs per SM)."""

    block_m: int
    block_n: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: int = 4

    def __post_init__(self) -> None:
        for name, value in (("block_m", self.block_m), ("block_n", self.block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: {value} must be a power of two >= 16")
        if self.split_k < 0 or self.programs_per_sm < 1:
            raise ValueError(
                f"split_k: {self.split_k} must be >= 0 and programs_per_sm: "
                f"{self.programs_per_sm} >= 1"
            )


# (max_m, config): the first entry whose max_m >= M serves M. Measured on an H100 80GB (Triton
# 3.6, bf16, G = 128, both 8B MLP shapes; `python bench/int4_gemm.py --autotune --layouts pairs`
# and sweeps of block_n / stages / splits / programs per SM, 2026-11-26): M = 1-16 19.5-23.4 us
# per call, 0.43-0.52 of copy bandwidth, 1.15-1.7x the k-order kernels (docs/benchmarks.md).
# On words tiled by 128 rows (`tile_pairs`, ninth session): 0.49-0.64, the same shape still best
# at M = 1 in a sweep of block_n 64-256, 3-6 stages, 2-8 programs per SM.
PAIRS_CONFIGS: tuple[tuple[int, Int4PairsConfig], ...] = (
    (16, Int4PairsConfig(16, 128, num_warps=4, num_stages=3, programs_per_sm=4)),
    (32, Int4PairsConfig(32, 64, num_warps=4, num_stages=4)),
    (64, Int4PairsConfig(64, 64, num_warps=4, num_stages=3, programs_per_sm=2)),
    (2**62, Int4PairsConfig(128, 128, split_k=2, num_warps=8, num_stages=3, programs_per_sm=2)),
)


def pick_pairs_config(m: int, configs=None) -> Int4PairsConfig:
    """The table's config for M rows (PAIRS_CONFIGS unless a backend passes its own)."""
    table = PAIRS_CONFIGS if configs is None else configs
    if not table:
        raise ValueError("configs: the table is empty")
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    return table[-1][1]


def pairs_unsupported(k: int, group_size: int) -> str | None:
    """Why the pairs order cannot take a weight of K inputs in groups of group_size, else None
    (its kernel then takes bf16 and fp16 x; fp32 x goes to the k-order kernels)."""
    if k % CHUNK:
        return f"K={k} is not a multiple of {CHUNK}"
    if group_size <= 0 or group_size % CHUNK:
        return f"group size {group_size} is not a multiple of {CHUNK} (per-k scales)"
    return None


def pairs_positions(k: int, device: torch.device | None = None) -> torch.Tensor:
    """int64 [K]: packed position 8 r + i (nibble i of word r) holds channel positions[8 r + i]
    of the pairs order, so codes_pairs[:, p] = codes[:, positions[p]]."""
    p = torch.arange(k, device=device)
    chunk, word, nib = p // CHUNK, (p % CHUNK) // 8, p % 8
    return chunk * CHUNK + 32 * (nib % 4) + 2 * word + nib // 4


def tile_pairs(qweight: torch.Tensor, rows: int) -> torch.Tensor:
    """The pairs-order words [N, K/8] regrouped losslessly into tiles of `rows` (a power of
    two) weight rows: int32 [N / rows, K / 128, rows, 16], so the kernel's step (rows x one
    128-k chunk) reads one contiguous run of rows x 64 bytes instead of 64 bytes from each of
    `rows` rows."""
    n, words = qweight.shape
    if rows <= 0 or rows & (rows - 1):
        raise ValueError(f"rows: {rows} must be a power of two (the kernels shift, not divide)")
    if n % rows or words % _WORDS:
        raise ValueError(f"qweight: {n} rows and {words} words do not tile by {rows} x {_WORDS}")
    return qweight.view(n // rows, rows, words // _WORDS, _WORDS).permute(0, 2, 1, 3).contiguous()


def word_strides(qweight: torch.Tensor) -> tuple[int, tuple[int, int, int, int]]:
    """(N, (row, tile, chunk, tile shift)) of 4-bit words, row-major [N, K/8] (its rows' words
    contiguous) or tiled [N / rows, K / 128, rows, 16] (`tile_pairs`, rows a power of two):
    word r of row n sits at (n >> shift) * tile + (n & (2^shift - 1)) * row + (r // 16) * chunk
    + r % 16 (a shift, not a division: the kernels compute it per row; row-major words take a
    shift past any row index and a tile stride of 0)."""
    if qweight.dim() == 4:
        rows = qweight.shape[2]
        if rows & (rows - 1):
            raise ValueError(f"qweight: tiles of {rows} rows; the kernels take a power of two")
        return qweight.shape[0] * rows, (
            qweight.stride(2), qweight.stride(0), qweight.stride(1), rows.bit_length() - 1
        )  # fmt: skip
    return qweight.shape[0], (qweight.stride(0), 0, _WORDS, ROW_MAJOR_SHIFT)


def untile_pairs(qweight: torch.Tensor) -> torch.Tensor:
    """Row-major words [N, K/8] of tiled ones (a copy); row-major ones unchanged."""
    if qweight.dim() != 4:
        return qweight
    tiles, chunks, rows, words = qweight.shape
    return qweight.permute(0, 2, 1, 3).reshape(tiles * rows, chunks * words)


@triton.jit
def _pair(words, zneg, NIB: tl.constexpr, MAGIC2: tl.constexpr, MAGIC: tl.constexpr,
          ONE2: tl.constexpr, PAIR_PTX: tl.constexpr, DOT_DTYPE: tl.constexpr,
          USE_PTX: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    # Nibbles NIB and NIB + 4 of each uint32 word as (q - z) in DOT_DTYPE: the (k, k + 1) pair.
    if USE_PTX:
        # zneg: -(MAGIC + z) in both halves; lop3 0xEA is (a & b) | c.
        lo, hi = tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t, one;
            mov.b32 one, {ONE2};
            shr.u32 t, $2, {4 * NIB};
            lop3.b32 t, t, 0x000F000F, {MAGIC2}, 0xea;
            fma.rn.{PAIR_PTX} t, t, one, $3;
            mov.b32 {{$0, $1}}, t;
            }}""",
            constraints="=h,=h,r,r",
            args=[words, zneg],
            dtype=(DOT_DTYPE.value, DOT_DTYPE.value),
            is_pure=True,
            pack=1,
        )
    elif INTERPRET:
        # The interpreter's bf16 dots are wrong: exact integers in fp32 instead.
        zf = zneg.to(tl.float32) + MAGIC  # -z
        lo = ((words >> (4 * NIB)) & 0xF).to(tl.float32) + zf
        hi = ((words >> (4 * NIB + 16)) & 0xF).to(tl.float32) + zf
    else:
        v = ((words >> (4 * NIB)) & 0x000F000F) | MAGIC2
        lo = (v & 0xFFFF).to(tl.uint16).to(DOT_DTYPE, bitcast=True) + zneg
        hi = (v >> 16).to(tl.uint16).to(DOT_DTYPE, bitcast=True) + zneg
    return lo, hi


@triton.jit
def _int4_pairs_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    stride_x_row,
    stride_qw_row,  # words between rows of a tile
    stride_qw_tile,  # words between tiles of 2^tile_shift rows (0: one tile)
    stride_qw_chunk,  # words between a row's 128-k chunks (16 in the row-major [N, K/8])
    tile_shift,
    stride_s_row,
    stride_s_group,
    stride_z_row,
    stride_z_group,
    stride_out_split,
    stride_out_row,
    n_rows,
    n_cols,
    n_words,
    words_per_split,
    GROUP_CHUNKS: tl.constexpr,  # 128-k chunks per scale group (the group size / 128)
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    MAGIC2: tl.constexpr,
    MAGIC: tl.constexpr,
    ONE2: tl.constexpr,
    PAIR_PTX: tl.constexpr,
    USE_PTX: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_wait(PDL)
    # One program: BLOCK_N weight rows against BLOCK_M rows of x over one K split, a 128-k chunk
    # [BLOCK_N, 16 words] per step: W_i [BN, 32] @ x[k0 + 32 i : +32, rows] for i = 0..3 on
    # tensor cores (the swapped product: weights fill the MMA's M side), scaled per chunk.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    pid_m = pid % blocks_m  # neighbours share a weight tile (L2 hits at M > BLOCK_M)
    pid_n = pid // blocks_m
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past the end re-read the last row (in bounds, never stored): loads need no mask.
    rn_in = tl.minimum(rn, n_cols - 1).to(tl.int64)
    rm_in = tl.minimum(rm, n_rows - 1).to(tl.int64)
    rj = tl.arange(0, 16)
    rk = tl.arange(0, 32)
    w_rows = (rn_in >> tile_shift) * stride_qw_tile + (rn_in & ((1 << tile_shift) - 1)) * (
        stride_qw_row
    )
    w_ptrs = qweight_ptr + w_rows[:, None] + rj[None, :]  # [BN, 16]
    x_ptrs = x_ptr + rm_in[None, :] * stride_x_row + rk[:, None]  # [32, BM]
    s_rows = scales_ptr + rn_in * stride_s_row
    z_rows = zeros_ptr + rn_in * stride_z_row
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    r_start = pid_k * words_per_split
    r_end = tl.minimum(r_start + words_per_split, n_words)
    last_group = (n_words // 16 - 1) // GROUP_CHUNKS
    # Scales and zeros one chunk ahead: the first chunk's here, each step loads the next's. The
    # group of a chunk: a division by a constant (a shift for the usual one-chunk groups).
    g = (r_start // 16) // GROUP_CHUNKS
    s_next = tl.load(s_rows + g * stride_s_group)
    z_next = tl.load(z_rows + g * stride_z_group)
    for r0 in range(r_start, r_end, 16):
        words = tl.load(w_ptrs + (r0 // 16) * stride_qw_chunk, eviction_policy="evict_first")
        words = words.to(tl.uint32, bitcast=True)
        s = s_next.to(tl.float32)  # [BN]
        z = z_next.to(tl.float32)
        g = tl.minimum((r0 // 16 + 1) // GROUP_CHUNKS, last_group)
        s_next = tl.load(s_rows + g * stride_s_group)
        z_next = tl.load(z_rows + g * stride_z_group)
        zneg = (-(z + MAGIC)).to(DOT_DTYPE)  # exact: an integer below 2^8 (2^11 for fp16)
        if USE_PTX:
            zbits = zneg.to(tl.uint16, bitcast=True).to(tl.uint32)
            zop = (zbits | (zbits << 16))[:, None]  # [BN, 1]: both halves
        else:
            zop = zneg[:, None]
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for i in tl.static_range(4):
            lo, hi = _pair(
                words, zop, i, MAGIC2, MAGIC, ONE2, PAIR_PTX, DOT_DTYPE, USE_PTX, INTERPRET
            )
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 32))  # column 2 j + h from word j
            xi = tl.load(x_ptrs + (r0 * 8 + 32 * i))
            if INTERPRET:
                part = tl.dot(w, xi.to(tl.float32), part, input_precision="ieee")
            else:
                part = tl.dot(w, xi, part)
        acc += part * s[:, None]
    mask = (rn < n_cols)[:, None] & (rm < n_rows)[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_in).to(tl.float32)[:, None]
        out = out_ptr + rm.to(tl.int64)[None, :] * stride_out_row + rn[:, None]
        tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = out_ptr + pid_k * stride_out_split + rm.to(tl.int64)[None, :] * stride_out_row
        tl.store(out + rn[:, None], acc, mask=mask)


def launch_pairs(x, qweight, scales, zeros, group_size, bias, out, cfg: Int4PairsConfig,
                 sm_count: int, reduce_splits) -> None:  # fmt: skip
    """Runs the kernel for x [M, K] (bf16/fp16, contiguous rows, in the weight's channel order)
    into out [M, N]; `reduce_splits(dest, bias_or_dummy, out, split, m, n, has_bias)` sums
    split-K partials. The caller has checked shapes and `pairs_unsupported`."""
    m, k = x.shape
    n, w_strides = word_strides(qweight)
    chunks = k // CHUNK
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    # Auto: as many splits as fit the resident programs in one wave (never a partial second
    # wave: ncu saw 560 programs on 528 slots spend up to half the kernel in the tail).
    split = cfg.split_k or (cfg.programs_per_sm * sm_count) // tiles
    split = max(1, min(split, chunks))
    per_split = triton.cdiv(chunks, split)  # whole chunks per split
    split = triton.cdiv(chunks, per_split)  # no empty split
    final = split == 1
    dest = out if final else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    magic2, magic, one2, pair_ptx = _MAGIC[x.dtype]
    b = bias.contiguous() if bias is not None else qweight  # a dummy pointer when absent
    interp = interpreting()
    _int4_pairs_kernel[(tiles, split)](
        x, qweight, scales, zeros, b, dest, x.stride(0), *w_strides, scales.stride(0),
        scales.stride(1), zeros.stride(0), zeros.stride(1), 0 if final else dest.stride(0),
        dest.stride(-2), m, n, k // 8, per_split * _WORDS, GROUP_CHUNKS=group_size // CHUNK,
        HAS_BIAS=bias is not None, FINAL=final, DOT_DTYPE=_TL_DTYPE[x.dtype], MAGIC2=magic2,
        MAGIC=magic, ONE2=one2, PAIR_PTX=pair_ptx,
        USE_PTX=USE_PTX and x.device.type == "cuda" and torch.version.hip is None and not interp,
        INTERPRET=interp, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device, "gemm"),
    )  # fmt: skip
    if not final:
        reduce_splits(dest, b, out, split, m, n, bias is not None)
