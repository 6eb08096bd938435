"""A warp-specialized paged decode attention kernel for NVIDIA sm_90 and newer (Gluon).

One program per (KV head, sequence, split): the default partition (four warps; one thread
issues) walks the sequence's pages and issues one TMA copy of each page's K and V rows
([page_size, head_dim] of this KV head, 128-byte swizzled) into a ring of STAGES shared-memory
slots, each guarded by a "ready" mbarrier (the copies' bytes) and an "empty" one (its consumer has
read it); CONSUMERS worker partitions (one warp each) take the pages round-robin, each with its
own online softmax (m, l, acc) over its pages: S = Q K^T and O += P V on mma.sync (m16n8k16), the
query group's heads as the 16 rows, so no warp waits on another's reductions. At the end the
consumers leave their (m, l, acc) in shared memory and the default partition folds them into the
output (or a split's partial for `attention_decode._reduce_kernel`). Under PDL the default
partition waits for the previous kernel before the region starts (the workers start after it).

Scope (`call_reason` checks it): bf16 / fp16 query and cache, head_dim 64 or 128, pages of 16
or 32 tokens, at most 16 query heads per KV head, one query token per sequence, no sliding window,
soft-cap or FP8 cache. `attention_decode._decode` takes it there unless HAL_ATTN_WS=0, and
`route` sends wide batches (more programs than SMs) and long whole ranges to the persistent
variant (`attention_ws_persistent`, one program per SM walking many (sequence, KV head) items).

H200 (2026-11-29, thirtieth session; graph replays, L2 flushed, us, against SDPA on contiguous
KV and the Triton kernel in the same run): 1 x 512 13.38 / 13.86 / 14.56, 4 x 512 13.46 / 14.61
/ 15.44, 16 x 512 16.03 / 16.59 / 18.16, 16 x 1024 23.90 / 23.86 / 25.50, 1 x 1024 (16 splits)
14.64 / 19.89 / 16.05, 4 x 8192 (8 splits) 44.26 / 102.24 / 47.30 (docs/benchmarks.md).
"""

from __future__ import annotations

import os

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 names the TMA load async_copy_global_to_shared; later releases async_load
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

from backends.triton.pdl import _sm90_or_newer, gluon_grid_wait, use_pdl
from backends.triton.quant import interpreting

ENABLED = os.environ.get("HAL_ATTN_WS", "1") != "0"
PERSISTENT_ENABLED = os.environ.get("HAL_ATTN_WS_PERSISTENT", "1") != "0"
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
PAGE_SIZES = (16, 32)
MAX_GROUP = 16
# Launch shape, H200 sweep (thirtieth session): 8 ring slots, consumers at 168 registers and the
# kernel capped at 128 a thread, so two programs fit an SM (0.93-1.04x the 232-register,
# one-per-SM build at 14 shapes; 4 slots were 0.7-0.9x: each consumer then has one page in flight).
STAGES = 8
CONSUMERS = 4
CONSUMER_REGS = 168
MAX_REGS = 128
# Split-KV for small batches (no split below 64 pages: the combine's launch costs more): as many
# splits as fill two programs per SM, each at least MIN_SPLIT_PAGES pages. H200: 1 x 1024 16
# splits 14.6 us against 18.5 whole, 4 x 1024 8 splits 17.6 / 19.3, 4 x 512 8 splits 15.6 / 13.5.
MIN_SPLIT_PAGES = 4
SPLIT_MIN_PAGES = 64
MAX_SPLITS = 128
# The persistent kernel from this many tokens when not split (H200, thirty-first session: 16 x
# 4096 / 8192 / 32768 67.3 / 125.2 / 471.7 us against this kernel's 68.0 / 128.3 / 483.3; at 16 x
# 512 / 1024 this one is 4-6% faster) and always past one program per SM (64 x 512 40.1 against
# the Triton kernel's 40.3, 256 x 1024 247.4 / 251.1).
PERSISTENT_MIN_TOKENS = 4096
# HAL_ATTN_WS_EARLY (on; =0 off): under PDL a program reads its sequence's length and block-table
# entries and issues the TMA copies of its pages before the wait for the kernel before it, all
# but the page that holds the step's own token (position seq_len - 1), which waits; the consumers
# wait before reading the query and the default partition before its stores. Right because the
# kernels that may still run when this one starts are the qkv GEMM and the rotary + KV write
# after it (which lets this kernel start early: rotary.EARLY_TRIGGER), and they write only this
# step's query and its own tokens' K / V slots; the lengths and block tables are copied from the
# host before the step, the other pages hold tokens of earlier steps, and a page shared between
# sequences (prefix caching) is full, so never written again. 2 x H200, TP=2 batch-1 decode
# alternated in one call (thirty-fourth session): 2.60 / 2.61 -> 2.58 / 2.58 ms (with the combine
# reading its lengths early too, EARLY_META), 2.54 / 2.55 with the rotary kernel's early trigger.
EARLY_PAGES = os.environ.get("HAL_ATTN_WS_EARLY", "1") != "0"
# Set (to the error) when the kernel failed to compile with this Triton: the decode path then
# keeps the Triton kernel, with the reason logged once (attention_decode._decode).
BROKEN: str | None = None


