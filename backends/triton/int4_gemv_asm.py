"""Decode-sized (M <= 16) 4-bit weight-only GEMM on the packed layout (`Int4Packed`) that
dequantizes with packed 16-bit arithmetic in inline PTX and multiplies on tensor cores.

Math (`backends.cpu.linear.int4_linear`): y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g]
+ bias[n], g = k // group_size. One program streams [BLOCK_N, BLOCK_K] weights of one K split; the
K tile lies in one group, so the tile's dot product is taken with the exact integers q - z and
scaled by s (fp32) after the dot (`tl.dot(W_tile, x_tile.T)`, "swap AB", M padded to 16).
Dequantization (the FasterTransformer / Marlin trick): `lop3` ((w >> 4j) & 0x000F000F) | MAGIC2
drops nibbles j and j + 4 of a word into the low mantissa bits of the two halves of an fp16x2 /
bf16x2 whose value is MAGIC + q (fp16 0x6400 = 1024, bf16 0x4300 = 128: the last mantissa place
is worth 1), and one `fma.rn.{f16x2,bf16x2}` by 1.0 with -(MAGIC + z) gives q - z in both halves,
exactly (|q - z| <= 15). Per int32 word: 3 shifts, 4 lop3, 4 fma for 8 weights.
Rounding: products x * (q - z) are exact, accumulation fp32 (tensor cores), the group scale is
applied in fp32 per tile, split-K partials are summed in split order by a second kernel
(deterministic, no atomics), then one rounding to x's dtype. Under TRITON_INTERPRET=1 the asm
cannot run: plain Triton ops compute the same q - z, and bf16 dots run in fp32 (the interpreter's
bf16 tl.dot is wrong). The launcher takes what this kernel can; `asm_reasons` says why not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.int4_gemm import Int4Packed, _split_reduce_kernel
from backends.triton.quant import cast_rtne, check_float, interpreting

MAX_M = 16  # the tensor-core tile's M side; every M in 1..16 is padded to it
DOT_BLOCK_M = 16
MIN_BLOCK_K = 16  # tl.dot's smallest K
MIN_CC = (8, 0)  # fma.rn.bf16x2 needs sm_80
_REDUCE_BLOCK = 1024
_MAX_GRID = 65535  # CUDA's limit on grid axis 1

# -- the PTX ----------------------------------------------------------------------------------
# One int32 word w (nibble i = bits 4i..4i+3 = the code at k = 8r + i) and one 32-bit register
# zneg = -(MAGIC + z) in both halves -> 8 16-bit outputs $0..$7 = q_i - z for nibble i = 0..7.
# Register t_j (j = 0..3) = ((w >> 4j) & PAIR_MASK) | MAGIC2: low half nibble j, high half j + 4.
PAIR_MASK = 0x000F000F
LOP3_AND_OR = 0xEA  # lop3 truth table of (a & b) | c: (0xF0 & 0xCC) | 0xAA
MAGIC = {"fp16": 0x6400, "bf16": 0x4300}  # 1024.0 / 128.0: mantissa's last place = 1
ONE = {"fp16": 0x3C00, "bf16": 0x3F80}  # 1.0
NEG_BIT = 0x8000  # the sign bit of a 16-bit float
FMA = {"fp16": "fma.rn.f16x2", "bf16": "fma.rn.bf16x2"}
OUT_CONSTRAINTS = "=h,=h,=h,=h,=h,=h,=h,=h,r,r"  # 8 16-bit outputs; inputs $8 = w, $9 = zneg


def dequant_asm(kind: str) -> str:
    """The PTX block for fp16 or bf16 ("fp16" / "bf16")."""
    magic2 = MAGIC[kind] * 0x10001
    one2 = ONE[kind] * 0x10001
    lines = ["{", ".reg .b32 dq_w, dq_one, dq_t<4>;", f"mov.b32 dq_one, {one2:#010x};"]
    for j in range(4):
        src = "$8"
        if j:
            lines.append(f"shr.u32 dq_w, $8, {4 * j};")
            src = "dq_w"
        lines.append(
            f"lop3.b32 dq_t{j}, {src}, {PAIR_MASK:#010x}, {magic2:#010x}, {LOP3_AND_OR:#x};"
        )
        lines.append(f"{FMA[kind]} dq_t{j}, dq_t{j}, dq_one, $9;")
        lines.append(f"mov.b32 {{${j}, ${j + 4}}}, dq_t{j};")  # {low half, high half}
    lines.append("}")
    return "\n".join(lines)


def neg_magic(dtype: torch.dtype) -> int:
    """The 16-bit pattern of -MAGIC for x's dtype; or-ing z into it gives -(MAGIC + z)."""
    return NEG_BIT | MAGIC["bf16" if dtype == torch.bfloat16 else "fp16"]


