"""A warp-specialized paged decode attention kernel for NVIDIA sm_90 (Gluon), experimental.

One program per (KV head, sequence, split): a producer partition (one warp) walks the
sequence's pages and issues one TMA copy of each page's K and V rows ([page_size, head_dim] of
this KV head, 128-byte swizzled) into a ring of shared-memory slots, each guarded by a "ready"
mbarrier (the copies' bytes) and an "empty" one (its consumer has read it); NUM_CONSUMERS
consumer partitions (one warp each) take the pages round-robin, each with its own online softmax
(m, l, acc) over its pages: S = Q K^T and O += P V on mma.sync (m16n8k16), the query group's heads
as the 16 rows, so no warp waits on another's reductions. At the end the consumers leave their
(m, l, acc) in shared memory and the producer's warp folds them into the output (or a split's
partial for `attention_decode._reduce_kernel`).

Scope (the caller checks): bf16 / fp16 query and cache, head_dim 64 or 128, pages of 16 tokens,
at most 16 query heads per KV head, one query token per sequence, no sliding window or soft-cap.
"""

from __future__ import annotations

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634


if HAVE_GLUON:
    BLOCK_M = gl.constexpr(16)  # mma.sync rows: the group's heads, padded

    @gluon.jit
    def _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, hi,
                  kv_col, PAGE: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        # Pages lo .. hi - 1 of the sequence into the ring, slot j % STAGES for the j-th.
        for i in range(lo, hi):
            j = i - lo
            slot = j % STAGES
            mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
            page = gl.load(bt_row_ptr + i)
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [page * PAGE, kv_col], bar, k_smem.index(slot))
            tma.async_copy_global_to_shared(v_desc, [page * PAGE, kv_col], bar, v_smem.index(slot))

    @gluon.jit
    def _consumer(k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                  seq_len, lo, hi, s_scale, C: gl.constexpr, NC: gl.constexpr,
                  PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  DT: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                      instr_shape=[16, 8])  # fmt: skip
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_op))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_op))
        q = gl.load(q_row_ptr + rows[:, None] * HEAD_DIM + cols[None, :],
                    mask=(rows < group)[:, None], other=0.0)  # fmt: skip
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, mma))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, mma)
        toks = gl.arange(0, PAGE, layout=gl.SliceLayout(0, mma))
        for i in range(lo + C, hi, NC):
            j = i - lo
            slot = j % STAGES
            mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
            kt = k_smem.index(slot).permute((1, 0)).load(b_op)  # [HEAD_DIM, PAGE]
            v = v_smem.index(slot).load(b_op)  # [PAGE, HEAD_DIM]
            mbarrier.arrive(empty.index(slot))
            s = mma_v2(q, kt, gl.zeros([BLOCK_M, PAGE], gl.float32, mma)) * s_scale
            s = gl.where((i * PAGE + toks < seq_len)[None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            p = gl.exp2(s - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = mma_v2(gl.convert_layout(p.to(DT), a_op), v, acc)
            m_i = m_new
        acc_smem.index(C).store(acc)
        ml_smem.index(2 * C).store(m_i)
        ml_smem.index(2 * C + 1).store(l_i)

    @gluon.jit
    def _ws_decode_kernel(q_ptr, k_desc, v_desc, out_ptr, part_out_ptr, part_lse_ptr, bt_ptr,
                          seq_lens_ptr, stride_bt_row, num_heads, group, s_scale, num_splits,
                          min_split_pages, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                          STAGES: gl.constexpr, NC: gl.constexpr, SPLIT: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr):  # fmt: skip
        kv_head = gl.program_id(0)
        seq = gl.program_id(1)
        split = gl.program_id(2)
        dt: gl.constexpr = k_desc.dtype
        seq_len = gl.load(seq_lens_ptr + seq)
        # the split's pages, as _chunk_splits cuts them (tiles of one page)
        pages = gl.cdiv(seq_len, PAGE)
        per_split = gl.maximum(gl.cdiv(pages, num_splits), min_split_pages)
        used = gl.cdiv(pages, per_split)
        lo = split * per_split
        hi = gl.minimum(lo + per_split, pages)

        k_smem = gl.allocate_shared_memory(dt, [STAGES, PAGE, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dt, [STAGES, PAGE, HEAD_DIM], v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        acc_smem = gl.allocate_shared_memory(gl.float32, [NC, BLOCK_M, HEAD_DIM],
                                             gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        ml_smem = gl.allocate_shared_memory(gl.float32, [2 * NC, BLOCK_M],
                                            gl.SwizzledSharedLayout(1, 1, 1, order=[0]))

        q_row_ptr = q_ptr + (seq.to(gl.int64) * num_heads + kv_head * group) * HEAD_DIM
        bt_row_ptr = bt_ptr + seq.to(gl.int64) * stride_bt_row
        gl.warp_specialize(
            [
                (_producer, (k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, hi,
                             kv_head * HEAD_DIM, PAGE, STAGES)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 0, NC, PAGE, HEAD_DIM, STAGES, dt)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 1, NC, PAGE, HEAD_DIM, STAGES, dt)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 2, NC, PAGE, HEAD_DIM, STAGES, dt)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 3, NC, PAGE, HEAD_DIM, STAGES, dt)),
            ],  # fmt: skip
            [1] * NC,
            [CONSUMER_REGS] * NC,
        )
        # fold the consumers' states (the default partition's four warps): rows = heads of the group, cols = head_dim
        fold: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
        mlv: gl.constexpr = gl.SliceLayout(1, fold)
        m_all = gl.full([BLOCK_M], float("-inf"), gl.float32, mlv)
        for c in gl.static_range(NC):
            m_all = gl.maximum(m_all, ml_smem.index(2 * c).load(mlv))
        m_safe = gl.where(m_all == float("-inf"), 0.0, m_all)
        l_all = gl.zeros([BLOCK_M], gl.float32, mlv)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, fold)
        for c in gl.static_range(NC):
            w = gl.exp2(ml_smem.index(2 * c).load(mlv) - m_safe)
            l_all += w * ml_smem.index(2 * c + 1).load(mlv)
            o += w[:, None] * acc_smem.index(c).load(fold)
        seen = l_all > 0
        l_safe = gl.where(seen, l_all, 1.0)
        rows = gl.arange(0, BLOCK_M, layout=mlv)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, fold))
        head = kv_head * group + rows
        row_ok = rows < group
        token = seq.to(gl.int64)
        o = o / l_safe[:, None]
        o_off = (token * num_heads + head) * HEAD_DIM
        if SPLIT:
            # partials of the splits that hold some of the range (when more than one does);
            # a range one split holds is written whole by split 0
            part = (token * num_heads + head) * num_splits + split
            part_ok = row_ok & (split < used) & (used > 1)
            lse = gl.where(seen, m_all + gl.log2(l_safe), float("-inf"))
            gl.store(part_lse_ptr + part, lse, mask=part_ok)
            gl.store(part_out_ptr + part[:, None] * HEAD_DIM + cols[None, :], o,
                     mask=part_ok[:, None])  # fmt: skip
            whole = row_ok & (used <= 1) & (split == 0)
            gl.store(out_ptr + o_off[:, None] + cols[None, :], o.to(dt), mask=whole[:, None])
        else:
            gl.store(out_ptr + o_off[:, None] + cols[None, :], o.to(dt), mask=row_ok[:, None])


