"""The CPU reference backend: registration, loading, dispatch; dense ops vs float64 formulas."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import hal
from backends.cpu.activation import silu_and_mul
from backends.cpu.backend import CpuBackend
from backends.cpu.ckernels import load_attention_kernel, load_rms_norm_kernel, load_rotary_kernel
from backends.cpu.graphs import EagerGraphRunner
from backends.cpu.linear import linear
from backends.cpu.norm import rms_norm
from hal.backend import OP_FAMILIES, Backend
from hal.registry import REGISTRY

CAPS = hal.Capabilities(vendor="cpu", device_name="x", arch="x86_64")


def test_registration_backend_and_every_family() -> None:
    (cand,) = [c for c in REGISTRY.candidates("backend") if c.name == "cpu"]
    assert (cand.priority, cand.target) == (0, "backends.cpu.backend:CpuBackend")
    assert cand.description == "plain PyTorch reference"
    assert cand.check(CAPS) == []
    for family in OP_FAMILIES:
        (ref,) = [c for c in REGISTRY.candidates(family, scope="cpu") if c.name == "reference"]
        assert ref.priority == 0 and ref.check(CAPS) == []
        module, _, attr = ref.target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_load_backend_selects_cpu_reference() -> None:
    backend = hal.load_backend(CAPS)
    assert isinstance(backend, CpuBackend) and backend.name == "cpu"
    assert backend.device == torch.device("cpu")
    assert backend.info.selections["backend"].chosen == "cpu"
    for family in OP_FAMILIES:
        # attention: the batched SDPA candidate outranks the reference loop (tested against it)
        fast = {
            # C decode attention where it builds (test_cpu_cattention.py), else batched SDPA
            "attention": "c" if load_attention_kernel()[0] is not None else "sdpa",
            "gemm": "onednn",  # fp32 through oneDNN (tests/backends/cpu/test_cpu_sdpa.py)
            "kv_write": "native",
            # the C RMSNorm where it builds, else torch's; both bitwise the reference
            # (tests/backends/cpu/test_cpu_native.py)
            "rms_norm": "c" if load_rms_norm_kernel()[0] is not None else "native",
            # the C rotary where it builds (bitwise the reference, test_cpu_native.py)
            "rotary": "c" if load_rotary_kernel()[0] is not None else "native",
            "gguf_gemm": "cpu_fast",  # exact tiled dequant (tests/engine/test_gguf_quantized.py)
        }  # engine paths, tested against the reference
        assert backend.chosen(family) == fast.get(family, "reference")
    chosen = backend.chosen("attention")
    assert any(line.startswith(f"attention: {chosen}") for line in backend.describe())


def test_every_abstract_method_is_implemented_with_the_contract_signature() -> None:
    assert not inspect.isabstract(CpuBackend)
    for name in Backend.__abstractmethods__:
        base = inspect.signature(getattr(Backend, name))
        ours = inspect.signature(getattr(CpuBackend, name))
        assert list(ours.parameters) == list(base.parameters), name
        for p, q in zip(base.parameters.values(), ours.parameters.values(), strict=True):
            assert p.default == q.default, (name, p.name)


def test_graph_runner_replays_on_live_buffers() -> None:
    backend = CpuBackend(CAPS, "cpu")
    buf = torch.zeros(3)
    runner = backend.capture_graph(lambda: buf * 2 + 1)
    assert isinstance(runner, EagerGraphRunner)
    buf.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(runner.replay(), torch.tensor([3.0, 5.0, 7.0]))
    buf.fill_(-1.0)
    assert torch.equal(runner.replay(), torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="not callable"):
        EagerGraphRunner(3)  # type: ignore[arg-type]


# -- dense ops against float64 formulas ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_matches_float64_sum(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(dtype)
    y = CpuBackend(CAPS, "cpu").linear(x, w, b)
    assert y.dtype == dtype and y.shape == (2, 3, 5)
    xd, wd, bd = x.double(), w.double(), b.double()
    ref = torch.empty(2, 3, 5, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            for n in range(5):
                ref[i, j, n] = sum(xd[i, j, k] * wd[n, k] for k in range(16)) + bd[n]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_linear_rejects_mismatched_k() -> None:
    with pytest.raises(ValueError, match="K=8"):
        linear(torch.zeros(2, 7), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="bias"):
        linear(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(4))


def _naive_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    for row in range(x.shape[0]):
        ms = sum(float(v) ** 2 for v in x[row]) / x.shape[1]
        out[row] = x[row] / math.sqrt(ms + eps) * w
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 24, generator=g, dtype=torch.float64).to(dtype)
    res = torch.randn(4, 24, generator=g, dtype=torch.float64).to(dtype)
    w = (1 + 0.1 * torch.randn(24, generator=g, dtype=torch.float64)).to(dtype)
    eps = 1e-5
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype
    ref = _naive_rms_norm(x.double(), w.double(), eps)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)

    y2, h = CpuBackend(CAPS, "cpu").rms_norm(x, w, eps, residual=res)
    h_ref = (x.double() + res.double()).to(dtype)  # the sum rounded to x's dtype
    assert h.dtype == dtype and torch.equal(h, h_ref)
    torch.testing.assert_close(y2.double(), _naive_rms_norm(h_ref.double(), w.double(), eps),
                               rtol=tol, atol=tol)  # fmt: skip


def test_rms_norm_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"weight: shape \(8,\), expected \[6\]"):
        rms_norm(torch.zeros(2, 6), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.zeros(2, 6), torch.ones(6), 1e-6, residual=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.zeros(2, 6), torch.ones(6), 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(3, 2, 10, generator=g, dtype=torch.float64)).to(dtype)
    y = CpuBackend(CAPS, "cpu").silu_and_mul(x)
    assert y.shape == (3, 2, 5) and y.dtype == dtype
    xd = x.double()
    ref = torch.empty(3, 2, 5, dtype=torch.float64)
    for idx in range(3 * 2 * 5):
        i, j, d = idx // 10, (idx // 5) % 2, idx % 5
        a, b = float(xd[i, j, d]), float(xd[i, j, d + 5])
        ref[i, j, d] = a / (1 + math.exp(-a)) * b
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 7))
