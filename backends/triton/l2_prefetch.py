"""L2 prefetch of weights the next GEMMs stream, issued while the GPU's memory would otherwise
idle (at batch 1 the decode attention runs on a few SMs and reads little).

One kernel takes up to two byte ranges, each a row prefix of a 2-D tensor (the first
`prefix_bytes` of each of `rows` rows `row_stride` bytes apart: a whole contiguous tensor is one
row). Each program issues `prefetch.global.L2` (one 128-byte line a lane) over its share of the
lines; the data lands in L2 and the GEMM that reads the weight next finds it there. A GEMV whose
programs all walk K from the start consumes the K-prefix of every row first, so a weight too
large for L2 is prefetched as such a prefix. Nothing is written: results cannot change. The
weights must not be written by a kernel that may still run (they are not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.pdl import grid_wait, let_next_start, pdl_args

LINE = 128  # bytes a prefetch brings in


@triton.jit
def _prefetch_range(ptr, rows, lines_per_row, row_stride, pid, programs, BLOCK: tl.constexpr,
                    EVICT_LAST: tl.constexpr):  # fmt: skip
    # Program pid of `programs` prefetches its share of the rows x lines_per_row lines at ptr.
    total = rows * lines_per_row
    per = tl.cdiv(tl.cdiv(total, programs), BLOCK) * BLOCK
    start = pid * per
    for i in range(start, tl.minimum(start + per, total), BLOCK):
        unit = tl.minimum(i + tl.arange(0, BLOCK), total - 1)
        row = unit // lines_per_row
        addr = ptr + row.to(tl.int64) * row_stride + (unit - row * lines_per_row).to(tl.int64) * 128
        if EVICT_LAST:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
                                      "=r,l", [addr], dtype=tl.int32, is_pure=False,
                                      pack=1)  # fmt: skip
        else:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                      dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit(do_not_specialize=["rows0", "lines0", "stride0", "rows1", "lines1", "stride1",
                               "programs0"])  # fmt: skip
def _prefetch_kernel(ptr0, rows0, lines0, stride0, ptr1, rows1, lines1, stride1, programs0,
                     BLOCK: tl.constexpr, TWO: tl.constexpr, EVICT_LAST: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    # grid: (programs0 + programs1,): the first programs0 take range 0, the rest range 1.
    let_next_start(PDL)
    pid = tl.program_id(0)
    if TWO & (pid >= programs0):
        _prefetch_range(ptr1, rows1, lines1, stride1, pid - programs0,
                        tl.num_programs(0) - programs0, BLOCK, EVICT_LAST)  # fmt: skip
    else:
        _prefetch_range(ptr0, rows0, lines0, stride0, pid, programs0, BLOCK, EVICT_LAST)
    grid_wait(PDL)


def _as_range(t: torch.Tensor, prefix_bytes: int | None) -> tuple[torch.Tensor, int, int, int]:
    # (uint8 view of t's storage start, rows, lines per row, row stride in bytes)
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"prefetch: expected a 2-D tensor with unit column stride, got "
                         f"{tuple(t.shape)} strides {t.stride()}")  # fmt: skip
    row_bytes = t.shape[1] * t.element_size()
    stride = t.stride(0) * t.element_size()
    if t.is_contiguous() and prefix_bytes is None:
        return t, 1, triton.cdiv(t.numel() * t.element_size(), LINE), 0
    take = row_bytes if prefix_bytes is None else min(row_bytes, prefix_bytes)
    return t, t.shape[0], triton.cdiv(take, LINE), stride


def prefetch_l2(
    ranges: list[tuple[torch.Tensor, int | None]],
    programs: int = 64,
    evict_last: bool = False,
    block: int = 128,
) -> None:
    """Issue L2 prefetches of one or two (tensor, row prefix bytes or None for whole rows)
    ranges from one kernel of `programs` programs (split between the ranges by their bytes);
    under PDL the next kernel may start at once. A line past a row's prefix may come along
    (prefixes are whole 128-byte lines)."""
    if not 1 <= len(ranges) <= 2:
        raise ValueError(f"prefetch: one or two ranges, got {len(ranges)}")
    rs = [_as_range(t, p) for t, p in ranges]
    lines = [r[1] * r[2] for r in rs]
    if len(rs) == 2:
        p0 = max(1, min(programs - 1, round(programs * lines[0] / max(1, sum(lines)))))
        r1 = rs[1]
    else:
        p0, r1 = programs, rs[0]
    # Pointers are passed as the tensors (element addresses); row strides and lines are bytes,
    # so the kernel sees them through a uint8 view.
    t0, t1 = rs[0][0].view(torch.uint8), r1[0].view(torch.uint8)
    _prefetch_kernel[(programs if len(rs) == 2 else p0,)](
        t0, rs[0][1], rs[0][2], rs[0][3], t1, r1[1], r1[2], r1[3], p0, BLOCK=block,
        TWO=len(rs) == 2, EVICT_LAST=evict_last, num_warps=4,
        **pdl_args(t0.device, "attention"),
    )  # fmt: skip
