"""The block-scaled FP8 GEMM (`backends.triton.fp8_block`) against float64 on dequantized operands,
under TRITON_INTERPRET=1 on CPU tensors or natively on a GPU; the CPU reference's and the dequant
path's block-scaled case; the CUDA backend's dispatch; bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from backends.cpu import linear as ref_linear
from backends.cuda import linear as cuda_linear
from tests.conformance.tolerances import tolerance

triton = pytest.importorskip("triton")
fp8_block = pytest.importorskip("backends.triton.fp8_block")

E4M3, E5M2, FNUZ = torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz


def _device() -> str:
    if torch.cuda.is_available() and not fp8_block.interpreting():
        return "cuda"
    if not fp8_block.interpreting():
        pytest.skip("no GPU and not under TRITON_INTERPRET=1")
    return "cpu"


def _case(m, n, g, block, fx=E4M3, fw=E4M3, seed=0, bias=False, transposed_ws=True, rows=1):
    # rows: consecutive weight rows sharing one scale (w_scale [N / rows, G])
    gen = torch.Generator().manual_seed(seed)
    k = g * block
    x_q = (torch.randn(m, k, generator=gen) * 64).clamp(-200, 200).to(fx)
    w_q = (torch.randn(n, k, generator=gen) * 64).clamp(-200, 200).to(fw)
    x_scale = torch.rand(m, g, generator=gen) * 0.02 + 0.001
    w_scale = torch.rand(g, n // rows, generator=gen) * 0.02 + 0.001  # [G, N / R] as stored
    w_scale = w_scale.t() if transposed_ws else w_scale.t().contiguous()
    b = torch.randn(n, generator=gen) if bias else None
    return x_q, x_scale, w_q, w_scale, b


def _exact(x_q, x_scale, w_q, w_scale, bias):
    # float64 on the dequantized operands: every scaled value and product exact
    b = x_q.shape[1] // x_scale.shape[1]
    x = x_q.double() * x_scale.double().repeat_interleave(b, dim=1)
    ws = w_scale.double().repeat_interleave(w_q.shape[0] // w_scale.shape[0], dim=0)
    w = w_q.double() * ws.repeat_interleave(b, dim=1)
    y = x @ w.t()
    return y if bias is None else y + bias.double()


def _check(y, x_q, x_scale, w_q, w_scale, bias, out_dtype, fp8_tc=False):
    assert y.dtype == out_dtype and tuple(y.shape) == (x_q.shape[0], w_q.shape[0])
    ref = _exact(x_q, x_scale, w_q, w_scale, bias)
    b = x_q.shape[1] // x_scale.shape[1]
    mag = float(
        (x_q.double().abs().amax() * x_scale.max()) * (w_q.double().abs().amax() * w_scale.max())
    )  # an upper bound of |x| * |w| over the operands
    allowed = tolerance(out_dtype, fp8_gemm=fp8_tc).allowed(ref, mag, x_q.shape[1])
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= allowed).all()), f"max err {float(err.max()):.3g} (block {b})"


def _on(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


@pytest.mark.parametrize(
    "m, n, g, block, fx, fw, out_dtype, bias",
    [
        (1, 70, 2, 128, E4M3, E4M3, torch.bfloat16, False),  # decode, N tail
        (5, 130, 4, 128, E4M3, E5M2, torch.float32, True),  # mixed formats
        (16, 64, 3, 64, E5M2, E5M2, torch.float16, True),
        (33, 33, 2, 128, FNUZ, E4M3, torch.float32, False),  # M just past the swapped tiles
        (70, 200, 2, 32, E4M3, E4M3, torch.bfloat16, True),  # 64 x 128 tiles, tails
        (130, 129, 2, 16, E4M3, E4M3, torch.float32, False),  # 128 x 128 tiles, tails
    ],
)
def test_kernel_matches_exact(m, n, g, block, fx, fw, out_dtype, bias):
    dev = _device()
    x_q, x_scale, w_q, w_scale, b = _on(dev, *_case(m, n, g, block, fx, fw, bias=bias))
    y = fp8_block.fp8_block_linear(x_q, x_scale, w_q, w_scale, b, out_dtype)
    native = dev == "cuda" and fx == fw and fx in (E4M3, E5M2)
    _check(y.cpu(), *_on("cpu", x_q, x_scale, w_q, w_scale, b), out_dtype, fp8_tc=native)


@pytest.mark.parametrize(
    "config",
    [
        fp8_block.Fp8BlockConfig(True, 16, 64, split=3),  # 3 splits over 5 blocks: uneven
        fp8_block.Fp8BlockConfig(True, 32, 16, split=1, num_stages=1),
        fp8_block.Fp8BlockConfig(False, 16, 32, group_m=2),  # grouped tile order, 3 row tiles
        fp8_block.Fp8BlockConfig(False, 32, 16, split=2),  # output tiles with split K
    ],
)
def test_forced_configs(config):
    dev = _device()
    case = _on(dev, *_case(40, 50, 5, 32, seed=3, bias=True, transposed_ws=False))
    y = fp8_block.fp8_block_linear(*case, torch.float32, config=config)
    _check(y.cpu(), *_on("cpu", *case), torch.float32, fp8_tc=dev == "cuda")


@pytest.mark.parametrize("rows", [2, 128])
def test_rows_sharing_a_scale(rows):
    # A checkpoint's 128 x 128 blocks: one scale per 128 rows (N = 256, tiles of 64 rows).
    dev = _device()
    n = 256 if rows == 128 else 70
    for m in (3, 40):
        case = _on(dev, *_case(m, n, 2, 64, seed=9, bias=True, rows=rows))
        y = fp8_block.fp8_block_linear(*case, torch.float32)
        _check(y.cpu(), *_on("cpu", *case), torch.float32, fp8_tc=dev == "cuda")
        ref = ref_linear.fp8_linear(*_on("cpu", *case), torch.float32)
        _check(ref, *_on("cpu", *case), torch.float32)


def test_split_k_is_deterministic():
    dev = _device()
    case = _on(dev, *_case(3, 96, 8, 16, seed=4))
    cfg = fp8_block.Fp8BlockConfig(True, 16, 32, split=4)
    a = fp8_block.fp8_block_linear(*case, torch.float32, config=cfg)
    b = fp8_block.fp8_block_linear(*case, torch.float32, config=cfg)
    assert torch.equal(a, b)


def test_split_plan_fills_the_device():
    cfg = fp8_block.pick_config(1)
    assert cfg.swap and fp8_block.pick_config(64).swap is False
    # 32 tiles of an 8B attention projection (N = 4096, BLOCK_N 128) over 32 K blocks, 132 SMs:
    # the splits cover every block once and stop at 4 blocks each
    splits, per = fp8_block.split_plan(cfg, 32, 32, 132)
    assert splits * per >= 32 and (splits - 1) * per < 32
    assert (splits, per) == (8, 4)
    assert fp8_block.split_plan(fp8_block.pick_config(256), 500, 32, 132) == (1, 32)
    # 64 output tiles (M = 256 on an N = 4096 projection) are split to fill 132 SMs
    splits, per = fp8_block.split_plan(fp8_block.pick_config(256), 64, 32, 132)
    assert splits == 4 and per == 8


def test_reference_and_dequant_path_match_exact():
    # The CPU reference (per-block fp32 sums) and the CUDA backend's dequant path (dequantized
    # operands, one GEMM) on CPU tensors, both against float64.
    case = _case(7, 45, 3, 32, E4M3, E5M2, seed=5, bias=True)
    for fn in (ref_linear.fp8_linear, cuda_linear.fp8_linear_dequant):
        for out_dtype in (torch.float32, torch.bfloat16):
            _check(fn(*case, out_dtype), *case, out_dtype)


def test_one_block_is_the_per_token_case():
    x_q, x_scale, w_q, w_scale, b = _case(4, 20, 1, 64, seed=6)
    assert not ref_linear.is_block_scaled(x_scale, w_scale)
    y = ref_linear.fp8_linear(x_q, x_scale, w_q, w_scale.contiguous(), b, torch.float32)
    _check(y, x_q, x_scale, w_q, w_scale, b, torch.float32)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: (c[0], c[1][:, :2], *c[2:]), "w_scale: shape"),  # G differs
        (lambda c: (*c[:3], c[3][:3], c[4]), "w_scale: shape"),  # 3 rows do not divide N = 20
        (lambda c: (c[0], c[1][:3], *c[2:]), "x_scale: shape"),  # M differs
        (lambda c: (c[0].float(), *c[1:]), "x_q: dtype"),
        (lambda c: (*c[:4], torch.zeros(3)), "bias: shape"),
    ],
)
def test_bad_input(change, message):
    case = change(_case(4, 20, 3, 32))
    for fn in (ref_linear.fp8_linear, fp8_block.fp8_block_linear):
        with pytest.raises(ValueError, match=message):
            fn(*case)


def test_blocks_must_divide_k_and_be_tiles():
    x_q, _, w_q, _, _ = _case(2, 8, 2, 48)  # K = 96
    with pytest.raises(ValueError, match="do not divide K"):
        ref_linear.fp8_linear(x_q, torch.ones(2, 5), w_q, torch.ones(8, 5))
    assert fp8_block.block_reasons(x_q, torch.ones(2, 2))  # B = 48: not a power of two
    with pytest.raises(ValueError, match="not a power of two"):
        fp8_block.fp8_block_linear(x_q, torch.ones(2, 2), w_q, torch.ones(8, 2))


def test_cuda_backend_dispatch_and_fallback(caplog):
    if not fp8_block.interpreting():
        pytest.skip("dispatch is checked under the interpreter")
    import hal
    from backends.cuda import interpreter_capabilities

    backend = hal.load_backend(interpreter_capabilities(), device="cpu", configured="require:cuda")
    assert backend.chosen("fp8_block_gemm") == "triton"
    case = _case(3, 24, 2, 64, seed=7)
    y = backend.fp8_linear(*case, torch.float32)
    assert backend.ran["fp8_block_gemm"] == "triton"
    _check(y, *case, torch.float32)
    case = _case(3, 24, 2, 48, seed=8)  # blocks of 48: the dequant path, logged
    with caplog.at_level(logging.WARNING):
        y = backend.fp8_linear(*case, torch.float32)
    assert backend.ran["fp8_block_gemm"] == "dequant_gemm"
    assert "not a power of two" in caplog.text
    _check(y, *case, torch.float32)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _hopper(), reason="cuBLASLt's block-scaled FP8 GEMM: an sm_90 GPU")
@pytest.mark.parametrize("m", [1, 5, 100, 256])
def test_cublas_block_scaled_mm_matches_exact(m):
    case = _on("cuda", *_case(m, 384, 4, 128, seed=10, bias=m % 2 == 1, rows=128))
    for out_dtype in (torch.bfloat16, torch.float32):
        y = cuda_linear.fp8_block_linear_scaled_mm(*case, out_dtype)
        _check(y.cpu(), *_on("cpu", *case), out_dtype, fp8_tc=True)


@pytest.mark.skipif(not _hopper(), reason="cuBLASLt's block-scaled FP8 GEMM: an sm_90 GPU")
def test_cuda_backend_picks_by_m_on_hopper():
    import hal
    from platforms import detect

    backend = hal.load_backend(detect(), device="cuda")
    assert backend.chosen("fp8_block_gemm") == "scaled_mm"
    for m, impl in ((16, "triton"), (backend.fp8_block_scaled_mm_min_m, "scaled_mm")):
        case = _on("cuda", *_case(m, 256, 4, 128, seed=11, rows=128))
        y = backend.fp8_linear(*case, torch.bfloat16)
        assert backend.ran["fp8_block_gemm"] == impl
        _check(y.cpu(), *_on("cpu", *case), torch.bfloat16, fp8_tc=True)
    case = _on("cuda", *_case(100, 256, 4, 128, seed=12, rows=1))  # per-row scales: triton
    y = backend.fp8_linear(*case, torch.bfloat16)
    assert backend.ran["fp8_block_gemm"] == "triton"
    _check(y.cpu(), *_on("cpu", *case), torch.bfloat16, fp8_tc=True)


# -- the per-token / per-channel case on the same kernel -----------------------------------------
@pytest.mark.parametrize(
    "m, n, k, per_token, bias, out_dtype, config",
    [
        (1, 70, 256, True, False, torch.bfloat16, None),  # swapped tiles, split K
        (5, 33, 96, False, True, torch.float32, None),  # per tensor; K tiles of 32
        (40, 130, 192, True, True, torch.float16, None),  # output tiles; K tiles of 64
        (70, 65, 512, True, False, torch.float32, fp8_block.Fp8BlockConfig(False, 32, 32, split=3)),
        (3, 40, 256, True, True, torch.float32, fp8_block.Fp8BlockConfig(True, 16, 16, split=2)),
    ],
)
def test_rowwise_matches_reference(m, n, k, per_token, bias, out_dtype, config):
    dev = _device()
    gen = torch.Generator().manual_seed(m + n + k)
    x_q = (torch.randn(m, k, generator=gen) * 64).clamp(-200, 200).to(E4M3)
    w_q = (torch.randn(n, k, generator=gen) * 64).clamp(-200, 200).to(E4M3)
    xs = torch.rand((m, 1) if per_token else (1,), generator=gen) * 0.02 + 0.001
    ws = torch.rand((n, 1) if per_token else (1,), generator=gen) * 0.02 + 0.001
    b = torch.randn(n, generator=gen) if bias else None
    case = _on(dev, x_q, xs, w_q, ws, b)
    y = fp8_block.fp8_rowwise_linear(*case, out_dtype, config=config)
    assert y.dtype == out_dtype
    x = x_q.double() * xs.double()
    w = w_q.double() * ws.double()
    ref = x @ w.t() + (b.double() if bias else 0)
    mag = float(x.abs().max() * w.abs().max())
    tol = tolerance(out_dtype, fp8_gemm=dev == "cuda").allowed(ref, mag, k)
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= tol).all()), float(err.max())


def test_rowwise_bad_input():
    x_q = torch.zeros(2, 48, dtype=E4M3)
    w_q = torch.zeros(3, 48, dtype=E4M3)
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        fp8_block.fp8_rowwise_linear(x_q, torch.ones(2, 1), w_q, torch.ones(3, 1))
    with pytest.raises(ValueError, match="w_scale"):
        fp8_block.fp8_rowwise_linear(x_q, torch.ones(2, 1), w_q, torch.ones(2, 1))
