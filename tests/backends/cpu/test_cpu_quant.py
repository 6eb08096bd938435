"""CPU reference quantization and quantized GEMMs against the format definitions and float64."""

from __future__ import annotations

import math

import pytest
import torch

from backends.cpu.linear import fp8_linear, int4_linear, int8_linear
from backends.cpu.quant import (
    SCALE_EPS,
    dequantize_fp8,
    dequantize_int4,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from hal.capabilities import FP8_FORMATS

FP8 = [FP8_FORMATS["e4m3fn"][0], FP8_FORMATS["e4m3fnuz"][0]]
# (exponent bits, mantissa bits, bias) of each format, from the OCP / AMD definitions.
LAYOUT = {torch.float8_e4m3fn: (4, 3, 7), torch.float8_e4m3fnuz: (4, 3, 8)}


def _decode(bits: int, dtype: torch.dtype) -> float:
    """One FP8 bit pattern to its value, from the format definition (NaN for non-finite codes)."""
    e_bits, m_bits, bias = LAYOUT[dtype]
    sign = -1.0 if bits >> 7 else 1.0
    e, m = (bits >> m_bits) & ((1 << e_bits) - 1), bits & ((1 << m_bits) - 1)
    if dtype == torch.float8_e4m3fn and e == 15 and m == 7:
        return math.nan
    if dtype == torch.float8_e4m3fnuz and bits == 0x80:
        return math.nan
    if e == 0:
        return sign * m / 2**m_bits * 2.0 ** (1 - bias)
    return sign * (1 + m / 2**m_bits) * 2.0 ** (e - bias)


def _table(dtype: torch.dtype) -> tuple[list[float], list[int]]:
    values, codes = [], []
    for bits in range(256):
        v = _decode(bits, dtype)
        if not math.isnan(v):
            values.append(v)
            codes.append(bits)
    return values, codes


def _nearest_even(y: float, values: list[float], codes: list[int]) -> float:
    best = min(abs(v - y) for v in values)
    ties = [(c, v) for c, v in zip(codes, values, strict=True) if abs(v - y) == best]
    return min(ties, key=lambda cv: cv[0] & 1)[1]  # a tie goes to the even mantissa


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_fp8_definition_matches_torch_and_max(fp8_dtype: torch.dtype) -> None:
    values, codes = _table(fp8_dtype)
    decoded = torch.tensor(codes, dtype=torch.uint8).view(fp8_dtype).double()
    assert decoded.tolist() == values
    assert max(values) == torch.finfo(fp8_dtype).max == dict(FP8_FORMATS.values())[fp8_dtype]


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_quantize_fp8_rounds_to_nearest_even(fp8_dtype: torch.dtype) -> None:
    values, codes = _table(fp8_dtype)
    fmax = max(values)
    # Representable values round-trip exactly with scale 1.
    exact = torch.tensor([values], dtype=torch.float32)
    q, s = quantize_fp8(exact, fp8_dtype, scale=torch.ones(1))
    assert q.dtype == fp8_dtype and q.double().tolist() == [values] and s.dtype == torch.float32
    # Random values, exact midpoints between neighbours, and values past the max (saturate).
    pos = sorted(v for v in values if v > 0)
    mids = [(a + b) / 2 for a, b in zip(pos[:-1], pos[1:], strict=True)]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=g) * 0.7, torch.tensor(mids), -torch.tensor(mids),
                   torch.tensor([fmax * 1.2, -fmax * 3])]).reshape(1, -1)  # fmt: skip
    scale = torch.tensor([0.0625])
    q, _ = quantize_fp8(x, fp8_dtype, scale=scale)
    y = (x / scale).clamp(-fmax, fmax)[0].tolist()
    for got, yi in zip(q.double()[0].tolist(), y, strict=True):
        want = _nearest_even(yi, values, codes)
        assert got == want, (yi, got, want)
        below = max([v for v in values if v <= yi], default=yi)
        above = min([v for v in values if v >= yi], default=yi)
        assert abs(got - yi) <= (above - below) / 2  # within half an fp8 ulp


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("per_token", [False, True])
def test_quantize_fp8_dynamic_scale(fp8_dtype: torch.dtype, per_token: bool) -> None:
    fmax = torch.finfo(fp8_dtype).max
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64) * torch.tensor(
        [[1.0], [5], [0.1], [0]]
    )
    q, s = quantize_fp8(x, fp8_dtype, per_token=per_token)
    absmax = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax().reshape(1)
    want = (absmax.clamp(min=SCALE_EPS) / fmax).float()
    assert s.shape == want.shape and torch.equal(s, want)
    rows = range(4) if per_token else [None]
    for r in rows:
        part = q if r is None else q[r : r + 1]
        if float(absmax.max() if r is None else absmax[r]) > 0:
            assert float(part.double().abs().max()) == fmax
    back = dequantize_fp8(q, s, torch.float64)
    assert torch.equal(back, q.double() * s.double())
    half_ulp = 2.0**-4 * (x / s.double()).abs().clamp(min=2.0**-6) * s.double()
    assert bool(((back - x).abs() <= half_ulp + 1e-30).all())  # 3 mantissa bits


