"""The Triton attention's decode path (GQA-packed rows, split-KV with a reduce kernel) against the
CPU reference: forced split counts over few blocks (empty splits included), every float dtype,
FP8 caches, sliding window, soft-cap, mixed query lengths; plus routing and the split heuristic.
Under TRITON_INTERPRET=1 on CPU tensors without a GPU; natively (and graph-captured) with one."""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")
# Masked-off lanes compute on filler values (0 / 0 and the like), as on a GPU; numpy says so.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

from backends.cpu import attention as ref_attention  # noqa: E402
from backends.cpu import kv_cache as ref_kv  # noqa: E402
from tests.conformance import strategies as S  # noqa: E402
from tests.conformance.tolerances import tolerance  # noqa: E402

if "backends.triton.attention" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.attention"])  # define the kernels interpreted
tattn = importlib.import_module("backends.triton.attention")

F64 = torch.float64


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def batch(
    seed: int,
    dtype: str,
    seq_lens: tuple[int, ...],
    query_lens: tuple[int, ...],
    cache_dtype: str | None = None,
    block_size: int = 8,
    **kw: object,
) -> S.AttentionBatch:
    """Sequences on blocks handed out in a random order, spare slots POISON."""
    cache_dtype = cache_dtype or dtype
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    order = tuple(int(v) for v in torch.randperm(num_blocks, generator=S.generator(seed)))
    fields = dict(
        dtype=dtype, cache_dtype=cache_dtype, num_kv_heads=2, gqa_ratio=4, head_dim=64,
        block_size=block_size, seq_lens=seq_lens, query_lens=query_lens, num_blocks=num_blocks,
        block_order=order, sliding_window=None, soft_cap=None,
        kv_scale=0.5 if cache_dtype.startswith("fp8") else None, score_scale=1.0,
        num_padding=0, seed=seed,
    )  # fmt: skip
    fields.update(kw)
    return S.AttentionBatch(**fields)


def run_and_check(case: S.AttentionBatch, fn, num_padding: int = 0, **kw: object) -> torch.Tensor:
    """fn (a tattn entry point) on the case, checked against the float64 reference within the
    dtype's tolerance; padding rows past query_start_loc[-1] must come back zero."""
    t = case.build()
    query = t["query"]
    if num_padding:
        query = torch.cat((query, torch.ones(num_padding, *query.shape[1:]).to(query.dtype)))
    args = (t["block_tables"], t["seq_lens"], t["query_start_loc"])
    opts = dict(sliding_window=case.sliding_window, soft_cap=case.soft_cap, kv_scale=case.kv_scale)
    out = fn(dev(query), dev(t["key_cache"]), dev(t["value_cache"]), *(dev(a) for a in args),
             t["scale"], **opts, **kw).cpu()  # fmt: skip
    kc, vc = t["key_cache"], t["value_cache"]
    if not case.cache_dtype.startswith("fp8"):
        kc, vc = kc.to(F64), vc.to(F64)
    ref = ref_attention.paged_attention(query.to(F64), kc, vc, *args, t["scale"], **opts)
    # Output magnitude: max |V| of the owned slots (POISON slots are never read).
    v_max = min(float(ref_kv.decode_kv(t["value_cache"], case.kv_scale, F64).abs().max()), 8.0)
    # fp32 accumulates head_dim products per score: its bound grows with sqrt(head_dim) and the
    # score magnitude; bf16/fp16 are bound by the output rounding and the rounded probabilities.
    k, magnitude = (case.head_dim, v_max * case.score_scale) if case.dtype == "fp32" else (1, v_max)
    allowed = tolerance(case.dtype).allowed(ref, magnitude, k)
    err = (out.to(F64) - ref).abs().nan_to_num(math.inf)
    bad = err > allowed
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{case.dtype}: |out - ref| {err[i].item():.3g} > {allowed.expand_as(err)[i]:.3g} at "
            f"{i} (out {out[i].item()}, ref {ref[i].item()}); case {case}"
        )
    assert not bool(out[case.num_tokens :].any()), "padding rows must be zero"
    return out


