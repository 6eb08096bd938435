"""Multi-LoRA deltas for steps of more than `lora.MAX_TOKENS` tokens (wide decode batches,
prefill chunks): the step's tokens sorted by slot, then tensor-core dots over blocks of sorted
tokens, so that a block reads each of its slots' A and B once (the idea of punica's / vLLM's
sgmv kernels; written here).

Layout: as `backends/triton/lora.py` (a [P S R, K], b [N, P S R], slot -1: no adapter).

- `sort_tokens`: torch.sort(token_slots, stable) gives the slots in order and each sorted
  position's token, on the device (no host sync, fixed shapes: CUDA graphs capture it); once a
  step when the caller passes the step's cache (`LoRABatch.cache`). Tokens of slot -1 sort first.
- shrink, grid (T / BLOCK_T, P, K splits): the BLOCK_T sorted positions of a block hold one
  range of slots [first, last] (usually one or two); for each slot s of the range that the
  block holds, h[i] += x[order[i], split] A_ps[:, split]^T with the rows of other slots masked
  to zero ([BLOCK_T, BLOCK_K] x [BLOCK_K, R] dots, fp32 accumulation), into a workspace
  [P, splits, T, R] by sorted position (no atomics: the expand kernel sums the splits).
- expand, grid (T / BLOCK_T, N / BLOCK_N): for each part p in the row block, h_p = the sum of
  its splits (fp32, in split order) rounded to y's dtype; for each slot s of the token block,
  delta += (h_p with other slots' rows zero) B_ps[n]^T ([BLOCK_T, R] x [R, BLOCK_N]); then
  y[order[i], n] = round(y + delta) for rows of a slot. Rows of slot -1 are never written.

Math: `Backend.lora_add`'s reference with one more rounding: h is rounded to y's dtype (round to
nearest even) before the expand dot, as tl.dot takes both operands in one dtype and bf16 / fp16
keep the tensor cores' rate (an fp32 B would need IEEE fp32 dots, or TF32). That adds at most
u sum_r |h_r| |B_nr| to an output (u: the dtype's unit roundoff), one of the two roundings
`tests/conformance/cases.py::check_lora_add` allows (the GEMM path makes both); the fp32 sums
run in another order (K in splits and tiles, then the splits in order). Under
TRITON_INTERPRET=1 the dots run in fp32 (the interpreter's bf16 `tl.dot` is wrong) on the same
rounded h, so tests on the CPU see the GPU's roundings. Block sizes and splits: chosen from
tile budgets, not tuned; H200 timings against the GEMM path: not measured on a GPU yet
(`bench/lora_ops.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import cast_rtne, interpreting

# Shrink programs to aim for with the K splits (about two per SM of a 132-SM H200); a constant,
# so the sums' order (and the bits) do not depend on the device.
TARGET_PROGRAMS = 256
MAX_SPLITS = 16


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    # acc + a @ b in fp32: the operands' own dtype on a GPU (tensor cores, fp32 accumulation),
    # fp32 under the interpreter (whose bf16 dot is wrong; bf16 / fp16 values are exact in fp32).
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _lora_shrink_wide_kernel(
    x_ptr, a_ptr, sorted_slots_ptr, order_ptr, ws_ptr, stride_x_row, stride_a_row, n_tokens,
    n_k, k_per_split, NUM_SLOTS, RANK,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    grid_wait(PDL)
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # sorted positions
    p = tl.program_id(1)
    j = tl.program_id(2)
    i_ok = i < n_tokens
    slot = tl.load(sorted_slots_ptr + i, mask=i_ok, other=-1)
    tok = tl.load(order_ptr + i, mask=i_ok, other=0)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_x_row
    r = tl.arange(0, BLOCK_R)
    r_ok = r < RANK
    k_start = j * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, n_k)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # h: [BLOCK_T, R]
    # Sorted, so the block's slots are one range; slots of the range it lacks are skipped.
    first = tl.min(tl.where(slot >= 0, slot, NUM_SLOTS))
    last = tl.max(slot)
    for s in range(first, last + 1):
        of_s = slot == s
        if tl.max(of_s.to(tl.int32)) > 0:
            a_rows = a_ptr + ((p * NUM_SLOTS + s) * RANK + r).to(tl.int64)[:, None] * stride_a_row
            for k0 in range(k_start, k_stop, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < k_stop
                # Rows of other slots load as zeros: they add exact zeros to their h.
                xv = tl.load(x_rows + k[None, :], mask=of_s[:, None] & k_ok[None, :], other=0.0)
                av = tl.load(a_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                acc = _dot(xv, tl.trans(av), acc, INTERPRET)
    row = ((p * tl.num_programs(2) + j) * n_tokens + i).to(tl.int64)
    tl.store(ws_ptr + row[:, None] * BLOCK_R + r[None, :], acc, mask=i_ok[:, None])


@triton.jit
def _block_h(ws_ptr, p, i, i_ok, n_tokens, n_splits, BLOCK_T: tl.constexpr,
             BLOCK_R: tl.constexpr):  # fmt: skip
    # The block's h for part p: its K splits summed in order, [BLOCK_T, BLOCK_R] fp32.
    r = tl.arange(0, BLOCK_R)
    h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for j in range(n_splits):
        row = ((p * n_splits + j) * n_tokens + i).to(tl.int64)
        h += tl.load(ws_ptr + row[:, None] * BLOCK_R + r[None, :], mask=i_ok[:, None], other=0.0)
    return h


@triton.jit
def _lora_expand_wide_kernel(
    y_ptr, b_ptr, sorted_slots_ptr, order_ptr, ws_ptr, stride_y_row, stride_b_row, n_tokens,
    n_out, start1, start2, n_splits, NUM_SLOTS, RANK,
    PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    grid_wait(PDL)
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # sorted positions
    i_ok = i < n_tokens
    slot = tl.load(sorted_slots_ptr + i, mask=i_ok, other=-1)
    last = tl.max(slot)
    if last >= 0:  # else no row of the block has an adapter: nothing to write
        first = tl.min(tl.where(slot >= 0, slot, NUM_SLOTS))
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_out
        part = (n >= start1).to(tl.int32) + (n >= start2).to(tl.int32)  # [BLOCK_N]
        r = tl.arange(0, BLOCK_R)
        r_ok = r < RANK
        b_rows = b_ptr + n.to(tl.int64)[:, None] * stride_b_row
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)  # delta: [BLOCK_T, BLOCK_N]
        for p in tl.static_range(PARTS):
            in_p = n_ok & (part == p)
            if tl.max(in_p.to(tl.int32)) > 0:
                h = _block_h(ws_ptr, p, i, i_ok, n_tokens, n_splits, BLOCK_T, BLOCK_R)
                h = cast_rtne(h, y_ptr.dtype.element_ty, INTERPRET)  # the dot's operand dtype
                for s in range(first, last + 1):
                    of_s = slot == s
                    if tl.max(of_s.to(tl.int32)) > 0:
                        cols = (p * NUM_SLOTS + s) * RANK + r
                        bv = tl.load(b_rows + cols[None, :], mask=in_p[:, None] & r_ok[None, :],
                                     other=0.0)  # fmt: skip
                        hs = tl.where(of_s[:, None], h, tl.zeros_like(h))
                        acc = _dot(hs, tl.trans(bv), acc, INTERPRET)
        tok = tl.load(order_ptr + i, mask=i_ok, other=0)
        y_rows = y_ptr + tok.to(tl.int64)[:, None] * stride_y_row + n[None, :]
        write = (slot >= 0)[:, None] & n_ok[None, :]
        yv = tl.load(y_rows, mask=write, other=0.0).to(tl.float32)
        tl.store(y_rows, cast_rtne(yv + acc, y_ptr.dtype.element_ty, INTERPRET), mask=write)


def sort_tokens(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the slots sorted, int32 [T]; each sorted position's token, int64 [T]), stable."""
    sorted_slots, order = torch.sort(token_slots, stable=True)
    return sorted_slots, order


