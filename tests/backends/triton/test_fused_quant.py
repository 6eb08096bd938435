"""The Triton norm and activation kernels fused with the per-token FP8 quantize of their output
(`rms_norm_quant_fp8`, `silu_and_mul_quant_fp8`, what an FP8 linear with dynamic per-token
activations reads next) against the two ops they replace, bit for bit (codes, scales and the
residual sum), every float dtype and FP8 format, rows of one tile and rows past it (the fallback
to the two ops); the CUDA backend's choice between fused and composed; bad input.

Why bit for bit: the fused kernel rounds the norm (or SiLU-and-mul) to the model dtype exactly as
the unfused kernel stores it, then runs quantize_fp8's per-row math (absmax, one correctly
rounded division for the scale and one per value, round-to-nearest-even encode) on those values.
Under TRITON_INTERPRET=1 (no GPU) the kernels run on CPU tensors; with a GPU natively.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from fractions import Fraction

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

for _name in ("backends.triton.quant", "backends.triton.norm", "backends.triton.activation"):
    if _name in sys.modules and INTERPRET:
        importlib.reload(sys.modules[_name])  # imported earlier without the interpreter
tquant = importlib.import_module("backends.triton.quant")
tnorm = importlib.import_module("backends.triton.norm")
tact = importlib.import_module("backends.triton.activation")

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
FP8S = [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2]


def _same(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[out.element_size()]
    diff = (out.view(bits) != ref.view(bits)).nonzero()
    assert diff.numel() == 0, f"{name}: {diff.shape[0]} elements differ, first at {diff[0]}"


def _x(shape, dtype, seed, mag=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * mag
    x[0, :3] = torch.tensor([0.0, -mag * 40, 1e-3])[: shape[1]]  # an outlier drives the scale
    return x.to(dtype).to(DEVICE)


# hidden 4100: past the interpreter's one-tile limit (4,096), the two-op fallback (rms_norm_quant)
@pytest.mark.parametrize("hidden", [1, 96, 4100])
@pytest.mark.parametrize("fp8", FP8S)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_equals_norm_then_quantize(hidden, fp8, dtype, with_residual) -> None:
    rows = 3 if hidden > 1000 else 7
    x = _x((rows, hidden), dtype, hidden)
    w = (1.0 + 0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(1))).to(dtype)
    w = w.to(DEVICE)
    r = _x((rows, hidden), dtype, hidden + 1) if with_residual else None
    got = tnorm.rms_norm_quant_fp8(x, w, 1e-6, fp8, r)
    out = tnorm.rms_norm(x, w, 1e-6, r)
    y, h = out if with_residual else (out, None)
    q, s = tquant.quantize_fp8(y, fp8, per_token=True)
    assert len(got) == (3 if with_residual else 2)
    _same("q", got[0], q)
    _same("scale", got[1], s)
    if with_residual:
        _same("h", got[2], h)


@pytest.mark.skipif(INTERPRET, reason="the GPU build's own layouts are what is checked")
def test_rms_norm_quant_many_rows_bitwise() -> None:
    # The compiler spreads a row over threads differently in the fused and the plain build (16 vs
    # 8 values per thread); with an fp32 sum of squares rstd then differed by an ulp in some rows
    # and 1-9 of 8.4M codes flipped at near-ties of y's bf16 rounding (H200). The fp64 sum makes
    # the mean independent of the layout.
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2048, 4096, generator=g).to(torch.bfloat16).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(4096, generator=g)).to(torch.bfloat16).to(DEVICE)
    q, s, h = tnorm.rms_norm_quant_fp8(x, w, 1e-5, torch.float8_e4m3fn, r)
    y, h_ref = tnorm.rms_norm(x, w, 1e-5, r)
    q_ref, s_ref = tquant.quantize_fp8(y, torch.float8_e4m3fn, per_token=True)
    _same("h", h, h_ref)
    _same("scale", s, s_ref)
    _same("q", q, q_ref)


def _rn32(v: Fraction) -> float:
    """v rounded to the nearest fp32 (ties to even), exactly; v != 0 and in fp32's normal range."""
    sign, a = (-1 if v < 0 else 1), abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    e -= Fraction(2) ** e > a  # 2^e <= a < 2^(e + 1)
    m = a / Fraction(2) ** (e - 23)  # in [2^23, 2^24)
    q, r = divmod(m.numerator, m.denominator)
    if 2 * r > m.denominator or (2 * r == m.denominator and q & 1):
        q += 1
    return sign * math.ldexp(q, e - 23)


