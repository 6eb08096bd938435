"""The CPU engine's native RMSNorm and rotary, the C RMSNorm, and the C rotary (with its fused
KV-cache write), against the reference they replace: bitwise equal (the same fp32 arithmetic in
the same order, one rounding), the same errors on bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu import ckernels, native, norm, rotary
from backends.cpu.kv_cache import write_kv

ROTARY_KERNEL, ROTARY_WHY = ckernels.load_rotary_kernel()
needs_rotary_kernel = pytest.mark.skipif(
    ROTARY_KERNEL is None, reason=f"no C rotary kernel here: {ROTARY_WHY}"
)

RMS_NORM_KERNEL, RMS_NORM_WHY = ckernels.load_rms_norm_kernel()
needs_rms_norm_kernel = pytest.mark.skipif(
    RMS_NORM_KERNEL is None, reason=f"no C RMSNorm kernel here: {RMS_NORM_WHY}"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    hidden=st.sampled_from([1, 7, 16, 23, 64, 100, 576, 1000, 4096]),
    dtype=st.sampled_from(DTYPES + [torch.float32] * 3),
    weight_fp32=st.booleans(),
    with_residual=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    magnitude=st.sampled_from([1e-3, 3.0, 300.0]),
    three_d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_is_bitwise_the_reference(rows, hidden, dtype, weight_fp32, with_residual, eps,
                                           magnitude, three_d, seed):  # fmt: skip
    # native (F.rms_norm) and the C kernel (fp32 rows of 16-16384 values; the rest falls back to
    # native) against the reference composition
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 2, hidden) if three_d else (rows, hidden)
    x = (torch.randn(shape, generator=g) * magnitude).to(dtype)
    w = torch.randn(hidden, generator=g).to(torch.float32 if weight_fp32 else dtype)
    r = (torch.randn(shape, generator=g) * magnitude).to(dtype) if with_residual else None
    want = norm.rms_norm(x, w, eps, r)
    fns = [native.native_rms_norm]
    if RMS_NORM_KERNEL is not None:
        fns.append(lambda *a: native.c_rms_norm(*a, kernel=RMS_NORM_KERNEL))
    for fn in fns:
        got = fn(x, w, eps, r)
        if r is None:
            assert _bits_equal(got, want)
        else:
            assert _bits_equal(got[0], want[0]) and _bits_equal(got[1], want[1])


@needs_rms_norm_kernel
def test_c_rms_norm_takes_rows_of_16_to_16384_values() -> None:
    # Both ends taken (the reference's bits) and the sizes past them handed to native; other
    # dtypes and layouts too.
    g = torch.Generator().manual_seed(3)
    k = RMS_NORM_KERNEL
    for hidden, taken in ((15, False), (16, True), (16384, True), (16385, False)):
        x, w = torch.randn(2, hidden, generator=g), torch.randn(hidden, generator=g)
        assert k.takes(x, w, None) == taken
        assert _bits_equal(native.c_rms_norm(x, w, 1e-5, kernel=k), norm.rms_norm(x, w, 1e-5))
    x, w = torch.randn(4, 64, generator=g), torch.randn(64, generator=g)
    assert not k.takes(x[:, ::2], w[::2], None)
    assert not k.takes(x.bfloat16(), w, None) and not k.takes(x, w.bfloat16(), None)
    assert not k.takes(x, w, x.bfloat16())
    assert k.lanes in (4, 8, 16)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 9),
    heads=st.sampled_from([(1, 1), (9, 3), (4, 4)]),
    head_dim=st.sampled_from([16, 64, 128]),
    partial=st.booleans(),
    is_neox=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    int32_positions=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rotary_is_bitwise_the_reference(tokens, heads, head_dim, partial, is_neox, dtype,
                                         int32_positions, seed):  # fmt: skip
    # Partial rotary (rotary_dim < head_dim, as in some models) keeps the rest of each head;
    # GPT-J pairs and float64 take the reference itself.
    g = torch.Generator().manual_seed(seed)
    rot = head_dim // 2 if partial else head_dim
    cache = torch.randn(50, rot, generator=g)
    pos = torch.randint(0, 50, (tokens,), generator=g)
    pos = pos.to(torch.int32) if int32_positions else pos
    q = torch.randn(tokens, heads[0], head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, heads[1], head_dim, generator=g).to(dtype)
    want = rotary.rotary(pos, q, k, cache, is_neox)
    for fn in (native.native_rotary, native.c_rotary):
        got = fn(pos, q, k, cache, is_neox)
        assert _bits_equal(got[0], want[0]) and _bits_equal(got[1], want[1])


def _qkv(tokens: int, hq: int, hk: int, d: int, g: torch.Generator):
    # query, key and value as the model makes them: views of one fused projection's rows
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g) * 2
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return q.view(tokens, hq, d), k.view(tokens, hk, d), v.view(tokens, hk, d)


@needs_rotary_kernel
@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 9),
    heads=st.sampled_from([(1, 1), (9, 3), (4, 4)]),
    head_dim=st.sampled_from([2, 16, 64, 128]),
    partial=st.booleans(),
    skip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_c_rotary_write_kv_is_bitwise_the_composition(tokens, heads, head_dim, partial, skip,
                                                      seed):  # fmt: skip
    # Strided rows (views of a fused qkv), partial rotary_dim, slot -1: the rotated pair and
    # both caches equal the reference rotary followed by the reference cache write.
    g = torch.Generator().manual_seed(seed)
    rot = head_dim // 2 if partial and head_dim > 2 else head_dim
    cache = torch.randn(64, rot, generator=g)
    pos = torch.randint(0, 64, (tokens,), generator=g)
    q, k, v = _qkv(tokens, *heads, head_dim, g)
    shape = (5, 4, heads[1], head_dim)
    slots = torch.randperm(20, generator=g)[:tokens]
    if skip and tokens:
        slots[0] = -1
    kc, vc = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    want_kc, want_vc = kc.clone(), vc.clone()
    want = rotary.rotary(pos, q, k, cache, True)
    write_kv(want[1], v, want_kc, want_vc, slots)
    got = native.c_rotary_write_kv(pos, q, k, v, cache, True, kc, vc, slots)
    assert got is not None
    assert _bits_equal(got[0], want[0]) and _bits_equal(got[1], want[1])
    assert torch.equal(kc, want_kc) and torch.equal(vc, want_vc)


@needs_rotary_kernel
def test_c_rotary_write_kv_leaves_other_inputs_to_the_composition() -> None:
    # GPT-J pairs, bf16 rows, a bf16 or FP8 cache, a cache that is not contiguous: None (the
    # backend composes rotary and write_kv for them).
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(2, 4, 2, 16, g)
    cache, pos, slots = torch.randn(8, 16), torch.tensor([1, 2]), torch.tensor([0, 1])
    kc, vc = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    args = (q, k, v, cache)
    assert native.c_rotary_write_kv(pos, *args, False, kc, vc, slots) is None
    bf = [t.to(torch.bfloat16) for t in (q, k, v)]
    assert native.c_rotary_write_kv(pos, *bf, cache, True, kc, vc, slots) is None
    half = (kc.to(torch.bfloat16), vc.to(torch.bfloat16))
    assert native.c_rotary_write_kv(pos, *args, True, *half, slots) is None
    wide = torch.zeros(2, 4, 2, 32)[..., ::2]
    assert native.c_rotary_write_kv(pos, *args, True, wide, wide, slots) is None
    assert not kc.any() and not vc.any()


@needs_rotary_kernel
def test_c_rotary_write_kv_checks_everything_before_writing() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(3, 4, 2, 16, g)
    cache = torch.randn(10, 16)
    kc, vc = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    bad_pos = r"positions: values must lie in 0\.\.9"
    cases = [
        ([0, 10, 2], [0, 1, 2], bad_pos),
        ([0, -1, 2], [0, 1, 2], bad_pos),
        ([0, 1, 2], [0, 8, 2], r"slots must be -1 \(skip\) or lie in 0\.\.7"),
        ([0, 1, 2], [3, 5, 3], "twice"),
    ]
    for pos, slots, match in cases:
        with pytest.raises(ValueError, match=match):
            native.c_rotary_write_kv(
                torch.tensor(pos), q, k, v, cache, True, kc, vc, torch.tensor(slots)
            )
        assert not kc.any() and not vc.any()
    with pytest.raises(ValueError, match=r"key/value: shapes \(3, 2, 16\)/\(2, 2, 16\)"):
        native.c_rotary_write_kv(torch.tensor([0, 1, 2]), q, k, v[:2], cache, True, kc, vc,
                                 torch.tensor([0, 1, 2]))  # fmt: skip


@needs_rotary_kernel
def test_the_backend_fuses_rotary_and_the_cache_write(cpu_caps, monkeypatch) -> None:
    # "c" rotary with the native cache write: one kernel pass; forced to the native rotary, the
    # HAL's composition. Same bits either way.
    from backends.cpu.backend import CpuBackend
    from hal.select import select_ops

    calls = []
    original = ckernels.RotaryKernel.run
    monkeypatch.setattr(
        ckernels.RotaryKernel, "run",
        lambda self, *a: calls.append(len(a)) or original(self, *a),
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 9, 3, 64, g)
    cache, pos, slots = torch.randn(32, 64, generator=g), torch.tensor([5, 6]), torch.tensor([7, 0])
    outs = []
    for forced in (None, "native"):
        if forced:
            monkeypatch.setenv("HAL_ROTARY_BACKEND", forced)
        backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
        assert backend.chosen("rotary") == (forced or "c")
        kc, vc = torch.zeros(2, 4, 3, 64), torch.zeros(2, 4, 3, 64)
        outs.append((*backend.rotary_write_kv(pos, q, k, v, cache, True, kc, vc, slots), kc, vc))
    assert calls == [8]  # the fused call (8 arguments), then none
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))


def test_native_norm_and_rotary_reject_what_the_reference_rejects() -> None:
    x, w = torch.randn(2, 16), torch.randn(16)  # 16 values: the C kernel's smallest rows
    for fn in (norm.rms_norm, native.native_rms_norm, native.c_rms_norm):
        with pytest.raises(ValueError, match=r"weight: shape \(7,\), expected \[16\]"):
            fn(x, torch.randn(7), 1e-5)
        with pytest.raises(ValueError, match="eps: 0.0 must be > 0"):
            fn(x, w, 0.0)
        with pytest.raises(ValueError, match=r"residual: shape \(2, 4\) differs"):
            fn(x, w, 1e-5, torch.randn(2, 4))
    q, k, cache = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(10, 16)
    for fn in (rotary.rotary, native.native_rotary, native.c_rotary):
        with pytest.raises(ValueError, match=r"positions: values must lie in 0\.\.9"):
            fn(torch.tensor([0, 10, 2]), q, k, cache)
        with pytest.raises(ValueError, match=r"positions: values must lie in 0\.\.9"):
            fn(torch.tensor([0, -1, 2]), q, k, cache)
        with pytest.raises(ValueError, match="rotary_dim 32 must be even and <= head_dim 16"):
            fn(torch.tensor([0, 1, 2]), q, k, torch.randn(10, 32))
        with pytest.raises(ValueError, match=r"key: expected \[num_tokens=3"):
            fn(torch.tensor([0, 1, 2]), q, k[:2], cache)


def test_write_kv_checks_each_new_slot_mapping_once() -> None:
    # Every layer of a step writes the same slots, so the checks run once per mapping; a mapping
    # refilled in place with other values (as the engine refills its host buffers) is checked
    # again, and a bad one never counts as checked.
    from backends.cpu.kv_cache import write_kv

    kc, vc = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    slots = torch.tensor([3, 9])
    for _ in range(2):
        native.native_write_kv(k, v, kc, vc, slots)
    slots.copy_(torch.tensor([5, 5]))  # in place: same tensor, same version counter
    for _ in range(2):
        with pytest.raises(ValueError, match="twice"):
            native.native_write_kv(k, v, kc, vc, slots)
    slots.copy_(torch.tensor([5, 32]))
    with pytest.raises(ValueError, match=r"lie in 0\.\.31"):
        native.native_write_kv(k, v, kc, vc, slots)
    slots.copy_(torch.tensor([-1, 7]))  # a skipped token, then the same mapping again
    kc.zero_(), vc.zero_()
    refs = [torch.zeros_like(kc), torch.zeros_like(vc)]
    for _ in range(2):
        native.native_write_kv(k, v, kc, vc, slots)
        write_kv(k, v, refs[0], refs[1], slots)
    assert torch.equal(kc, refs[0]) and torch.equal(vc, refs[1])
    # The same values against a smaller cache are checked against that cache.
    with pytest.raises(ValueError, match=r"lie in 0\.\.6"):
        native.native_write_kv(k, v, torch.zeros(1, 7, 2, 16), torch.zeros(1, 7, 2, 16), slots)