if HAVE_GLUON:
    BLOCK_M = gl.constexpr(16)  # mma.sync rows: the group's heads, padded

    @gluon.jit
    def _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, hi, early_end,
                  kv_col, PAGE: gl.constexpr, STAGES: gl.constexpr, EARLY: gl.constexpr,
                  PDL: gl.constexpr):  # fmt: skip
        # Pages lo .. hi - 1 of the sequence into the ring, slot j % STAGES for the j-th; the
        # page's block-table entry loads before the wait for its slot. EARLY: the pages before
        # early_end (the page being written this step) go before the PDL wait, the rest after.
        mid = lo
        if EARLY:
            mid = gl.maximum(gl.minimum(hi, early_end), lo)
            _issue_pages(k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, lo, mid,
                         kv_col, PAGE, STAGES)  # fmt: skip
            gluon_grid_wait(PDL)
        _issue_pages(k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, mid, hi,
                     kv_col, PAGE, STAGES)  # fmt: skip

    @gluon.jit
    def _issue_pages(k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, first, end,
                     kv_col, PAGE: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        # Pages first .. end - 1 (the ring counts from lo).
        for i in range(first, end):
            page = gl.load(bt_row_ptr + i)
            j = i - lo
            slot = j % STAGES
            issue_page(k_desc, v_desc, k_smem, v_smem, ready, empty, slot, ((j // STAGES) & 1) ^ 1,
                       page * PAGE, kv_col)  # fmt: skip

    @gluon.jit
    def issue_page(k_desc, v_desc, k_smem, v_smem, ready, empty, slot, phase, row, kv_col):
        # The producer's step: once ring slot `slot` is free (phase), one TMA copy each of the
        # page's K and V rows (row .. row + page - 1, this KV head's columns) into it, landing on
        # its "ready" barrier. Shared with the persistent kernel (attention_ws_persistent).
        mbarrier.wait(empty.index(slot), phase)
        bar = ready.index(slot)
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
        _tma_load(k_desc, [row, kv_col], bar, k_smem.index(slot))
        _tma_load(v_desc, [row, kv_col], bar, v_smem.index(slot))

    @gluon.jit
    def page_step(k_smem, v_smem, ready, empty, slot, phase, q, m_i, l_i, acc, s_scale, start,
                  toks, seq_len, PAGE: gl.constexpr, DT: gl.constexpr):  # fmt: skip
        # One consumer's step over the page in ring slot `slot` (once its copies landed: phase):
        # S = Q K^T scaled, tokens start + toks from seq_len on masked, the online softmax's
        # (m, l, acc) updated with O += P V; the slot is released as soon as K and V are in
        # registers. Shared with the persistent kernel (attention_ws_persistent).
        mma: gl.constexpr = q.type.layout.parent
        b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        mbarrier.wait(ready.index(slot), phase)
        kt = k_smem.index(slot).permute((1, 0)).load(b_op)  # [HEAD_DIM, PAGE]
        v = v_smem.index(slot).load(b_op)  # [PAGE, HEAD_DIM]
        mbarrier.arrive(empty.index(slot))
        s = mma_v2(q, kt, gl.zeros([BLOCK_M, PAGE], gl.float32, mma)) * s_scale
        s = gl.where((start + toks < seq_len)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        p = gl.exp2(s - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = mma_v2(gl.convert_layout(p.to(DT), q.type.layout), v, acc)
        return m_new, l_i, acc

    @gluon.jit
    def _consumer(k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                  seq_len, lo, hi, s_scale, C: gl.constexpr, NC: gl.constexpr,
                  PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  DT: gl.constexpr, EARLY: gl.constexpr, PDL: gl.constexpr):  # fmt: skip
        if EARLY:  # the query is the kernel before's output
            gluon_grid_wait(PDL)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                      instr_shape=[16, 8])  # fmt: skip
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
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
            m_i, l_i, acc = page_step(k_smem, v_smem, ready, empty, slot, (j // STAGES) & 1, q,
                                      m_i, l_i, acc, s_scale, i * PAGE, toks, seq_len, PAGE,
                                      DT)  # fmt: skip
        acc_smem.index(C).store(acc)
        ml_smem.index(2 * C).store(m_i)
        ml_smem.index(2 * C + 1).store(l_i)

    @gluon.jit
    def _ws_decode_kernel(q_ptr, k_desc, v_desc, out_ptr, part_out_ptr, part_lse_ptr, bt_ptr,
                          seq_lens_ptr, stride_bt_row, num_heads, group, s_scale, num_splits,
                          min_split_pages, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                          STAGES: gl.constexpr, NC: gl.constexpr, SPLIT: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, EARLY: gl.constexpr,
                          PDL: gl.constexpr):  # fmt: skip
        # Without EARLY the default partition's warps wait here before any read and the workers
        # start after; with it (see EARLY_PAGES) every partition waits where it needs to.
        if not EARLY:
            gluon_grid_wait(PDL)
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
        fence_async_shared()  # the initialised barriers visible to the TMA unit
        acc_smem = gl.allocate_shared_memory(
            gl.float32, [NC, BLOCK_M, HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        )
        ml_smem = gl.allocate_shared_memory(
            gl.float32, [2 * NC, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        )

        q_row_ptr = q_ptr + (seq.to(gl.int64) * num_heads + kv_head * group) * HEAD_DIM
        bt_row_ptr = bt_ptr + seq.to(gl.int64) * stride_bt_row
        gl.warp_specialize(
            [
                (_producer, (k_desc, v_desc, k_smem, v_smem, ready, empty, bt_row_ptr, lo, hi,
                             (seq_len - 1) // PAGE, kv_head * HEAD_DIM, PAGE, STAGES, EARLY,
                             PDL)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 0, NC, PAGE, HEAD_DIM, STAGES, dt, EARLY,
                             PDL)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 1, NC, PAGE, HEAD_DIM, STAGES, dt, EARLY,
                             PDL)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 2, NC, PAGE, HEAD_DIM, STAGES, dt, EARLY,
                             PDL)),
                (_consumer, (k_smem, v_smem, ready, empty, acc_smem, ml_smem, q_row_ptr, group,
                             seq_len, lo, hi, s_scale, 3, NC, PAGE, HEAD_DIM, STAGES, dt, EARLY,
                             PDL)),
            ],
            [1] * NC,
            [CONSUMER_REGS] * NC,
        )  # fmt: skip
        # fold the consumers' states (the default partition's four warps): rows = the group's
        # heads, columns = head_dim
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


def device_reason(cc_ok: bool) -> str | None:
    """Why no call on this device can take the kernel (None when some can), for `hal info`:
    cc_ok says whether the device has compute capability 9.0 or newer (TMA)."""
    if not ENABLED:
        return "HAL_ATTN_WS=0"
    if BROKEN is not None:
        return f"the kernel did not build here ({BROKEN})"
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if torch.version.hip is not None or interpreting():
        return "not an NVIDIA GPU (or the interpreter)"
    return None if cc_ok else "compute capability below 9.0 (no TMA)"


def call_reason(query, key_cache, value_cache, num_seqs: int, sliding_window, soft_cap,
                kv_scale, max_query_len) -> str | None:  # fmt: skip
    """Why this decode call cannot take the warp-specialized kernels (None when it can; then
    `route` picks this module's, the persistent one or, for wide batches with the persistent one
    switched off, the Triton kernel): shapes, dtypes and hints only (no
    tensor values), so the choice is the same under CUDA graph capture."""
    if query.device.type != "cuda":
        return "not a CUDA tensor"
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    why = device_reason(_sm90_or_newer(index))
    if why is not None:
        return why
    num_tokens, num_heads, head_dim = query.shape
    _, page, kv_heads, _ = key_cache.shape
    if query.dtype not in (torch.bfloat16, torch.float16) or key_cache.dtype != query.dtype:
        return f"query {query.dtype} / cache {key_cache.dtype}: needs one of bf16, fp16 for both"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim}: the kernel takes {HEAD_DIMS}"
    if page not in PAGE_SIZES:
        return f"block_size {page}: the kernel takes {PAGE_SIZES}"
    if num_heads // kv_heads > MAX_GROUP:
        return f"{num_heads // kv_heads} query heads per KV head: at most {MAX_GROUP}"
    if max_query_len != 1 or num_tokens != num_seqs:
        return "not one query token per sequence (max_query_len hint 1, num_tokens == num_seqs)"
    if sliding_window or soft_cap or kv_scale not in (None, 1.0):
        return "sliding window, soft-cap or kv_scale"
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            return f"{name} is not contiguous and 16-byte aligned"
    return None


def num_splits(programs: int, max_kv_len: int, page: int, num_sms: int) -> int:
    """Split-KV factor from shapes alone: 1 unless the batch leaves most SMs idle and the
    longest range holds at least SPLIT_MIN_PAGES pages; then as many splits as make two
    programs per SM, each of at least MIN_SPLIT_PAGES pages (a shorter sequence uses fewer)."""
    pages = -(-max_kv_len // page)
    if 2 * programs > num_sms or pages < SPLIT_MIN_PAGES:
        return 1
    return max(1, min(2 * num_sms // programs, pages // MIN_SPLIT_PAGES, MAX_SPLITS))


def route(programs: int, max_kv_len: int, page: int, num_sms: int) -> str:
    """Which kernel a call the warp-specialized kernels take runs: "persistent"
    (attention_ws_persistent) past one (sequence, KV head) program per SM, or for an unsplit
    range of at least PERSISTENT_MIN_TOKENS tokens (one long range per program, where its deeper
    ring reads faster); else "ws" (this module's). With HAL_ATTN_WS_PERSISTENT=0 the wide
    batches keep the Triton kernel ("triton"; this one was 0.93-0.99x it there) and the long
    ranges this one."""
    whole = num_splits(programs, max_kv_len, page, num_sms) == 1
    if programs > num_sms or (whole and max_kv_len >= PERSISTENT_MIN_TOKENS):
        if PERSISTENT_ENABLED:
            return "persistent"
        return "triton" if programs > num_sms else "ws"
    return "ws"


def decode(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, s_scale,
           out, splits: int) -> torch.Tensor:  # fmt: skip
    """Runs the kernel (the caller checked `call_reason`) into out with the module's launch
    shape; s_scale: the softmax scale times log2(e)."""
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                   s_scale, out, splits, MIN_SPLIT_PAGES, STAGES, CONSUMER_REGS, MAX_REGS,
                   use_pdl(query.device))  # fmt: skip


def ws_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale,
                        num_splits=1, min_split_pages=1, stages=STAGES, consumer_regs=232,
                        maxnreg=None) -> torch.Tensor:  # fmt: skip
    """Probe entry (bench scripts): another launch shape and split count, no PDL; query
    [num_seqs, num_heads, head_dim] contiguous, one token per sequence."""
    if query.shape[0] != seq_lens.shape[0] or not query.is_contiguous():
        raise ValueError("one contiguous query token per sequence")
    qsl = torch.arange(seq_lens.shape[0] + 1, dtype=torch.int32, device=query.device)
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, qsl, scale * LOG2E,
                   torch.empty_like(query), num_splits, min_split_pages, stages, consumer_regs,
                   maxnreg, False)  # fmt: skip


def kv_descriptors(query, key_cache, value_cache):
    """TMA descriptors of the caches viewed [blocks x page, kv_heads x head_dim], one box a
    page of one KV head ([page, head_dim], 128-byte swizzle for 128-byte rows, else 64)."""
    blocks, page, kv_heads, head_dim = key_cache.shape
    wide = head_dim * query.element_size() >= 128
    lay = gl.NVMMASharedLayout(swizzle_byte_width=128 if wide else 64, element_bitwidth=16,
                               rank=2)  # fmt: skip
    rows, cols = blocks * page, kv_heads * head_dim
    return tuple(
        TensorDescriptor(c.view(rows, cols), [rows, cols], [cols, 1], [page, head_dim], lay)
        for c in (key_cache, value_cache)
    )


def _launch(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, s_scale,
            out, splits, min_split_pages, stages, consumer_regs, maxnreg, pdl):  # fmt: skip
    from backends.triton.attention_decode import EARLY_META, EARLY_TRIGGER, _reduce_kernel

    num_tokens, num_heads, head_dim = query.shape
    page, kv_heads = key_cache.shape[1:3]
    num_seqs = seq_lens.shape[0]
    k_desc, v_desc = kv_descriptors(query, key_cache, value_cache)
    if splits > 1:
        part_out = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32,
                               device=query.device)  # fmt: skip
        part_lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32,
                               device=query.device)  # fmt: skip
    else:
        part_out = part_lse = out
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    launch = {"launch_pdl": True} if pdl else {}
    _ws_decode_kernel[(kv_heads, num_seqs, splits)](
        query, k_desc, v_desc, out, part_out, part_lse, bt, seq_lens, bt.stride(0), num_heads,
        num_heads // kv_heads, s_scale, splits, min_split_pages, PAGE=page, HEAD_DIM=head_dim,
        STAGES=stages, NC=CONSUMERS, SPLIT=splits > 1, CONSUMER_REGS=consumer_regs,
        EARLY=EARLY_PAGES and pdl, PDL=pdl,
        num_warps=4, **({"maxnreg": maxnreg} if maxnreg else {}), **launch,
    )  # fmt: skip
    if splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, seq_lens, query_start_loc, out.stride(0), out.stride(1),
            num_heads, head_dim, splits, min_split_pages, 0, 1, 1.0, INTERPRET=False,
            EVEN_D=True, BLOCK_N=page, SPLITS_P2=triton.next_power_of_2(splits),
            HEAD_DIM_P2=head_dim, EARLY_META=EARLY_META, EARLY_TRIGGER=EARLY_TRIGGER, PDL=pdl,
            num_warps=4,
            **launch,
        )  # fmt: skip
    return out
