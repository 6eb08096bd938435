"""Per-sequence block tables over a BlockPool: allocation, prefix-cache hits, fork with
copy-on-write, swap maps between the GPU and CPU pools, and usage/waste statistics.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine.block_pool import Block, BlockPool
from engine.sequence import Sequence


def hash_block_tokens(parent_hash: bytes | None, token_ids: Seq[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 over the parent block's hash and its tokens.

    The chain makes a block's key stand for every token up to and including it.
    """
    h = hashlib.sha256(parent_hash if parent_hash is not None else b"\0")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KVCacheStats:
    """A snapshot of the GPU pool. Shared blocks count once in used/allocated/held."""

    block_size: int
    num_usable_blocks: int
    num_used_blocks: int  # referenced by at least one sequence
    num_evictable_blocks: int  # cached, unreferenced: free but still hit-able
    num_allocated_slots: int  # num_used_blocks * block_size
    num_held_tokens: int  # token slots of used blocks that sequences actually fill
    num_logical_tokens: int  # the same summed per sequence (a shared block counts per sharer)
    num_swapped_blocks: int  # CPU swap pool blocks in use
    prefix_cache_queries: int  # prompt tokens looked up, since start
    prefix_cache_hits: int  # of which found computed in the cache

    @property
    def waste(self) -> float:
        """Fraction of allocated KV slots holding no token (the partial last blocks)."""
        if self.num_allocated_slots == 0:
            return 0.0
        return 1.0 - self.num_held_tokens / self.num_allocated_slots

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0
        )


