"""A persistent warp-specialized decode attention kernel for wide batches and long whole
sequences (Gluon, sm_90+); `attention_ws.persistent` says which calls take it.

`attention_ws` runs one program per (KV head, sequence[, split]); from more programs than SMs on
each pays its start (the length and first table loads, the first copies) and its fold, and a
long sequence at batch 16 streams through one program's ring. Here a fixed grid (one program
per SM) walks the (sequence, KV head) items heads first (item w: sequence w // kv_heads, head
w % kv_heads), program p taking items p, p + grid, ...: the producer partition copies pages
across item boundaries into one ring of STAGES slots (a running page counter gives every page
its slot and phase; table entries are loaded 32 at a time), the four consumer partitions take
the pages round-robin by that counter, load the next item's query rows and length while this
item streams, leave each item's state in one of two state buffers (double-buffered by item
parity, guarded by "done" / "free" mbarriers) and go on with the next item at once; the default
partition folds each item's four states and writes its output while the others stream the next.
Same scope as `attention_ws` (bf16 / fp16, head_dim 64 / 128, pages 16 / 32, at most 16 query
heads per KV head, one token per sequence), no splits.

Every slot is read by one consumer only (STAGES a multiple of the consumers): a slot shared by
two would be waited on two phases ahead, which an mbarrier's one-bit parity cannot tell from
the phase before (a 6-slot build faulted on the H200).

H200 (2026-11-29, thirty-first session, graph replays, L2 flushed, against SDPA on contiguous
KV, the Triton kernel and `attention_ws` in the same run, `bench/ws_persistent_probe.py`):
16 x 8192 125.2 us (SDPA 124.7, ws 128.3), 16 x 32768 471.7 (471.1, 483.3), 64 x 512 40.1
(43.6, Triton 40.3), 256 x 1024 247.4 (246.3, 251.1), 256 x 8192 1891 (1889, 1912); the same
grid streaming the pages with no math reads 0.97-1.01x SDPA's time, so what is left is the
paged read itself (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from backends.triton import attention_ws as ws
from backends.triton.attention_common import _sm_count
from backends.triton.pdl import gluon_grid_wait, use_pdl

# Launch shape (H200, thirty-first session, 12 wide-batch and long-context shapes): one program
# per SM (the state buffers and the ring take ~160 KB of shared memory), a ring of up to 12 slots
# in RING_BYTES (16 slots: level or 1-2% slower), consumers at 192 registers under a 168 cap
# (168 under 128 spilled a register and ran 1-3% slower).
RING_BYTES = 128 * 1024
MAX_STAGES = 12
CONSUMER_REGS = 192
MAX_REGS = 168

if ws.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    BLOCK_M = ws.BLOCK_M

    @gluon.jit
    def _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, bt_ptr, seq_lens_ptr,
                  stride_bt_row, num_items, kv_heads, PAGE: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        # Table entries TB at a time (one vector load, then each picked out by a warp reduction)
        # so a page's copy waits on no load of its own; the next item's length is loaded while
        # this item's pages are issued.
        TB: gl.constexpr = 32
        tb_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        lanes = gl.arange(0, TB, layout=tb_layout)
        j = 0  # pages issued so far by this program: the ring's running counter
        step = gl.num_programs(0)
        seq_len = gl.load(seq_lens_ptr + gl.program_id(0) // kv_heads)
        for w in range(gl.program_id(0), num_items, step):
            seq = w // kv_heads
            kv_col = (w % kv_heads) * HEAD_DIM
            pages = gl.cdiv(seq_len, PAGE)
            nxt = gl.minimum(w + step, num_items - 1)
            seq_len = gl.load(seq_lens_ptr + nxt // kv_heads)
            bt_row_ptr = bt_ptr + seq.to(gl.int64) * stride_bt_row
            for i0 in range(0, pages, TB):
                ents = gl.load(bt_row_ptr + i0 + lanes, mask=i0 + lanes < pages, other=0)
                for k in range(0, gl.minimum(TB, pages - i0)):
                    page = gl.sum(gl.where(lanes == k, ents, 0), axis=0)
                    slot = j % STAGES
                    ws.issue_page(k_desc, v_desc, k_smem, v_smem, ready, empty, slot,
                                  ((j // STAGES) & 1) ^ 1, page * PAGE, kv_col)  # fmt: skip
                    j += 1

    @gluon.jit
    def _consumer(k_smem, v_smem, ready, empty, done, free, acc_smem, ml_smem, q_ptr,
                  seq_lens_ptr, num_items, kv_heads, num_heads, group, s_scale,
                  C: gl.constexpr, NC: gl.constexpr, PAGE: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DT: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                      instr_shape=[16, 8])  # fmt: skip
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_op))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_op))
        toks = gl.arange(0, PAGE, layout=gl.SliceLayout(0, mma))
        j = 0  # the ring's running page counter at the item's first page
        t = 0  # items done by this program
        # The next item's length and query rows are loaded while this item's pages stream.
        step = gl.num_programs(0)
        q_offs = rows[:, None] * HEAD_DIM + cols[None, :]
        q_mask = (rows < group)[:, None]
        w0 = gl.program_id(0)
        seq_len = gl.load(seq_lens_ptr + w0 // kv_heads)
        q_row0 = ((w0 // kv_heads).to(gl.int64) * num_heads + (w0 % kv_heads) * group) * HEAD_DIM
        q = gl.load(q_ptr + q_row0 + q_offs, mask=q_mask, other=0.0)
        for w in range(gl.program_id(0), num_items, step):
            pages = gl.cdiv(seq_len, PAGE)
            cur_len = seq_len
            nxt = gl.minimum(w + step, num_items - 1)
            seq_len = gl.load(seq_lens_ptr + nxt // kv_heads)
            q_rown = (
                (nxt // kv_heads).to(gl.int64) * num_heads + (nxt % kv_heads) * group
            ) * HEAD_DIM
            q_next = gl.load(q_ptr + q_rown + q_offs, mask=q_mask, other=0.0)
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
            l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, mma))
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, mma)
            # this consumer's pages of the item: those whose running count is C mod NC
            for p in range((C - j % NC + NC) % NC, pages, NC):
                jj = j + p
                slot = jj % STAGES
                m_i, l_i, acc = ws.page_step(k_smem, v_smem, ready, empty, slot,
                                             (jj // STAGES) & 1, q, m_i, l_i, acc, s_scale,
                                             p * PAGE, toks, cur_len, PAGE, DT)  # fmt: skip
            # the item's state into buffer t % 2 once the folder has read its last contents
            b = t % 2
            mbarrier.wait(free.index(b), ((t // 2) & 1) ^ 1)
            acc_smem.index(b * NC + C).store(acc)
            ml_smem.index(2 * (b * NC + C)).store(m_i)
            ml_smem.index(2 * (b * NC + C) + 1).store(l_i)
            mbarrier.arrive(done.index(b))
            j += pages
            t += 1
            q = q_next

    @gluon.jit
    def _folder(done, free, acc_smem, ml_smem, out_ptr, num_items, kv_heads, num_heads, group,
                NC: gl.constexpr, HEAD_DIM: gl.constexpr, DT: gl.constexpr):  # fmt: skip
        # The default partition (four warps): each item's four states -> its output rows.
        fold: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
        mlv: gl.constexpr = gl.SliceLayout(1, fold)
        rows = gl.arange(0, BLOCK_M, layout=mlv)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, fold))
        row_ok = rows < group
        t = 0
        for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
            b = t % 2
            mbarrier.wait(done.index(b), (t // 2) & 1)
            m_all = gl.full([BLOCK_M], float("-inf"), gl.float32, mlv)
            for c in gl.static_range(NC):
                m_all = gl.maximum(m_all, ml_smem.index(2 * (b * NC + c)).load(mlv))
            m_safe = gl.where(m_all == float("-inf"), 0.0, m_all)
            l_all = gl.zeros([BLOCK_M], gl.float32, mlv)
            o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, fold)
            for c in gl.static_range(NC):
                wgt = gl.exp2(ml_smem.index(2 * (b * NC + c)).load(mlv) - m_safe)
                l_all += wgt * ml_smem.index(2 * (b * NC + c) + 1).load(mlv)
                o += wgt[:, None] * acc_smem.index(b * NC + c).load(fold)
            mbarrier.arrive(free.index(b))
            o = o / gl.where(l_all > 0, l_all, 1.0)[:, None]
            seq = w // kv_heads
            head = (w % kv_heads) * group + rows
            o_off = (seq.to(gl.int64) * num_heads + head) * HEAD_DIM
            gl.store(out_ptr + o_off[:, None] + cols[None, :], o.to(DT), mask=row_ok[:, None])
            t += 1

    @gluon.jit
    def _ws_persistent_kernel(q_ptr, k_desc, v_desc, out_ptr, bt_ptr, seq_lens_ptr,
                              stride_bt_row, num_heads, group, kv_heads, num_items, s_scale,
                              PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                              NC: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                              PDL: gl.constexpr):  # fmt: skip
        gluon_grid_wait(PDL)
        dt: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dt, [STAGES, PAGE, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dt, [STAGES, PAGE, HEAD_DIM], v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for s in gl.static_range(2):
            mbarrier.init(done.index(s), count=NC)
            mbarrier.init(free.index(s), count=1)
        fence_async_shared()
        acc_smem = gl.allocate_shared_memory(
            gl.float32, [2 * NC, BLOCK_M, HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        )
        ml_smem = gl.allocate_shared_memory(
            gl.float32, [4 * NC, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        )
        gl.warp_specialize(
            [
                (_folder, (done, free, acc_smem, ml_smem, out_ptr, num_items, kv_heads,
                           num_heads, group, NC, HEAD_DIM, dt)),
                (_producer, (k_desc, v_desc, k_smem, v_smem, ready, empty, bt_ptr,
                             seq_lens_ptr, stride_bt_row, num_items, kv_heads, PAGE, HEAD_DIM,
                             STAGES)),
                (_consumer, (k_smem, v_smem, ready, empty, done, free, acc_smem, ml_smem, q_ptr,
                             seq_lens_ptr, num_items, kv_heads, num_heads, group, s_scale, 0,
                             NC, PAGE, HEAD_DIM, STAGES, dt)),
                (_consumer, (k_smem, v_smem, ready, empty, done, free, acc_smem, ml_smem, q_ptr,
                             seq_lens_ptr, num_items, kv_heads, num_heads, group, s_scale, 1,
                             NC, PAGE, HEAD_DIM, STAGES, dt)),
                (_consumer, (k_smem, v_smem, ready, empty, done, free, acc_smem, ml_smem, q_ptr,
                             seq_lens_ptr, num_items, kv_heads, num_heads, group, s_scale, 2,
                             NC, PAGE, HEAD_DIM, STAGES, dt)),
                (_consumer, (k_smem, v_smem, ready, empty, done, free, acc_smem, ml_smem, q_ptr,
                             seq_lens_ptr, num_items, kv_heads, num_heads, group, s_scale, 3,
                             NC, PAGE, HEAD_DIM, STAGES, dt)),
            ],
            [1] * (NC + 1),
            [40] + [CONSUMER_REGS] * NC,
        )  # fmt: skip


def stages_for(page: int, head_dim: int, element_size: int) -> int:
    """Ring slots for a page shape: as many as RING_BYTES holds (at most MAX_STAGES), a multiple
    of the consumers (12 for 16-token pages of head_dim 128 in bf16, 8 for 32-token ones)."""
    n = min(MAX_STAGES, RING_BYTES // (2 * page * head_dim * element_size))
    return n - n % ws.CONSUMERS


def decode(query, key_cache, value_cache, block_tables, seq_lens, s_scale, out) -> torch.Tensor:
    """Runs the kernel (the caller checked `attention_ws.call_reason` and `persistent`) into out
    with the module's launch shape; s_scale: the softmax scale times log2(e)."""
    stages = stages_for(key_cache.shape[1], query.shape[2], query.element_size())
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, s_scale, out,
                   _sm_count(query.device), stages, CONSUMER_REGS, MAX_REGS,
                   use_pdl(query.device))  # fmt: skip