def test_quantize_fp8_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not an FP8 format"):
        quantize_fp8(torch.zeros(2, 2), torch.int8)
    with pytest.raises(ValueError, match=r"scale: shape \(3, 1\)"):
        quantize_fp8(torch.zeros(2, 2), FP8[0], scale=torch.ones(3, 1))
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.zeros(2, 2, 2), FP8[0])


def test_quantize_int8_round_half_even_and_dynamic() -> None:
    x = torch.tensor([[0.25, 0.75, -0.25, 1.25, -1.25, 100.0]])
    q, s = quantize_int8(x, scale=torch.tensor([0.5]))
    assert q.tolist() == [[0, 2, 0, 2, -2, 127]] and q.dtype == torch.int8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 20, generator=g)
    q, s = quantize_int8(x)  # per token by default
    assert s.shape == (3, 1) and torch.equal(s, x.abs().amax(1, keepdim=True) / 127)
    for r in range(3):
        for c in range(20):
            want = max(-128, min(127, round(float(x[r, c] / s[r, 0]))))  # Python rounds half even
            assert int(q[r, c]) == want
    _, s_tensor = quantize_int8(x, per_token=False)
    assert s_tensor.shape == (1,)


def test_pack_unpack_int4_bit_layout() -> None:
    codes = torch.arange(1, 9, dtype=torch.uint8).reshape(8, 1)
    assert pack_int4(codes).tolist() == [[0x87654321 - 2**32]]  # row 8r + i at bits 4i
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 5), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (4, 5)
    assert torch.equal(unpack_int4(packed), q)
    for r in range(4):
        for n in range(5):
            word = int(packed[r, n]) & 0xFFFFFFFF
            assert [(word >> (4 * i)) & 15 for i in range(8)] == q[8 * r : 8 * r + 8, n].tolist()
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(12, 2, dtype=torch.uint8))