_ASM_FP16 = tl.constexpr(dequant_asm("fp16"))
_ASM_BF16 = tl.constexpr(dequant_asm("bf16"))
_CONSTRAINTS = tl.constexpr(OUT_CONSTRAINTS)


@dataclass(frozen=True)
class AsmConfig:
    """One launch shape: block_n output columns x block_k k per tile (powers of two, >= 16;
    block_k shrinks to the largest power of two dividing the group size), split_k K splits
    (0: enough to give every SM ~2 programs), num_warps, num_stages (software pipelining)."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name, value, least in (("block_n", self.block_n, 16), ("block_k", self.block_k,
                                   MIN_BLOCK_K), ("num_warps", self.num_warps, 1)):  # fmt: skip
            if value < least or value & (value - 1):
                raise ValueError(f"{name}: {value} must be a power of two >= {least}")
        if self.split_k < 0:
            raise ValueError(f"split_k: {self.split_k} must be >= 0 (0 picks one per device)")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")


# (max_m, config): the first entry whose max_m >= M serves M. Not yet measured: the defaults
# below are a starting point; `python bench/int4_gemv_asm.py --out X.json` prints the best of its
# sweep per (shape, M) as a replacement table.
ConfigTable = Sequence[tuple[int, AsmConfig]]
ASM_CONFIGS: tuple[tuple[int, AsmConfig], ...] = (
    (4, AsmConfig(64, 128, split_k=0, num_warps=4, num_stages=4)),
    (16, AsmConfig(64, 128, split_k=0, num_warps=4, num_stages=4)),
)


def pick_asm_config(m: int, configs: ConfigTable | None = None) -> AsmConfig:
    """The table's config for M rows (ASM_CONFIGS unless a backend passes its own)."""
    table = ASM_CONFIGS if configs is None else configs
    if not table:
        raise ValueError("configs: the table is empty")
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    return table[-1][1]


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one at a time: no device to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


def _asm_runs_on(device: torch.device) -> bool:
    """Inline PTX runs here: an NVIDIA GPU of sm_80+, not the interpreter."""
    if device.type != "cuda" or torch.version.cuda is None or interpreting():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CC


def tile_k(block_k: int, group_size: int) -> int:
    """The K tile: the largest power of two dividing group_size, at most block_k (0: none)."""
    if group_size <= 0:
        return 0
    return min(block_k, group_size & -group_size)


# -- kernel -------------------------------------------------------------------------------------
@triton.jit
def _interleave8(v0, v1, v2, v3, v4, v5, v6, v7):
    # [BN, BR] x 8 -> [BN, 8 * BR], column 8r + i from v_i[:, r]: joins keep the new axis inside
    # each thread, so this reorders registers only.
    even = tl.interleave(tl.interleave(v0, v4), tl.interleave(v2, v6))
    odd = tl.interleave(tl.interleave(v1, v5), tl.interleave(v3, v7))
    return tl.interleave(even, odd)