def block_sizes(tokens: int, rank: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_K, BLOCK_N) for a step of `tokens` at `rank`. Tile budgets, not
    tuned: the h and delta accumulators at most 4K / 8K fp32 values (larger ranks get fewer
    rows), an A or B tile at most 4K / 8K values; tl.dot needs 16 or more each way."""
    block_r = max(16, triton.next_power_of_2(rank))
    block_t = 16 if tokens <= 64 else 32 if tokens <= 256 else 64
    block_t = min(block_t, max(16, 4096 // block_r))
    block_k = max(16, min(128, 4096 // block_r))
    block_n = max(16, min(128, 8192 // block_r))
    return block_t, block_r, block_k, block_n


def lora_add_wide(x, y, a, b, sorted_slots: torch.Tensor, order: torch.Tensor, num_slots: int,
                  rank: int, parts) -> torch.Tensor:  # fmt: skip
    """y += each token's delta in place (`Backend.lora_add`) by the sorted block kernels;
    (sorted_slots, order) from `sort_tokens`; the caller checked `lora.unsupported`."""
    t, k = x.shape
    n, n_parts = y.shape[1], len(parts)
    block_t, block_r, block_k, block_n = block_sizes(t, rank)
    token_blocks = triton.cdiv(t, block_t)
    splits = min(MAX_SPLITS, max(1, TARGET_PROGRAMS // (token_blocks * n_parts)))
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    ws = torch.empty(n_parts, splits, t, block_r, dtype=torch.float32, device=x.device)
    interpret = interpreting()
    _lora_shrink_wide_kernel[(token_blocks, n_parts, splits)](
        x, a, sorted_slots, order, ws, x.stride(0), a.stride(0), t, k, per_split, num_slots, rank,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k, INTERPRET=interpret, num_warps=4,
        num_stages=2, **pdl_args(x.device),
    )  # fmt: skip
    start1 = parts[1][0] if n_parts > 1 else n
    start2 = parts[2][0] if n_parts > 2 else n
    _lora_expand_wide_kernel[(token_blocks, triton.cdiv(n, block_n))](
        y, b, sorted_slots, order, ws, y.stride(0), b.stride(0), t, n, start1, start2, splits,
        num_slots, rank, PARTS=n_parts, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n,
        INTERPRET=interpret, num_warps=4, **pdl_args(x.device),
    )  # fmt: skip
    return y
