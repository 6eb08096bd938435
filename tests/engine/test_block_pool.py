"""BlockPool: the null block, reference counts, double frees, prefix-cache map and LRU eviction."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4 and pool.num_free_blocks == 4
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(RuntimeError, match="asked for 1 blocks with 0 free"):
        pool.get_new_blocks(1)
    with pytest.raises(RuntimeError, match="null block"):
        pool.touch([pool.null_block])
    pool.check()


def test_free_and_double_free():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a, b])
    assert (a.ref_cnt, b.ref_cnt) == (1, 0) and pool.num_free_blocks == 2
    pool.free_blocks([a])
    assert pool.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([a])
    pool.check()


def test_cached_blocks_stay_findable_until_evicted_in_lru_order():
    pool = BlockPool(4)  # 3 usable
    a, b, c = pool.get_new_blocks(3)
    assert pool.cache_block(a, b"ha") and pool.cache_block(b, b"hb")
    assert not pool.cache_block(c, b"ha"), "a hash maps to one block"
    assert not pool.cache_block(a, b"hx"), "a block carries one hash"
    pool.free_blocks([b, a, c])  # b freed first: the least recently used cached block
    assert pool.num_free_blocks == 3 and pool.num_evictable_blocks == 2
    assert pool.get_cached_block(b"ha") is a and pool.get_cached_block(b"hb") is b
    pool.check()

    # Uncached blocks go first, then cached ones from the least recently freed.
    (first,) = pool.get_new_blocks(1)
    assert first is c and pool.num_cached_blocks == 2
    (second,) = pool.get_new_blocks(1)
    assert second is b and second.block_hash is None and pool.get_cached_block(b"hb") is None
    assert pool.num_evictions == 1
    # A hit revives an evictable block without copying.
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 0 and pool.get_cached_block(b"ha") is a
    pool.check()


def test_touching_a_free_uncached_block_is_an_error():
    pool = BlockPool(3)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(RuntimeError, match="free and uncached"):
        pool.touch([a])


def test_caching_switched_off_and_reset():
    off = BlockPool(3, enable_caching=False)
    (a,) = off.get_new_blocks(1)
    assert not off.cache_block(a, b"h") and off.get_cached_block(b"h") is None

    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, b"h")
    assert not pool.reset_prefix_cache(), "refused while blocks are referenced"
    pool.free_blocks([a, b])
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and pool.num_evictable_blocks == 0
    assert pool.num_free_blocks == 2 and a.block_hash is None
    pool.check()


def test_check_finds_corruption():
    pool = BlockPool(4)
    (a,) = pool.get_new_blocks(1)
    a.ref_cnt = 0  # a leak: free by count, but on no free list
    with pytest.raises(RuntimeError, match="disagrees"):
        pool.check()


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, True, None])
def test_bad_size(bad):
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 2"):
        BlockPool(bad)
