"""The CPU engine's batched SDPA attention against the reference loop (the oracle)."""

from __future__ import annotations

import pytest
import torch

import hal
from backends.cpu.attention import paged_attention
from backends.cpu.kv_cache import write_kv
from backends.cpu.sdpa import sdpa_attention
from hal.capabilities import Capabilities

# fp32 inputs, fp32 accumulation in both: only summation order differs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _case(
    seed,
    q_lens,
    seq_lens,
    heads=4,
    kv_heads=2,
    dim=32,
    bs=8,
    dtype=torch.float32,
    cache_dtype=None,
    pad=0,
):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // bs) for s in seq_lens) + 3
    cache_dtype = cache_dtype or dtype
    kc = torch.zeros(num_blocks, bs, kv_heads, dim, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(-(-s // bs) for s in seq_lens), dtype=torch.int32)
    for i, s in enumerate(seq_lens):
        n = -(-s // bs)
        tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
        slots = torch.tensor([int(tables[i, p // bs]) * bs + p % bs for p in range(s)])
        k = torch.randn(s, kv_heads, dim, generator=g).to(dtype)
        v = torch.randn(s, kv_heads, dim, generator=g).to(dtype)
        write_kv(k, v, kc, vc, slots, kv_scale=0.5 if cache_dtype != dtype else None)
    total = sum(q_lens)
    q = torch.randn(total + pad, heads, dim, generator=g).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, kc, vc, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 30.0), (5, 20.0)])
def test_sdpa_matches_reference(dtype, window, soft_cap):
    # decode, prefill and chunked prefill mixed; one sequence of a single token
    args = _case(0, q_lens=[1, 13, 4, 1, 1], seq_lens=[40, 13, 29, 1, 17], dtype=dtype)
    ref = paged_attention(*args, 0.2, window, soft_cap)
    got = sdpa_attention(*args, 0.2, window, soft_cap)
    assert got.dtype == dtype
    assert (got.float() - ref.float()).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 1), (6, 2)])
def test_sdpa_gqa_fp8_cache_and_padding(heads, kv_heads):
    args = _case(
        1,
        [3, 1],
        [9, 30],
        heads=heads,
        kv_heads=kv_heads,
        dim=16,
        bs=16,
        cache_dtype=torch.float8_e4m3fn,
        pad=2,
    )
    ref = paged_attention(*args, 0.25, kv_scale=0.5)
    got = sdpa_attention(*args, 0.25, kv_scale=0.5)
    assert (got - ref).abs().max() <= TOL[torch.float32]
    assert got[-2:].abs().max() == 0  # padding rows are zeros, as in the reference


def test_cpu_backend_dispatches_to_sdpa_and_can_force_reference(monkeypatch):
    caps = Capabilities(vendor="cpu", device_name="test", arch="x86_64")
    # the C decode attention outranks SDPA where it builds, and takes only decode batches
    assert hal.load_backend(caps).chosen("attention") in ("c", "sdpa")
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "sdpa")
    assert hal.load_backend(caps).chosen("attention") == "sdpa"
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "reference")
    assert hal.load_backend(caps).chosen("attention") == "reference"