@triton.jit
def _nib(words, zf, i: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # The asm's value without asm: q_i - z, exact in fp32, exact again in fp16 / bf16.
    return (((words >> (4 * i)) & 0xF).to(tl.float32) - zf).to(DOT_DTYPE)


@triton.jit
def _dequant_tile(
    words, z, USE_ASM: tl.constexpr, NEG_MAGIC: tl.constexpr, DOT_DTYPE: tl.constexpr
):
    # words: int32 [BN, BR]; z: uint8 [BN] -> [BN, 8 * BR] in DOT_DTYPE, column 8r + i holding
    # q - z of nibble i of word r (packed k order, as x is loaded).
    if USE_ASM:
        zh = z.to(tl.uint32) | NEG_MAGIC  # -(MAGIC + z): z lands in the mantissa's low bits
        zneg = tl.broadcast_to((zh | (zh << 16))[:, None], words.shape)
        if DOT_DTYPE == tl.bfloat16:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _ASM_BF16, _CONSTRAINTS, [words, zneg], dtype=(tl.int16,) * 8, is_pure=True,
                pack=1,
            )  # fmt: skip
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _ASM_FP16, _CONSTRAINTS, [words, zneg], dtype=(tl.int16,) * 8, is_pure=True,
                pack=1,
            )  # fmt: skip
        w = _interleave8(
            v0.to(DOT_DTYPE, bitcast=True), v1.to(DOT_DTYPE, bitcast=True),
            v2.to(DOT_DTYPE, bitcast=True), v3.to(DOT_DTYPE, bitcast=True),
            v4.to(DOT_DTYPE, bitcast=True), v5.to(DOT_DTYPE, bitcast=True),
            v6.to(DOT_DTYPE, bitcast=True), v7.to(DOT_DTYPE, bitcast=True),
        )  # fmt: skip
    else:
        zf = z.to(tl.float32)[:, None]
        w = _interleave8(
            _nib(words, zf, 0, DOT_DTYPE), _nib(words, zf, 1, DOT_DTYPE),
            _nib(words, zf, 2, DOT_DTYPE), _nib(words, zf, 3, DOT_DTYPE),
            _nib(words, zf, 4, DOT_DTYPE), _nib(words, zf, 5, DOT_DTYPE),
            _nib(words, zf, 6, DOT_DTYPE), _nib(words, zf, 7, DOT_DTYPE),
        )  # fmt: skip
    return w