def test_reciprocal_and_fma_correction_divides_exactly() -> None:
    # quant.div_by_row_scale on a GPU: inv = RN(1 / s), z = RN(x * inv), rem = RN(z * s - x) (one
    # fma), y = RN(z - rem * inv) (one fma) must be RN(x / s), the reference's division, for a
    # dynamic scale s = max(absmax, SCALE_EPS) / qmax. Checked here with exact rational fmas on
    # random rows of wide magnitude (x/s near every FP8 rounding point is where a wrong last bit
    # would flip a code); the GPU tests then hold the kernels to the CPU reference.
    import numpy as np

    f32 = np.float32
    g = np.random.default_rng(0)
    for qmax in (448.0, 57344.0, 127.0):
        for _ in range(40):
            row = (g.standard_normal(64) * np.exp(g.standard_normal(64) * 4)).astype(f32)
            s = f32(max(float(np.abs(row).max()), 1e-12)) / f32(qmax)  # numpy: IEEE division
            inv = f32(1.0) / s
            for x in row[row != 0]:
                z = f32(x * inv)
                fz, fs, fi = Fraction(float(z)), Fraction(float(s)), Fraction(float(inv))
                rem = _rn32(fz * fs - Fraction(float(x)))
                y = z if rem == 0 else f32(_rn32(fz - Fraction(rem) * fi))
                assert y == x / s, (x, s, y, x / s)


@pytest.mark.skipif(INTERPRET, reason="the GPU's division by a row scale is what is checked")
def test_dynamic_row_quant_matches_the_cpu_division() -> None:
    # The GPU kernels divide by a dynamic row scale with a reciprocal and an fma correction; the
    # CPU reference divides. Same codes on 1024 rows of wide magnitude, with signed zeros (a
    # zero row, -0 entries) and a row holding inf (scale inf: finite -> 0, inf -> NaN).
    from backends.cpu import quant as ref_quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 4096, generator=g) * torch.exp(torch.randn(1024, 4096, generator=g) * 2)
    x[0] = -0.0
    x[1, ::3] = -0.0
    x[2, 7] = float("inf")
    x = x.to(torch.bfloat16)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, s = tquant.quantize_fp8(x.to(DEVICE), fp8, per_token=True)
        q_ref, s_ref = ref_quant.quantize_fp8(x, fp8, per_token=True)
        _same("scale", s.cpu(), s_ref)
        q = q.cpu()
        # inf / inf is NaN on both, but its sign is the platform's (x86's default NaN is
        # negative, the GPU's canonical NaN positive): a NaN code either way
        assert q[2, 7].float().isnan() and q_ref[2, 7].float().isnan()
        q[2, 7] = q_ref[2, 7]
        _same("q", q, q_ref)
    qi, si = tquant.quantize_int8(x[3:].to(DEVICE), per_token=True)
    qi_ref, si_ref = ref_quant.quantize_int8(x[3:], per_token=True)
    _same("int8 scale", si.cpu(), si_ref)
    _same("int8 q", qi.cpu(), qi_ref)
    xs = x[3:].to(DEVICE)  # the fused kernels, against the CPU quantize of the GPU op's output
    q, s = tact.silu_and_mul_quant_fp8(xs, torch.float8_e4m3fn)
    q_ref, s_ref = ref_quant.quantize_fp8(tact.silu_and_mul(xs).cpu(), torch.float8_e4m3fn,
                                          per_token=True)  # fmt: skip
    _same("silu scale", s.cpu(), s_ref)
    _same("silu q", q.cpu(), q_ref)
    w = torch.ones(4096, dtype=torch.bfloat16, device=DEVICE)
    q, s = tnorm.rms_norm_quant_fp8(xs, w, 1e-5, torch.float8_e4m3fn)
    q_ref, s_ref = ref_quant.quantize_fp8(tnorm.rms_norm(xs, w, 1e-5).cpu(), torch.float8_e4m3fn,
                                          per_token=True)  # fmt: skip
    _same("norm scale", s.cpu(), s_ref)
    _same("norm q", q.cpu(), q_ref)