def _weight_with_edge_groups(g) -> torch.Tensor:
    w = torch.randn(6, 64, generator=g, dtype=torch.float64)
    w[1, :16] = w[1, :16].abs() + 3.0  # all positive: the range must still include 0
    w[2, 16:32] = 0.0  # all zero
    w[3, 32:48] = -1.5  # constant negative
    return w


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_int4_formula_and_round_trip(symmetric: bool) -> None:
    w = _weight_with_edge_groups(torch.Generator().manual_seed(4))
    G = 16
    qweight, scales, zeros = quantize_int4(w, G, symmetric=symmetric)
    assert qweight.shape == (8, 6) and scales.shape == zeros.shape == (4, 6)
    assert scales.dtype == torch.float64 and zeros.dtype == torch.uint8
    codes = unpack_int4(qweight)
    for n in range(6):
        for gi in range(4):
            grp = w[n, gi * G : (gi + 1) * G].tolist()
            if symmetric:
                scale, zero = max(max(abs(v) for v in grp), SCALE_EPS) / 7.5, 8
            else:
                lo, hi = min(min(grp), 0.0), max(max(grp), 0.0)
                scale = max(hi - lo, SCALE_EPS) / 15
                zero = min(15, max(0, round(-lo / scale)))
            assert float(scales[gi, n]) == scale and int(zeros[gi, n]) == zero
            want = [min(15, max(0, round(v / scale) + zero)) for v in grp]
            assert codes[gi * G : (gi + 1) * G, n].tolist() == want
    back = dequantize_int4(qweight, scales, zeros, G)
    bound = scales.t().repeat_interleave(G, dim=1) / 2 * (1 + 1e-9)
    assert bool(((back - w).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_int4_low_precision_round_trip(dtype: torch.dtype) -> None:
    w = _weight_with_edge_groups(torch.Generator().manual_seed(5)).to(dtype)
    qweight, scales, zeros = quantize_int4(w, 32)
    assert scales.dtype == dtype
    back = dequantize_int4(qweight, scales, zeros, 32)
    assert back.dtype == dtype
    bound = scales.double().t().repeat_interleave(32, dim=1) * 0.51 + 1e-6
    assert bool(((back.double() - w.double()).abs() <= bound).all())


def test_dequantize_int4_with_g_idx() -> None:
    g = torch.Generator().manual_seed(6)
    K, N, G = 32, 3, 8
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // G, N, generator=g, dtype=torch.float64) + 0.1
    zeros = torch.randint(0, 16, (K // G, N), generator=g, dtype=torch.uint8)
    g_idx = (torch.arange(K) // G)[torch.randperm(K, generator=g)].to(torch.int32)
    w = dequantize_int4(pack_int4(q), scales, zeros, G, g_idx)
    for n in range(N):
        for k in range(K):
            gk = int(g_idx[k])
            assert float(w[n, k]) == (int(q[k, n]) - int(zeros[gk, n])) * float(scales[gk, n])
    with pytest.raises(ValueError, match=r"g_idx: values must lie in 0\.\.3"):
        dequantize_int4(pack_int4(q), scales, zeros, G, torch.full((K,), 4))


def test_int4_rejects_bad_group_size() -> None:
    with pytest.raises(ValueError, match="group_size: 12 must be positive and divide K=32"):
        quantize_int4(torch.zeros(4, 32), 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_int4(torch.zeros(4, 20), 4)
    qweight, scales, zeros = quantize_int4(torch.randn(4, 32), 16)
    with pytest.raises(ValueError, match="group_size: 8 with K=32"):
        dequantize_int4(qweight, scales, zeros, 8)


# -- quantized GEMMs -------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("per_token", [False, True])
def test_fp8_linear_matches_float64(fp8_dtype: torch.dtype, per_token: bool) -> None:
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g), torch.randn(7)
    x_q, x_s = quantize_fp8(x, fp8_dtype, per_token=per_token)
    w_q, w_s = quantize_fp8(w, fp8_dtype, per_token=per_token)  # per row of w = per channel
    y = fp8_linear(x_q, x_s, w_q, w_s, b, out_dtype=torch.float32)
    ref = (x_q.double() * x_s.double()) @ (w_q.double() * w_s.double()).t() + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert fp8_linear(x_q, x_s, w_q, w_s).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"w_scale: shape \(5, 1\)"):
        fp8_linear(x_q, x_s, w_q, torch.ones(5, 1))
    with pytest.raises(ValueError, match="x_q: dtype torch.int8"):
        fp8_linear(x_q.view(torch.int8), x_s, w_q, w_s)


def test_int8_linear_exact_integer_accumulation() -> None:
    g = torch.Generator().manual_seed(8)
    x_q = torch.randint(-128, 128, (4, 64), generator=g, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (3, 64), generator=g, dtype=torch.int8)
    x_s, w_s = torch.rand(4, 1, generator=g) + 0.5, torch.rand(3, 1, generator=g) + 0.5
    b = torch.randn(3, generator=g)
    y = int8_linear(x_q, x_s, w_q, w_s, b, out_dtype=torch.float32)
    acc = [[sum(int(x_q[m, k]) * int(w_q[n, k]) for k in range(64)) for n in range(3)]
           for m in range(4)]  # fmt: skip
    ref = torch.tensor(acc, dtype=torch.float64) * x_s.double() * w_s.double().t() + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    full = int8_linear(torch.full((1, 64), 127, dtype=torch.int8), torch.ones(1),
                       torch.full((1, 64), -128, dtype=torch.int8), torch.ones(1),
                       out_dtype=torch.float32)  # fmt: skip
    assert full.item() == 127 * -128 * 64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_int4_linear_matches_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 64, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(5, 64, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(dtype)
    qweight, scales, zeros = quantize_int4(w, 32)
    y = int4_linear(x, qweight, scales, zeros, 32, bias=b)
    assert y.dtype == dtype
    w_ref = (unpack_int4(qweight).double() - zeros.double().repeat_interleave(32, 0)) * (
        scales.double().repeat_interleave(32, 0)
    )  # [K, N]
    ref = x.double() @ w_ref + b.double()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="x: K=48 differs"):
        int4_linear(x[:, :48], qweight, scales, zeros, 32)
