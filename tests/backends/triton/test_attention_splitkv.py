"""The Triton attention's tile-dependent paths against the CPU reference: the decode path (forced
split counts over few blocks, empty splits included) and the general kernel on small forced tiles
(unmasked whole tiles before the diagonal, masked diagonal tiles, odd page sizes); every float
dtype, FP8 caches, sliding window, soft-cap, mixed query lengths; routing and the split model.
Under TRITON_INTERPRET=1 on CPU tensors without a GPU; natively (and graph-captured) with one."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import sys
from pathlib import Path

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

# The kernels are defined when their module runs: reload any imported without the interpreter,
# the shared pieces first.
for _name in ("attention_common", "attention_decode", "attention"):
    if f"backends.triton.{_name}" in sys.modules and INTERPRET:
        importlib.reload(sys.modules[f"backends.triton.{_name}"])
tattn = importlib.import_module("backends.triton.attention")
tdecode = importlib.import_module("backends.triton.attention_decode")

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


@pytest.mark.parametrize("cache_dtype", [None, "fp8_e4m3fn", "fp8_e5m2"])
@pytest.mark.parametrize("wide", [0, 1])
def test_decode_wide_batch_configs(cache_dtype: str | None, wide: int) -> None:
    # The wide-batch table's configs (1-2 warps, 16-64 token tiles; on a GPU with sm_89+ an FP8
    # cache under bf16 queries runs its dots in fp16 with the scale folded into q).
    key = ("narrow", "big_smem", cache_dtype is not None)
    table = tdecode.DECODE_WIDE_BATCH[key]
    cfg = table[min(wide, len(table) - 1)][1]
    case = batch(31 + wide, "bf16", (1, 97, 40, 130, 73, 64), (1,) * 6, cache_dtype,
                 block_size=16, head_dim=128, kv_scale=0.5 if cache_dtype else None)  # fmt: skip
    run_and_check(case, tattn.decode_attention, config=cfg)


def test_decode_config_wide_batch_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tdecode, "interpreting", lambda: False)
    monkeypatch.setattr(tdecode, "_sm_count", lambda device: 132)
    monkeypatch.setattr(tdecode, "table_key", lambda d, dt, device: ("narrow", "big_smem"))
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    default = tdecode.DECODE_CONFIGS[("narrow", "big_smem")]
    wide_fp8 = dict(tdecode.DECODE_WIDE_BATCH[("narrow", "big_smem", True)])
    wide_bf16 = dict(tdecode.DECODE_WIDE_BATCH[("narrow", "big_smem", False)])
    assert tdecode.decode_config(128, bf16, cpu) == default  # no batch size: the table
    assert tdecode.decode_config(128, bf16, cpu, False, 32 * 8) == default  # < 3 per SM
    assert tdecode.decode_config(128, bf16, cpu, True, 32 * 8) == wide_fp8[0]  # FP8's own
    assert tdecode.decode_config(128, bf16, cpu, False, 64 * 8) == wide_bf16[3]
    assert tdecode.decode_config(128, bf16, cpu, True, 64 * 8) == wide_fp8[3]
    assert tdecode.decode_config(128, bf16, cpu, False, 115 * 8) == wide_bf16[3]  # < 7 per SM
    assert tdecode.decode_config(128, bf16, cpu, False, 256 * 8) == wide_bf16[7]
    assert tdecode.decode_config(128, bf16, cpu, True, 115 * 8) == wide_fp8[3]  # < 7 per SM
    assert tdecode.decode_config(128, bf16, cpu, True, 116 * 8) == wide_fp8[7]
    # One program per SM or fewer, left whole by the split model: the one-wave tile (a float
    # cache only); split, over one per SM, FP8 or without the length: the table.
    one_wave = dataclasses.replace(tdecode.DECODE_ONE_WAVE[("narrow", "big_smem")], num_splits=1)
    assert tdecode.decode_config(128, bf16, cpu, False, 16 * 8, 1024) == one_wave
    assert tdecode.decode_config(128, bf16, cpu, False, 4 * 8, 512) == one_wave
    # 12-16 x 8 programs nearly fill the 132 SMs: whole on the one-wave tile at any context (the
    # model alone would split 16 x 8192 and 12 x 4096 in two); 11 x 8 = 88 < 0.7 x 132 splits.
    assert tdecode.decode_config(128, bf16, cpu, False, 16 * 8, 8192) == one_wave
    assert tdecode.decode_config(128, bf16, cpu, False, 16 * 8, 32768) == one_wave
    assert tdecode.decode_config(128, bf16, cpu, False, 12 * 8, 4096) == one_wave
    assert tdecode.decode_config(128, bf16, cpu, False, 11 * 8, 8192) == default
    assert tdecode.decode_splits(16, 8, 16, 8192 // 16, one_wave, cpu) == 1
    assert tdecode.decode_config(128, bf16, cpu, False, 4 * 8, 8192) == default  # 8 splits
    assert tdecode.decode_config(128, bf16, cpu, False, 17 * 8, 1024) == default  # > 1 per SM
    assert tdecode.decode_config(128, bf16, cpu, True, 16 * 8, 1024) == wide_fp8[0]
    assert tdecode.decode_config(128, bf16, cpu, False, 16 * 8) == default
    for cfgs in tdecode.DECODE_WIDE_BATCH.values():  # most programs per SM first
        assert [m for m, _ in cfgs] == sorted((m for m, _ in cfgs), reverse=True)


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


@pytest.mark.parametrize(("early", "trigger"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("splits", [1, 3])
def test_lengths_read_before_the_pdl_wait_give_the_same_result(monkeypatch, splits, early,
                                                               trigger) -> None:  # fmt: skip
    # HAL_ATTN_EARLY_META (on by default) moves the sequence-length loads of the decode and
    # combine kernels ahead of the PDL wait, HAL_ATTN_EARLY_TRIGGER lets the next kernel start
    # before it; the results are the same either way (without PDL, e.g. the interpreter, the
    # wait is a no-op and only the order of the code changes).
    monkeypatch.setattr(tdecode, "EARLY_META", early)
    monkeypatch.setattr(tdecode, "EARLY_TRIGGER", trigger)
    case = batch(40 + splits, "bf16", (1, 97, 40, 130, 73), (1, 1, 3, 1, 2), block_size=16)
    config = tattn.DecodeConfig(block_n=16, num_splits=splits)
    run_and_check(case, tattn.decode_attention, max_query_len=3, config=config)


@pytest.mark.parametrize(
    ("dtype", "query_lens", "extra"),
    [
        ("bf16", (1,) * 6, {}),
        ("fp32", (1, 7, 5, 1, 2, 7), {}),  # chunks of one sequence use different split counts
        ("fp16", (1, 2, 1, 4, 1, 1), {"sliding_window": 45}),
        ("bf16", (1,) * 6, {"cache_dtype": "fp8_e4m3fn", "kv_scale": 0.05}),
    ],
)
def test_short_sequences_use_fewer_splits(dtype: str, query_lens: tuple, extra: dict) -> None:
    # A grid of 6 splits with at least 32 KV tokens (2 tiles of 16) per split: the 1- and
    # 16-token sequences take one split (written whole, skipped by the combine), 40 two, 73
    # three, 97 four (sliding windows: fewer) and 300 all six. As under CUDA graphs, where
    # the grid is sized for the model's longest sequence.
    seq_lens = (1, 97, 40, 16, 73, 300)
    case = batch(17, dtype, seq_lens, query_lens, extra.pop("cache_dtype", None), **extra)
    cfg = tattn.DecodeConfig(block_n=16, num_splits=6, min_split_tokens=32)
    # A hint of 1 token: 16 rows hold 4 tokens of the 4 heads, so 5-7 tokens take two chunks.
    run_and_check(case, tattn.decode_attention, num_padding=1, max_query_len=1, config=cfg)


# The general kernel with small tiles: with block_n 16 most tiles lie wholly before a q-block's
# first position (the unmasked step) and a few straddle the diagonal (the masked step).
PREFILL_CASES = [
    # (dtype, cache_dtype, head_dim, (block_m, block_n), block_size, extra)
    ("fp32", None, 80, (16, 16), 8, {}),
    ("bf16", None, 64, (32, 16), 16, {}),
    ("fp16", None, 128, (16, 32), 8, {"soft_cap": 30.0, "score_scale": 4.0}),
    ("bf16", None, 80, (16, 16), 5, {"sliding_window": 19}),  # a page size that is no power of 2
    ("fp16", None, 64, (16, 16), 8, {"gqa_ratio": 1, "soft_cap": 5.0, "sliding_window": 7}),
    ("bf16", "fp8_e4m3fn", 64, (16, 16), 16, {"kv_scale": 0.05}),
    ("fp32", "fp8_e5m2", 64, (64, 16), 3, {"gqa_ratio": 8, "num_kv_heads": 1}),
]


@pytest.mark.parametrize(("dtype", "cache_dtype", "head_dim", "tile", "block_size", "extra"),
                         PREFILL_CASES)  # fmt: skip
def test_general_kernel_small_tiles(
    dtype: str, cache_dtype: str | None, head_dim: int, tile: tuple[int, int], block_size: int,
    extra: dict,
) -> None:  # fmt: skip
    # Prefill (query = whole sequence), chunked prefill (a context before the query), a decode
    # token, and an empty query; two padding rows that must stay zero.
    seq_lens = (45, 70, 20, 5, 33)
    query_lens = (45, 25, 1, 0, 33)
    case = batch(head_dim + tile[0], dtype, seq_lens, query_lens, cache_dtype,
                 block_size=block_size, head_dim=head_dim, **extra)  # fmt: skip
    config = tattn.PrefillConfig(block_m=tile[0], block_n=tile[1], num_warps=4, num_stages=1)
    run_and_check(case, tattn.general_attention, num_padding=2, config=config)


def test_prefill_config_checks_and_table() -> None:
    with pytest.raises(ValueError, match="block_m: 48 must be a power of two >= 16"):
        tattn.PrefillConfig(block_m=48)
    with pytest.raises(ValueError, match="num_stages: 0 must be >= 1"):
        tattn.PrefillConfig(num_stages=0)
    # q tile + one K and one V buffer per two stages past the first (the block-table load takes
    # half the pipeline): 3 stages (128 + 2 * 64) rows of 128 bf16 values = 64 KiB, 5 stages
    # (128 + 2 * 2 * 128) rows = 160 KiB
    assert tattn.PrefillConfig(128, 64, 8, 3).smem_bytes(128, 2) == 64 * 1024
    assert tattn.PrefillConfig(128, 128, 8, 5).smem_bytes(128, 2) == 160 * 1024
    assert tattn.PrefillConfig(64, 64, 4, 1).smem_bytes(128, 2) == 48 * 1024
    keys = {(w, m) for w in ("narrow", "wide", "fp32_256") for m in ("big_smem", "small_smem")}
    assert set(tattn.PREFILL_CONFIGS) == keys == set(tattn.DECODE_CONFIGS)
    for key, cfg in tattn.PREFILL_CONFIGS.items():
        d, elem = (256 if key[0] != "narrow" else 128), (4 if key[0] != "narrow" else 2)
        if key[0] == "wide":
            d = 128  # fp32 with head_dim <= 128 (bf16 with 256 is the same size)
        limit = (227 if key[1] == "big_smem" else 99) * 1024
        assert cfg.smem_bytes(d, elem) <= limit, (key, cfg)


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
    # sequence's actual range, so a hint far too small (1 split) or far too large (8 splits,
    # a wave of 32 programs, most of them empty) gives the same answer.
    # (The launch's split count, recorded from decode_splits: on a GPU decode_config asks
    # num_splits too, for its one-wave rule.)
    chosen: list[int] = []
    real = tdecode.decode_splits
    monkeypatch.setattr(tdecode, "_sm_count", lambda device: 16)
    monkeypatch.setattr(tdecode, "decode_splits", lambda *a: chosen.append(real(*a)) or chosen[-1])
    case = batch(9, "fp16", (90, 3), (1, 1))
    run_and_check(case, tattn.attention, max_query_len=1, max_seq_len=1)
    run_and_check(case, tattn.attention, max_query_len=1, max_seq_len=100_000)
    assert chosen == [1, 8]


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


def _split_time(programs: int, s: int, sms: int, tiles: int) -> float:
    # The model num_splits minimises: the busiest SM's k programs of ceil(tiles / s) tiles at
    # (1 + gain (k - 1)) times one program's rate, plus the cost of splitting at all.
    k = -(-programs * s // sms)
    extra = tdecode.SPLIT_COST_TILES if s > 1 else 0.0
    return k * -(-tiles // s) / (1 + tdecode.SPLIT_SHARED_GAIN * (k - 1)) + extra


def test_num_splits_model() -> None:
    sms, per_sm = 132, 2  # an H100 / H200 SXM, at most two resident decode programs per SM
    split = functools.partial(tattn.num_splits, num_sms=sms, block_n=64, programs_per_sm=per_sm)
    # H200 graph replays, 64-token tiles with 5 stages (fourteenth session's autotune): 16
    # sequences x 8 KV heads are 128 programs, about one per SM; a second program per SM gains
    # little and a split costs about four tiles, so contexts up to 2k stay whole (16 x 2048: one
    # split 0.70 of copy, two 0.69) and longer ones split in two (16 x 4096: 0.85 against 0.65).
    assert split(16, 8, 512) == 1 and split(16, 8, 1024) == 1 and split(16, 8, 2048) == 1
    assert split(16, 8, 4096) == 2 and split(16, 8, 8192) == 2 and split(16, 8, 32768) == 2
    assert split(64, 8, 4096) == 1 and split(256, 8, 1024) == 1  # the GPU is full already
    assert split(256, 8, 4096) == 1 and split(256, 8, 8192) == 1
    # Few programs split until the SMs are covered: 4 x 1024 in four, 1 x 32k in 32 (0.70
    # against 0.56 with 16 and 0.57 with 64), 4 x 8k in 8 (0.68; 4: 0.52, 12: 0.62).
    assert split(4, 8, 1024) == 4 and split(1, 8, 32768) == 32 and split(4, 8, 8192) == 8
    assert split(1, 8, 512) == 1  # two 4-tile splits cost as much as one 8-tile program
    assert split(1, 8, 300) == 1  # shorter than two MIN_SPLIT_TOKENS
    assert split(1, 1, 1 << 22) <= tattn.MAX_SPLITS
    for b in (1, 2, 4, 16, 64, 256):
        for ctx in (512, 1024, 4096, 8192, 32768):
            s = split(b, 8, ctx)
            assert 1 <= s <= tattn.MAX_SPLITS
            if b * 8 >= sms * per_sm:
                assert s == 1
                continue
            assert s == 1 or (ctx // s >= tattn.MIN_SPLIT_TOKENS and b * 8 * s <= sms * per_sm)
            # the least modelled time over every allowed count, the fewest splits on ties
            tiles, limit = -(-ctx // 64), max(1, min(tattn.MAX_SPLITS, ctx // 256, -(-ctx // 64)))
            counts = [c for c in range(1, limit + 1) if c == 1 or b * 8 * c <= sms * per_sm]
            times = [_split_time(b * 8, c, sms, tiles) for c in counts]
            assert s == counts[times.index(min(times))], (b, ctx, s, times)


def test_decode_splits_follow_hint_and_config() -> None:
    cfg = tattn.DecodeConfig(block_n=64)
    cpu = torch.device("cpu")  # one "SM" under the interpreter: no split from the model
    assert tattn.decode_splits(4, 2, 16, 100, cfg, cpu) == 1
    assert tattn.decode_splits(4, 2, 16, 100, tattn.DecodeConfig(num_splits=7), cpu) == 7


def test_bad_config_and_hints_name_the_value() -> None:
    with pytest.raises(ValueError, match="block_n: 24 must be a power of two >= 16"):
        tattn.DecodeConfig(block_n=24)
    with pytest.raises(ValueError, match="num_warps: 3"):
        tattn.DecodeConfig(num_warps=3)
    with pytest.raises(ValueError, match="num_splits: 0 must be in 1..1024"):
        tattn.DecodeConfig(num_splits=0)
    with pytest.raises(ValueError, match="min_split_tokens: 0 must be >= 1"):
        tattn.DecodeConfig(min_split_tokens=0)
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


def test_decode_tile_override_parses_or_says_what_is_wrong() -> None:
    # HAL_ATTN_DECODE_TILE=NxWxS replaces the default decode tile (for measuring another one).
    assert tdecode.tile_override(None) is None
    assert tdecode.tile_override("") is None
    assert tdecode.tile_override("32x4x5") == tattn.DecodeConfig(block_n=32, num_warps=4,
                                                                 num_stages=5)  # fmt: skip
    with pytest.raises(ValueError, match="expected NxWxS"):
        tdecode.tile_override("32x4")
    with pytest.raises(ValueError, match="power of two"):
        tdecode.tile_override("48x4x5")


def test_split_tokens_env_sets_the_split_models_floor() -> None:
    # HAL_ATTN_SPLIT_TOKENS replaces MIN_SPLIT_TOKENS at import (a fresh interpreter: the module
    # reads it once): 64 lets 1 x 512 split into eight one-tile splits; below 16 is an error.
    import subprocess

    root = Path(__file__).resolve().parents[3]
    code = ("from backends.triton import attention_decode as d; "
            "print(d.MIN_SPLIT_TOKENS, d.num_splits(1, 8, 512, 132, 64))")  # fmt: skip

    def run(value: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HAL_ATTN_SPLIT_TOKENS": value, "PYTHONPATH": str(root)}
        return subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    assert run("64").stdout.split() == ["64", "8"]
    assert run("256").stdout.split() == ["256", "1"]
    bad = run("8")
    assert bad.returncode != 0 and "at least 16" in bad.stderr
