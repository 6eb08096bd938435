"""4-bit weight-only GEMM for decode sizes (M <= 8) on NVIDIA GPUs, written in Gluon (Triton's
explicit-layout dialect): the "pairs" words go from global memory straight into registers laid
out as mma.sync operands, with no shared memory and no barrier in the loop.

Same packed weight as `backends.triton.int4_tc` (order "pairs", words row-major or tiled): in
each 128-k chunk, nibble i (0-3) of word j holds k = 32 i + 2 j and nibble i + 4 holds k + 1.
Thread t of a quad (lane % 4) loads words 4 t .. 4 t + 3 of a row (one 16-byte load); for nibble
pair i those hold k = 32 i + 8 t + 2 u + h (u the word, h the half), which is exactly the
(k, k + 1) pairs an m16n8k16 A operand wants once k is renumbered 8 u + 2 t + h inside the
32-wide piece; x is loaded in the same renumbering (8 contiguous values of row m at 32 i + 8 t),
so both operands reach the MMA by register renaming only (`convert_layout(..., assert_trivial)`).

Math: one lop3 makes each pair MAGIC + q exactly (bf16 128 + q, fp16 1024 + q); the MMA sums
(MAGIC + q) x in fp32, a second MMA with an all-ones operand gives sum x per chunk, and
(part - (MAGIC + z) sum_x) * scale is the chunk's exact-integer (q - z) product scaled once
(groups are whole chunks). The subtraction cancels about log2(MAGIC / 8) bits of the fp32
partial (under 8 of 24), far below the output's bf16/fp16 rounding. Split-K partials go to the
shared reduce kernel as in the pairs kernel.

H200 (2026-11-27, Triton 3.6, 8B MLP shapes, `bench/int4_gemm.py`): 0.54-0.58 of copy bandwidth
at M = 1 and 0.50-0.55 at M = 4-8, against 0.45-0.51 and 0.44-0.50 for the wgmma pairs kernel;
GPTQ 8B batch-1 decode 2.70 -> 2.34 ms. The pairs kernel stays from M = 9 (this kernel's x loads
and MMAs double there). docs/benchmarks.md, twelfth session.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

try:  # Gluon ships with Triton >= 3.5; without it (or off NVIDIA) the pairs kernel serves
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton (no Gluon, or another API)
    HAVE_GLUON = False

from backends.triton.pdl import gluon_grid_wait, use_pdl
from backends.triton.quant import interpreting
from hal.env import parse_dims

ENABLED = os.environ.get("HAL_INT4_GLUON", "1") != "0"
# The first chunk's weight loads ahead of the PDL wait (see _int4_gluon_kernel): the packed
# words, scales and zeros are made once at load (`repack_int4_for_triton`, torch ops) and written
# by no kernel after. H200, GPTQ 4-bit Llama-3-8B shape, batch-1 decode with graphs (with
# HAL_GEMV_EARLY): 2.41-2.42 -> 2.35-2.36 ms a step (eighteenth session). HAL_INT4_EARLY=0: off.
EARLY = os.environ.get("HAL_INT4_EARLY", "1") != "0"
BLOCK_M = 8  # the MMA's N side: rows of x per program
# Registers per thread capped so that `programs_per_sm` programs fit an SM's 64K-register file
# (`Int4GluonConfig.maxnreg`): without it ptxas gives the 64 / 4 / 8 shape 66 registers, which
# round to 72 a thread, so 7 programs of 4 warps fit where the split count planned 8 (with the cap:
# 64, no spills, sm_90). HAL_INT4_REG_CAP=0: no cap.
REG_CAP = os.environ.get("HAL_INT4_REG_CAP", "1") != "0"
REGISTERS_PER_SM = 65536


@dataclass(frozen=True)
class Int4GluonConfig:
    """block_n weight rows per program (16 per warp times a power of two), num_warps, and
    programs_per_sm for the split-K count (as many K splits as keep the grid within one wave)."""

    block_n: int = 128
    num_warps: int = 4
    programs_per_sm: int = 4

    def __post_init__(self) -> None:
        reps = self.block_n // (16 * self.num_warps) if self.num_warps > 0 else 0
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps: {self.num_warps} must be a power of two")
        if reps not in (1, 2) or reps * 16 * self.num_warps != self.block_n:
            raise ValueError(
                f"block_n: {self.block_n} must be 16 or 32 rows per warp ({self.num_warps} warps)"
            )
        if self.programs_per_sm < 1:
            raise ValueError(f"programs_per_sm: {self.programs_per_sm} must be >= 1")

    @property
    def maxnreg(self) -> int | None:
        """The most registers a thread may use for programs_per_sm programs to reside on one SM
        (whole multiples of 8, the allocation unit), None when that is no limit (255 or more)."""
        per_thread = REGISTERS_PER_SM // (self.programs_per_sm * self.num_warps * 32) // 8 * 8
        return per_thread if per_thread < 255 else None


# (max_m, min_n, config): the first entry with M <= max_m and N >= min_n. H200 (2026-11-27):
# block_n 128 / 4 warps / 4 programs per SM was best or within 5% of the best at M = 1, 4, 8 on
# gate, gate_up and down of the 8B shape. H200 (2026-11-29, thirtieth session, in-process sweep
# of 11 shapes on qkv / o / gate / gate_up / down, two rounds, docs/benchmarks.md): from N = 12288
# (gate or up alone, as at TP=2, and the fused gate_up) half-height blocks, twice as many
# resident, read faster: 64 / 4 / 8 at M = 1 / 4 / 8 gate_up 0.633-0.647 / 0.598-0.601 /
# 0.557-0.559 of copy against 0.616-0.619 / 0.552-0.555 / 0.522-0.523, gate 0.59 / 0.55-0.57 /
# 0.53 against 0.56 / 0.51-0.52 / 0.50; down (N 4096) and o lose with it (down M = 1 0.47).
GLUON_CONFIGS: tuple[tuple[int, int, Int4GluonConfig], ...] = (
    (BLOCK_M, 12288, Int4GluonConfig(block_n=64, num_warps=4, programs_per_sm=8)),
    (BLOCK_M, 0, Int4GluonConfig()),
)


def config_override(value: str | None) -> Int4GluonConfig | None:
    """HAL_INT4_GLUON_CFG=NxWxP (block_n x num_warps x programs_per_sm): one launch shape for
    every call, replacing the table (for measuring); unset or empty: None, the table stands."""
    dims = parse_dims("HAL_INT4_GLUON_CFG", value, "NxWxP (block_n x num_warps x programs_per_sm)",
                      "128x4x4")  # fmt: skip
    return None if dims is None else Int4GluonConfig(*dims)


_OVERRIDE = config_override(os.environ.get("HAL_INT4_GLUON_CFG"))
if _OVERRIDE is not None:
    GLUON_CONFIGS = ((BLOCK_M, 0, _OVERRIDE),)
MAX_M = max(max_m for max_m, _, _ in GLUON_CONFIGS)


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def usable(x: torch.Tensor) -> str | None:
    """Why this kernel cannot take x (None when it can): it needs Gluon, an NVIDIA GPU of
    compute capability 8.0 or newer (mma.sync with bf16), no interpreter, bf16 or fp16 x whose
    rows start on 16-byte boundaries, and HAL_INT4_GLUON not 0."""
    if x.device.type != "cuda":
        return "not an NVIDIA GPU (or the interpreter)"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    why = device_reason(_capable(index))
    if why is not None:
        return why
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype}, not bfloat16 or float16"
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        return "x rows are not contiguous 16-byte-aligned runs"
    return None


def device_reason(cc_ok: bool) -> str | None:
    """Why no call on this device can take the kernel (None when bf16/fp16 x can), for `hal
    info`: cc_ok says whether the device has compute capability 8.0 or newer."""
    if not ENABLED:
        return "HAL_INT4_GLUON=0"
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if torch.version.hip is not None or interpreting():
        return "not an NVIDIA GPU (or the interpreter)"
    return None if cc_ok else "compute capability below 8.0"


def pick_config(m: int, n: int = 0, configs=None) -> Int4GluonConfig:
    """The launch shape for M rows of x and N output features (the table's first match)."""
    table = GLUON_CONFIGS if configs is None else configs
    for max_m, min_n, cfg in table:
        if m <= max_m and n >= min_n:
            return cfg
    raise ValueError(
        f"M={m}, N={n}: no Gluon launch shape (the table takes M <= {max(e[0] for e in table)})"
    )


if HAVE_GLUON:

    @gluon.jit
    def _a_operand(w2, NIB: gl.constexpr, MAGIC2: gl.constexpr, DOT_DTYPE: gl.constexpr,
                   BLOCK_N: gl.constexpr, AL: gl.constexpr):  # fmt: skip
        # w2 [BN, 16, 2] uint32 (each word twice): pair NIB as MAGIC + q in both halves of one
        # register -> the A operand [BN, 32] with k renumbered 8 u + 2 t + h.
        if NIB == 0:
            asm: gl.constexpr = f"lop3.b32 $0, $1, 0x000F000F, {MAGIC2}, 0xea;"
        else:
            asm: gl.constexpr = (
                f"{{ .reg .b32 t; shr.u32 t, $1, {4 * NIB}; "
                f"lop3.b32 $0, t, 0x000F000F, {MAGIC2}, 0xea; }}"
            )
        p = gl.inline_asm_elementwise(asm=asm, constraints="=r,r,r", args=[w2],
                                      dtype=DOT_DTYPE.value, is_pure=True, pack=2)  # fmt: skip
        a = gl.reshape(p, [BLOCK_N, 4, 4, 2])  # (row, t, u, h)
        a = gl.reshape(gl.permute(a, [0, 2, 1, 3]), [BLOCK_N, 32])
        return gl.convert_layout(a, AL, assert_trivial=True)

    @gluon.jit
    def _b_operand(xw, BLOCK_M: gl.constexpr, DOT_DTYPE: gl.constexpr, BL: gl.constexpr):
        # xw [BM, 4, 4] int32: bf16/fp16 pairs of x (row, t, u) -> the B operand [32, BM].
        lo, hi = gl.inline_asm_elementwise(asm="mov.b32 {$0, $1}, $2;", constraints="=h,=h,r",
                                           args=[xw], dtype=(DOT_DTYPE.value, DOT_DTYPE.value),
                                           is_pure=True, pack=1)  # fmt: skip
        b = gl.join(lo, hi)  # (row, t, u, h)
        b = gl.reshape(gl.permute(b, [2, 1, 3, 0]), [32, BLOCK_M])
        return gl.convert_layout(b, BL, assert_trivial=True)

    @gluon.jit
    def _piece(w2, xw, NIB: gl.constexpr, part, xs, ones, MAGIC2: gl.constexpr,
               DOT_DTYPE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
               AL: gl.constexpr, BL: gl.constexpr):  # fmt: skip
        # The 32-wide piece NIB of a chunk: part += (MAGIC + q) x, xs += sum of x (all-ones A).
        b = _b_operand(xw, BLOCK_M, DOT_DTYPE, BL)
        part = mma_v2(_a_operand(w2, NIB, MAGIC2, DOT_DTYPE, BLOCK_N, AL), b, part)
        return part, mma_v2(ones, b, xs)

    @gluon.jit
    def _load_weight_chunk(c, w_ptrs, s_rows, z_rows, stride_qw_chunk, stride_s_group,
                           stride_z_group, GROUP_CHUNKS: gl.constexpr):  # fmt: skip
        # 128-k chunk c of the weight: the words, its group's scales and zeros (fp32).
        words = gl.load(w_ptrs + c * stride_qw_chunk)
        s = gl.load(s_rows + (c // GROUP_CHUNKS) * stride_s_group).to(gl.float32)
        z = gl.load(z_rows + (c // GROUP_CHUNKS) * stride_z_group).to(gl.float32)
        return words, s, z

    @gluon.jit
    def _load_x_chunk(c, x_ptrs):
        # x's four 32-wide pieces of 128-k chunk c.
        x0 = gl.load(x_ptrs + c * 64)
        x1 = gl.load(x_ptrs + c * 64 + 16)
        x2 = gl.load(x_ptrs + c * 64 + 32)
        x3 = gl.load(x_ptrs + c * 64 + 48)
        return x0, x1, x2, x3

    @gluon.jit
    def _load_chunk(c, w_ptrs, s_rows, z_rows, x_ptrs, stride_qw_chunk, stride_s_group,
                    stride_z_group, GROUP_CHUNKS: gl.constexpr):  # fmt: skip
        # 128-k chunk c: the words, its group's scales and zeros (fp32), x's four 32-wide pieces.
        words, s, z = _load_weight_chunk(c, w_ptrs, s_rows, z_rows, stride_qw_chunk,
                                         stride_s_group, stride_z_group, GROUP_CHUNKS)  # fmt: skip
        x0, x1, x2, x3 = _load_x_chunk(c, x_ptrs)
        return words, s, z, x0, x1, x2, x3

    @gluon.jit
    def _int4_gluon_kernel(
        x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
        stride_x_row, stride_qw_row, stride_qw_tile, stride_qw_chunk, tile_shift,
        stride_s_row, stride_s_group, stride_z_row, stride_z_group,
        stride_out_split, stride_out_row, n_rows, n_cols, n_chunks, chunks_per_split,
        GROUP_CHUNKS: gl.constexpr, HAS_BIAS: gl.constexpr, FINAL: gl.constexpr,
        DOT_DTYPE: gl.constexpr, MAGIC2: gl.constexpr, MAGIC: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ONES_N: gl.constexpr,
        WL: gl.constexpr, XL: gl.constexpr, AL: gl.constexpr, BL: gl.constexpr,
        MMA: gl.constexpr, PDL: gl.constexpr, EARLY: gl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_N weight rows x BLOCK_M rows of x over one K split, one 128-k chunk
        # per step, the next chunk's words / scales / zeros / x loaded one step ahead. EARLY:
        # the first chunk's words, scales and zeros (no kernel writes them) load before the PDL
        # wait, so their latency overlaps the previous kernel's tail.
        if not EARLY:
            gluon_grid_wait(PDL)
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        blocks_m = gl.cdiv(n_rows, BLOCK_M)
        pid_m = pid % blocks_m
        pid_n = pid // blocks_m
        # Rows past the end re-read the last row (in bounds, never stored): no load masks.
        rn_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WL))
        rn_w = gl.minimum(rn_w, n_cols - 1).to(gl.int64)
        rj = gl.arange(0, 16, layout=gl.SliceLayout(0, WL))
        w_rows = (rn_w >> tile_shift) * stride_qw_tile + (rn_w & ((1 << tile_shift) - 1)) * (
            stride_qw_row
        )
        w_ptrs = qweight_ptr + (w_rows[:, None] + rj[None, :])
        # x as int32 pairs [BM, 4 (t), 4 (u)]: row m, pair 16 i + 4 t + u of the chunk.
        rm = pid_m * BLOCK_M + gl.arange(
            0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL))
        )
        rm = gl.minimum(rm, n_rows - 1).to(gl.int64)
        rt = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
        ru = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
        x_ptrs = x_ptr.to(gl.pointer_type(gl.int32)) + (
            (rm * (stride_x_row // 2))[:, None, None] + (rt * 4)[None, :, None] + ru[None, None, :]
        )
        rn_s = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        rn_s = gl.minimum(rn_s, n_cols - 1).to(gl.int64)
        s_rows = scales_ptr + rn_s * stride_s_row
        z_rows = zeros_ptr + rn_s * stride_z_row
        ones = gl.full([ONES_N, 32], 1.0, DOT_DTYPE, AL)
        c_start = pid_k * chunks_per_split
        c_end = gl.minimum(c_start + chunks_per_split, n_chunks)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        words, s_cur, z_cur = _load_weight_chunk(c_start, w_ptrs, s_rows, z_rows, stride_qw_chunk,
                                                 stride_s_group, stride_z_group,
                                                 GROUP_CHUNKS)  # fmt: skip
        if EARLY:
            gluon_grid_wait(PDL)
        x0, x1, x2, x3 = _load_x_chunk(c_start, x_ptrs)
        for c in range(c_start, c_end):
            # The next chunk's operands (the last step re-reads its own chunk: cached).
            words_n, s_n, z_n, x0n, x1n, x2n, x3n = _load_chunk(
                gl.minimum(c + 1, c_end - 1), w_ptrs, s_rows, z_rows, x_ptrs, stride_qw_chunk,
                stride_s_group, stride_z_group, GROUP_CHUNKS,
            )  # fmt: skip
            wu = words.to(gl.uint32, bitcast=True)
            w2 = gl.join(wu, wu)
            part = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
            xs = gl.zeros([ONES_N, BLOCK_M], gl.float32, MMA)
            part, xs = _piece(
                w2, x0, 0, part, xs, ones, MAGIC2, DOT_DTYPE, BLOCK_N, BLOCK_M, AL, BL
            )
            part, xs = _piece(
                w2, x1, 1, part, xs, ones, MAGIC2, DOT_DTYPE, BLOCK_N, BLOCK_M, AL, BL
            )
            part, xs = _piece(
                w2, x2, 2, part, xs, ones, MAGIC2, DOT_DTYPE, BLOCK_N, BLOCK_M, AL, BL
            )
            part, xs = _piece(
                w2, x3, 3, part, xs, ones, MAGIC2, DOT_DTYPE, BLOCK_N, BLOCK_M, AL, BL
            )
            if ONES_N == BLOCK_N:
                xsum = xs
            else:  # two row blocks per warp: the same sums for both
                xsum = gl.reshape(gl.permute(gl.join(xs, xs), [2, 0, 1]), [BLOCK_N, BLOCK_M])
                xsum = gl.convert_layout(xsum, MMA, assert_trivial=True)
            acc += (part - (z_cur + MAGIC)[:, None] * xsum) * s_cur[:, None]
            words = words_n
            s_cur = s_n
            z_cur = z_n
            x0 = x0n
            x1 = x1n
            x2 = x2n
            x3 = x3n
        rn_o = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        rm_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        mask = (rn_o < n_cols)[:, None] & (rm_o < n_rows)[None, :]
        if FINAL:
            if HAS_BIAS:
                acc += gl.load(bias_ptr + rn_s).to(gl.float32)[:, None]
            out = out_ptr + rm_o.to(gl.int64)[None, :] * stride_out_row + rn_o[:, None]
            gl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            out = out_ptr + pid_k * stride_out_split + rm_o.to(gl.int64)[None, :] * stride_out_row
            gl.store(out + rn_o[:, None], acc, mask=mask)


def _log2(v: int) -> int:
    return v.bit_length() - 1


@functools.cache
def _layouts(block_n: int, num_warps: int) -> dict:
    """The kernel's register layouts: the MMA (v2, m16n8) and its operands, the words [BN, 16]
    (lane quad t owns words 4 t .. 4 t + 3 of rows g and g + 8, warp w rows 16 w, a second row
    block per warp at 16 x warps) and x [BM, 4, 4] (the same in every warp)."""
    reps = block_n // (16 * num_warps)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                    instr_shape=[16, 8])  # fmt: skip
    words = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]] + [[16 * num_warps << r, 0] for r in range(_log2(reps))],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << w, 0] for w in range(_log2(num_warps))],
        block_bases=[],
        shape=[block_n, 16],
    )
    x = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2]],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[0, 0, 0]] * _log2(num_warps),
        block_bases=[],
        shape=[BLOCK_M, 4, 4],
    )
    return dict(
        WL=words, XL=x, MMA=mma,
        AL=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
        BL=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2),
    )  # fmt: skip