class KVCacheManager:
    """Maps each sequence to its blocks. Methods that may run out of blocks check first and
    return None without side effects, so the scheduler can preempt and retry."""

    def __init__(
        self,
        block_size: int,
        num_gpu_blocks: int,
        num_cpu_blocks: int = 0,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.gpu_pool = BlockPool(num_gpu_blocks, enable_caching=enable_prefix_caching)
        self.cpu_pool = BlockPool(num_cpu_blocks, enable_caching=False) if num_cpu_blocks else None
        self.block_tables: dict[int, list[Block]] = {}  # seq_id -> GPU blocks
        self._block_ids: dict[int, array] = {}  # seq_id -> the same as int32 block ids
        self.cpu_tables: dict[int, list[Block]] = {}  # seq_id -> CPU blocks while swapped
        self._num_slots: dict[int, int] = {}  # seq_id -> token slots its table is sized for
        self._num_registered: dict[int, int] = {}  # seq_id -> leading blocks offered to the cache
        # CoW sources keep the writer's reference until the step is built; _pending_refs counts
        # those references per block so they do not count as sharers.
        self._pending_release: list[Block] = []
        self._pending_refs: Counter[int] = Counter()
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.gpu_pool.num_free_blocks

    def get_block_table(self, seq: Sequence) -> list[int]:
        """seq's block ids (a copy: the table may change in later steps)."""
        ids = self._block_ids.get(seq.seq_id)
        return [] if ids is None else ids.tolist()

    def block_ids(self, seq: Sequence) -> array:
        """seq's block ids as an int32 array (a copy; one memcpy, however long the table)."""
        ids = self._block_ids.get(seq.seq_id)
        return array("i") if ids is None else ids[:]

    def _ensure_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(
                hash_block_tokens(
                    hashes[-1] if hashes else seq.request.cache_salt,
                    seq.token_ids[i * bs : (i + 1) * bs],
                )
            )
        return hashes

    # -- allocation ----------------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> tuple[list[Block], int]:
        """Cached blocks matching the longest prefix of full blocks, and the tokens they cover.

        Only blocks within the first num_tokens - 1 tokens count, so at least one token is left
        to compute (its logits are needed) and a hit block is never written to. A request that
        wants prompt logprobs takes no hits (its prompt positions must run); its blocks are
        still cached for others.
        """
        if (
            not self.enable_prefix_caching
            or seq.num_computed_tokens
            or seq.seq_id in self.block_tables
            or seq.request.sampling_params.prompt_logprobs is not None
        ):
            return [], 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self._ensure_hashes(seq, max_blocks)[:max_blocks]:
            block = self.gpu_pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: Seq[Block] = ()
    ) -> list[tuple[int, int]] | None:
        """Size seq's table for num_new_tokens more slots after its computed (or hit) tokens.

        computed_blocks: prefix-cache hits from get_computed_blocks, for a sequence with no table.
        Returns the (src, dst) block copies for copy-on-write of shared blocks about to be written,
        or None (nothing changed) when the pool lacks free blocks.
        """
        seq_id, bs = seq.seq_id, self.block_size
        table = self.block_tables.get(seq_id)
        if computed_blocks and (table or seq.num_computed_tokens):
            raise RuntimeError(f"{seq}: prefix hits apply only to a sequence with nothing computed")
        table = table if table is not None else []
        start = seq.num_computed_tokens + len(computed_blocks) * bs
        num_slots = start + num_new_tokens
        num_new_blocks = -(-num_slots // bs) - len(table) - len(computed_blocks)
        # Blocks that receive new tokens must be private: copy the shared ones first (the last
        # sharer writes in place).
        cow = []
        pending = self._pending_refs
        for i in range(start // bs, len(table)):
            block = table[i]
            if block.ref_cnt > 1 and block.ref_cnt - pending.get(block.block_id, 0) > 1:
                cow.append(i)
        if table and num_new_blocks <= 0 and not cow:  # e.g. a decode within its last block
            self._num_slots[seq_id] = num_slots
            self._num_registered.setdefault(seq_id, 0)
            return []
        num_new_blocks = max(0, num_new_blocks)
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + len(cow) > self.gpu_pool.num_free_blocks - revived:
            return None
        if not table and seq.num_computed_tokens == 0 and self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * bs
        ids = self._block_ids.get(seq_id)
        if ids is None:
            ids = self._block_ids[seq_id] = array("i")
        if computed_blocks:
            self.gpu_pool.touch(computed_blocks)
            table.extend(computed_blocks)
            ids.extend(b.block_id for b in computed_blocks)
        copies = []
        for i in cow:
            src, (dst,) = table[i], self.gpu_pool.get_new_blocks(1)
            table[i] = dst
            ids[i] = dst.block_id
            # src keeps this sequence's reference until release_pending(): a block freed and
            # handed out again in the same step could be a copy's source and destination at once.
            self._pending_release.append(src)
            pending[src.block_id] += 1
            copies.append((src.block_id, dst.block_id))
        if num_new_blocks:
            new = self.gpu_pool.get_new_blocks(num_new_blocks)
            table.extend(new)
            ids.extend(b.block_id for b in new)
        self.block_tables[seq_id] = table
        self._num_slots[seq_id] = num_slots
        self._num_registered.setdefault(seq_id, len(computed_blocks))
        return copies

    def release_pending(self) -> None:
        """Drop the references copy-on-write sources kept during the step's scheduling."""
        if self._pending_release:
            self.gpu_pool.free_blocks(self._pending_release)
            self._pending_release.clear()
            self._pending_refs.clear()

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer seq's full, computed blocks to the prefix cache (after their KV is written)."""
        if not self.enable_prefix_caching:
            return
        start = self._num_registered.get(seq.seq_id, 0)
        if seq.num_computed_tokens // self.block_size <= start:  # no newly full block
            return
        table = self.block_tables.get(seq.seq_id)
        if table is None:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        if num_full <= start:
            return
        hashes = self._ensure_hashes(seq, num_full)
        for i in range(start, num_full):
            self.gpu_pool.cache_block(table[i], hashes[i])
        self._num_registered[seq.seq_id] = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (one more reference each)."""
        table = self.block_tables[parent.seq_id]
        self.gpu_pool.touch(table)
        self.block_tables[child.seq_id] = list(table)
        self._block_ids[child.seq_id] = self._block_ids[parent.seq_id][:]
        self._num_slots[child.seq_id] = self._num_slots[parent.seq_id]
        self._num_registered[child.seq_id] = self._num_registered.get(parent.seq_id, 0)
        # Only the computed blocks are common to both; later ones may hold diverging tokens.
        child.block_hashes = parent.block_hashes[: parent.num_computed_tokens // self.block_size]

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (GPU and CPU); last blocks first, so they are evicted first."""
        table = self.block_tables.pop(seq.seq_id, [])
        self._block_ids.pop(seq.seq_id, None)
        self.gpu_pool.free_blocks(reversed(table))
        cpu_table = self.cpu_tables.pop(seq.seq_id, [])
        if cpu_table:
            self.cpu_pool.free_blocks(cpu_table)
        self._num_slots.pop(seq.seq_id, None)
        self._num_registered.pop(seq.seq_id, None)

    # -- swapping ------------------------------------------------------------------------------
    def swap_out(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Move seq's blocks to the CPU pool: the (gpu, cpu) copies to make, or None if no room."""
        table = self.block_tables.get(seq.seq_id, [])
        if self.cpu_pool is None or len(table) > self.cpu_pool.num_free_blocks:
            return None
        cpu_table = self.cpu_pool.get_new_blocks(len(table))
        mapping = [(g.block_id, c.block_id) for g, c in zip(table, cpu_table, strict=True)]
        self.free(seq)
        self.cpu_tables[seq.seq_id] = cpu_table
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the GPU pool holds seq's swapped blocks plus slots for num_new_tokens."""
        need = _cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(need, len(self.cpu_tables[seq.seq_id])) <= self.gpu_pool.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move seq's blocks back to the GPU pool: the (cpu, gpu) copies to make."""
        cpu_table = self.cpu_tables.pop(seq.seq_id)
        if len(cpu_table) > self.gpu_pool.num_free_blocks:
            self.cpu_tables[seq.seq_id] = cpu_table
            raise RuntimeError(f"{seq}: swap in without room; call can_swap_in first")
        table = self.gpu_pool.get_new_blocks(len(cpu_table))
        self.cpu_pool.free_blocks(cpu_table)
        self.block_tables[seq.seq_id] = table
        self._block_ids[seq.seq_id] = array("i", [b.block_id for b in table])
        self._num_slots[seq.seq_id] = seq.num_computed_tokens
        self._num_registered[seq.seq_id] = 0  # new block ids: offer them to the cache again
        return [(c.block_id, g.block_id) for c, g in zip(cpu_table, table, strict=True)]

    # -- statistics ----------------------------------------------------------------------------
    @property
    def num_used_blocks(self) -> int:
        """GPU blocks referenced now (O(1); `stats` has the rest)."""
        pool = self.gpu_pool
        return pool.num_usable_blocks - pool.num_free_blocks

    def _held_tokens_scan(self) -> int:
        """Filled slots of the used blocks, a block shared by several tables counted once at
        its fullest: the reference the fast path in `stats` must equal."""
        bs = self.block_size
        held: dict[int, int] = {}  # block_id -> filled slots (max over the sequences sharing it)
        for seq_id, table in self.block_tables.items():
            num_slots = self._num_slots[seq_id]
            for i, block in enumerate(table):
                filled = min(bs, max(0, num_slots - i * bs))
                held[block.block_id] = max(held.get(block.block_id, 0), filled)
        return sum(held.values())

    def stats(self) -> KVCacheStats:
        bs = self.block_size
        pool = self.gpu_pool
        num_slots = self._num_slots
        logical = sum(num_slots[seq_id] for seq_id in self.block_tables)
        if pool.num_shared_refs == 0:
            # Every block has at most one holder, so each table's blocks hold min(its slots,
            # its capacity) tokens: no per-block scan.
            held = 0
            for seq_id, table in self.block_tables.items():
                n, cap = num_slots[seq_id], len(table) * bs
                held += n if n < cap else cap
        else:
            held = self._held_tokens_scan()
        num_used = pool.num_usable_blocks - pool.num_free_blocks
        return KVCacheStats(
            block_size=bs,
            num_usable_blocks=pool.num_usable_blocks,
            num_used_blocks=num_used,
            num_evictable_blocks=pool.num_evictable_blocks,
            num_allocated_slots=num_used * bs,
            num_held_tokens=held,
            num_logical_tokens=logical,
            num_swapped_blocks=sum(len(t) for t in self.cpu_tables.values()),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )
