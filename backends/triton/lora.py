"""Multi-LoRA deltas for decode-sized steps (`Backend.lora_add`): each token's own adapter, read
from its slot, in two kernels (vLLM's punica "shrink" and "expand" split; written here).

Layout (`engine.lora.LoRASlots`): a [P * S * R, K] stacks every part's A for every slot (part p,
slot s: rows (p S + s) R ...), b [N, P * S * R] holds part p's B in its output rows and slot
columns (zero elsewhere); token t has slot token_slots[t] (-1: none).

- shrink, grid (T, P, K splits): program (t, p, j) sums A_ps[:, K split j] x[t, K split j] in
  fp32 into its own row of a workspace [T, P, J, R] (no atomics: the splits are summed by
  the expand kernel). Only the token's own slot is read, never the other slots.
- expand, grid (N / BLOCK_N, T): for a token of a slot, h_p = the sum of its part p splits
  (fp32), then y[t, n] = round(y[t, n] + B_ps[n] . h_p) for the block's rows n (part p of row n).

Math: `hal.backend.Backend.lora_add`'s reference (h and the delta in fp32, y rounded once); the
sums run in another order (K in splits, then a tree over the splits), well inside the bf16/fp16
rounding of y. Each token reads its own slot's A and B, so the work grows with the step: the
CUDA backend sends steps of more than MAX_TOKENS to its GEMM path (`bench/lora_ops.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import cast_rtne, interpreting

MAX_TOKENS = 16  # steps of up to this many tokens (about where the GEMM path draws level: 32)
MAX_PARTS = 3  # q / k / v
# Output rows per expand program: 64 for steps of 1-2 tokens, 256 from 3 (one H200, one 8B
# layer's four projections, `bench/lora_ops.py`-style sweep of 64 / 128 / 256 rows x 4 / 8 / 16
# K splits: T = 1 15.3 / 16.9 us, T = 16 31.9 / 26.8 us; 16 splits best at every T).
BLOCK_N_FEW, BLOCK_N_MANY = 64, 256
MAX_SPLITS = 16  # K splits of the shrink (each summed by the expand kernel)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, slots_ptr, ws_ptr, stride_x_row, stride_a_row, n_k, k_per_split,
    NUM_SLOTS, RANK,
    PARTS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    grid_wait(PDL)
    t = tl.program_id(0)
    p = tl.program_id(1)
    j = tl.program_id(2)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < RANK
        rows = (p * NUM_SLOTS + slot) * RANK + r
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a_row
        x_row = x_ptr + t.to(tl.int64) * stride_x_row
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        k_start = j * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, n_k)
        for k0 in range(k_start, k_stop, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_stop
            xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            av = tl.load(a_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        tl.store(ws_ptr + ((t * PARTS + p) * SPLITS + j) * BLOCK_R + r, acc)


@triton.jit
def _part_h(ws_ptr, t, p: tl.constexpr, PARTS: tl.constexpr, SPLITS: tl.constexpr,
            SPLITS_P2: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    # Token t's h for part p: its K splits summed, [BLOCK_R] fp32 (one [splits, R] load).
    j = tl.arange(0, SPLITS_P2)
    base = ws_ptr + (t * PARTS + p) * SPLITS * BLOCK_R
    hs = tl.load(base + j[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :],
                 mask=(j < SPLITS)[:, None], other=0.0)  # fmt: skip
    return tl.sum(hs, axis=0)


@triton.jit
def _lora_expand_kernel(
    y_ptr, b_ptr, slots_ptr, ws_ptr, stride_y_row, stride_b_row, n_out,
    start1, start2, NUM_SLOTS, RANK,
    PARTS: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    grid_wait(PDL)
    t = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_out
        part = (n >= start1).to(tl.int32) + (n >= start2).to(tl.int32)  # [BLOCK_N]
        r = tl.arange(0, BLOCK_R)
        r_ok = r < RANK
        h = _part_h(ws_ptr, t, 0, PARTS, SPLITS, SPLITS_P2, BLOCK_R)[None, :]
        if PARTS > 1:
            h1 = _part_h(ws_ptr, t, 1, PARTS, SPLITS, SPLITS_P2, BLOCK_R)[None, :]
            h = tl.where((part == 1)[:, None], h1, h)
        if PARTS > 2:
            h2 = _part_h(ws_ptr, t, 2, PARTS, SPLITS, SPLITS_P2, BLOCK_R)[None, :]
            h = tl.where((part == 2)[:, None], h2, h)
        cols = (part[:, None] * NUM_SLOTS + slot) * RANK + r[None, :]
        b_rows = b_ptr + n.to(tl.int64)[:, None] * stride_b_row
        bv = tl.load(b_rows + cols, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        delta = tl.sum(bv.to(tl.float32) * h, axis=1)
        y_row = y_ptr + t.to(tl.int64) * stride_y_row + n
        yv = tl.load(y_row, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_row, cast_rtne(yv + delta, y_ptr.dtype.element_ty, INTERPRET), mask=n_ok)


def unsupported(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                token_slots: torch.Tensor, num_slots: int, rank: int,
                parts: tuple[tuple[int, int], ...]) -> str | None:  # fmt: skip
    """Why these kernels cannot take the call, else None."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        return f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [T, K] and [T, N]"
    t = x.shape[0]
    if t > MAX_TOKENS:
        return f"{t} tokens: the expand kernel takes at most {MAX_TOKENS}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x dtype {x.dtype} is not bfloat16 or float16"
    if not 1 <= len(parts) <= MAX_PARTS:
        return f"{len(parts)} parts: at most {MAX_PARTS}"
    edges = [0, *(e for p in parts for e in p), y.shape[1]]  # 0 = start 0, stop i = start i + 1
    if any(lo != hi for lo, hi in zip(edges[0::2], edges[1::2], strict=True)):
        return f"parts {parts} do not tile y's {y.shape[1]} columns in order"
    if x.stride(-1) != 1 or y.stride(-1) != 1 or a.stride(-1) != 1 or b.stride(-1) != 1:
        return "x, y, a and b need contiguous rows"
    width = len(parts) * num_slots * rank
    if a.shape != (width, x.shape[1]) or b.shape != (y.shape[1], width):
        return f"a {tuple(a.shape)} / b {tuple(b.shape)} do not match P S R = {width}"
    if token_slots.shape != (t,) or token_slots.dtype != torch.int32:
        return "token_slots must be int32 [T]"
    return None


def lora_add(x, y, a, b, token_slots, num_slots: int, rank: int, parts) -> torch.Tensor:
    """y += each token's delta in place (`Backend.lora_add`); the caller checked `unsupported`."""
    t, k = x.shape
    if t == 0:
        return y
    n_parts = len(parts)
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = max(16, min(512, 4096 // block_r))
    per_split = max(block_k, triton.cdiv(triton.cdiv(k, MAX_SPLITS), block_k) * block_k)
    splits = triton.cdiv(k, per_split)
    ws = torch.empty(t, n_parts, splits, block_r, dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(t, n_parts, splits)](
        x, a, token_slots, ws, x.stride(0), a.stride(0), k, per_split, num_slots, rank,
        PARTS=n_parts, SPLITS=splits, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4,
        **pdl_args(x.device),
    )  # fmt: skip
    n = y.shape[1]
    start1 = parts[1][0] if n_parts > 1 else n
    start2 = parts[2][0] if n_parts > 2 else n
    # At most 8K B values a program ([rows, rank] tile: large ranks get fewer rows).
    block_n = min(BLOCK_N_FEW if t <= 2 else BLOCK_N_MANY, max(16, 8192 // block_r))
    _lora_expand_kernel[(triton.cdiv(n, block_n), t)](
        y, b, token_slots, ws, y.stride(0), b.stride(0), n, start1, start2, num_slots, rank,
        PARTS=n_parts, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_R=block_r,
        BLOCK_N=block_n, INTERPRET=interpreting(), num_warps=4, **pdl_args(x.device),
    )  # fmt: skip
    return y
