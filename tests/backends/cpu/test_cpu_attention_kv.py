"""CPU reference KV-cache ops and paged attention against explicit per-element formulas."""

from __future__ import annotations

import math

import pytest
import torch

from backends.cpu.attention import paged_attention
from backends.cpu.kv_cache import copy_blocks, swap_blocks, write_kv

FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


def _random_block_tables(g, num_seqs: int, max_blocks: int, num_blocks: int) -> torch.Tensor:
    # Every sequence gets distinct blocks drawn in random order from the whole pool.
    perm = torch.randperm(num_blocks, generator=g)[: num_seqs * max_blocks]
    return perm.reshape(num_seqs, max_blocks).to(torch.int32)


def test_write_kv_skips_padding_and_follows_random_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, dim = 6, 4, 2, 8
    k_cache = torch.full((num_blocks, block_size, heads, dim), 7.0, dtype=torch.float64)
    v_cache = k_cache.clone()
    key = torch.randn(10, heads, dim, generator=g, dtype=torch.float64)
    value = torch.randn(10, heads, dim, generator=g, dtype=torch.float64)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:10]
    slots[[1, 4, 9]] = -1
    write_kv(key, value, k_cache, v_cache, slots)
    written = set()
    for t, slot in enumerate(slots.tolist()):
        if slot == -1:
            continue
        blk, off = divmod(slot, block_size)
        written.add((blk, off))
        assert torch.equal(k_cache[blk, off], key[t]) and torch.equal(v_cache[blk, off], value[t])
    for blk in range(num_blocks):
        for off in range(block_size):
            if (blk, off) not in written:  # untouched, including what the -1 tokens would hit
                assert bool((k_cache[blk, off] == 7.0).all() and (v_cache[blk, off] == 7.0).all())


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_write_kv_fp8_stores_scaled_bits(fp8_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    k_cache = torch.zeros(3, 4, 1, 8, dtype=fp8_dtype)
    v_cache = torch.zeros_like(k_cache)
    key = 3 * torch.randn(5, 1, 8, generator=g)
    key[0, 0, 0] = 1e4  # saturates at the format's max, never NaN
    value = torch.randn(5, 1, 8, generator=g)
    slots = torch.tensor([11, 0, -1, 5, 6])
    write_kv(key, value, k_cache, v_cache, slots, kv_scale=0.5)
    fmax = torch.finfo(fp8_dtype).max
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, 4)
        want = (key[t] / 0.5).clamp(-fmax, fmax).to(fp8_dtype)
        assert torch.equal(k_cache[blk, off].view(torch.uint8), want.view(torch.uint8))
    assert float(k_cache[2, 3, 0, 0].float()) == fmax


