"""The Triton small-M W8A8 GEMM (`backends.triton.int8_gemv`) against the CPU reference
(`backends.cpu.linear.int8_linear`), under TRITON_INTERPRET=1 without a GPU, natively with one.

Every comparison is bit for bit (torch.equal), and that is a justified bound, not luck: the kernel's
int32 accumulator is exact (|acc| <= K * 2^14 < 2^31 for every K here) and the reference's float64
sum of the same integers is exact too, so both hold the same integer; each converts it to fp32 with
one round-to-nearest-even; then both do the same IEEE fp32 operations in the same order
(* x_scale, * w_scale, + bias, each rounded on its own: the kernel compiles with fp fusion off)
and one round-to-nearest-even to out_dtype. Split-K only regroups an exact integer sum.
"""

from __future__ import annotations

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

from backends.cpu import linear as ref_linear  # noqa: E402

_KERNELS = {"backends.triton.gemv": "_small_m_kernel",
            "backends.triton.int8_gemv": "_int8_small_m_kernel"}  # fmt: skip
for _name, _kernel in _KERNELS.items():  # in order: int8_gemv imports gemv's epilogue
    _mod = sys.modules.get(_name)
    if INTERPRET and _mod is not None and type(getattr(_mod, _kernel)).__name__ == "JITFunction":
        importlib.reload(_mod)  # defined without the interpreter
gemv = importlib.import_module("backends.triton.gemv")
ig = importlib.import_module("backends.triton.int8_gemv")

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# K = 200 below: not a multiple of any block_k here (the masked tail); 3 splits of a 64-wide
# block_k give partials [3, M, N] and the reduce kernel.
CONFIGS = {
    "fma_split3": gemv.GemvConfig("fma", 16, 64, split_k=3),
    "dot": gemv.GemvConfig("dot", 32, 64, split_k=1),
    "dot_split3": gemv.GemvConfig("dot", 16, 32, split_k=3),
    "heuristic": None,
}


def dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def int8_case(
    m: int, n: int, k: int, x_per_row: bool, w_per_row: bool, has_bias: bool, seed: int
) -> dict:
    """Random int8 operands over the full range, with row 0 of each all -128: the largest
    product sum, K * 2^14, lands in out[0, 0]."""
    gen = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    x_q[0], w_q[0] = -128, -128
    # per-token / per-channel scales as a quantizer makes them (amax / 127 of unit-scale data)
    x_s = torch.rand(m if x_per_row else 1, generator=gen) * 0.02 + 1e-3
    w_s = torch.rand(n if w_per_row else 1, generator=gen) * 0.002 + 1e-4
    return {
        "x_q": x_q,
        "x_scale": x_s.reshape(m, 1) if x_per_row else x_s,
        "w_q": w_q,
        "w_scale": w_s.reshape(n, 1) if w_per_row else w_s,
        "bias": torch.randn(n, generator=gen) if has_bias else None,
    }


ARGS = ("x_q", "x_scale", "w_q", "w_scale", "bias")


def run(case: dict, out_dtype: torch.dtype, **kw) -> torch.Tensor:
    return ig.int8_linear_small_m(*(dev(case[key]) for key in ARGS), out_dtype, **kw)


def check(case: dict, y: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Bit for bit the reference's output (see the module docstring)."""
    ref = ref_linear.int8_linear(*(case[key] for key in ARGS), out_dtype)
    assert y.dtype == out_dtype and tuple(y.shape) == tuple(ref.shape), (y.dtype, y.shape)
    y = y.cpu()
    if not torch.equal(y, ref):
        bad = (y != ref).nonzero()[:5].tolist()
        diff = float((y.double() - ref.double()).abs().max())
        raise AssertionError(f"differs from the reference at {bad}; max |diff| {diff:.3g}")


# -- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", list(OUT_DTYPES))
@pytest.mark.parametrize("kernel", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 2, 3, 16])
def test_int8_linear_matches_reference(out: str, kernel: str, m: int) -> None:
    # N = 37 (the last column block is partial); scales per row for odd M, per tensor for even,
    # bias for M <= 2 (test_scale_shapes_and_bias takes every combination for one shape).
    case = int8_case(m, 37, 200, m % 2 == 1, m % 2 == 1, m <= 2, seed=m)
    check(case, run(case, OUT_DTYPES[out], config=CONFIGS[kernel]), OUT_DTYPES[out])


@pytest.mark.parametrize("x_per_row", [False, True], ids=["x1", "xM"])
@pytest.mark.parametrize("w_per_row", [False, True], ids=["w1", "wN"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_scale_shapes_and_bias(x_per_row: bool, w_per_row: bool, has_bias: bool) -> None:
    case = int8_case(5, 24, 96, x_per_row, w_per_row, has_bias, seed=11)
    for kernel in ("fma_split3", "dot"):
        check(case, run(case, torch.bfloat16, config=CONFIGS[kernel]), torch.bfloat16)


def test_low_precision_scales_and_bias_load_as_fp32() -> None:
    # compressed-tensors keeps weight scales in the model dtype: bf16 scales and bias are
    # widened to fp32 exactly, as the reference's .to(float32) does.
    case = int8_case(4, 20, 64, True, True, True, seed=12)
    case["w_scale"] = case["w_scale"].to(torch.bfloat16)
    case["bias"] = case["bias"].to(torch.bfloat16)
    check(case, run(case, torch.float16, config=CONFIGS["dot"]), torch.float16)


@pytest.mark.parametrize("kernel", ["fma", "dot"])
def test_split_k_partials_stay_exact_int32(kernel: str) -> None:
    # K = 6144 = 96 tiles of 64, split 3 ways: 2048 each. out[0, 0]'s partials are 2^25 (2048
    # products of -128 * -128), 1 and 2; the exact sum 2^25 + 3 rounds once to fp32 as 2^25 + 4,
    # while fp32 partials summed in split order would give (2^25 + 1 -> 2^25) + 2 -> 2^25 (ties
    # to even). With unit scales and an fp32 output, y is float32(acc) itself.
    k = 6144
    gen = torch.Generator().manual_seed(17)
    x_q = torch.randint(-128, 128, (2, k), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (3, k), generator=gen, dtype=torch.int8)
    x_q[0], w_q[0] = 0, 0
    x_q[0, :2048], w_q[0, :2048] = -128, -128
    x_q[0, 2048], w_q[0, 2048] = 1, 1
    x_q[0, 4096], w_q[0, 4096] = 1, 2
    ones = torch.ones(1)
    case = {"x_q": x_q, "x_scale": ones, "w_q": w_q, "w_scale": ones, "bias": None}
    y = run(case, torch.float32, config=gemv.GemvConfig(kernel, 16, 64, split_k=3))
    exact = x_q.long() @ w_q.long().t()
    assert int(exact[0, 0]) == 2**25 + 3
    assert float(y[0, 0]) == 2**25 + 4
    assert torch.equal(y.cpu(), exact.to(torch.float32))  # one rounding of the exact integer
    check(case, y, torch.float32)


def test_strided_weight_and_activation() -> None:
    # w_q a column slice of a wider matrix, x_q every other row: the kernel takes any strides.
    case = int8_case(3, 20, 80, True, True, True, seed=13)
    w_wide = torch.zeros(20, 96, dtype=torch.int8)
    w_wide[:, 8:88] = case["w_q"]
    x_tall = torch.zeros(6, 80, dtype=torch.int8)
    x_tall[::2] = case["x_q"]
    for kernel in ("fma_split3", "dot"):
        y = ig.int8_linear_small_m(
            dev(x_tall)[::2], dev(case["x_scale"]), dev(w_wide)[:, 8:88], dev(case["w_scale"]),
            dev(case["bias"]), torch.bfloat16, config=CONFIGS[kernel],
        )  # fmt: skip
        check(case, y, torch.bfloat16)


def test_empty_shapes() -> None:
    case = int8_case(2, 5, 32, True, True, True, seed=14)
    for key in ("w_q", "x_q"):
        c = dict(case, **{key: case[key][:0]})
        if key == "w_q":
            c.update(w_scale=case["w_scale"][:0], bias=case["bias"][:0])
        else:
            c.update(x_scale=case["x_scale"][:0])
        y = run(c, torch.bfloat16)
        assert y.shape == (c["x_q"].shape[0], c["w_q"].shape[0])
    # K = 0: the empty sum is 0, y = bias
    c = dict(case, x_q=case["x_q"][:, :0], w_q=case["w_q"][:, :0])
    check(c, run(c, torch.float32), torch.float32)


@settings(max_examples=10 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else 200)
@given(
    m=st.integers(1, 16),
    n=st.integers(1, 48),
    k=st.integers(1, 300),
    kernel=st.sampled_from(list(gemv.KERNELS)),
    split_k=st.integers(0, 4),
    x_per_row=st.booleans(),
    w_per_row=st.booleans(),
    has_bias=st.booleans(),
    out=st.sampled_from(list(OUT_DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_drawn_shapes(
    m, n, k, kernel, split_k, x_per_row, w_per_row, has_bias, out, seed
) -> None:
    cfg = gemv.GemvConfig(kernel, 16, 32, split_k=split_k)
    case = int8_case(m, n, k, x_per_row, w_per_row, has_bias, seed)
    check(case, run(case, OUT_DTYPES[out], config=cfg), OUT_DTYPES[out])


# -- configs and errors --------------------------------------------------------------------------
def test_config_table_and_heuristic() -> None:
    assert ig.heuristic_config(1).kernel == "fma" and ig.heuristic_config(2).kernel == "fma"
    assert ig.heuristic_config(3).kernel == "dot" and ig.heuristic_config(16).kernel == "dot"
    assert ig.heuristic_config(16).block_k >= ig.DOT_MIN_BLOCK_K
    mine = gemv.GemvConfig("dot", 64, 128, split_k=2)
    table = {(4, 96, 128): mine}  # M bucket 4 holds M = 3 and 4
    assert ig.pick_config(3, 96, 128, table) is mine
    assert ig.pick_config(4, 96, 128, table) is mine
    assert ig.pick_config(5, 96, 128, table) == ig.heuristic_config(5)
    assert ig.pick_config(3, 96, 256, table) == ig.heuristic_config(3)
    # the table a caller passes is the one used
    case = int8_case(3, 96, 128, True, True, False, seed=15)
    check(case, run(case, torch.bfloat16, configs=table), torch.bfloat16)


def test_dispatch_rule() -> None:
    assert ig.int8_small_m_reasons(torch.empty(16, 8, dtype=torch.int8)) == []
    assert ig.int8_small_m_reasons(torch.empty(17, 8, dtype=torch.int8)) == ["M=17 > 16"]
    assert ig.int8_small_m_reasons(torch.empty(5, 8, dtype=torch.int8), max_m=4) == ["M=5 > 4"]


def test_bad_inputs_raise() -> None:
    case = {key: dev(t) for key, t in int8_case(4, 16, 64, True, True, True, seed=16).items()}
    args = [case[key] for key in ARGS]

    def call(*a, **kw):
        return ig.int8_linear_small_m(*a, **kw)

    x17 = torch.zeros(17, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=r"M=17 rows, more than 16.*_int_mm"):
        call(x17, torch.ones(1, device=DEVICE), *args[2:])
    with pytest.raises(ValueError, match="x_q: dtype torch.float32 is not torch.int8"):
        call(args[0].float(), *args[1:])
    with pytest.raises(ValueError, match="w_q: dtype torch.uint8 is not torch.int8"):
        call(args[0], args[1], args[2].view(torch.uint8), *args[3:])
    with pytest.raises(ValueError, match="K=64"):
        call(args[0][:, :32], *args[1:])
    with pytest.raises(ValueError, match=r"x_scale: shape \(4,\)"):
        call(args[0], args[1].reshape(-1), *args[2:])
    with pytest.raises(ValueError, match=r"w_scale: shape \(1, 16\)"):
        call(*args[:3], args[3].reshape(1, -1), args[4])
    with pytest.raises(ValueError, match=r"bias: shape \(15,\)"):
        call(*args[:4], args[4][:15])
    with pytest.raises(ValueError, match="out_dtype: torch.int32"):
        call(*args, torch.int32)
    with pytest.raises(ValueError, match="block_k=16 is below 32"):
        call(*args, config=gemv.GemvConfig("dot", 16, 16))
    with pytest.raises(ValueError, match="must share one device"):
        call(*args[:4], args[4].to("meta"))


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
        caps = interpreter_capabilities()
        if caps is None:
            pytest.skip("Triton interpreter capabilities unavailable")
        return load_backend(caps, device="cpu", configured="require:cuda")
    from platforms import detect

    return load_backend(detect(), configured="require:cuda")


def test_backend_int8_linear_switches_on_m(backend) -> None:
    assert backend.chosen("int8_gemm") == "triton_small_m"
    # Without a GPU there is no _int_mm (no compute capability): dequant_gemm takes M > 16.
    large = backend.large_m_impl("int8_gemm")
    assert large == ("dequant_gemm" if INTERPRET else "int_mm")
    for m in (1, 16):
        case = int8_case(m, 24, 96, True, True, True, seed=20 + m)
        y = backend.int8_linear(*(dev(case[key]) for key in ARGS), out_dtype=torch.bfloat16)
        assert backend.ran["int8_gemm"] == "triton_small_m", m
        check(case, y, torch.bfloat16)
    # M = 17: the large-M candidate by design; K = 96 keeps dequant_gemm's fp32 sums exact
    # (K * 2^14 < 2^24), and _int_mm is exact, so it too equals the reference bit for bit.
    case = int8_case(17, 24, 96, True, True, True, seed=37)
    y = backend.int8_linear(*(dev(case[key]) for key in ARGS), out_dtype=torch.float32)
    assert backend.ran["int8_gemm"] == large
    check(case, y, torch.float32)