def ws_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale,
                        num_splits=1, min_split_pages=1, stages=8, consumers=4,
                        consumer_regs=232, maxnreg=None) -> torch.Tensor:  # fmt: skip
    """Decode attention (one query token per sequence) on the warp-specialized kernel: query
    [num_seqs, num_heads, head_dim] contiguous, caches [blocks, 16, kv_heads, head_dim]."""
    from backends.triton.attention_decode import _reduce_kernel

    num_tokens, num_heads, head_dim = query.shape
    blocks, page, kv_heads, _ = key_cache.shape
    group = num_heads // kv_heads
    num_seqs = seq_lens.shape[0]
    if consumers != 4:
        raise ValueError("consumers: the kernel is written for 4")
    if num_tokens != num_seqs or not query.is_contiguous():
        raise ValueError("one contiguous query token per sequence")
    out = torch.empty_like(query)
    lay = gl.NVMMASharedLayout(swizzle_byte_width=128 if head_dim * query.element_size() >= 128
                               else 64, element_bitwidth=16, rank=2)  # fmt: skip
    descs = [
        TensorDescriptor(c.view(blocks * page, kv_heads * head_dim), [blocks * page,
                         kv_heads * head_dim], [kv_heads * head_dim, 1], [page, head_dim], lay)
        for c in (key_cache, value_cache)
    ]  # fmt: skip
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=query.device)  # fmt: skip
        part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32,
                               device=query.device)  # fmt: skip
    else:
        part_out = part_lse = out
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    _ws_decode_kernel[(kv_heads, num_seqs, num_splits)](
        query, descs[0], descs[1], out, part_out, part_lse, bt, seq_lens, bt.stride(0),
        num_heads, group, scale * LOG2E, num_splits, min_split_pages, PAGE=page,
        HEAD_DIM=head_dim, STAGES=stages, NC=consumers, SPLIT=num_splits > 1,
        CONSUMER_REGS=consumer_regs, num_warps=4, **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip
    if num_splits > 1:
        qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=query.device)
        _reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, seq_lens, qsl, out.stride(0), out.stride(1), num_heads,
            head_dim, num_splits, min_split_pages, 0, 1, 1.0, INTERPRET=False, EVEN_D=True,
            BLOCK_N=page, SPLITS_P2=triton.next_power_of_2(num_splits), HEAD_DIM_P2=head_dim,
            EARLY_META=False, EARLY_TRIGGER=False, PDL=False, num_warps=4,
        )  # fmt: skip
    return out
