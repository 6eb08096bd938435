"""The C codes kernel (`backends/cpu/ckernels.py`, `backends/cpu/csrc/codes_gemm.c`): its product
against the reference GGUF GEMM for every block type, row count and layout, its bad-input errors,
how the build reports a missing compiler or a failed build, and the CPU backend's use of it (the
decode-sized calls of dense and tiled weights, a GGUF LM head from its blocks)."""

from __future__ import annotations

import pytest
import torch

from backends.cpu import ckernels
from backends.cpu import gguf as ref
from backends.cpu import gguf_fast as fast
from backends.cpu.backend import CpuBackend
from hal.select import select_ops
from tests.backends.gguf.gguf_random import QTYPES, random_blocks

KERNEL, WHY = ckernels.load_codes_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no C codes kernel here: {WHY}")
U_FP32 = 2.0**-24


def _case(qtype: str, n: int, nblocks: int, seed: int):
    k = nblocks * ref.block_type(qtype).block_size
    blocks = random_blocks(qtype, n, k, seed=seed)
    return blocks, k, ref.dequantize_gguf(blocks, qtype, (n, k)).double()


def _allowed(x: torch.Tensor, w: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    # fp32 sums in another order than the reference matmul: K roundings in the accumulators
    # (16u sqrt(K) |x||w|), the per-group scale and offset products, and the output's rounding
    k = x.shape[-1]
    mag = x.abs().max().item() * w.abs().max().item()
    return 16 * U_FP32 * k**0.5 * mag * 4 + 16 * U_FP32 * want.abs()


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_codes_kernel_is_the_reference_product(qtype: str, m: int) -> None:
    n = 37  # not a multiple of any vector width or thread split
    blocks, k, w = _case(qtype, n, 3, seed=21 + m)
    weight = fast.prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=False)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = KERNEL(x, weight.codes, weight.scale, weight.offset)
    want = x.double() @ w.t()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - want).abs() <= _allowed(x, w, want)).all()
    for threads in (1, 3):  # the split over threads does not change any output's sums
        assert torch.equal(KERNEL(x, weight.codes, weight.scale, weight.offset, threads), y)


@needs_kernel
def test_each_row_of_x_is_its_own_product() -> None:
    # Row m of an M-row call equals the one-row call on x[m]: the same sums in the same order.
    blocks, k, _ = _case("Q4_1", 19, 4, seed=5)
    weight = fast.prepare_gguf_cpu(blocks, "Q4_1", 19, k, use_int4pack=False)
    x = torch.randn(KERNEL.max_m, k)
    y = KERNEL(x, weight.codes, weight.scale, weight.offset)
    for i in range(x.shape[0]):
        one = KERNEL(x[i : i + 1].contiguous(), weight.codes, weight.scale, weight.offset)
        assert torch.equal(one[0], y[i])


