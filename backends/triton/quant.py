"""Triton quantize/dequantize kernels (FP8, INT8, INT4) that match `backends.cpu.quant` bit for bit,
plus the exact number-format helpers (round-half-even, bf16 and FP8 codecs) the other kernels share.

Math (the reference's): dynamic scale = max(absmax, SCALE_EPS) / qmax per tensor or per row, one
correctly rounded fp32 division; q = fp8(clamp(x / scale, -fp8_max, fp8_max)) rounding to nearest
even; int8 q = clamp(round_half_even(x / scale), -128, 127); int4 as `quantize_int4` documents.
Divisions use `tl.math.div_rn` (IEEE division: Triton's `/` may be approximate on the GPU). FP8 is
encoded and decoded from its bits (uint8) rather than cast: that is exact for every format
(e4m3fn, e4m3fnuz, e5m2) on any vendor and under TRITON_INTERPRET=1, whose own FP8 and bf16 casts do
not round to nearest even.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from backends.cpu.quant import INT4_LEVELS, INT4_SYMMETRIC_ZERO, INT8_MAX, SCALE_EPS

# The reference's constants, visible inside kernels (Triton only reads constexpr globals).
_SCALE_EPS = tl.constexpr(SCALE_EPS)
_INT4_LEVELS = tl.constexpr(INT4_LEVELS)
_INT4_SYMMETRIC_ZERO = tl.constexpr(float(INT4_SYMMETRIC_ZERO))

# FP8 format -> (mantissa bits, exponent bias, largest finite value, NaN code, no negative zero,
# has infinities). NaN codes are PyTorch's (0x7F with the sign for the IEEE-like formats).
FP8_CODECS: dict[torch.dtype, tuple[int, int, float, int, bool, bool]] = {
    torch.float8_e4m3fn: (3, 7, 448.0, 0x7F, False, False),
    torch.float8_e4m3fnuz: (3, 8, 240.0, 0x80, True, False),
    torch.float8_e5m2: (2, 15, 57344.0, 0x7F, False, True),
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NATIVE_FP8_MIN_CC = (8, 9)  # sm_89+ converts e4m3fn / e5m2 to fp16 in hardware
# Rows up to this long are quantized in one pass (read once, absmax and codes from registers);
# longer ones loop twice over BLOCK_N columns.
ONE_TILE_MAX_COLS = 16384


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _setup_interpreter() -> None:
    # Under the interpreter every tl.dot is one small numpy matmul, which OpenBLAS's worker
    # threads only slow down (16 ms instead of 0.1 ms for 128x128x256 on a busy 2-core machine),
    # so an interpreting process runs numpy's BLAS on one thread (via threadpoolctl, if present).
    # Masked-off lanes compute on filler values (0 / 0 and the like) as on a GPU, where nobody
    # hears of it; numpy would warn about each one.
    warnings.filterwarnings(
        "ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter"
    )
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")


if interpreting():
    _setup_interpreter()


@functools.lru_cache(maxsize=16)
def native_fp8(device: torch.device) -> bool:
    """Whether kernels on `device` convert e4m3fn / e5m2 in hardware: an NVIDIA GPU of sm_89+
    (Triton's fp8e4nv needs sm_89), never under the interpreter."""
    if device.type != "cuda" or torch.version.cuda is None or interpreting():
        return False
    return torch.cuda.get_device_capability(device) >= NATIVE_FP8_MIN_CC


def fp8_encode_mode(dtype: torch.dtype, device: torch.device) -> int:
    """fp8_encode's NATIVE for `dtype` on `device`: 1 (e4m3fn) / 2 (e5m2) where the hardware
    converts (`native_fp8`), else 0 (from the bits)."""
    if not native_fp8(device):
        return 0
    return {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}.get(dtype, 0)


def fp8_codec(dtype: torch.dtype) -> dict[str, object]:
    """The constexpr kwargs of `fp8_encode` / `fp8_decode` for an FP8 dtype."""
    if dtype not in FP8_CODECS:
        valid = ", ".join(str(d).replace("torch.", "") for d in FP8_CODECS)
        raise ValueError(f"fp8 dtype: {dtype} is not one of {valid}")
    man, bias, fmax, nan, fnuz, via16 = FP8_CODECS[dtype]
    return dict(MAN_BITS=man, EXP_BIAS=bias, FP8_MAX=fmax, NAN_CODE=nan, FNUZ=fnuz, HAS_INF=via16)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not one of float32, bfloat16, float16")


def raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors travel as their uint8 bits (kernels encode and decode them exactly)."""
    return t.view(torch.uint8) if t.dtype in FP8_CODECS else t


# -- shared number-format helpers --------------------------------------------------------------
@triton.jit
def round_half_even(x):
    """fp32 x rounded to the nearest integer, ties to even (torch.round), as fp32."""
    f = tl.floor(x)
    d = x - f  # exact for |x| < 2^23
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x -> DTYPE rounding to nearest even. The interpreter's bf16 cast does not round to
    even, so there bf16 is rounded from the bits; on a GPU the hardware conversion is exact."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)  # NaN stays NaN (its payload could round to inf)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def fp8_encode(
    x,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """fp32 x -> uint8 FP8 bits of fp8(clamp(x, -FP8_MAX, FP8_MAX)), round to nearest even.
    NATIVE (`fp8_encode_mode`): 1 / 2 convert e4m3fn / e5m2 with the hardware's round-to-nearest-
    even cvt (sm_89+; the same bits for every clamped value), 0 from the fp32 bits (any format)."""
    is_nan = x != x
    if NATIVE == 1:  # cvt.rn.satfinite: rounding then saturating equals clamping then rounding
        sign = (x.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        hw = x.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        code = tl.where(is_nan, NAN_CODE | (sign << 7), hw)
    elif NATIVE == 2:  # clamped first (e5m2 has infinities)
        xc = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
        sign = (xc.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        hw = xc.to(tl.float8e5).to(tl.uint8, bitcast=True).to(tl.int32)
        code = tl.where(is_nan, NAN_CODE | (sign << 7), hw)
    else:
        xc = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
        sign = (xc.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        a = tl.abs(xc)
        # Normal range: round the fp32 bits to MAN_BITS (a carry moves into the exponent),
        # then rebias. Below the smallest normal 2^(1 - bias): a multiple of the subnormal step.
        SHIFT: tl.constexpr = 23 - MAN_BITS
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) >> SHIFT) - (
            (127 - EXP_BIAS) << MAN_BITS
        )
        sub_scale: tl.constexpr = 2.0 ** (EXP_BIAS - 1 + MAN_BITS)
        sub = round_half_even(a * sub_scale).to(tl.int32)
        code = tl.where(a < 2.0 ** (1 - EXP_BIAS), sub, normal)
        if FNUZ:
            code = tl.where(code == 0, 0, code | (sign << 7))  # no negative zero
            code = tl.where(is_nan, NAN_CODE, code)
        else:
            code = tl.where(is_nan, NAN_CODE, code) | (sign << 7)
    return code.to(tl.uint8)


@triton.jit
def fp8_decode(
    code,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
):
    """uint8 FP8 bits -> their exact fp32 value. The magnitude bits, shifted into an fp16's
    exponent and mantissa, are the value times 2^(bias - 15) for normals and subnormals alike
    (fp16 has at least as many exponent and mantissa bits), so one exact fp16 -> fp32 conversion
    and a power-of-two product decode every format."""
    c = code.to(tl.int32)
    half = ((c & 0x7F) << (10 - MAN_BITS)) | ((c & 0x80) << 8)
    val = half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * (2.0 ** (15 - EXP_BIAS))
    if FNUZ:
        val = tl.where(c == 0x80, float("nan"), val)  # the lone NaN; there is no -0
    elif not HAS_INF:
        val = tl.where((c & 0x7F) == 0x7F, float("nan"), val)  # e4m3fn: S.1111.111 is NaN
    return val  # e5m2 is fp16's top byte: its infinities and NaNs decode as themselves


# -- FP8 / INT8 quantize -----------------------------------------------------------------------
@triton.jit
def _row_absmax_kernel(x_ptr, out_ptr, stride_x_row, n_rows, n_cols, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):  # fmt: skip
    # out[row] = max |x[row, :]| in fp32 for BLOCK_M rows (exact: abs and max do not round)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    tl.store(out_ptr + rows, tl.max(acc, axis=1), mask=rows < n_rows)


@triton.jit
def _absmax_scale_kernel(absmax_ptr, scale_ptr, n_rows, qmax, BLOCK: tl.constexpr):
    # scale[0] = max(max(absmax[:]), SCALE_EPS) / qmax: the per-tensor dynamic scale
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.load(absmax_ptr + rows, mask=rows < n_rows, other=0.0))
    absmax = tl.maximum(tl.max(acc, axis=0), _SCALE_EPS)
    tl.store(scale_ptr, tl.math.div_rn(absmax, qmax))


@triton.jit
def dynamic_row_scale(x, rows, row_ok, scale_ptr, qmax):
    """Per-row dynamic scales of fp32 x [BLOCK_M, BLOCK_N] (whole rows; masked lanes 0):
    max(absmax, SCALE_EPS) / qmax, stored at scale_ptr[rows] and returned [BLOCK_M]."""
    absmax = tl.maximum(tl.max(tl.abs(x), axis=1), _SCALE_EPS)
    scale = tl.math.div_rn(absmax, tl.zeros_like(absmax) + qmax)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    return scale


@triton.jit
def div_by_row_scale(x, scale, INTERPRET: tl.constexpr):
    """x [BLOCK_M, BLOCK_N] / scale [BLOCK_M] (fp32), the bits of `tl.math.div_rn`, for a dynamic
    row scale (max(absmax, SCALE_EPS) / qmax: every |x / scale| <= qmax, or an infinite scale
    from a row holding inf). On a GPU one correctly rounded reciprocal a row and three
    instructions an element instead of a division's ~10 and its slow-path check (Markstein's
    correction: with inv = RN(1 / s) and z within an ulp of x / s, the remainder z * s - x is
    exact in an fma and RN(z - rem * inv) = RN(x / s)). Signed zeros come out as the division's;
    an infinite scale takes s = inv = 0 (finite x -> +-0, inf -> NaN, as x / inf). The
    interpreter divides (its fma is not fused)."""
    if INTERPRET:
        y = tl.math.div_rn(x, tl.zeros_like(x) + scale[:, None])
    else:
        inf_row = scale == float("inf")
        s = tl.where(inf_row, 0.0, scale)[:, None]
        inv = tl.where(inf_row, 0.0, tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale))[:, None]
        z = x * inv
        # rem = z * s - x (negated so that -0 / s stays -0); "* -1.0" is a true negation
        # (Triton's unary minus is 0 - x, which turns -0 into +0)
        rem = tl.math.fma(z, s, x * -1.0)
        y = tl.math.fma(rem * -1.0, inv, z)
    return y


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    stride_x_row,
    stride_q_row,
    n_rows,
    n_cols,
    qmax,
    DYNAMIC_PER_ROW: tl.constexpr,  # compute the rows' scales (and store them) first
    PER_ROW_SCALE: tl.constexpr,  # scale_ptr holds one scale per row, else one for all
    TO_INT8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    ENCODE_NATIVE: tl.constexpr,  # fp8_encode's NATIVE
    ONE_TILE: tl.constexpr,  # n_cols <= BLOCK_N: each row read once, kept in registers
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # BLOCK_M rows of x [M, K] -> q, each row scaled by its (or the tensor's) scale
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_x_row
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if DYNAMIC_PER_ROW:
            scale = dynamic_row_scale(x, rows, row_ok, scale_ptr, qmax)  # [BLOCK_M]
        elif PER_ROW_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
        else:
            scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(scale_ptr)
        if DYNAMIC_PER_ROW:
            y = div_by_row_scale(x, scale, INTERPRET)
        else:  # a given scale: any value, so a plain division
            y = tl.math.div_rn(x, tl.zeros_like(x) + scale[:, None])
        if TO_INT8:
            q = tl.minimum(tl.maximum(round_half_even(y), -128.0), 127.0).to(tl.int8)
        else:
            q = fp8_encode(y, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE)
        tl.store(q_ptr + rows64[:, None] * stride_q_row + cols[None, :], q, mask=mask)
    else:  # two passes over BLOCK_N columns: the row maxima, then the codes
        if DYNAMIC_PER_ROW:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_ok[:, None] & (cols[None, :] < n_cols)
                x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
                acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
            absmax = tl.maximum(tl.max(acc, axis=1), _SCALE_EPS)
            scale = tl.math.div_rn(absmax, tl.zeros_like(absmax) + qmax)  # [BLOCK_M]
            tl.store(scale_ptr + rows, scale, mask=row_ok)
        elif PER_ROW_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
        else:
            scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(scale_ptr)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if DYNAMIC_PER_ROW:
                y = div_by_row_scale(x, scale, INTERPRET)
            else:
                y = tl.math.div_rn(x, tl.zeros_like(x) + scale[:, None])
            if TO_INT8:
                q = tl.minimum(tl.maximum(round_half_even(y), -128.0), 127.0).to(tl.int8)
            else:
                q = fp8_encode(y, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF,
                               ENCODE_NATIVE)  # fmt: skip
            tl.store(q_ptr + rows64[:, None] * stride_q_row + cols[None, :], q, mask=mask)


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    check_float("x", x)


def _static_scale(scale: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    if tuple(scale.shape) not in ((1,), (rows, 1)):
        raise ValueError(
            f"scale: shape {tuple(scale.shape)} is neither [1] (per tensor) nor [{rows}, 1] "
            "(per token)"
        )
    return scale.to(device=device, dtype=torch.float32).contiguous()


def row_blocks(n_rows: int, n_cols: int, max_block_n: int = 1024) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a row-wise kernel: one row per program on a GPU; under the
    interpreter, where each program costs milliseconds of Python, as many rows as fit 16K values
    (and columns up to 4096)."""
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), 4096 if interpreting() else max_block_n)
    if not interpreting():
        return 1, block_n
    return min(triton.next_power_of_2(max(n_rows, 1)), max(1, 16384 // block_n)), block_n


def _quantize(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor | None,
    per_token: bool,
    qmax: float,
    codec: dict[str, object],
) -> torch.Tensor:
    # x: [M, K] float; q: [M, K] int8 or uint8 (FP8 bits). Returns the fp32 scale [1] or [M, 1].
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m, block_n = row_blocks(m, k, ONE_TILE_MAX_COLS)
    grid = (triton.cdiv(m, block_m),)
    # a whole row per program in registers: more warps for long rows (~64 values per thread)
    warps = min(16, max(4, block_n // 256)) if not interpreting() else 4
    if scale is not None:
        s = _static_scale(scale, m, x.device)
        per_row, dynamic_row = s.dim() == 2, False
    elif per_token:
        s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        per_row, dynamic_row = True, True
    else:
        if m == 0 or k == 0:
            raise ValueError(f"x: shape {tuple(x.shape)} is empty; a per-tensor scale needs values")
        absmax = torch.empty(m, dtype=torch.float32, device=x.device)
        _row_absmax_kernel[grid](x, absmax, x.stride(0), m, k, BLOCK_M=block_m, BLOCK_N=block_n,
                                 num_warps=warps)  # fmt: skip
        s = torch.empty(1, dtype=torch.float32, device=x.device)
        _absmax_scale_kernel[(1,)](absmax, s, m, qmax, BLOCK=min(triton.next_power_of_2(m), 1024))
        per_row, dynamic_row = False, False
    if m:
        _quantize_kernel[grid](
            x, q, s, x.stride(0), q.stride(0), m, k, qmax, DYNAMIC_PER_ROW=dynamic_row,
            PER_ROW_SCALE=per_row, ONE_TILE=k <= block_n, INTERPRET=interpreting(),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **codec,
        )  # fmt: skip
    return s


def quantize_fp8(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 [M, K], scale fp32 [1] or [M, 1]); q = fp8(clamp(x / scale)).

    Static when `scale` is given, else scale = max(absmax, SCALE_EPS) / fp8_max per tensor
    (two small reduction kernels, then the quantize kernel) or per row (one fused kernel)."""
    _check_x(x)
    codec = fp8_codec(fp8_dtype)
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    s = _quantize(x, q.view(torch.uint8), scale, per_token, float(codec["FP8_MAX"]),
                  {**codec, "TO_INT8": False,
                   "ENCODE_NATIVE": fp8_encode_mode(fp8_dtype, x.device)})  # fmt: skip
    return q, s


def quantize_int8(
    x: torch.Tensor, scale: torch.Tensor | None = None, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scale = max(absmax, SCALE_EPS) / 127 per tensor or row (unless given),
    q = clamp(round_half_even(x / scale), -128, 127). Returns (q int8, scale fp32)."""
    _check_x(x)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    # the FP8 constexprs go unused
    codec = {**fp8_codec(torch.float8_e4m3fn), "TO_INT8": True, "ENCODE_NATIVE": 0}
    s = _quantize(x, q, scale, per_token, INT8_MAX, codec)
    return q, s


# -- FP8 dequantize ----------------------------------------------------------------------------
@triton.jit
def _dequantize_fp8_kernel(
    q_ptr,
    scale_ptr,
    y_ptr,
    stride_q_row,
    stride_y_row,
    n_rows,
    n_cols,
    PER_ROW_SCALE: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    if PER_ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
    else:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(scale_ptr)
    rows64 = rows.to(tl.int64)[:, None]
    code = tl.load(q_ptr + rows64 * stride_q_row + cols[None, :], mask=mask, other=0)
    x = fp8_decode(code, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF) * scale[:, None]
    y = cast_rtne(x, y_ptr.dtype.element_ty, INTERPRET)
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y, mask=mask)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x = q * scale (scale [1] or [M, 1]), one fp32 product rounded to out_dtype."""
    if q.dtype not in FP8_CODECS:
        raise ValueError(f"q: dtype {q.dtype} is not an FP8 format")
    if q.dim() != 2:
        raise ValueError(f"q: expected a 2-D [M, K] tensor, got shape {tuple(q.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not one of float32, bfloat16, float16")
    m, k = q.shape
    s = _static_scale(scale, m, q.device)
    qb = raw(q if q.stride(1) == 1 else q.contiguous())
    y = torch.empty(m, k, dtype=out_dtype, device=q.device)
    if m and k:
        block_m, block_n = row_blocks(m, k)
        _dequantize_fp8_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_n))](
            qb, s, y, qb.stride(0), y.stride(0), m, k, PER_ROW_SCALE=s.dim() == 2,
            INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, **fp8_codec(q.dtype),
        )  # fmt: skip
    return y


# -- INT4 --------------------------------------------------------------------------------------
@triton.jit
def _int4_scales_kernel(
    w_ptr,
    scales_ptr,
    zeros_ptr,
    stride_w_row,
    stride_s_row,
    n_cols,
    group_size,
    SYMMETRIC: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # BLOCK_N output channels x group g: each one's scale (rounded to the weight's dtype) and zero
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    n_ok = n < n_cols
    mask = n_ok[:, None] & (offs[None, :] < group_size)
    n64 = n.to(tl.int64)
    w = tl.load(w_ptr + n64[:, None] * stride_w_row + g * group_size + offs[None, :], mask=mask,
                other=0.0).to(tl.float32)  # fmt: skip
    if SYMMETRIC:
        absmax = tl.maximum(tl.max(tl.abs(w), axis=1), _SCALE_EPS)
        scale = tl.math.div_rn(absmax, tl.zeros_like(absmax) + 7.5)
    else:
        lo = tl.minimum(tl.min(w, axis=1), 0.0)  # masked lanes hold 0, inside [lo, hi] anyway
        hi = tl.maximum(tl.max(w, axis=1), 0.0)
        span = tl.maximum(hi - lo, _SCALE_EPS)
        scale = tl.math.div_rn(span, tl.zeros_like(span) + _INT4_LEVELS)
    stored = cast_rtne(scale, scales_ptr.dtype.element_ty, INTERPRET)
    scale = stored.to(tl.float32)
    if SYMMETRIC:
        zero = scale * 0.0 + _INT4_SYMMETRIC_ZERO
    else:
        zero = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-lo, scale)), 0.0), 15.0)
    tl.store(scales_ptr + g * stride_s_row + n64, stored, mask=n_ok)
    tl.store(zeros_ptr + g * stride_s_row + n64, zero.to(tl.uint8), mask=n_ok)


@triton.jit
def _int4_pack_kernel(
    w_ptr,
    scales_ptr,
    zeros_ptr,
    qweight_ptr,
    stride_w_row,
    stride_s_row,
    stride_qw_row,
    n_words,
    n_cols,
    group_size,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # qweight[r, n]: nibble i (bits 4i) = clamp(round(w[n, 8r + i] / scale) + zero, 0, 15).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r[:, None] < n_words) & (n[None, :] < n_cols)
    n64 = n.to(tl.int64)
    word = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.int32)
    for i in tl.static_range(8):
        k = 8 * r + i  # [BLOCK_R]
        g = (k // group_size).to(tl.int64)
        w = tl.load(w_ptr + n64[None, :] * stride_w_row + k[:, None], mask=mask, other=0.0)
        s = tl.load(scales_ptr + g[:, None] * stride_s_row + n64[None, :], mask=mask, other=1.0)
        z = tl.load(zeros_ptr + g[:, None] * stride_s_row + n64[None, :], mask=mask, other=0)
        y = round_half_even(tl.math.div_rn(w.to(tl.float32), s.to(tl.float32)))
        code = tl.minimum(tl.maximum(y + z.to(tl.float32), 0.0), 15.0).to(tl.int32)
        word = word | (code << (4 * i))
    out = qweight_ptr + r.to(tl.int64)[:, None] * stride_qw_row + n64[None, :]
    tl.store(out, word, mask=mask)


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise 4-bit quantization of weight [N, K] -> (qweight int32 [K/8, N], scales [K/G, N]
    in weight's dtype, zeros uint8 [K/G, N]), the reference's math (`backends.cpu.quant`)."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [N, K] tensor, got shape {tuple(weight.shape)}")
    check_float("weight", weight)
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size: {group_size} must be positive and divide K={k}")
    if k % 8:
        raise ValueError(f"weight: K={k} is not a multiple of 8 (8 nibbles per int32 word)")
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    num_groups = k // group_size
    scales = torch.empty(num_groups, n, dtype=weight.dtype, device=weight.device)
    zeros = torch.empty(num_groups, n, dtype=torch.uint8, device=weight.device)
    qweight = torch.empty(k // 8, n, dtype=torch.int32, device=weight.device)
    if n == 0 or k == 0:
        return qweight, scales, zeros
    block_g = triton.next_power_of_2(group_size)
    block_c = max(1, min(triton.next_power_of_2(n), (8192 if interpreting() else 2048) // block_g))
    _int4_scales_kernel[(triton.cdiv(n, block_c), num_groups)](
        w, scales, zeros, w.stride(0), scales.stride(0), n, group_size, SYMMETRIC=symmetric,
        INTERPRET=interpreting(), BLOCK_N=block_c, BLOCK_G=block_g,
    )  # fmt: skip
    block_r, block_n = (64, 64) if interpreting() else (16, 64)
    grid = (triton.cdiv(k // 8, block_r), triton.cdiv(n, block_n))
    _int4_pack_kernel[grid](
        w, scales, zeros, qweight, w.stride(0), scales.stride(0), qweight.stride(0), k // 8, n,
        group_size, BLOCK_R=block_r, BLOCK_N=block_n,
    )  # fmt: skip
    return qweight, scales, zeros


@triton.jit
def _dequantize_int4_kernel(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    w_ptr,
    stride_qw_row,
    stride_s_row,
    stride_w_row,
    n_rows,
    n_cols,
    group_size,
    HAS_G_IDX: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # w[n, k] = (nibble k % 8 of qweight[k // 8, n] - zeros[g, n]) * scales[g, n]
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (k[:, None] < n_rows) & (n[None, :] < n_cols)
    word = tl.load(qweight_ptr + (k // 8).to(tl.int64)[:, None] * stride_qw_row + n[None, :],
                   mask=mask, other=0)  # fmt: skip
    code = (word >> (4 * (k % 8))[:, None]) & 0xF
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + k, mask=k < n_rows, other=0).to(tl.int64)
    else:
        g = (k // group_size).to(tl.int64)
    s = tl.load(scales_ptr + g[:, None] * stride_s_row + n[None, :], mask=mask, other=0.0)
    z = tl.load(zeros_ptr + g[:, None] * stride_s_row + n[None, :], mask=mask, other=0)
    w = (code.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)  # exact small integer * s
    out = w_ptr + n[None, :] * stride_w_row + k.to(tl.int64)[:, None]
    tl.store(out, cast_rtne(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Canonical layout -> weight [N, K]: W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n] with
    g = g_idx[k] if given else k // group_size, in fp32, rounded once to out_dtype (scales')."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(
            f"qweight: expected int32 [K / 8, N], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if scales.dim() != 2 or scales.shape[1] != n or tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(
            f"scales/zeros: shapes {tuple(scales.shape)} and {tuple(zeros.shape)}, "
            f"expected the same [K / group_size, {n}]"
        )
    check_float("scales", scales)
    num_groups = scales.shape[0]
    if g_idx is None:
        if group_size <= 0 or k % group_size or k // group_size != num_groups:
            raise ValueError(
                f"group_size: {group_size} with K={k} does not give the {num_groups} groups "
                "that scales/zeros have"
            )
    elif tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx: shape {tuple(g_idx.shape)}, expected [{k}]")
    out_dtype = out_dtype or scales.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not one of float32, bfloat16, float16")
    qw, sc = qweight.contiguous(), scales.contiguous()
    zs = zeros.to(torch.uint8).contiguous()
    gi = g_idx.to(device=qw.device, dtype=torch.int32).contiguous() if g_idx is not None else qw
    w = torch.empty(n, k, dtype=out_dtype, device=qweight.device)
    if n and k:
        block_k, block_n = (128, 64) if interpreting() else (64, 64)
        grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
        _dequantize_int4_kernel[grid](
            qw, sc, zs, gi, w, qw.stride(0), sc.stride(0), w.stride(0), k, n,
            max(group_size, 1), HAS_G_IDX=g_idx is not None, INTERPRET=interpreting(),
            BLOCK_K=block_k, BLOCK_N=block_n,
        )  # fmt: skip
    return w