@pytest.mark.parametrize("d", [1, 80, 4100])
@pytest.mark.parametrize("fp8", FP8S)
@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_and_mul_quant_equals_silu_then_quantize(d, fp8, dtype) -> None:
    rows = 3 if d > 1000 else 9
    x = _x((rows, 2 * d), dtype, d)
    q, s = tact.silu_and_mul_quant_fp8(x, fp8)
    q_ref, s_ref = tquant.quantize_fp8(tact.silu_and_mul(x), fp8, per_token=True)
    _same("q", q, q_ref)
    _same("scale", s, s_ref)


@pytest.mark.parametrize("chunk", [64, 256])
def test_silu_and_mul_quant_chunked_rows(chunk) -> None:
    # rows past one chunk: the absmax pass, then the codes pass recomputing each chunk
    x = _x((5, 2 * 300), torch.bfloat16, 7)
    q, s = tact.silu_and_mul_quant_fp8(x, torch.float8_e4m3fn, chunk=chunk)
    q_ref, s_ref = tquant.quantize_fp8(tact.silu_and_mul(x), torch.float8_e4m3fn, per_token=True)
    _same("q", q, q_ref)
    _same("scale", s, s_ref)


def test_empty_rows_and_bad_input() -> None:
    x = torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    q, s = tnorm.rms_norm_quant_fp8(x, w, 1e-6, torch.float8_e4m3fn)
    assert q.shape == (0, 64) and s.shape == (0, 1)
    q, s = tact.silu_and_mul_quant_fp8(torch.empty(0, 64, device=DEVICE), torch.float8_e5m2)
    assert q.shape == (0, 32) and s.shape == (0, 1)
    x3 = torch.zeros(2, 3, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"x: expected a 2-D \[T, hidden\]"):
        tnorm.rms_norm_quant_fp8(x3, w, 1e-6, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"x: expected a 2-D \[T, 2d\]"):
        tact.silu_and_mul_quant_fp8(x3, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="last dim must be even"):
        tact.silu_and_mul_quant_fp8(torch.zeros(2, 5, device=DEVICE), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="int8"):
        tnorm.rms_norm_quant_fp8(torch.zeros(2, 64, device=DEVICE), w.float(), 1e-6, torch.int8)


def test_cuda_backend_fuses_only_when_both_families_chose_triton(monkeypatch) -> None:
    from backends.cuda.backend import CudaBackend

    calls = []
    be = CudaBackend.__new__(CudaBackend)  # the dispatch methods alone, no device
    be.ran, be._fallbacks_logged = {}, set()
    chosen = {"rms_norm": "triton", "activation": "triton", "quantize": "triton"}
    monkeypatch.setattr(CudaBackend, "chosen", lambda self, family: chosen[family])
    monkeypatch.setattr(tnorm, "rms_norm_quant_fp8", lambda *a: calls.append("fused norm"))
    monkeypatch.setattr(tact, "silu_and_mul_quant_fp8", lambda *a: calls.append("fused silu"))
    monkeypatch.setattr(CudaBackend, "rms_norm", lambda self, *a: calls.append("norm") or a[0])
    monkeypatch.setattr(CudaBackend, "silu_and_mul", lambda self, x: calls.append("silu") or x)
    monkeypatch.setattr(CudaBackend, "quantize_fp8", lambda self, *a, **k: calls.append("q") or a)
    x, w = torch.zeros(2, 8), torch.ones(8)
    be.rms_norm_quant_fp8(x, w, 1e-6, torch.float8_e4m3fn)
    be.silu_and_mul_quant_fp8(x, torch.float8_e4m3fn)
    assert calls == ["fused norm", "fused silu"]
    chosen["quantize"] = "torch"
    calls.clear()
    be.rms_norm_quant_fp8(x, w, 1e-6, torch.float8_e4m3fn)
    be.silu_and_mul_quant_fp8(x, torch.float8_e4m3fn)
    assert calls == ["norm", "q", "silu", "q"]
    chosen["quantize"] = "triton"
    calls.clear()
    be.rms_norm_quant_fp8(x.double(), w.double(), 1e-6, torch.float8_e4m3fn)  # not a Triton dtype
    assert calls == ["norm", "q"]