_MAGIC = {  # (MAGIC + q in both halves' bit pattern, MAGIC)
    torch.bfloat16: (0x43004300, 128),
    torch.float16: (0x64006400, 1024),
}


def launch_gluon(x, qweight, scales, zeros, group_size, bias, out, cfg: Int4GluonConfig,
                 sm_count: int, reduce_splits) -> None:  # fmt: skip
    """Runs the kernel for x [M <= 8, K] (`usable(x)` is None) on pairs-order words into out
    [M, N], as `int4_tc.launch_pairs` does (same arguments; the caller checked the shapes)."""
    from backends.triton import int4_tc

    m, k = x.shape
    n, (s_row, s_tile, s_chunk, shift) = int4_tc.word_strides(qweight)
    chunks = k // int4_tc.CHUNK
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, cfg.block_n)
    split = max(1, min((cfg.programs_per_sm * sm_count) // tiles, chunks))
    per_split = triton.cdiv(chunks, split)
    split = triton.cdiv(chunks, per_split)
    final = split == 1
    dest = out if final else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    magic2, magic = _MAGIC[x.dtype]
    b = bias.contiguous() if bias is not None else qweight
    pdl = use_pdl(x.device)
    _int4_gluon_kernel[(tiles, split)](
        x, qweight, scales, zeros, b, dest, x.stride(0), s_row, s_tile, s_chunk, shift,
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        0 if final else dest.stride(0), dest.stride(-2), m, n, chunks, per_split,
        GROUP_CHUNKS=group_size // int4_tc.CHUNK, HAS_BIAS=bias is not None, FINAL=final,
        DOT_DTYPE=gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16, MAGIC2=magic2,
        MAGIC=magic, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, ONES_N=16 * cfg.num_warps,
        PDL=pdl, EARLY=EARLY and pdl, num_warps=cfg.num_warps,
        **({"maxnreg": cfg.maxnreg} if REG_CAP and cfg.maxnreg else {}),
        **({"launch_pdl": True} if pdl else {}),
        **_layouts(cfg.block_n, cfg.num_warps),
    )  # fmt: skip
    if not final:
        reduce_splits(dest, b, out, split, m, n, bias is not None)