def test_write_kv_rejects_bad_input() -> None:
    cache = torch.zeros(2, 4, 2, 8)
    kv = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match=r"slot_mapping: .*0\.\.7"):
        write_kv(kv, kv, cache, cache.clone(), torch.tensor([0, 8, -1]))
    with pytest.raises(ValueError, match="appears twice"):
        write_kv(kv, kv, cache, cache.clone(), torch.tensor([2, 2, -1]))
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        write_kv(torch.zeros(3, 1, 8), kv, cache, cache.clone(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="value_cache"):
        write_kv(kv, kv, cache, torch.zeros(2, 4, 1, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="kv_scale"):
        write_kv(kv, kv, cache.to(FP8[0]), cache.to(FP8[0]), torch.tensor([0, 1, 2]), 0.0)


def test_copy_blocks_copies_every_cache_from_the_old_contents() -> None:
    g = torch.Generator().manual_seed(2)
    caches = [torch.randn(5, 2, 1, 3, generator=g) for _ in range(3)]
    before = [c.clone() for c in caches]
    src, dst = torch.tensor([0, 3, 1]), torch.tensor([3, 4, 0])  # block 3 is read and written
    copy_blocks(caches, src, dst)
    for c, b in zip(caches, before, strict=True):
        assert torch.equal(c[3], b[0]) and torch.equal(c[4], b[3]) and torch.equal(c[0], b[1])
        assert torch.equal(c[1], b[1]) and torch.equal(c[2], b[2])
    with pytest.raises(ValueError, match="destination block appears twice"):
        copy_blocks(caches, torch.tensor([0, 1]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"src: block ids must lie in 0\.\.4"):
        copy_blocks(caches, torch.tensor([5]), torch.tensor([0]))


def test_swap_blocks_between_pools() -> None:
    gpu_pool, cpu_pool = torch.arange(24.0).reshape(4, 6), torch.zeros(3, 6)
    swap_blocks(gpu_pool, cpu_pool, torch.tensor([3, 1]), torch.tensor([0, 2]))
    assert torch.equal(cpu_pool[0], gpu_pool[3]) and torch.equal(cpu_pool[2], gpu_pool[1])
    assert bool((cpu_pool[1] == 0).all())
    with pytest.raises(ValueError, match="per-block shape"):
        swap_blocks(gpu_pool, torch.zeros(3, 5), torch.tensor([0]), torch.tensor([0]))


# -- attention -------------------------------------------------------------------------------------
def _naive_attention(query, k_cache, v_cache, block_tables, seq_lens, qsl, scale, window, cap,
                     kv_scale=None):  # fmt: skip
    """One query token, one head at a time, K/V read slot by slot through the block table."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for s in range(len(seq_lens)):
        start, end, seq_len = int(qsl[s]), int(qsl[s + 1]), int(seq_lens[s])
        for j in range(end - start):
            p = seq_len - (end - start) + j
            for h in range(num_heads):
                kv_h = h // (num_heads // num_kv_heads)
                keys, logits, values = range(seq_len), [], []
                for t in keys:
                    if t > p or (window is not None and p - t >= window):
                        continue
                    blk = int(block_tables[s, t // block_size])
                    k = k_cache[blk, t % block_size, kv_h].double()
                    v = v_cache[blk, t % block_size, kv_h].double()
                    if kv_scale is not None:
                        k, v = k * kv_scale, v * kv_scale
                    score = scale * float((query[start + j, h].double() * k).sum())
                    if cap is not None:
                        score = cap * math.tanh(score / cap)
                    logits.append(score)
                    values.append(v)
                m = max(logits)
                weights = [math.exp(x - m) for x in logits]
                total = sum(weights)
                out[start + j, h] = sum(w / total * v for w, v in zip(weights, values, strict=True))
    return out


def _make_case(g, query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    num_blocks = len(seq_lens) * max_blocks + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v_cache = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    block_tables = _random_block_tables(g, len(seq_lens), max_blocks, num_blocks)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g, dtype=torch.float64)
    return (
        query.to(dtype),
        k_cache,
        v_cache,
        block_tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        qsl,
    )


CASES = [
    # query_lens (prefill, chunked prefill, decode mixed), seq_lens, heads, kv heads, window, cap
    ([5, 3, 1], [5, 11, 9], 4, 2, None, None),
    ([1, 1, 1, 1], [1, 7, 16, 17], 4, 1, None, None),  # decode, MQA
    ([6, 0, 2], [13, 4, 2], 6, 3, 4, None),  # sliding window, one sequence without new tokens
    ([4, 2], [9, 2], 2, 2, 3, 5.0),  # window and soft-cap, MHA
]


@pytest.mark.parametrize(("query_lens", "seq_lens", "heads", "kv_heads", "window", "cap"), CASES)
def test_attention_matches_per_query_loop(query_lens, seq_lens, heads, kv_heads, window, cap):
    g = torch.Generator().manual_seed(sum(seq_lens))
    case = _make_case(g, query_lens, seq_lens, heads, kv_heads, 8, 4, torch.float64)
    scale = 8**-0.5 * (4.0 if cap else 1.0)  # a large scale so the cap actually bites
    out = paged_attention(*case, scale=scale, sliding_window=window, soft_cap=cap)
    ref = _naive_attention(*case, scale, window, cap)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_low_precision_within_dtype_tolerance(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    case = _make_case(g, [3, 1, 4], [3, 10, 12], 4, 2, 16, 4, dtype)
    out = paged_attention(*case, scale=0.25)
    assert out.dtype == dtype
    ref = _naive_attention(*case, 0.25, None, None)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_attention_fp8_kv_cache_dequantizes_with_kv_scale(fp8_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    query, k_hi, v_hi, tables, seq_lens, qsl = _make_case(g, [4, 1], [4, 9], 4, 2, 8, 4,
                                                          torch.float32)  # fmt: skip
    kv_scale = 0.05
    k8, v8 = (k_hi / kv_scale).to(fp8_dtype), (v_hi / kv_scale).to(fp8_dtype)
    out = paged_attention(query, k8, v8, tables, seq_lens, qsl, 0.3, kv_scale=kv_scale)
    ref = _naive_attention(query, k8.float(), v8.float(), tables, seq_lens, qsl, 0.3, None, None,
                           kv_scale=kv_scale)  # fmt: skip
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_attention_zeroes_padding_rows() -> None:
    g = torch.Generator().manual_seed(7)
    query, kc, vc, tables, seq_lens, qsl = _make_case(g, [2, 1], [2, 5], 2, 1, 8, 4, torch.float64)
    padded = torch.cat([query, torch.randn(3, 2, 8, generator=g, dtype=torch.float64)])
    out = paged_attention(padded, kc, vc, tables, seq_lens, qsl, 0.3)
    torch.testing.assert_close(out[:3], paged_attention(query, kc, vc, tables, seq_lens, qsl, 0.3))
    assert bool((out[3:] == 0).all())


def test_attention_rejects_bad_input() -> None:
    g = torch.Generator().manual_seed(8)
    query, kc, vc, tables, seq_lens, qsl = _make_case(g, [2, 1], [2, 5], 6, 4, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="num_heads: 6 .* num_kv_heads 4"):
        paged_attention(query, kc, vc, tables, seq_lens, qsl, 0.3)
    query, kc, vc, tables, seq_lens, qsl = _make_case(g, [2, 1], [2, 5], 4, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]: 1 is shorter"):
        paged_attention(query, kc, vc, tables, torch.tensor([1, 5]), qsl, 0.3)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(query, kc, vc, tables, seq_lens, torch.tensor([0, 2]), 0.3)
    with pytest.raises(ValueError, match="head_dim 4 differs"):
        paged_attention(query, kc[..., :4], vc[..., :4], tables, seq_lens, qsl, 0.3)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        paged_attention(query, kc, vc, tables[:, :2], torch.tensor([2, 9]), qsl, 0.3)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(query, kc, vc, tables, seq_lens, qsl, 0.3, sliding_window=0)
