"""KVCacheManager: allocation, prefix-cache hits by hash chain, fork with copy-on-write, swap maps,
and the usage/waste statistics."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine.kv_cache_manager import KVCacheManager, hash_block_tokens
from engine.sequence import Request, Sequence


@dataclass
class FakeParams:
    n: int = 1
    max_tokens: int | None = None
    prompt_logprobs: int | None = None  # set: the request takes no prefix-cache hits


_ids = iter(range(10**6))


def make_seq(tokens: list[int], prompt_logprobs: int | None = None) -> Sequence:
    seq_id = next(_ids)
    request = Request(f"r{seq_id}", tokens, FakeParams(prompt_logprobs=prompt_logprobs))
    return Sequence(seq_id, request, list(tokens))


def compute(kv: KVCacheManager, seq: Sequence, num_new: int, hits=()) -> list[tuple[int, int]]:
    """Allocate, 'run' the step and register full blocks, as the scheduler does."""
    copies = kv.allocate_slots(seq, num_new, hits)
    assert copies is not None
    kv.release_pending()
    seq.num_computed_tokens += len(hits) * kv.block_size + num_new
    kv.cache_full_blocks(seq)
    return copies


def test_hash_chain_depends_on_parent_and_tokens():
    h1 = hash_block_tokens(None, [1, 2])
    assert h1 == hash_block_tokens(None, [1, 2])
    assert h1 != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert len(h1) == 32


def test_allocate_grows_table_and_fails_without_side_effects():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=5)  # 4 usable blocks = 16 slots
    seq = make_seq(list(range(10)))
    assert compute(kv, seq, 10) == []
    table = kv.get_block_table(seq)
    assert len(table) == 3 and 0 not in table and kv.num_free_blocks == 1
    other = make_seq(list(range(100, 109)))
    assert kv.allocate_slots(other, 9) is None  # needs 3 blocks, 1 free
    assert kv.num_free_blocks == 1 and kv.get_block_table(other) == []
    seq.append_token(10)
    seq.append_token(11)
    assert compute(kv, seq, 2) == []  # slots 10, 11 fit the third block
    assert kv.get_block_table(seq) == table
    kv.free(seq)
    assert kv.num_free_blocks == 4 and kv.get_block_table(seq) == []


def test_prefix_hits_cover_full_blocks_and_leave_one_token():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=10)
    prompt = list(range(10))
    first = make_seq(prompt)
    compute(kv, first, 10)
    assert kv.gpu_pool.num_cached_blocks == 2  # the partial third block is not cached

    same = make_seq(prompt)
    hits, num_cached = kv.get_computed_blocks(same)
    assert num_cached == 8 and [b.block_id for b in hits] == kv.get_block_table(first)[:2]
    compute(kv, same, 2, hits)
    assert kv.get_block_table(same)[:2] == kv.get_block_table(first)[:2]
    assert all(b.ref_cnt == 2 for b in hits)
    assert kv.prefix_cache_hits == 8 and kv.prefix_cache_queries == 20

    # A prompt of exactly two full blocks hits only the first: its last token must be computed.
    exact = make_seq(prompt[:8])
    assert kv.get_computed_blocks(exact)[1] == 4
    # Same second block, different first block: the chain makes it a miss.
    shifted = make_seq([99, 1, 2, 3] + prompt[4:])
    assert kv.get_computed_blocks(shifted)[1] == 0
    # A request that wants its prompt's logprobs must run every position: no hits.
    scored = make_seq(prompt, prompt_logprobs=1)
    assert kv.get_computed_blocks(scored) == ([], 0)


def test_prefix_hit_revives_a_freed_block_and_counts_it_against_free_space():
    kv = KVCacheManager(block_size=2, num_gpu_blocks=4)  # 3 usable
    prompt = [5, 6, 7, 8, 9]
    first = make_seq(prompt)
    compute(kv, first, 5)
    kv.free(first)
    assert kv.num_free_blocks == 3 and kv.gpu_pool.num_evictable_blocks == 2
    blocker = make_seq([1, 2])
    assert kv.allocate_slots(blocker, 2) == []  # takes the one uncached free block
    again = make_seq(prompt)
    hits, num_cached = kv.get_computed_blocks(again)
    assert num_cached == 4 and all(b.ref_cnt == 0 for b in hits)
    # Reviving both hits uses up the free count: no block is left for the fifth token.
    assert kv.allocate_slots(again, 1, hits) is None
    assert all(b.ref_cnt == 0 for b in hits) and kv.num_free_blocks == 2
    kv.free(blocker)
    assert kv.allocate_slots(again, 1, hits) == []
    assert all(b.ref_cnt == 1 for b in hits) and kv.num_free_blocks == 0
    kv.gpu_pool.check()


def test_eviction_takes_the_tail_of_a_freed_sequence_first():
    kv = KVCacheManager(block_size=2, num_gpu_blocks=4)  # 3 usable
    prompt = [5, 6, 7, 8, 9]
    first = make_seq(prompt)
    compute(kv, first, 5)
    kv.free(first)
    blocker = make_seq([1, 2, 3, 4])
    assert kv.allocate_slots(blocker, 4) == []  # the uncached block, then one eviction
    # The second block went first, so the first still hits (a chain needs its head).
    assert kv.get_computed_blocks(make_seq(prompt))[1] == 2


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(block_size=2, num_gpu_blocks=8, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    compute(kv, a, 5)
    assert kv.get_computed_blocks(make_seq([1, 2, 3, 4, 5])) == ([], 0)
    assert kv.gpu_pool.num_cached_blocks == 0 and kv.prefix_cache_queries == 0


def test_fork_shares_blocks_and_copy_on_write_on_the_partial_block():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=10)
    parent = make_seq(list(range(6)))
    compute(kv, parent, 6)
    child = Sequence(next(_ids), parent.request, parent.token_ids[:], index=1)
    child.num_computed_tokens = parent.num_computed_tokens
    kv.fork(parent, child)
    shared = kv.get_block_table(parent)
    assert kv.get_block_table(child) == shared
    assert [kv.gpu_pool.blocks[b].ref_cnt for b in shared] == [2, 2]
    parent.append_token(50)
    child.append_token(60)

    copies = kv.allocate_slots(child, 1)
    assert len(copies) == 1 and copies[0][0] == shared[1]
    dst = copies[0][1]
    assert kv.get_block_table(child) == [shared[0], dst]
    # The source keeps the child's reference until the step is built, then only the parent's.
    assert kv.gpu_pool.blocks[shared[1]].ref_cnt == 2
    kv.release_pending()
    assert kv.gpu_pool.blocks[shared[1]].ref_cnt == 1
    assert kv.allocate_slots(parent, 1) == [], "the last sharer writes in place"
    assert kv.gpu_pool.blocks[shared[0]].ref_cnt == 2

    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == kv.gpu_pool.num_usable_blocks
    kv.gpu_pool.check()


def test_fork_on_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=10)
    parent = make_seq(list(range(8)))
    compute(kv, parent, 8)
    child = Sequence(next(_ids), parent.request, parent.token_ids[:], index=1)
    child.num_computed_tokens = 8
    kv.fork(parent, child)
    child.append_token(1)
    assert kv.allocate_slots(child, 1) == []
    assert len(kv.get_block_table(child)) == 3


def test_copy_on_write_needs_a_free_block():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=3)  # 2 usable
    parent = make_seq(list(range(6)))
    compute(kv, parent, 6)
    child = Sequence(next(_ids), parent.request, parent.token_ids[:], index=1)
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    child.append_token(1)
    assert kv.allocate_slots(child, 1) is None
    assert kv.gpu_pool.blocks[kv.get_block_table(child)[1]].ref_cnt == 2


def test_swap_out_and_in_maps_blocks():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=6, num_cpu_blocks=4)
    seq = make_seq(list(range(7)))
    compute(kv, seq, 7)
    gpu_table = kv.get_block_table(seq)
    out = kv.swap_out(seq)
    assert [g for g, _ in out] == gpu_table and len({c for _, c in out}) == 2
    assert kv.get_block_table(seq) == [] and kv.num_free_blocks == 5
    assert kv.cpu_pool.num_free_blocks == 1 and kv.stats().num_swapped_blocks == 2
    seq.append_token(7)
    assert kv.can_swap_in(seq, 1)
    back = kv.swap_in(seq)
    assert [c for c, _ in back] == [c for _, c in out]
    assert kv.get_block_table(seq) == [g for _, g in back]
    assert kv.allocate_slots(seq, 1) == []
    assert kv.cpu_pool.num_free_blocks == 3


def test_swap_out_needs_room_in_the_cpu_pool():
    kv = KVCacheManager(block_size=2, num_gpu_blocks=8, num_cpu_blocks=2)  # 1 usable CPU block
    seq = make_seq([1, 2, 3])
    compute(kv, seq, 3)
    assert kv.swap_out(seq) is None
    assert len(kv.get_block_table(seq)) == 2
    assert KVCacheManager(2, 8).swap_out(seq) is None  # no CPU pool at all


def test_waste_counts_partial_blocks_once_when_shared():
    kv = KVCacheManager(block_size=16, num_gpu_blocks=20)
    seq = make_seq(list(range(17)))
    compute(kv, seq, 17)
    stats = kv.stats()
    assert (stats.num_used_blocks, stats.num_allocated_slots, stats.num_held_tokens) == (2, 32, 17)
    assert stats.waste == pytest.approx(15 / 32)
    child = Sequence(next(_ids), seq.request, seq.token_ids[:], index=1)
    child.num_computed_tokens = 17
    kv.fork(seq, child)
    stats = kv.stats()
    assert stats.num_logical_tokens == 34 and stats.num_held_tokens == 17
    assert stats.waste == pytest.approx(15 / 32)

    long = make_seq(list(range(1000, 1000 + 250)))
    compute(kv, long, 250)
    stats = kv.stats()
    # 16 + 2 blocks for 250 + 17 tokens: the waste is the two partial last blocks.
    assert stats.num_allocated_slots == 18 * 16 and stats.num_held_tokens == 267
    assert stats.waste == pytest.approx(1 - 267 / 288) and stats.waste < 0.08
    assert stats.usage == pytest.approx(18 / 19)
