"""A pool of fixed-size KV blocks: free list, reference counts, prefix-cache map, LRU eviction.

Block 0 is the null block: reserved, never handed out (padding rows of block tables point at it).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable

logger = logging.getLogger(__name__)


class Block:
    """One physical KV block. block_hash is set while its full contents sit in the prefix cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else f", hash={self.block_hash[:4].hex()}"
        return f"Block({self.block_id}, ref={self.ref_cnt}{cached})"


class BlockPool:
    """Hands out blocks with reference counts; keeps freed full blocks cached until evicted.

    A free block is either uncached (handed out first) or cached with ref_cnt 0 (evictable, in LRU
    order: the least recently freed is evicted first). Both count as free.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an integer >= 2 (block 0 is reserved), got {num_blocks!r}"
            )
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self._free_uncached: deque[Block] = deque(self.blocks[1:])
        self._evictable: OrderedDict[int, Block] = OrderedDict()  # block_id -> block, LRU first
        self._cached: dict[bytes, Block] = {}  # block hash -> block (referenced or evictable)
        self.num_evictions = 0
        # Sum over blocks of (ref_cnt - 1) where positive: 0 means no block has two holders, so
        # the KV statistics need no per-block scan.
        self.num_shared_refs = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: uncached free plus evictable cached."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_new_blocks(self, num_blocks: int) -> list[Block]:
        """num_blocks blocks with ref_cnt 1; evicts least recently freed cached ones if needed."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(
                f"asked for {num_blocks} blocks with {self.num_free_blocks} free; callers must "
                f"check num_free_blocks first"
            )
        out = []
        uncached = self._free_uncached
        for _ in range(num_blocks):
            if uncached:
                block = uncached.popleft()
            else:
                _, block = self._evictable.popitem(last=False)
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1

    def touch(self, blocks: Iterable[Block]) -> None:
        """Add a reference to each block (prefix-cache hit or fork), reviving evictable ones."""
        for block in blocks:
            if block.block_id == 0:
                raise RuntimeError("the null block cannot be referenced")
            if block.ref_cnt == 0:
                if block.block_hash is None or block.block_id not in self._evictable:
                    raise RuntimeError(f"{block} is free and uncached: it cannot be touched")
                del self._evictable[block.block_id]
            else:
                self.num_shared_refs += 1
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block, in order; the first freed is the first evicted."""
        for block in blocks:
            ref_cnt = block.ref_cnt
            if ref_cnt > 1:
                block.ref_cnt = ref_cnt - 1
                self.num_shared_refs -= 1
            elif ref_cnt == 1:
                block.ref_cnt = 0
                if block.block_hash is not None:
                    self._evictable[block.block_id] = block
                else:
                    self._free_uncached.append(block)
            else:
                raise RuntimeError(f"double free of {block}")

    def cache_block(self, block: Block, block_hash: bytes) -> bool:
        """Register a full, computed block under its hash; False if it or the hash is cached."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return False
        if block.ref_cnt <= 0:
            raise RuntimeError(f"{block} is free: only referenced blocks can be cached")
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def get_cached_block(self, block_hash: bytes) -> Block | None:
        return self._cached.get(block_hash)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only when no block is referenced (else False, nothing done)."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in list(self._evictable.values()):
            self._evict(block)
            self._free_uncached.append(block)
        self._evictable.clear()
        logger.info("prefix cache reset")
        return True

    def check(self) -> None:
        """Raise RuntimeError if the free lists, ref counts and hash map disagree (for tests)."""
        uncached_ids = {b.block_id for b in self._free_uncached}
        free_ids = [b.block_id for b in self._free_uncached] + list(self._evictable)
        if len(free_ids) != len(set(free_ids)):
            raise RuntimeError("a block sits twice in the free lists")
        if 0 in free_ids or self.null_block.ref_cnt != 0:
            raise RuntimeError("the null block was handed out")
        for block in self.blocks[1:]:
            is_free = block.block_id in self._evictable or block.block_id in uncached_ids
            if is_free != (block.ref_cnt == 0) or block.ref_cnt < 0:
                raise RuntimeError(f"{block}: free-list membership disagrees with its ref count")
            if block.block_id in self._evictable and block.block_hash is None:
                raise RuntimeError(f"{block} is evictable but uncached")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise RuntimeError(f"{block} has a hash the cache map does not point back from")
        if len(self._cached) != sum(b.block_hash is not None for b in self.blocks):
            raise RuntimeError("the cache map holds blocks that do not carry its hash")
        shared = sum(max(0, b.ref_cnt - 1) for b in self.blocks)
        if self.num_shared_refs != shared:
            raise RuntimeError(
                f"num_shared_refs={self.num_shared_refs}, but the ref counts add up to {shared}"
            )