@needs_kernel
@pytest.mark.parametrize("layout", ["tiled", "dense"])
@pytest.mark.parametrize("rows", [1, 8, 9, 20, 40])
def test_gguf_linear_takes_decode_sized_calls(layout: str, rows: int, monkeypatch) -> None:
    # Up to MAX_M rows one kernel call; a dense weight takes MAX_M rows a call up to
    # DENSE_CHUNKED_ROWS, then its fp32 matmul; a tiled weight (no fp32 copy) up to
    # CHUNKED_ROWS, then its tiles. Any x shape.
    calls = []
    monkeypatch.setattr(
        ckernels.CodesWeight, "__call__",
        lambda self, x, *a, **kw: calls.append(x.shape[0]) or ORIGINAL(self, x, *a, **kw),
    )  # fmt: skip
    n, qtype = 24, "Q8_0"
    blocks, k, w = _case(qtype, n, 2, seed=rows)
    weight = fast.prepare_gguf_cpu(
        blocks, qtype, n, k, use_int4pack=False, dense_budget=1 << 30 if layout == "dense" else 0,
        keep_codes=True,
    )  # fmt: skip
    assert weight.path == layout and weight.codes is not None
    x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(rows))[:, : rows // 2 + 1]
    bias = torch.randn(n)
    y = fast.gguf_linear_cpu(x, weight, bias, codes_kernel=KERNEL)
    want = x.double() @ w.t() + bias.double()
    assert y.shape == (*x.shape[:-1], n)
    assert ((y.double() - want).abs() <= _allowed(x, w, want)).all()
    m = x.shape[0] * x.shape[1]
    if m <= KERNEL.max_m:
        assert calls == [m]
    elif m <= fast.chunked_rows(layout):
        step = KERNEL.max_m
        assert calls == [min(step, m - i) for i in range(0, m, step)]
    else:
        assert calls == []


ORIGINAL = ckernels.CodesWeight.__call__


@needs_kernel
@pytest.mark.parametrize("dense", [True, False])
def test_the_backend_binds_each_weight_once(cpu_caps, dense: bool, monkeypatch) -> None:
    # prepare_gguf leaves the kernel's checked handle on the weight's own tensors (no copy);
    # gguf_linear's decode-sized calls go through it, with the bare kernel's bits.
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    backend.gguf_dense_left = 1 << 30 if dense else 0
    blocks, k, _ = _case("Q4_1", 40, 3, seed=9)
    weight = backend.prepare_gguf(blocks, "Q4_1", 40, k)
    assert weight.layout == ("dense" if dense else "tiled")
    bound = weight.data
    assert isinstance(bound, ckernels.CodesWeight)
    # Q4_1 on an AVX-512 build: its codes two per byte (half the bytes of int8 codes), bias 0
    key = "codes4" if backend.gguf_nibbles else "codes"
    assert set(weight.tensors) & {"codes", "codes4"} == {key}
    assert bound.codes.data_ptr() == weight.tensors[key].data_ptr()
    assert bound.bias == (0 if backend.gguf_nibbles else None)
    assert bound.offset.data_ptr() == weight.tensors["offset"].data_ptr()
    monkeypatch.setattr(ckernels.CodesKernel, "bind", None)  # no second bind per call
    for m in (1, 5):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        want = ORIGINAL(bound, x)
        assert torch.equal(backend.gguf_linear(x, weight), want)


@needs_kernel
def test_long_rows_take_scratch_from_the_heap() -> None:
    # 8 rows x 520 groups of x sums pass the kernel's stack scratch (4096 floats): the same
    # products, each row's sums as in a one-row call.
    blocks, k, w = _case("Q4_1", 5, 520, seed=2)
    weight = fast.prepare_gguf_cpu(blocks, "Q4_1", 5, k, use_int4pack=False)
    x = torch.randn(KERNEL.max_m, k, generator=torch.Generator().manual_seed(4))
    y = KERNEL(x, weight.codes, weight.scale, weight.offset)
    want = x.double() @ w.t()
    assert ((y.double() - want).abs() <= _allowed(x, w, want)).all()
    one = KERNEL(x[2:3].contiguous(), weight.codes, weight.scale, weight.offset)
    assert torch.equal(one[0], y[2])


@needs_kernel
def test_bf16_input_computes_in_fp32_and_returns_bf16() -> None:
    blocks, k, w = _case("Q4_0", 16, 2, seed=3)
    weight = fast.prepare_gguf_cpu(blocks, "Q4_0", 16, k, use_int4pack=False)
    x = torch.randn(2, k).to(torch.bfloat16)
    y = fast.gguf_linear_cpu(x, weight, codes_kernel=KERNEL)
    want = fast.gguf_linear_cpu(x.float(), weight, codes_kernel=KERNEL)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.to(torch.bfloat16))
    # fp64 input is not the kernel's: the tiled path in fp64
    y64 = fast.gguf_linear_cpu(x.double(), weight, codes_kernel=KERNEL)
    assert y64.dtype == torch.float64