def persistent_decode(query, key_cache, value_cache, block_tables, seq_lens, scale,
                      stages: int | None = None, consumer_regs: int = CONSUMER_REGS,
                      maxnreg: int | None = MAX_REGS, grid: int | None = None):  # fmt: skip
    """Probe entry (bench scripts): another launch shape or grid size, no PDL; query [num_seqs,
    num_heads, head_dim] contiguous, one token per sequence."""
    if query.shape[0] != seq_lens.shape[0] or not query.is_contiguous():
        raise ValueError("one contiguous query token per sequence")
    if stages is None:
        stages = stages_for(key_cache.shape[1], query.shape[2], query.element_size())
    if stages % ws.CONSUMERS:
        raise ValueError(f"stages={stages} must be a multiple of {ws.CONSUMERS} (the consumers)")
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, scale * ws.LOG2E,
                   torch.empty_like(query), grid or _sm_count(query.device), stages,
                   consumer_regs, maxnreg, False)  # fmt: skip


def _launch(query, key_cache, value_cache, block_tables, seq_lens, s_scale, out, grid, stages,
            consumer_regs, maxnreg, pdl) -> torch.Tensor:  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    k_desc, v_desc = ws.kv_descriptors(query, key_cache, value_cache)
    items = num_tokens * kv_heads
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    _ws_persistent_kernel[(max(1, min(items, grid)),)](
        query, k_desc, v_desc, out, bt, seq_lens, bt.stride(0), num_heads, num_heads // kv_heads,
        kv_heads, items, s_scale, PAGE=key_cache.shape[1], HEAD_DIM=head_dim, STAGES=stages,
        NC=ws.CONSUMERS, CONSUMER_REGS=consumer_regs, PDL=pdl, num_warps=4,
        **({"maxnreg": maxnreg} if maxnreg else {}), **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out
