"""The CPU engine's "c" attention (`backends/cpu/cattention.py`, `csrc/decode_attention.c`):
decode batches on fp32 caches against the reference loop (the oracle), every other call left to
the batched SDPA path, and its errors on lengths or block ids the caches cannot hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.cpu import ckernels, sdpa
from backends.cpu.attention import paged_attention
from backends.cpu.cattention import c_attention
from tests.backends.cpu.test_cpu_sdpa import _case

KERNEL, WHY = ckernels.load_attention_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason=f"no C attention kernel here: {WHY}")
# fp32 in both, only the summation order (and expf against torch's exp) differs: scores of
# O(10) carry ~1e-6 relative error into weights, outputs are averages of O(1) values.
TOL = 2e-5


@settings(max_examples=80, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    heads=st.sampled_from([(4, 2), (9, 3), (2, 2), (8, 1)]),
    dim=st.sampled_from([8, 24, 32, 64, 80]),  # the dot's 16 lanes, with and without a tail
    bs=st.sampled_from([4, 16]),
    window=st.sampled_from([None, 1, 7, 21]),  # windows that start inside a page
    soft_cap=st.sampled_from([None, 20.0]),
    scale=st.sampled_from([0.3, 8.0]),  # 8: scores far below the max (the exp's clamp at -87)
    seed=st.integers(0, 2**16),
)
def test_decode_batches_match_the_reference(seq_lens, heads, dim, bs, window, soft_cap, scale,
                                            seed):  # fmt: skip
    args = _case(seed, [1] * len(seq_lens), seq_lens, heads[0], heads[1], dim, bs)
    want = paged_attention(*args, scale, window, soft_cap)
    got = c_attention(*args, scale, window, soft_cap, kernel=KERNEL)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # Both sides round each fp32 score s to ~|s| 2^-24 (here |s| reaches ~4 sqrt(dim) scale for
    # N(0, 1) q and k), and the output moves by that times |v|: TOL holds for scores up to ~4.
    assert (got - want).abs().max() <= TOL * max(1.0, scale * dim**0.5 / 4)


def _spy_sdpa(monkeypatch) -> list:
    calls = []
    original = sdpa.sdpa_attention
    monkeypatch.setattr(
        "backends.cpu.cattention.sdpa_attention",
        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k),
    )
    return calls


def test_the_kernel_takes_decode_and_leaves_the_rest_to_sdpa(monkeypatch) -> None:
    calls = _spy_sdpa(monkeypatch)
    decode = _case(1, [1, 1, 1], [5, 33, 17])
    assert torch.allclose(c_attention(*decode, 0.2), paged_attention(*decode, 0.2), atol=TOL)
    assert calls == []
    # int64 block tables, seq_lens and starts: converted, same result
    wide = (*decode[:3], *(t.long() for t in decode[3:]))
    assert torch.equal(c_attention(*wide, 0.2), c_attention(*decode, 0.2))
    assert calls == []
    # A speculative step: a sequence's last three tokens (causal among themselves) and a decode.
    spec = _case(2, [3, 1], [9, 4])
    assert torch.allclose(c_attention(*spec, 0.2), paged_attention(*spec, 0.2), atol=TOL)
    assert calls == []
    cases = [
        _case(6, [9, 1], [12, 4]),  # a chunk of 9 tokens: more than the kernel's 8
        _case(3, [2, 0], [9, 4]),  # two tokens, two sequences, but not one each
        _case(4, [1, 1], [6, 8], dtype=torch.bfloat16),  # bf16: SDPA
    ]
    q, kc, vc, *rest = _case(7, [1, 1], [6, 8])
    cases.append((q, kc, vc.to(torch.bfloat16), *rest))  # an fp32 key cache, a bf16 value one
    for args in cases:
        got = c_attention(*args, 0.2)
        want = paged_attention(*args, 0.2)
        assert (got.float() - want.float()).abs().max() <= 2e-2
    assert len(calls) == len(cases)


def test_lengths_and_block_ids_the_caches_cannot_hold_are_errors() -> None:
    q, kc, vc, tables, lens, qsl = _case(5, [1, 1], [6, 12], bs=4)
    with pytest.raises(ValueError, match=r"seq_lens: each must lie in 1\.\.12"):
        c_attention(q, kc, vc, tables, torch.tensor([6, 13], dtype=torch.int32), qsl, 0.2)
    with pytest.raises(ValueError, match=r"seq_lens: each must lie in 1\.\.12"):
        c_attention(q, kc, vc, tables, torch.tensor([0, 12], dtype=torch.int32), qsl, 0.2)
    bad = tables.clone()
    bad[1, 2] = kc.shape[0]
    with pytest.raises(ValueError, match=rf"block id .* outside 0\.\.{kc.shape[0] - 1}"):
        c_attention(q, kc, vc, bad, lens, qsl, 0.2)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="block id"):
        c_attention(q, kc, vc, bad, lens, qsl, 0.2)


def test_the_backend_picks_it_and_sdpa_can_be_forced(cpu_caps, monkeypatch) -> None:
    from backends.cpu.backend import CpuBackend
    from hal.select import select_ops

    args = _case(6, [1, 1], [20, 3])
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    assert backend.chosen("attention") == "c" and backend.attention_kernel is KERNEL
    calls = _spy_sdpa(monkeypatch)
    ours = backend.attention(*args, 0.25)
    assert calls == []
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "sdpa")
    forced = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    assert forced.chosen("attention") == "sdpa" and forced.attention_kernel is None
    assert (forced.attention(*args, 0.25) - ours).abs().max() <= TOL