@needs_kernel
def test_bad_calls_say_what_is_wrong() -> None:
    blocks, k, _ = _case("Q4_1", 8, 2, seed=1)
    wt = fast.prepare_gguf_cpu(blocks, "Q4_1", 8, k, use_int4pack=False)
    x = torch.randn(1, k)
    with pytest.raises(ValueError, match="expected float32"):
        KERNEL(x.double(), wt.codes, wt.scale, wt.offset)
    with pytest.raises(ValueError, match="expected int8, float32"):
        KERNEL(x, wt.codes.to(torch.int16), wt.scale, wt.offset)
    with pytest.raises(ValueError, match="1 <= M <= 8"):
        KERNEL(torch.randn(KERNEL.max_m + 1, k), wt.codes, wt.scale, wt.offset)
    with pytest.raises(ValueError, match=f"expected float32 \\[M, {k}\\]"):
        KERNEL(torch.randn(1, k + 32), wt.codes, wt.scale, wt.offset)
    with pytest.raises(ValueError, match="whole groups"):
        KERNEL(x, wt.codes[:, :-1].contiguous(), wt.scale, wt.offset)
    with pytest.raises(ValueError, match="scale's shape"):
        KERNEL(x, wt.codes, wt.scale, wt.offset[:, :1].contiguous())
    with pytest.raises(ValueError, match="contiguous CPU"):
        KERNEL(torch.randn(2, 2 * k)[:, ::2], wt.codes, wt.scale, wt.offset)
    with pytest.raises(ValueError, match="contiguous CPU"):
        KERNEL(x, wt.codes.t().contiguous().t(), wt.scale, wt.offset)
    with pytest.raises(ValueError, match="in_features"):
        bound = KERNEL.bind(wt.codes, wt.scale, wt.offset)
        fast.codes_linear(torch.randn(1, k + 1), bound, None)


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(ckernels.ENV, "0")
    assert ckernels.load_codes_kernel() == (None, f"{ckernels.ENV}=0")
    monkeypatch.setenv(ckernels.ENV, "maybe")
    with pytest.raises(ValueError, match="HAL_CPU_C_KERNELS: 'maybe'"):
        ckernels.enabled()


def test_no_compiler_is_a_reason(monkeypatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    for source in (ckernels.SOURCE, ckernels.ROTARY_SOURCE):
        lib, why = ckernels._library.__wrapped__(source)
        assert lib is None and "no C compiler: '/nonexistent/cc'" in why


@pytest.mark.skipif(ckernels._compiler()[0] is None, reason="no C compiler here")
def test_a_failed_build_is_a_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ckernels.CACHE_ENV, str(tmp_path))
    bad = tmp_path / "broken.c"
    bad.write_text("int f(void) { return }\n")
    cc, version = ckernels._compiler()
    path, why = ckernels._build(cc, version, bad)
    assert path is None and why.startswith("building broken.c failed with")
    assert list((tmp_path / "ckernels").rglob("*.so")) == []  # no half-written library left


@needs_kernel
def test_the_build_is_cached_by_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ckernels.CACHE_ENV, str(tmp_path))
    cc, version = ckernels._compiler()
    first, why = ckernels._build(cc, version, ckernels.SOURCE)
    assert first is not None and why == "" and first.is_relative_to(tmp_path)
    mtime = first.stat().st_mtime_ns
    again, _ = ckernels._build(cc, version, ckernels.SOURCE)
    assert again == first and again.stat().st_mtime_ns == mtime


