"""The Triton small-M GEMMs (`backends.triton.gemv`) against the CPU reference
(`backends.cpu.linear`) in float64, under TRITON_INTERPRET=1 without a GPU, natively with one.

Tolerance: the kernels' error has two sources, both bounded rigorously (Higham, "Accuracy and
Stability of Numerical Algorithms", sec. 3.1: a sum of n terms in precision u errs by at most
gamma_n * sum |terms| ~ n * u * sum |terms|):
- fp32 accumulation: bf16 / fp16 / FP8 products are exact in fp32 (at most 2 * 11 significand
  bits); fp32 products round once more; the K terms, the bias and (FP8) the two scale products
  add at most (K + 4) roundings of u32 = 2^-24 each, relative to sum_k |x_k w_k| + |bias|.
  Split-K only reorders the sum, which the bound does not depend on.
- one rounding of the result to the output dtype: u_out * |ref|, plus a subnormal step.
On a GPU, tensor cores align products before adding and truncate instead of rounding, which at
most doubles the per-addition error: the accumulation term gets a factor 2 there.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined, so it must be set before the kernels import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

from backends.cpu import linear as ref_linear  # noqa: E402
from backends.cpu import quant as ref_quant  # noqa: E402
from tests.conformance.tolerances import DTYPE_NAME, SUBNORMAL_MIN, UNIT_ROUNDOFF  # noqa: E402

if "backends.triton.gemv" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.gemv"])  # defined without the interpreter
gemv = importlib.import_module("backends.triton.gemv")
if "backends.triton.activation" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.activation"])
activation = importlib.import_module("backends.triton.activation")
counters = importlib.import_module("backends.triton.counters")

F64 = torch.float64
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
U32 = UNIT_ROUNDOFF["fp32"]
ACC_SLACK = 1.0 if INTERPRET else 2.0  # see the module docstring
FMA = gemv.GemvConfig("fma", 16, 32, split_k=3)  # 3 splits: partials + the reduce kernel
DOT = gemv.GemvConfig("dot", 32, 32, split_k=1)  # K tail masked (K % 32 != 0 below)
CONFIGS = {"fma_split3": FMA, "dot": DOT}


def dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def up(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def check(y: torch.Tensor, ref: torch.Tensor, abs_terms: torch.Tensor, k: int) -> None:
    """|y - ref| <= u_out |ref| + subnormal + slack * (K + 4) * u32 * abs_terms, elementwise;
    abs_terms = sum_k |x_k w_k| (+ |bias|), the scale of what the accumulator adds."""
    name = DTYPE_NAME[y.dtype]
    allowed = (
        UNIT_ROUNDOFF[name] * ref.abs()
        + SUBNORMAL_MIN[name]
        + ACC_SLACK * (k + 4) * U32 * abs_terms
    )
    assert tuple(y.shape) == tuple(ref.shape), (y.shape, ref.shape)
    err = (y.cpu().to(F64) - ref).abs()
    worst = float((err / allowed).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"max |y - ref| = {float(err.max()):.3g}, {worst:.2f}x the bound"


def dense_case(m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(m, k, generator=gen).to(dtype),
        "weight": (torch.randn(n, k, generator=gen) * 0.5).to(dtype),
        "bias": torch.randn(n, generator=gen).to(dtype) if has_bias else None,
    }


def check_dense(case: dict, y: torch.Tensor) -> None:
    x, w, b = case["x"], case["weight"], case["bias"]
    assert y.dtype == x.dtype
    ref = ref_linear.linear(up(x), up(w), up(b))  # the reference, in float64
    terms = up(x).abs() @ up(w).abs().t() + (0.0 if b is None else up(b).abs())
    check(y, ref, terms, x.shape[1])


def run_dense(case: dict, **kw) -> torch.Tensor:
    return gemv.linear_small_m(dev(case["x"]), dev(case["weight"]), dev(case["bias"]), **kw)


# -- dense ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("kernel", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_linear_matches_reference(dtype: str, kernel: str, m: int) -> None:
    # N = 37 (odd: the last column block is partial), K = 80 (not a multiple of BLOCK_K = 32:
    # the masked tail; the FMA config's 3 tiles split 3 ways). Bias on for M = 1 and 5, off for
    # 2 and 16 (test_bias_on_and_off takes both for one shape).
    has_bias = m in (1, 5)
    case = dense_case(m, 37, 80, FLOATS[dtype], has_bias, seed=m)
    check_dense(case, run_dense(case, config=CONFIGS[kernel]))


@pytest.mark.parametrize("kernel", list(CONFIGS))
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_bias_on_and_off(kernel: str, has_bias: bool) -> None:
    case = dense_case(3, 21, 48, torch.bfloat16, has_bias, seed=30)
    check_dense(case, run_dense(case, config=CONFIGS[kernel]))


@pytest.mark.parametrize("m", [1, 3, 16])
def test_default_configs_and_even_k(m: int) -> None:
    # The table / heuristic path (no forced config); K = 1024 fills whole tiles (no masks).
    case = dense_case(m, 45, 1024, torch.bfloat16, m != 3, seed=20 + m)
    check_dense(case, run_dense(case))


# -- silu_and_mul fused into the GEMM's epilogue (a SwiGLU gate_up projection) -----------------
@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("kernel", ["fma_split3", "dot", "fma_whole"])
@pytest.mark.parametrize("m", [1, 5])
def test_linear_silu_and_mul_is_the_two_kernels(dtype: str, kernel: str, m: int) -> None:
    # The same bits as linear_small_m then Triton's silu_and_mul with the same launch shape:
    # D = 37 (the last column block half full), K = 80 (the masked tail), split-K summed in the
    # kernel, bias on the gate and up rows; and within the GEMM bound of the float64 reference.
    cfg = CONFIGS.get(kernel, gemv.GemvConfig("fma", 8, 32, split_k=1))
    case = dense_case(m, 74, 80, FLOATS[dtype], m == 1, seed=41 + m)
    x, w, b = (dev(case[key]) for key in ("x", "weight", "bias"))
    fused = gemv.linear_silu_and_mul_small_m(x, w, b, config=cfg)
    h = gemv.linear_small_m(x, w, b, config=cfg)
    assert tuple(fused.shape) == (m, 37)
    two_kernels = activation.silu_and_mul(h)
    if INTERPRET and kernel == "dot" and dtype == "fp32":
        # The interpreter's fp32 tl.dot is numpy's matmul, whose BLAS may sum an element's
        # products in an order that depends on where its row sits in the tile (seen on one CPU
        # machine, not on another), and the fused tile holds gate and up rows: a few ulps.
        torch.testing.assert_close(fused, two_kernels, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(fused, two_kernels)
    check_dense(case, h)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_linear_silu_and_mul_default_configs(m: int) -> None:
    # The table / heuristic launch shape, K = 1024 in whole tiles (no masks), x a row slice.
    gen = torch.Generator().manual_seed(50 + m)
    x = dev(torch.randn(m, 1024 + 64, generator=gen).to(torch.bfloat16))[:, :1024]
    case = dense_case(m, 90, 1024, torch.bfloat16, True, seed=51)
    w, b = dev(case["weight"]), dev(case["bias"])
    fused = gemv.linear_silu_and_mul_small_m(x, w, b)
    assert torch.equal(fused, activation.silu_and_mul(gemv.linear_small_m(x, w, b)))


def test_linear_silu_and_mul_without_the_fused_reduce() -> None:
    # A split-K launch whose partials the reduce kernel sums: the GEMM, then the activation.
    cfg = gemv.GemvConfig("fma", 16, 32, split_k=3)
    case = dense_case(2, 48, 96, torch.float16, True, seed=52)
    x, w, b = (dev(case[key]) for key in ("x", "weight", "bias"))
    fused = gemv.linear_silu_and_mul_small_m(x, w, b, config=cfg, fused_reduce=False)
    h = gemv.linear_small_m(x, w, b, config=cfg, fused_reduce=False)
    assert torch.equal(fused, activation.silu_and_mul(h))


def test_linear_silu_and_mul_bad_input() -> None:
    x = dev(torch.zeros(1, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected an even count"):
        gemv.linear_silu_and_mul_small_m(x, dev(torch.zeros(7, 32, dtype=torch.bfloat16)))
    w = dev(torch.zeros(8, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="differs from x's"):
        gemv.linear_silu_and_mul_small_m(x.half(), w)
    with pytest.raises(ValueError, match="K=16 differs from weight's K=32"):
        gemv.linear_silu_and_mul_small_m(x[:, :16], w)
    with pytest.raises(ValueError, match="needs block_n >= 2"):
        gemv.linear_silu_and_mul_small_m(x, w, config=gemv.GemvConfig("fma", 1, 32))


def test_strided_operands() -> None:
    # A transposed weight view and x rows with a gap: any strides compute correctly.
    case = dense_case(3, 24, 64, torch.float16, True, seed=5)
    w_t = case["weight"].t().contiguous().t()  # [N, K] with strides (1, N)
    x_wide = torch.zeros(3, 96, dtype=torch.float16)
    x_wide[:, :64] = case["x"]
    y = gemv.linear_small_m(dev(x_wide[:, :64]), dev(w_t), dev(case["bias"]), config=DOT)
    check_dense(case, y)


def test_split_k_is_deterministic_and_reads_no_stale_memory() -> None:
    # Results must be bit-identical run to run. Between the runs the caching allocator is
    # filled with NaNs, so a partial or output element the kernels fail to write shows up.
    case = dense_case(4, 40, 160, torch.bfloat16, True, seed=3)
    cfg = gemv.GemvConfig("fma", 16, 32, split_k=5)
    first = run_dense(case, config=cfg)
    junk = torch.full((1 << 16,), float("nan"), device=DEVICE)
    del junk
    gc.collect()
    second = run_dense(case, config=cfg)
    assert torch.equal(first, second)
    check_dense(case, second)


@pytest.mark.parametrize(
    ("kernel", "m", "splits"), [("fma", 1, 3), ("fma", 3, 5), ("dot", 5, 4), ("dot", 16, 2)]
)
def test_fused_split_k_reduce_gives_the_same_bits(kernel: str, m: int, splits: int) -> None:
    # The last split of each tile sums the partials in split order, as the reduce kernel does:
    # the same bits, dense and FP8, and the per-tile counters are back at zero after each call.
    cfg = gemv.GemvConfig(kernel, 16, 32, split_k=splits)
    case = dense_case(m, 37, 150, torch.bfloat16, True, seed=m + splits)
    for _ in range(2):  # the second call reuses the counters the first one left at zero
        fused = run_dense(case, config=cfg, fused_reduce=True)
        assert torch.equal(fused, run_dense(case, config=cfg, fused_reduce=False))
        assert not counters._COUNTERS[fused.device].any()
    check_dense(case, fused)
    x_q, x_s = ref_quant.quantize_fp8(case["x"].float(), torch.float8_e4m3fn, per_token=True)
    w_q, w_s = ref_quant.quantize_fp8(case["weight"].float(), torch.float8_e5m2, per_token=True)
    args = [dev(t) for t in (x_q, x_s, w_q, w_s, case["bias"])]
    fused = gemv.fp8_linear_small_m(*args, config=cfg, fused_reduce=True)
    assert torch.equal(fused, gemv.fp8_linear_small_m(*args, config=cfg, fused_reduce=False))
    assert not counters._COUNTERS[fused.device].any()


@pytest.mark.parametrize(
    ("kernel", "m", "splits", "silu"),
    [("fma", 1, 1, False), ("fma", 3, 3, True), ("dot", 5, 2, False), ("dot", 16, 1, True)],
)
def test_early_first_tile_gives_the_same_bits(kernel, m, splits, silu) -> None:
    # early peels each program's first K step (its weight tile loads before the PDL wait): the
    # same products in the same order, so the same bits, dense, with the fused activation and FP8.
    cfg = gemv.GemvConfig(kernel, 16, 32, split_k=splits)
    case = dense_case(m, 38, 160, torch.bfloat16, True, seed=m + splits)
    args = [dev(case[key]) for key in ("x", "weight", "bias")]
    fn = gemv.linear_silu_and_mul_small_m if silu else gemv.linear_small_m
    late, early = (fn(*args, config=cfg, early=flag) for flag in (False, True))
    assert torch.equal(late, early)
    x_q, x_s = ref_quant.quantize_fp8(case["x"].float(), torch.float8_e4m3fn, per_token=True)
    w_q, w_s = ref_quant.quantize_fp8(case["weight"].float(), torch.float8_e4m3fn, per_token=True)
    fp8 = [dev(t) for t in (x_q, x_s, w_q, w_s, case["bias"])]
    late, early = (gemv.fp8_linear_small_m(*fp8, config=cfg, early=flag) for flag in (False, True))
    assert torch.equal(late, early)


def test_early_with_empty_k_reads_nothing() -> None:
    # K = 0 (a multiple of every tile): no peeled step, the output is the bias alone.
    w = torch.nn.Parameter(dev(torch.zeros(6, 0, dtype=torch.bfloat16)), requires_grad=False)
    b = dev(torch.arange(6, dtype=torch.bfloat16))
    for fn in (gemv.linear_small_m, gemv.linear_silu_and_mul_small_m):
        y = fn(dev(torch.zeros(2, 0, dtype=torch.bfloat16)), w, b, early=True)
        h = b.expand(2, 6)
        assert torch.equal(y, h if fn is gemv.linear_small_m else activation.silu_and_mul(h))


def test_early_by_default_only_for_parameters(monkeypatch) -> None:
    # A weight a kernel may still be writing (any plain tensor) is read after the wait; the
    # engine's nn.Parameter weights early, unless HAL_GEMV_EARLY=0.
    seen = []
    real = gemv._launch
    monkeypatch.setattr(gemv, "_launch",
                        lambda *a, **kw: seen.append(kw["early"]) or real(*a, **kw))  # fmt: skip
    case = dense_case(1, 8, 32, torch.bfloat16, False, seed=0)
    x, w = dev(case["x"]), dev(case["weight"])
    gemv.linear_small_m(x, w)
    gemv.linear_small_m(x, torch.nn.Parameter(w, requires_grad=False))
    monkeypatch.setattr(gemv, "EARLY", False)
    gemv.linear_small_m(x, torch.nn.Parameter(w, requires_grad=False))
    assert seen == [False, True, False]


def test_counters_grow_without_freeing_the_old_buffer() -> None:
    # A CUDA graph captured earlier holds the old buffer's address: growing must keep it
    # allocated (and the new one zeroed, at least twice as large).
    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")
    old = counters.tile_counters(device, 1)
    grown = counters.tile_counters(device, old.numel() + 1)
    assert grown.numel() >= 2 * old.numel() and not grown.any()
    assert any(buf is old for buf in counters._RETIRED)
    assert counters.tile_counters(device, 5) is grown


@settings(max_examples=10 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else 200)
@given(
    m=st.integers(1, 16),
    n=st.integers(1, 70),
    k=st.integers(1, 130),
    dtype=st.sampled_from(list(FLOATS)),
    kernel=st.sampled_from(list(gemv.KERNELS)),
    split_k=st.integers(0, 4),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_drawn_shapes(m, n, k, dtype, kernel, split_k, has_bias, seed) -> None:
    cfg = gemv.GemvConfig(kernel, 16, 16, split_k=split_k)
    case = dense_case(m, n, k, FLOATS[dtype], has_bias, seed)
    check_dense(case, run_dense(case, config=cfg))


# -- FP8 -----------------------------------------------------------------------------------------
def fp8_case(m, n, k, x_fmt, w_fmt, per_row, has_bias, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x_q, x_s = ref_quant.quantize_fp8(
        torch.randn(m, k, generator=gen) * 3, x_fmt, per_token=per_row
    )
    w_q, w_s = ref_quant.quantize_fp8(torch.randn(n, k, generator=gen), w_fmt, per_token=per_row)
    bias = torch.randn(n, generator=gen) if has_bias else None
    return {"x_q": x_q, "x_scale": x_s, "w_q": w_q, "w_scale": w_s, "bias": bias}


def check_fp8(case: dict, y: torch.Tensor, out_dtype: torch.dtype) -> None:
    assert y.dtype == out_dtype
    x = up(case["x_q"]) * up(case["x_scale"])  # the dequantized operands, exactly
    w = up(case["w_q"]) * up(case["w_scale"])
    b = up(case["bias"])
    ref = ref_linear.linear(x, w, b)
    terms = x.abs() @ w.abs().t() + (0.0 if b is None else b.abs())
    check(y, ref, terms, x.shape[1])


def run_fp8(case: dict, out_dtype: torch.dtype, **kw) -> torch.Tensor:
    args = [dev(case[key]) for key in ("x_q", "x_scale", "w_q", "w_scale", "bias")]
    return gemv.fp8_linear_small_m(*args, out_dtype=out_dtype, **kw)


E4M3 = torch.float8_e4m3fn


@pytest.mark.parametrize("out", list(FLOATS))
@pytest.mark.parametrize("kernel", list(CONFIGS))
@pytest.mark.parametrize("m,per_row", [(1, True), (5, False), (16, True)])
def test_fp8_linear_matches_reference(out: str, kernel: str, m: int, per_row: bool) -> None:
    # Per-row scales ([M, 1] and [N, 1]) at M = 1 and 16, per-tensor ([1]) at M = 5 (no bias).
    case = fp8_case(m, 21, 72, E4M3, E4M3, per_row, m != 5, seed=m)  # odd N, K tail of 8
    check_fp8(case, run_fp8(case, FLOATS[out], config=CONFIGS[kernel]), FLOATS[out])


@pytest.mark.parametrize(
    "x_fmt,w_fmt",
    [
        (E4M3, torch.float8_e5m2),
        (torch.float8_e5m2, E4M3),
        (torch.float8_e4m3fnuz, torch.float8_e4m3fnuz),
    ],
    ids=["e4m3fn_x_e5m2", "e5m2_x_e4m3fn", "fnuz"],
)
@pytest.mark.parametrize("kernel", list(CONFIGS))
def test_fp8_formats(x_fmt: torch.dtype, w_fmt: torch.dtype, kernel: str) -> None:
    case = fp8_case(3, 29, 96, x_fmt, w_fmt, True, True, seed=11)
    check_fp8(case, run_fp8(case, torch.float32, config=CONFIGS[kernel]), torch.float32)


def test_fp8_matches_the_contract_reference_function() -> None:
    # backends.cpu.linear.fp8_linear itself (fp32 accumulator, scales in fp32): both sides err
    # by at most the bound, so they agree within twice it.
    case = fp8_case(2, 40, 64, E4M3, E4M3, True, True, seed=2)
    y = run_fp8(case, torch.float32)
    ref = ref_linear.fp8_linear(*(case[k] for k in ("x_q", "x_scale", "w_q", "w_scale", "bias")),
                                out_dtype=torch.float32)  # fmt: skip
    x = case["x_q"].to(F64) * case["x_scale"].to(F64)
    w = case["w_q"].to(F64) * case["w_scale"].to(F64)
    terms = x.abs() @ w.abs().t() + case["bias"].to(F64).abs()
    allowed = 2 * (68 * U32 * ACC_SLACK * terms + U32 * ref.to(F64).abs())
    assert ((y.cpu().to(F64) - ref.to(F64)).abs() <= allowed).all()


# -- configs and bad input -----------------------------------------------------------------------
def test_config_table_lookup_and_split_plan() -> None:
    cfg = gemv.GemvConfig("fma", 8, 64, split_k=2, num_warps=2, num_stages=1)
    table = {(2, 4, 96, 512): cfg}
    assert [gemv.m_bucket(m) for m in (1, 2, 3, 4, 5, 16)] == [1, 2, 4, 4, 8, 16]
    assert gemv.pick_config(2, 3, 96, 512, table) is cfg  # M = 3 -> bucket 4
    assert gemv.pick_config(2, 5, 96, 512, table) == gemv.heuristic_config(2, 5)
    assert gemv.pick_config(1, 1, 96, 512, table).kernel == "fma"
    # One row, untabled: K steps of 2048 where K is a multiple of it, else 1024, else 512 (no
    # partly empty last step), e.g. Llama-3.2-3B's K = 3072.
    tile = lambda k: (lambda c: (c.kernel, c.block_n, c.block_k))(gemv.pick_config(2, 1, 96, k, {}))  # noqa: E731
    assert tile(4096) == ("fma", 4, 2048) and tile(8192) == ("fma", 4, 2048)
    assert tile(3072) == ("fma", 4, 1024) and tile(1536) == ("fma", 8, 512)
    assert gemv.heuristic_config(2, 1) == gemv.heuristic_config(2, 1, 14336)
    # 8 tiles of K split 3 ways: 3 tiles per split, the last split has 2.
    assert gemv.split_plan(gemv.GemvConfig("fma", 8, 64, split_k=3), 1, 96, 512, 132) == (3, 192)
    # split_k 0: doubled while the grid is short of 4 programs per SM and splits keep 4+ tiles.
    auto = gemv.GemvConfig("fma", 32, 256)
    assert gemv.split_plan(auto, 1, 4096, 4096, 132) == (4, 1024)  # 128 -> 512 programs
    assert gemv.split_plan(auto, 1, 4096, 14336, 132) == (8, 1792)  # 56 tiles, 7 per split
    assert gemv.split_plan(auto, 1, 128256, 4096, 132) == (1, 4096)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel": "gemv"}, "kernel: 'gemv' is not one of fma, dot"),
        ({"kernel": "dot", "block_n": 8}, "block_n: 8 must be a power of two >= 16"),
        ({"block_k": 48}, "block_k: 48 must be a power of two"),
        ({"split_k": -1}, "split_k: -1 must be >= 0"),
        ({"num_warps": 3}, "num_warps: 3 must be a power of two"),
    ],
)
def test_bad_configs(kwargs: dict, match: str) -> None:
    args = {"kernel": "fma", "block_n": 16, "block_k": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        gemv.GemvConfig(**args)


def test_bad_input_names_the_value() -> None:
    x, w = torch.randn(2, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected \[M, K\] and \[N, K\]"):
        gemv.linear_small_m(x[None], w)
    with pytest.raises(ValueError, match="weight: dtype torch.float16 differs"):
        gemv.linear_small_m(x, w.half())
    with pytest.raises(ValueError, match="x: K=32 differs from weight's K=16"):
        gemv.linear_small_m(x, w[:, :16])
    with pytest.raises(ValueError, match=r"bias: shape \(7,\), expected \[N=8\]"):
        gemv.linear_small_m(x, w, torch.zeros(7))
    with pytest.raises(ValueError, match="x: dtype torch.int8 is not one of"):
        gemv.linear_small_m(x.to(torch.int8), w.to(torch.int8))
    q, s = ref_quant.quantize_fp8(torch.randn(8, 32), E4M3)
    with pytest.raises(ValueError, match="x_q: dtype torch.bfloat16 is not an FP8 format"):
        gemv.fp8_linear_small_m(x, s, q, s)
    with pytest.raises(ValueError, match=r"w_scale: shape \(2,\)"):
        gemv.fp8_linear_small_m(q[:2], s, q, torch.ones(2))
    with pytest.raises(ValueError, match="out_dtype: torch.int32 is not one of"):
        gemv.fp8_linear_small_m(q[:2], s, q, s, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="column blocks"):
        big = torch.empty(70000, 16, dtype=torch.bfloat16)
        gemv.linear_small_m(x[:, :16], big, config=gemv.GemvConfig("fma", 1, 16, split_k=1))


def test_dispatch_rules() -> None:
    w = torch.empty(64, 128, dtype=torch.bfloat16)
    assert gemv.small_m_reasons(torch.empty(2, 8, 128, dtype=torch.bfloat16), w) == []
    assert gemv.small_m_reasons(torch.empty(17, 128, dtype=torch.bfloat16), w) == ["M=17 > 16"]
    assert gemv.small_m_reasons(torch.empty(3, 128), w.float()) == [
        "dtype torch.float32 is not bfloat16 or float16"
    ]
    w72 = torch.empty(64, 72, dtype=torch.float16)
    assert gemv.small_m_reasons(torch.empty(3, 72, dtype=torch.float16), w72) == [
        "K=72 is not a multiple of 16"
    ]
    assert gemv.small_m_reasons(torch.empty(1, 64, dtype=torch.bfloat16), w.t()) == [
        "weight rows are not contiguous"
    ]
    assert gemv.fp8_small_m_reasons(torch.empty(16, 8)) == []
    assert gemv.fp8_small_m_reasons(torch.empty(17, 8)) == ["M=17 > 16"]


# -- dispatch through the CUDA backend -----------------------------------------------------------
@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch):
    import backends  # noqa: F401  (registers the candidates)
    from backends.cuda import interpreter_capabilities
    from hal.backend import OP_FAMILIES
    from hal.select import load_backend

    for family in OP_FAMILIES:
        monkeypatch.delenv(f"HAL_{family.upper()}_BACKEND", raising=False)
    if INTERPRET:
        return load_backend(interpreter_capabilities(), device="cpu", configured="require:cuda")
    from platforms import detect

    return load_backend(detect(), configured="require:cuda")


def test_backend_linear_switches_on_m(backend) -> None:
    assert backend.chosen("gemm") == "triton_small_m"
    assert backend.info.settings["gemm_large_m"] == "M > 16: cublas"
    # M = 2 * 3 = 6 rows of a 3-D x: the kernel, the leading dims kept.
    case = dense_case(6, 40, 64, torch.bfloat16, True, seed=8)
    y = backend.linear(dev(case["x"].reshape(2, 3, 64)), dev(case["weight"]), dev(case["bias"]))
    assert backend.ran["gemm"] == "triton_small_m" and tuple(y.shape) == (2, 3, 40)
    check_dense(case, y.reshape(6, 40))
    # M = 17, fp32, K % 16 != 0: cuBLAS by design (its own numerics: the reference's tolerance).
    for m, k, dtype in ((17, 64, torch.bfloat16), (4, 64, torch.float32), (4, 72, torch.float16)):
        case = dense_case(m, 24, k, dtype, False, seed=m)
        y = backend.linear(dev(case["x"]), dev(case["weight"]))
        assert backend.ran["gemm"] == "cublas", (m, k, dtype)
        ref = ref_linear.linear(up(case["x"]), up(case["weight"]))
        torch.testing.assert_close(y.cpu().to(F64), ref, rtol=2e-2, atol=2e-2)


def test_backend_fp8_linear_switches_on_m(backend) -> None:
    assert backend.chosen("fp8_gemm") == "triton_small_m"
    large = backend.large_m_impl("fp8_gemm")
    assert large == ("dequant_gemm" if INTERPRET else "scaled_mm")
    fp8 = backend.caps.fp8_dtype or E4M3
    case = fp8_case(5, 24, 64, fp8, fp8, True, True, seed=6)
    args = [dev(case[key]) for key in ("x_q", "x_scale", "w_q", "w_scale", "bias")]
    y = backend.fp8_linear(*args, out_dtype=torch.float32)
    assert backend.ran["fp8_gemm"] == "triton_small_m"
    check_fp8(case, y, torch.float32)
    case = fp8_case(17, 24, 64, fp8, fp8, True, True, seed=7)
    args = [dev(case[key]) for key in ("x_q", "x_scale", "w_q", "w_scale", "bias")]
    y = backend.fp8_linear(*args, out_dtype=torch.float32)
    assert backend.ran["fp8_gemm"] == large


def test_cuda_backend_fuses_linear_silu_and_mul_only_when_asked_and_able(monkeypatch) -> None:
    # HAL_FUSED_GATE_UP_SILU on, both families on Triton, M <= 16, bf16 / fp16, even rows: one
    # fused launch; otherwise the composition (linear, then silu_and_mul).
    from backends.cuda.backend import CudaBackend

    calls = []
    be = CudaBackend.__new__(CudaBackend)  # the dispatch methods alone, no device
    be.ran, be._fallbacks_logged, be.gemv_configs, be.fused_gate_up_silu = {}, set(), None, True
    chosen = {"gemm": "triton_small_m", "activation": "triton"}
    monkeypatch.setattr(CudaBackend, "chosen", lambda self, family: chosen[family])

    def fused(x, w, b, configs):
        calls.append("fused")
        return x[:, : w.shape[0] // 2]

    monkeypatch.setattr(gemv, "linear_silu_and_mul_small_m", fused)
    monkeypatch.setattr(CudaBackend, "silu_and_mul", lambda self, x: calls.append("silu") or x)
    monkeypatch.setattr(CudaBackend, "linear", lambda self, x, w, b=None: calls.append("gemm") or x)
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    y = be.linear_silu_and_mul(torch.zeros(2, 3, 16, dtype=torch.bfloat16), w)
    assert calls == ["fused"] and tuple(y.shape) == (2, 3, 4)
    for x, wt, change in (
        (torch.zeros(17, 16, dtype=torch.bfloat16), w, None),  # M > 16
        (torch.zeros(2, 16, dtype=torch.float32), w.float(), None),  # not bf16 / fp16
        (torch.zeros(2, 16, dtype=torch.bfloat16), w[:7], None),  # odd rows
        (torch.zeros(2, 16, dtype=torch.bfloat16), w, ("activation", "torch")),
        (torch.zeros(2, 16, dtype=torch.bfloat16), w, ("gemm", "cublas")),
        (torch.zeros(2, 16, dtype=torch.bfloat16), w, ("off", None)),
    ):
        calls.clear()
        saved = dict(chosen)
        if change and change[0] == "off":
            be.fused_gate_up_silu = False
        elif change:
            chosen[change[0]] = change[1]
        be.linear_silu_and_mul(x, wt)
        assert calls == ["gemm", "silu"], (tuple(x.shape), x.dtype, change)
        chosen.update(saved)
        be.fused_gate_up_silu = True
    # Unset (None): fused only at the shapes SILU_CONFIGS lists (measured faster there).
    be.fused_gate_up_silu = None
    monkeypatch.setattr(gemv, "SILU_CONFIGS", {(2, 8, 8, 16): gemv.GemvConfig("fma", 4, 16)})
    for x, expected in (
        (torch.zeros(6, 16, dtype=torch.bfloat16), ["fused"]),  # M bucket 8: listed
        (torch.zeros(2, 16, dtype=torch.bfloat16), ["gemm", "silu"]),  # M bucket 2: not
    ):
        calls.clear()
        be.linear_silu_and_mul(x, w)
        assert calls == expected, tuple(x.shape)


def test_silu_configs_pick_the_fused_launch_shape(monkeypatch) -> None:
    # SILU_CONFIGS' entry serves the fused launch; the plain GEMM and a backend's own table
    # (configs) do not read it, and shapes it lacks take the plain table's entry.
    key = (2, 4, 64, 1024)
    fused_cfg, plain_cfg = gemv.GemvConfig("fma", 4, 64), gemv.GemvConfig("dot", 32, 64)
    monkeypatch.setattr(gemv, "SILU_CONFIGS", {key: fused_cfg})
    monkeypatch.setitem(gemv.DEFAULT_CONFIGS, key, plain_cfg)
    assert gemv.pick_config(2, 3, 64, 1024, silu=True) == fused_cfg
    assert gemv.pick_config(2, 3, 64, 1024) == plain_cfg
    assert gemv.pick_config(2, 3, 64, 1024, {}, silu=True) == gemv.heuristic_config(2, 3)
    assert gemv.pick_config(2, 1, 64, 1024, silu=True) == gemv.pick_config(2, 1, 64, 1024)
    assert gemv.silu_fusion_measured_faster(2, 3, 64, 1024)
    assert not gemv.silu_fusion_measured_faster(2, 5, 64, 1024)


# -- a qkv projection with rotary and the KV-cache write in the GEMM's epilogue ----------------
if "backends.triton.rotary" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.rotary"])
rotary_kernels = importlib.import_module("backends.triton.rotary")


def qkv_rotary_case(m: int, heads: int, kv_heads: int, d: int, k: int, dtype, cache_dtype,
                    has_bias: bool, seed: int) -> dict:  # fmt: skip
    from hal.rope import build_cos_sin_cache

    gen = torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * d
    blocks, block_size = 3, 4
    slots = torch.randperm(blocks * block_size, generator=gen)[:m]
    slots[0] = -1  # padding: skipped
    if m > 2:
        slots[2] = blocks * block_size + 5  # past the cache: skipped
    cache = torch.zeros(blocks, block_size, kv_heads, d)
    return {
        "x": torch.randn(m, k, generator=gen).to(dtype),
        "weight": (torch.randn(n, k, generator=gen) * 0.5).to(dtype),
        "bias": torch.randn(n, generator=gen).to(dtype) if has_bias else None,
        "positions": torch.randint(0, 40, (m,), generator=gen),
        "cos_sin_cache": build_cos_sin_cache(d, 40, 10000.0, None),
        "slot_mapping": slots,
        "key_cache": cache.to(cache_dtype),
        "value_cache": (cache + 1).to(cache_dtype),
    }


def two_kernel_qkv_rotary(c: dict, heads: int, kv_heads: int, cfg, kv_scale=None):
    """linear_small_m, then the Triton rotary + KV-write kernel: (qkv rotated, caches)."""
    x, w, b = (dev(c[key]) for key in ("x", "weight", "bias"))
    kc, vc = dev(c["key_cache"].clone()), dev(c["value_cache"].clone())
    h = gemv.linear_small_m(x, w, b, config=cfg)
    d = kc.shape[3]
    q, k, v = h.view(h.shape[0], -1, d).split([heads, kv_heads, kv_heads], dim=1)
    q2, k2 = rotary_kernels.rotary_write_kv(
        dev(c["positions"]), q, k, v, dev(c["cos_sin_cache"]), True, kc, vc,
        dev(c["slot_mapping"]), kv_scale,
    )  # fmt: skip
    out = torch.cat([q2.flatten(1), k2.flatten(1), v.flatten(1)], dim=1)
    return out, kc, vc


def fused_qkv_rotary(c: dict, heads: int, kv_heads: int, cfg, kv_scale=None, **kw):
    kc, vc = dev(c["key_cache"].clone()), dev(c["value_cache"].clone())
    out = gemv.linear_rotary_write_kv_small_m(
        dev(c["x"]), dev(c["weight"]), dev(c["bias"]), heads, kv_heads, dev(c["positions"]),
        dev(c["cos_sin_cache"]), kc, vc, dev(c["slot_mapping"]), kv_scale, config=cfg, **kw,
    )  # fmt: skip
    return out, kc, vc


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("kernel", ["fma_split3", "dot", "fma_whole"])
@pytest.mark.parametrize("m", [1, 5])
def test_linear_rotary_write_kv_is_the_two_kernels(dtype: str, kernel: str, m: int) -> None:
    # The same bits as linear_small_m then rotary_write_kv with the same launch shape: 4 q / 2
    # KV heads of 16 (pairs of one program span heads with block_n 16 / 32), K = 80 (a masked
    # tail), split-K summed in the kernel, bias at M = 1, a padding slot and one past the cache.
    cfg = CONFIGS.get(kernel, gemv.GemvConfig("fma", 8, 32, split_k=1))
    c = qkv_rotary_case(m, 4, 2, 16, 80, FLOATS[dtype], FLOATS[dtype], m == 1, seed=60 + m)
    out, kc, vc = fused_qkv_rotary(c, 4, 2, cfg)
    ref, ref_kc, ref_vc = two_kernel_qkv_rotary(c, 4, 2, cfg)
    assert tuple(out.shape) == (m, 128)
    if INTERPRET and kernel == "dot" and dtype == "fp32":  # numpy's matmul order: see above
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc, ref_kc, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, ref)
        assert torch.equal(kc, ref_kc)
        assert torch.equal(vc, ref_vc)
    if m > 1:  # token 0's slot is -1; the others' are written
        assert not torch.equal(kc, dev(c["key_cache"]))


@pytest.mark.parametrize("fused_reduce", [True, False])
def test_linear_rotary_write_kv_fp8_cache_and_split_k(fused_reduce: bool) -> None:
    # An FP8 cache with a scale (fp8(x / kv_scale)); split-K without the in-kernel sum falls back
    # to the two kernels, with it stays one launch: both the two kernels' bits. GQA 8 / 1.
    cfg = gemv.GemvConfig("fma", 16, 32, split_k=2)
    fp8 = torch.float8_e4m3fn
    c = qkv_rotary_case(3, 8, 1, 32, 64, torch.bfloat16, fp8, True, seed=70)
    out, kc, vc = fused_qkv_rotary(c, 8, 1, cfg, 0.5, fused_reduce=fused_reduce)
    ref, ref_kc, ref_vc = two_kernel_qkv_rotary(c, 8, 1, cfg, 0.5)
    assert torch.equal(out, ref)
    assert torch.equal(kc.view(torch.uint8), ref_kc.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ref_vc.view(torch.uint8))


def test_linear_rotary_write_kv_bad_input() -> None:
    c = qkv_rotary_case(2, 4, 2, 16, 32, torch.bfloat16, torch.bfloat16, False, seed=80)
    args = {key: dev(v) for key, v in c.items()}

    def call(**change):
        a = {**args, **change}
        return gemv.linear_rotary_write_kv_small_m(
            a["x"], a["weight"], a["bias"], a.get("heads", 4), a.get("kv_heads", 2),
            a["positions"], a["cos_sin_cache"], a["key_cache"], a["value_cache"],
            a["slot_mapping"],
        )  # fmt: skip

    with pytest.raises(ValueError, match="weight: shape"):
        call(weight=args["weight"][:-16])
    with pytest.raises(ValueError, match="whole"):
        call(cos_sin_cache=args["cos_sin_cache"][:, :8])  # rotary_dim 8 of head_dim 16
    with pytest.raises(ValueError, match="positions"):
        call(positions=args["positions"][:1])
    with pytest.raises(ValueError, match="slot_mapping"):
        call(slot_mapping=args["slot_mapping"].float())
    with pytest.raises(ValueError, match="KV heads"):
        call(heads=5, kv_heads=1)


def test_cuda_backend_fuses_linear_rotary_write_kv_only_when_asked_and_able(monkeypatch) -> None:
    # HAL_FUSED_QKV_ROTARY on, GEMM / rotary / KV write on Triton, NeoX over whole heads, M <= 16:
    # one fused launch; otherwise the composition (linear, then rotary_write_kv).
    from backends.cuda.backend import CudaBackend

    calls = []
    be = CudaBackend.__new__(CudaBackend)  # the dispatch methods alone, no device
    be.ran, be._fallbacks_logged, be.gemv_configs, be.fused_qkv_rotary = {}, set(), None, True
    chosen = {"gemm": "triton_small_m", "rotary": "triton", "kv_write": "triton"}
    monkeypatch.setattr(CudaBackend, "chosen", lambda self, family: chosen[family])

    def fused(x, w, b, heads, kv_heads, *rest, configs):
        calls.append("fused")
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)

    monkeypatch.setattr(gemv, "linear_rotary_write_kv_small_m", fused)
    monkeypatch.setattr(CudaBackend, "linear", lambda self, x, w, b=None: calls.append("gemm")
                        or torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype))  # fmt: skip
    monkeypatch.setattr(CudaBackend, "rotary_write_kv",
                        lambda self, p, q, k, *rest: calls.append("rotary") or (q, k))  # fmt: skip
    cache = torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16)
    cos_sin = torch.zeros(10, 8)
    w = torch.zeros((4 + 2 * 2) * 8, 16, dtype=torch.bfloat16)
    pos = torch.zeros(3, dtype=torch.long)

    def run(x, weight=w, neox=True, table=cos_sin):
        q, k = be.linear_rotary_write_kv(x, weight, None, 4, 2, pos, table, neox, cache, cache,
                                         pos)  # fmt: skip
        assert tuple(q.shape) == (x.shape[0], 4, 8) and tuple(k.shape) == (x.shape[0], 2, 8)

    run(torch.zeros(3, 16, dtype=torch.bfloat16))
    assert calls == ["fused"]
    for x, kw, change in (
        (torch.zeros(17, 16, dtype=torch.bfloat16), {}, None),  # M > 16
        (torch.zeros(3, 16, dtype=torch.float32), {"weight": w.float()}, None),  # fp32
        (torch.zeros(3, 16, dtype=torch.bfloat16), {"neox": False}, None),  # GPT-J
        (torch.zeros(3, 16, dtype=torch.bfloat16), {"table": cos_sin[:, :4]}, None),  # partial
        (torch.zeros(3, 16, dtype=torch.bfloat16), {}, ("rotary", "torch")),
        (torch.zeros(3, 16, dtype=torch.bfloat16), {}, ("gemm", "cublas")),
        (torch.zeros(3, 16, dtype=torch.bfloat16), {}, ("off", None)),
    ):
        calls.clear()
        saved = dict(chosen)
        if change and change[0] == "off":
            be.fused_qkv_rotary = False
        elif change:
            chosen[change[0]] = change[1]
        run(x, **kw)
        assert calls == ["gemm", "rotary"], (tuple(x.shape), kw.keys(), change)
        chosen.update(saved)
        be.fused_qkv_rotary = True