# Few blocks, many splits: with block_n 16 a split covers 16-32 KV tokens, so 5-9 splits leave
# some splits with a partial tile and (for the short sequences) some with none at all.
SPLIT_CASES = [
    # (dtype, cache_dtype, head_dim, splits, extra)
    ("fp32", None, 80, 7, {}),
    ("bf16", None, 64, 5, {}),
    ("fp16", None, 128, 9, {"soft_cap": 30.0, "score_scale": 4.0}),
    ("bf16", None, 80, 6, {"sliding_window": 19}),
    ("fp16", None, 64, 4, {"gqa_ratio": 1, "soft_cap": 5.0, "sliding_window": 7}),
    ("fp32", None, 96, 8, {"gqa_ratio": 8, "num_kv_heads": 1, "soft_cap": 50.0}),
    ("bf16", "fp8_e4m3fn", 64, 5, {"kv_scale": 0.05}),
    ("fp16", "fp8_e4m3fnuz", 80, 3, {"kv_scale": 2.0, "sliding_window": 33}),
    ("fp32", "fp8_e5m2", 64, 6, {"gqa_ratio": 2, "soft_cap": 30.0}),
    ("bf16", None, 64, 1, {"gqa_ratio": 16, "num_kv_heads": 1}),  # 16 heads: 16 rows, one split
]


@pytest.mark.parametrize(("dtype", "cache_dtype", "head_dim", "splits", "extra"), SPLIT_CASES)
def test_decode_split_kv(
    dtype: str, cache_dtype: str | None, head_dim: int, splits: int, extra: dict
) -> None:
    # Pure decode: one query token per sequence, contexts from 1 to ~100 tokens.
    seq_lens = (1, 97, 40, 16, 73)
    case = batch(splits + head_dim, dtype, seq_lens, (1,) * 5, cache_dtype, head_dim=head_dim,
                 **extra)  # fmt: skip
    config = tattn.DecodeConfig(block_n=16, num_splits=splits)
    run_and_check(case, tattn.decode_attention, config=config)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_decode_kernel_takes_mixed_query_lengths(dtype: str) -> None:
    # Speculative-decoding-like batch (2-5 tokens), a zero-length query, a short prefill and a
    # chunked prefill longer than one chunk of rows: the decode kernel loops over query chunks
    # and stays correct whatever the batch; padding rows stay zero.
    seq_lens = (30, 9, 50, 64, 12)
    query_lens = (3, 0, 5, 21, 12)
    case = batch(11, dtype, seq_lens, query_lens, sliding_window=25 if dtype == "fp16" else None)
    config = tattn.DecodeConfig(block_n=16, num_splits=3)
    run_and_check(case, tattn.decode_attention, num_padding=2, max_query_len=5, config=config)


def test_splits_agree_with_one_split() -> None:
    # Same batch, 1 split vs many: the reduce changes only rounding, within fp32 noise.
    case = batch(5, "fp32", (120, 33, 7), (1, 1, 1), head_dim=64)
    one = run_and_check(case, tattn.decode_attention, config=tattn.DecodeConfig(16, num_splits=1))
    many = run_and_check(case, tattn.decode_attention, config=tattn.DecodeConfig(16, num_splits=8))
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


def test_wrong_max_seq_len_hint_costs_speed_not_correctness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hint sizes the split count (here on a pretend 16-SM GPU); the kernel splits each
    # sequence's actual range, so a hint far too small (1 split) or far too large (16 splits,
    # most of them empty) gives the same answer.
    chosen: list[int] = []
    real = tattn.num_splits
    monkeypatch.setattr(tattn, "_sm_count", lambda device: 16)
    monkeypatch.setattr(tattn, "num_splits", lambda *a: chosen.append(real(*a)) or chosen[-1])
    case = batch(9, "fp16", (90, 3), (1, 1))
    run_and_check(case, tattn.attention, max_query_len=1, max_seq_len=1)
    run_and_check(case, tattn.attention, max_query_len=1, max_seq_len=100_000)
    assert chosen == [1, 16]