def test_the_backend_says_which_small_batch_path_runs(cpu_caps, monkeypatch) -> None:
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    setting = backend.info.settings["gguf_small_batch"]
    if KERNEL is None:
        assert setting == f"torch (no C codes kernel: {WHY})" and not backend.gguf_lm_head
    else:
        assert setting.startswith("C codes kernel") and backend.gguf_lm_head
    # the bf16 int4pack opt-in runs its own op: no codes kernel, no LM head from blocks
    packed = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps), gguf_int4pack=True)
    assert packed.codes_kernel is None and "gguf_small_batch" not in packed.info.settings
    with pytest.raises(ValueError, match="role: 'head'"):
        backend.prepare_gguf(*_case("Q8_0", 4, 1, 0)[:1], "Q8_0", 4, 32, role="head")


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_codes_two_per_byte_give_the_int8_codes_bits(qtype: str) -> None:
    # The 4-bit types' codes packed two per byte (half the bytes): the same integers, so the
    # same sums in the same order at every M, and the tiled path's dequantize the same weight.
    n = 21
    blocks, k, _ = _case(qtype, n, 2, seed=7)
    int8 = fast.prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=False)
    four = fast.prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=False, nibbles=True)
    assert (
        four.codes is None and four.codes4.shape == (n, k // 2) and four.codes4.dtype == torch.uint8
    )
    assert four.nbytes() == int8.nbytes() - n * k // 2
    bias = fast.CODES4_BIAS[qtype]
    assert torch.equal(ckernels.unpack_codes4(four.codes4, bias), int8.codes)
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        want = KERNEL(x, int8.codes, int8.scale, int8.offset)
        assert torch.equal(KERNEL(x, four.codes4, four.scale, four.offset, bias=bias), want)
        assert torch.equal(fast.gguf_linear_cpu(x, four, codes_kernel=KERNEL), want)
    assert torch.equal(fast.dequantize_tiled(four), fast.dequantize_tiled(int8))
    assert torch.equal(fast.dequantize_tiled(four, 5, 9), fast.dequantize_tiled(int8, 5, 9))
    x = torch.randn(40, k)  # past CHUNKED_ROWS: the tiled path's dequantize and matmul
    assert torch.equal(fast.gguf_linear_cpu(x, four), fast.gguf_linear_cpu(x, int8))
    # Q8_0 / Q6_K codes do not fit 4 bits: int8 codes whatever nibbles says
    q8, k8, _ = _case("Q8_0", 4, 1, seed=1)
    assert fast.prepare_gguf_cpu(q8, "Q8_0", 4, k8, use_int4pack=False, nibbles=True).codes4 is None


def test_pack_codes4_checks_what_fits() -> None:
    codes = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    assert torch.equal(ckernels.unpack_codes4(ckernels.pack_codes4(codes, -8), -8), codes)
    with pytest.raises(ValueError, match="must lie in 0..15"):
        ckernels.pack_codes4(codes, 0)  # negative values with bias 0
    with pytest.raises(ValueError, match="K = 48 is not a multiple of 32"):
        ckernels.pack_codes4(codes[:, :48], -8)


@needs_kernel
def test_bad_4bit_binds_say_what_is_wrong() -> None:
    codes4 = torch.zeros(4, 32, dtype=torch.uint8)
    scale = torch.ones(4, 2, 1)
    with pytest.raises(ValueError, match="expected uint8 \\(4-bit codes two per byte\\)"):
        KERNEL.bind(codes4.to(torch.int8), scale, None, bias=0)
    with pytest.raises(ValueError, match="bias 3: 4-bit codes take a bias in -8..0"):
        KERNEL.bind(codes4, scale, None, bias=3)
    with pytest.raises(ValueError, match="multiples of 32"):
        KERNEL.bind(codes4, torch.ones(4, 4, 1), None, bias=0)  # groups of 16


@pytest.mark.skipif(ckernels._compiler()[0] is None, reason="no C compiler here")
@pytest.mark.parametrize(
    "isa,width",
    [(("-mavx2", "-mfma", "-mno-avx512f"), 8), (("-mno-avx", "-mno-avx2"), 0)],
    ids=["avx2", "plain-c"],
)
def test_the_narrower_builds_pass_the_self_check(tmp_path, monkeypatch, isa, width) -> None:
    # The AVX2 and plain C variants of the source (what other CPUs build) give the int8 and
    # 4-bit products and the dequantize the self-check demands.
    if width == 8 and "avx2" not in ckernels._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv(ckernels.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(ckernels, "FLAG_SETS", (("-O3", "-ffp-contract=off", *isa, "-fopenmp"),))
    cc, version = ckernels._compiler()
    path, why = ckernels._build(cc, version, ckernels.SOURCE)
    if path is None:
        pytest.skip(f"the compiler does not take {isa}: {why}")
    lib = ckernels.ctypes.CDLL(str(path))
    ckernels._declare_codes(lib)
    kernel = ckernels.CodesKernel(lib, path, lib.codes_gemm_max_m(), width, True)
    assert lib.codes_gemm_vector_width() == width
    assert ckernels._self_check(kernel) == ""