@triton.jit(do_not_specialize=["n_rows", "n_tiles", "tiles_per_split", "tiles_per_group"])
def _int4_asm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
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
    n_tiles,
    tiles_per_split,
    tiles_per_group,
    USE_ASM: tl.constexpr,
    NEG_MAGIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FINAL: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program: BLOCK_N weight rows (output columns n) against all M <= 16 rows of x over one
    # K split of whole tiles. Per tile: words [BN, BR] (each row's 4 * BR bytes contiguous), the
    # tile's group's scale and zero per row, x [BK, BM] (k contiguous per row of x); acc [BN, BM].
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < n_cols
    m_ok = rm < n_rows
    # Rows past the end re-read the last one (in bounds, never stored): loads need no masks (K
    # splits are whole tiles and K is a multiple of the tile).
    rn_in = tl.minimum(rn, n_cols - 1).to(tl.int64)
    rm_in = tl.minimum(rm, n_rows - 1).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, 8 * BLOCK_R)
    w_ptrs = qweight_ptr + rn_in[:, None] * stride_qw_row + rr[None, :]  # [BN, BR]
    x_ptrs = x_ptr + rm_in[None, :] * stride_x_row + rk[:, None]  # [BK, BM]
    s_rows = scales_ptr + rn_in * stride_s_row  # [BN]
    z_rows = zeros_ptr + rn_in * stride_z_row
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Tile indices, not word offsets: t * BLOCK_R tells the compiler the words are 16-byte
    # aligned (vector cp.async). The group's scale and zero (1-2 byte gathers, which cp.async
    # cannot pipeline) are loaded one tile ahead into registers.
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    s_next = tl.load(s_rows + t_start // tiles_per_group)
    z_next = tl.load(z_rows + t_start // tiles_per_group)
    for t in range(t_start, t_end):
        s = s_next.to(tl.float32)
        z = z_next
        g_next = tl.minimum(t + 1, t_end - 1) // tiles_per_group
        s_next = tl.load(s_rows + g_next)
        z_next = tl.load(z_rows + g_next)
        r0 = t * BLOCK_R
        words = tl.load(w_ptrs + r0, eviction_policy="evict_first")
        xt = tl.load(x_ptrs + r0 * 8)
        w = _dequant_tile(words, z, USE_ASM, NEG_MAGIC, DOT_DTYPE)  # [BN, BK], exact q - z
        if DOT_DTYPE == tl.float32:
            part = tl.dot(w, xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w, xt.to(DOT_DTYPE))
        acc += part * s[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_in).to(tl.float32)[:, None]
        out = out_ptr + rm.to(tl.int64)[None, :] * stride_out_row + rn[:, None]
        tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = out_ptr + pid_k * stride_out_split + rm.to(tl.int64)[None, :] * stride_out_row
        tl.store(out + rn[:, None], acc, mask=mask)


# -- launcher -----------------------------------------------------------------------------------
def asm_reasons(x: torch.Tensor, p: Int4Packed) -> list[str]:
    """Why `int4_linear_packed_asm` cannot take (x, p) (empty: it can). The caller falls back to
    `backends.triton.int4_gemm.int4_linear` on any reason."""
    if not isinstance(p, Int4Packed):
        return [f"weight is a {type(p).__name__}, not an Int4Packed (repack_int4_for_triton)"]
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return [f"x is {what}, not a 2-D [M, K] tensor"]
    reasons = []
    m, k = x.shape
    if m > MAX_M:
        reasons.append(f"M={m} > {MAX_M} (the kernel pads M to one 16-row tile)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"x dtype {x.dtype} is not bfloat16 or float16")
    if k != p.in_features:
        reasons.append(f"x's K={k} differs from the packed weight's K={p.in_features}")
    if p.g_idx is not None:
        reasons.append("the weight has a g_idx (groups of unequal size): scales vary per k")
    elif tile_k(2**30, p.group_size) < MIN_BLOCK_K:
        reasons.append(f"group_size={p.group_size} is not a multiple of {MIN_BLOCK_K} (no K "
                       "tile of >= 16 inside one group)")  # fmt: skip
    if p.qweight.dtype != torch.int32 or p.qweight.dim() != 2 or p.qweight.stride(-1) != 1:
        reasons.append("qweight is not a row-contiguous int32 [N, K/8]")
    if p.zeros.dtype != torch.uint8:
        reasons.append(f"zeros dtype {p.zeros.dtype} is not uint8")
    if p.scales.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"scales dtype {p.scales.dtype} is not a float dtype")
    groups = k // p.group_size if p.g_idx is None and p.group_size > 0 else None
    for name, t in (("scales", p.scales), ("zeros", p.zeros)):
        if groups is not None and tuple(t.shape) != (p.out_features, groups):
            reasons.append(f"{name} shape {tuple(t.shape)} is not [N={p.out_features}, "
                           f"groups={groups}]")  # fmt: skip
        elif t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
            reasons.append(f"{name} rows are not contiguous")
    devices = {str(t.device) for t in (x, p.qweight, p.scales, p.zeros)}
    if len(devices) > 1:
        reasons.append(f"x and the weight are on different devices ({', '.join(sorted(devices))})")
    elif x.device.type == "cuda" and not interpreting():
        if torch.version.cuda is None:
            reasons.append("the dequantization is NVIDIA PTX; this GPU is not NVIDIA")
        elif torch.cuda.get_device_capability(x.device) < MIN_CC:
            cc = torch.cuda.get_device_capability(x.device)
            reasons.append(f"compute capability {cc} < {MIN_CC} (fma.rn.bf16x2)")
    return reasons


def split_plan(cfg: AsmConfig, n: int, k: int, block_k: int, sm_count: int) -> tuple[int, int]:
    """(splits, K tiles per split); split_k 0 aims at ~2 programs per
    SM, keeping >= 4 tiles per split."""
    k_tiles = k // block_k
    if cfg.split_k:
        want = cfg.split_k
    else:
        programs = triton.cdiv(n, cfg.block_n)
        want = max(1, min(triton.cdiv(2 * sm_count, programs), k_tiles // 4, 32))
    per_split = triton.cdiv(k_tiles, max(1, min(want, k_tiles)))
    return triton.cdiv(k_tiles, per_split), per_split


def int4_linear_packed_asm(
    x: torch.Tensor,
    p: Int4Packed,
    bias: torch.Tensor | None = None,
    config: AsmConfig | None = None,
    *,
    configs: ConfigTable | None = None,
    use_asm: bool | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias for W = dequantize_packed(p) (fp32 accumulation of the exact products
    x * (q - z), scales applied in fp32 per group, one rounding to x's dtype).

    x: [M <= 16, K] bf16 / fp16 (in the checkpoint's channel order: p.perm is applied here);
    p: an Int4Packed without g_idx; bias: [N] (any float dtype, added in fp32). Returns [M, N] in
    x's dtype. `config` forces a launch shape, else `configs` (default ASM_CONFIGS) picks one by
    M. `use_asm` None takes the PTX dequantization wherever it runs (NVIDIA sm_80+, not the
    interpreter); False computes the same values with plain Triton ops. Raises ValueError with
    `asm_reasons` when the kernel cannot take the input.
    """
    reasons = asm_reasons(x, p)
    if reasons:
        raise ValueError(
            "int4_linear_packed_asm cannot take this input: " + "; ".join(reasons)
            + " (use backends.triton.int4_gemm.int4_linear)"
        )  # fmt: skip
    m, k = x.shape
    n = p.out_features
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [N={n}]")
        check_float("bias", bias)
        if bias.device != x.device:
            raise ValueError(f"bias: on {bias.device}, x on {x.device}; move it to x's device")
    can_asm = _asm_runs_on(x.device)
    if use_asm and not can_asm:
        raise ValueError(
            "use_asm: True, but inline PTX runs only on an NVIDIA sm_80+ GPU without "
            "TRITON_INTERPRET=1; pass use_asm=None or False"
        )
    asm = can_asm if use_asm is None else use_asm
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    cfg = config if config is not None else pick_asm_config(m, configs)
    block_k = tile_k(cfg.block_k, p.group_size)
    xc = x if x.stride(1) == 1 else x.contiguous()
    if p.perm is not None:
        xc = xc.index_select(1, p.perm)  # [M, K] in the packed channel order
    splits, tiles_per_split = split_plan(cfg, n, k, block_k, _sm_count(x.device))
    if splits > _MAX_GRID:
        raise ValueError(f"config: split_k gives {splits} splits > {_MAX_GRID}")
    final = splits == 1
    dest = out if final else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    if x.dtype == torch.bfloat16 and interpreting():
        dot_dtype = tl.float32  # the interpreter's bf16 tl.dot is wrong (Triton issue #11584)
    else:
        dot_dtype = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
    qw, sc, zs = p.qweight, p.scales, p.zeros
    b = bias if bias is not None else qw  # a dummy pointer when absent
    interpret = interpreting()
    _int4_asm_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        xc, qw, sc, zs, b, dest, xc.stride(0), qw.stride(0), sc.stride(0), zs.stride(0),
        0 if final else dest.stride(0), dest.stride(-2), m, n, k // block_k, tiles_per_split,
        p.group_size // block_k, USE_ASM=asm, NEG_MAGIC=neg_magic(x.dtype), DOT_DTYPE=dot_dtype,
        HAS_BIAS=bias is not None, FINAL=final, INTERPRET=interpret, BLOCK_M=DOT_BLOCK_M,
        BLOCK_N=cfg.block_n, BLOCK_R=block_k // 8, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if not final:
        _split_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            dest, b, out, splits, m * n, n, HAS_BIAS=bias is not None, INTERPRET=interpret,
            BLOCK=_REDUCE_BLOCK,
        )  # fmt: skip
    return out