def test_attention_routes_decode_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_decode, real_general = tattn._decode, tattn._general

    def decode(*a, **k):
        calls.append("decode")
        return real_decode(*a, **k)

    def general(*a, **k):
        calls.append("general")
        return real_general(*a, **k)

    monkeypatch.setattr(tattn, "_decode", decode)
    monkeypatch.setattr(tattn, "_general", general)
    decode_case = batch(3, "bf16", (40, 17, 5), (1, 1, 1))
    mixed_case = batch(4, "bf16", (40, 17, 5), (1, 17, 2))
    run_and_check(decode_case, tattn.attention)  # num_tokens == num_seqs
    run_and_check(decode_case, tattn.attention, num_padding=3, max_query_len=1)  # padded, hinted
    run_and_check(decode_case, tattn.attention, num_padding=3)  # padded, no hint: general
    run_and_check(mixed_case, tattn.attention)
    run_and_check(mixed_case, tattn.attention, max_query_len=17)
    assert calls == ["decode", "decode", "general", "general", "general"]
    assert tattn.takes_decode_path(8, 8) and not tattn.takes_decode_path(9, 8)
    assert tattn.takes_decode_path(40, 8, max_query_len=tattn.DECODE_MAX_QUERY_LEN)
    assert not tattn.takes_decode_path(8, 8, max_query_len=tattn.DECODE_MAX_QUERY_LEN + 1)


def test_num_splits_from_shapes() -> None:
    sms = 132  # an H100 SXM
    # Batch 1 x 32k, 8 KV heads: 8 programs -> split to about 4 programs per SM.
    assert tattn.num_splits(1, 8, 32768, sms) == -(-4 * sms // 8)
    # A full GPU already: no split.
    assert tattn.num_splits(256, 8, 4096, sms) == 1
    assert tattn.num_splits(64, 8, 4096, sms) == 2
    # Short contexts: no split below MIN_SPLIT_TOKENS tokens each.
    assert tattn.num_splits(1, 8, 300, sms) == 1
    assert tattn.num_splits(1, 8, 1024, sms) == 1024 // tattn.MIN_SPLIT_TOKENS
    assert tattn.num_splits(1, 1, 1 << 20, sms) == tattn.MAX_SPLITS
    for b in (1, 2, 4, 16, 64, 256):
        for ctx in (512, 4096, 32768):
            s = tattn.num_splits(b, 8, ctx, sms)
            assert 1 <= s <= tattn.MAX_SPLITS
            assert s == 1 or ctx // s >= tattn.MIN_SPLIT_TOKENS


def test_bad_config_and_hints_name_the_value() -> None:
    with pytest.raises(ValueError, match="block_n: 24 must be a power of two >= 16"):
        tattn.DecodeConfig(block_n=24)
    with pytest.raises(ValueError, match="num_warps: 3"):
        tattn.DecodeConfig(num_warps=3)
    with pytest.raises(ValueError, match="num_splits: 0 must be in 1..1024"):
        tattn.DecodeConfig(num_splits=0)
    case = batch(1, "fp32", (5,), (1,))
    t = case.build()
    args = [dev(t[k]) for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                                "query_start_loc")]  # fmt: skip
    with pytest.raises(ValueError, match="max_seq_len: 0 must be a Python int >= 1"):
        tattn.attention(*args, 0.1, max_seq_len=0)
    with pytest.raises(ValueError, match="max_query_len: tensor"):
        tattn.attention(*args, 0.1, max_query_len=torch.tensor(1))


@pytest.mark.skipif(INTERPRET, reason="CUDA graph capture needs a GPU")
def test_decode_path_captures_in_a_cuda_graph() -> None:
    # No host sync on the decode path: capture it (split-KV on) and replay on new values.
    case = batch(21, "bf16", (300, 1000, 64, 7), (1,) * 4, block_size=16, head_dim=128)
    t = {k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in case.build().items()}
    args = (t["query"], t["key_cache"], t["value_cache"], t["block_tables"], t["seq_lens"],
            t["query_start_loc"], t["scale"])  # fmt: skip
    tattn.attention(*args, max_seq_len=1000)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tattn.attention(*args, max_seq_len=1000)
    t["query"].copy_(torch.randn_like(t["query"]))
    graph.replay()
    torch.cuda.synchronize()
    eager = tattn.attention(*args, max_seq_len=1000)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
