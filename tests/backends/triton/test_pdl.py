"""Programmatic dependent launch (`backends.triton.pdl`): off without an sm_90 NVIDIA GPU, and on
one a chain of dependent decode kernels (each reading what the one before wrote) gives the bits
of plain launches, eagerly and replayed from a CUDA graph. A kernel that read its input before
`griddepcontrol.wait` would race with the kernel before it and, on these sizes, differ."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import
pytest.importorskip("triton")

from backends.triton import pdl  # noqa: E402

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_off_on_the_cpu_and_when_disabled(monkeypatch) -> None:
    assert not pdl.use_pdl(torch.device("cpu"))
    assert pdl.pdl_args(torch.device("cpu")) == {"PDL": False}
    assert pdl.launch_kwargs(False) == {} and pdl.launch_kwargs(True) == {"launch_pdl": True}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.use_pdl(torch.device("cuda", 0))  # decided before asking the device


@pytest.mark.skipif(not SM90, reason="PDL needs an NVIDIA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("m", [1, 4])
def test_a_dependent_chain_gives_the_bits_of_plain_launches(monkeypatch, m: int) -> None:
    from backends.triton import activation, gemv, norm
    from backends.triton import int4_gemm as ig

    assert pdl.use_pdl(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(m)
    dt, hidden, inter = torch.bfloat16, 1024, 2048

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dt)

    x, w_norm = randn(m, hidden), randn(hidden)
    w_up, w_out = randn(2 * inter, hidden) / 32, randn(hidden, hidden) / 32
    qweight = torch.randint(-(2**31), 2**31, (inter // 8, hidden), generator=gen,
                            device="cuda", dtype=torch.int64).to(torch.int32)  # fmt: skip
    scales = (torch.rand(inter // 128, hidden, generator=gen, device="cuda") / 64).to(dt)
    zeros = torch.randint(0, 16, (inter // 128, hidden), generator=gen, device="cuda",
                          dtype=torch.uint8)  # fmt: skip
    packed = ig.repack_int4_for_triton(qweight, scales, zeros, 128, order="pairs", tile_rows=128)

    def chain() -> torch.Tensor:
        y, h = norm.rms_norm(x, w_norm, 1e-5, residual=x)
        a = activation.silu_and_mul(gemv.linear_small_m(y, w_up))
        o = ig.int4_linear(a, packed)
        return gemv.linear_small_m(o + h, w_out)  # a torch add between two PDL kernels

    monkeypatch.setattr(pdl, "ENABLED", False)
    plain = chain()
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert torch.equal(chain(), plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        out.zero_()
        graph.replay()
        assert torch.equal(out, plain)