def test_sdpa_rejects_inconsistent_lengths():
    q, kc, vc, tables, seq_lens, qsl = _case(2, [4], [8])
    with pytest.raises(ValueError):
        sdpa_attention(q, kc, vc, tables, torch.tensor([2], dtype=torch.int32), qsl, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_linear_matches_reference(dtype):
    from backends.cpu.linear import linear
    from backends.cpu.native import native_linear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 96, generator=g).to(dtype)
    w = torch.randn(40, 96, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    ref = linear(x, w, b).double()
    got = native_linear(x, w, b)
    assert got.dtype == dtype
    # One rounding of the output at most, plus fp32-accumulation order: |y| * 2u.
    u = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    bound = 2 * u * ref.abs() + 96 * 2**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "x_shape, n, with_bias, transposed_w",
    [((1, 576), 960, False, False), ((5, 3, 96), 40, True, False), ((96,), 17, True, True),
     ((0, 64), 8, True, False), ((130, 200), 72, False, True)],
)  # fmt: skip
def test_onednn_linear_matches_reference(dtype, x_shape, n, with_bias, transposed_w):
    """The "onednn" gemm (fp32 through oneDNN's matmul; other dtypes as native_linear) against
    the reference: fp32 accumulation in both, so within summation-order error, any x rank, a
    bias or none, a weight that is a transposed view, no rows."""
    from backends.cpu.linear import linear
    from backends.cpu.native import onednn_linear, onednn_reasons

    assert onednn_reasons() == []  # torch 2.13's CPU build has it; the candidate is chosen
    g = torch.Generator().manual_seed(5)
    k = x_shape[-1]
    x = torch.randn(*x_shape, generator=g).to(dtype)
    w = torch.randn(k, n, generator=g).t() if transposed_w else torch.randn(n, k, generator=g)
    w = w.to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    ref = linear(x.double(), w.double(), None if b is None else b.double())
    got = onednn_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (*x_shape[:-1], n)
    u = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float64: 2**-53}[dtype]
    mag = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    bound = 2 * u * ref.abs() + k * 2**-24 * mag  # one output rounding + fp32 summation
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


def test_onednn_gemm_passed_over_with_the_reason_when_torch_lacks_onednn(monkeypatch):
    import backends.cpu as cpu
    from backends.cpu.native import onednn_reasons

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert onednn_reasons() == [
        "torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    ]
    cpu._onednn_probe.cache_clear()
    try:
        backend = hal.load_backend(Capabilities(vendor="cpu", device_name="test", arch="x86_64"))
        assert backend.chosen("gemm") == "native"
        rejected = backend.info.selections["gemm"].rejected["onednn"]
        assert rejected == [
            "torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
        ]
    finally:
        monkeypatch.undo()
        cpu._onednn_probe.cache_clear()
    assert (
        hal.load_backend(Capabilities(vendor="cpu", device_name="test", arch="x86_64")).chosen(
            "gemm"
        )
        == "onednn"
    )


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_native_write_kv_is_bitwise_the_reference(cache_dtype):
    from backends.cpu.native import native_write_kv

    g = torch.Generator().manual_seed(4)
    k = torch.randn(11, 2, 16, generator=g)
    v = torch.randn(11, 2, 16, generator=g)
    slots = torch.randperm(6 * 8, generator=g)[:11]
    slots[[2, 7]] = -1
    caches = [torch.zeros(6, 8, 2, 16).to(cache_dtype) for _ in range(4)]
    scale = 0.5 if cache_dtype == torch.float8_e4m3fn else None
    write_kv(k, v, caches[0], caches[1], slots, scale)
    native_write_kv(k, v, caches[2], caches[3], slots, scale)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    with pytest.raises(ValueError, match="twice"):
        native_write_kv(k[:2], v[:2], caches[2], caches[3], torch.tensor([3, 3]))


def test_step_plan_is_reused_by_value_and_follows_in_place_refills():
    # The layers of a step share one plan; the engine refills the same host buffers in place
    # through numpy for the next step (no torch version bump), which must not reuse a stale one.
    from backends.cpu import sdpa

    q, kc, vc, tables, seq_lens, qsl = _case(3, [1, 1], [20, 9])
    lens_np = seq_lens.numpy().copy()
    lens = torch.from_numpy(lens_np)  # shares memory with lens_np
    first = sdpa_attention(q, kc, vc, tables, lens, qsl, 0.3)
    plan = sdpa._last_plan
    assert torch.equal(sdpa_attention(q, kc, vc, tables, lens, qsl, 0.3), first)
    assert sdpa._last_plan is plan  # same values: the plan of the layer before
    lens_np[:] = [13, 5]  # the next step, written behind torch's back
    want = paged_attention(q, kc, vc, tables, lens, qsl, 0.3)
    got = sdpa_attention(q, kc, vc, tables, lens, qsl, 0.3)
    assert sdpa._last_plan is not plan
    assert (got - want).abs().max() <= TOL[torch.float32]
    assert (got - first).abs().max() > 1e-3  # the shorter contexts changed the answer
