"""One-shot all-reduce over peer-mapped GPU memory, optionally fused with the residual add and
RMSNorm that follow a row-parallel linear (NVIDIA GPUs with peer access, e.g. NVLink).

At decode sizes (one to a few hundred rows of the hidden size) an all-reduce is all latency:
NCCL's ring takes 12-18 us per call inside a CUDA graph on 2 x H200 (8-512 KiB), and its kernel
cannot be chained to its neighbours with programmatic dependent launch. Here every rank owns one
buffer that every other rank can write (torch symmetric memory; `engine.distributed.oneshot`),
and one Triton kernel per call pushes and polls, with no flags (the data is its own signal):

1. pushes this rank's rows of x into segment `rank` of the current slot of every rank's buffer
   (its own included): remote stores, nothing waits for them;
2. empties the slot it used one call earlier (its own buffer only: writes EMPTY over the bytes
   that call used);
3. polls its own buffer's current slot until no element of any segment is EMPTY, then sums the
   segments in rank order in fp32 (so every rank gets the same bits), rounds to x's dtype and
   stores it, or with a residual: h = sum + residual rounded to x's dtype, y = rms_norm(h)
   exactly as `backends.triton.norm` computes it, (y, h) stored, or y's per-token FP8 codes and
   scales as `rms_norm_quant_fp8` gives them.

EMPTY is the 16-bit pattern 0x8000 in every half-word: -0.0 in bf16 / fp16, and 0x80008000
(a negative denormal, -4.6e-41) in fp32. A value with that exact pattern is pushed as -0.0 in
fp32 and +0.0 in 16-bit dtypes (the sum's sign of zero aside, nothing changes). Each element is
stored and polled on its own, so partly arrived rows are waited for element by element, and no
fence or flag round trip sits on the path: one remote store latency per call instead of a flag
store, a wait and a remote read.

Three slots rotate: a slot used at call e is emptied by its owner at call e + 1 and written
again at call e + 3; a peer can only be at call e + 3 after this rank pushed call e + 2, which it
does after its call e + 1 kernel (and the emptying) finished. The slot counter (one per
program: program k of every rank handles the same rows) and the bytes each slot holds live in
device memory, so the kernel replays correctly inside CUDA graphs. A poll that spins past
SPIN_LIMIT loads (seconds) gives up and sets the error word, so a broken peer mapping shows up
as an error on the host instead of a hung GPU (`OneShotWorkspace.check`). A rank's buffer must
hold EMPTY everywhere before its first call (`OneShotWorkspace.reset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.norm import _norm_output, _rstd
from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import cast_rtne, fp8_codec, fp8_encode_mode, interpreting

MAX_COLS = 16384  # a row is one register tile
SPIN_LIMIT = 1 << 26  # polls of one row before a program gives up (several seconds)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SLOTS = 3
EMPTY16 = -32768  # 0x8000 as int16
EMPTY32 = -2147450880  # 0x80008000 as int32: two EMPTY half-words
CLEAR_BLOCK = 1024  # int32 words a program empties per step


@dataclass
class OneShotWorkspace:
    """One rank's view of the group's peer-mapped buffers.

    data_table: int64 [world] device tensor with the address, valid in this process and
    writable from this GPU, of every rank's buffer (SLOTS x world segments of capacity_bytes).
    slots: int32 [max_programs], the slot each program used last; used: int32 [SLOTS], bytes a
    segment of each slot holds; error: int32 [1], set when a poll gave up. All on this GPU.
    """

    rank: int
    world: int
    data_table: torch.Tensor
    slots: torch.Tensor
    used: torch.Tensor
    error: torch.Tensor
    capacity_bytes: int
    max_programs: int
    spin_limit: int = SPIN_LIMIT

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x can go through the one-shot kernel: a tensor of a float dtype on this
        workspace's device whose rows (last dim <= MAX_COLS, each padded to a power of 2) fit
        in one segment of the buffer."""
        if x.device != self.slots.device or x.dtype not in DTYPES or x.dim() < 1:
            return False
        cols = x.shape[-1]
        if not 0 < cols <= MAX_COLS:
            return False
        rows = x.numel() // cols  # a row takes block_n(cols) values of the buffer
        return rows * block_n(cols) * x.element_size() <= self.capacity_bytes

    @classmethod
    def create(
        cls,
        rank: int,
        world: int,
        buffer_ptrs: list[int],
        capacity_bytes: int,
        max_programs: int,
        device: torch.device,
    ) -> OneShotWorkspace:
        """The workspace over every rank's buffer (`buffer_bytes` bytes each; buffer_ptrs:
        their addresses as this process sees them). Every rank calls reset() and the group
        synchronises before the first call."""
        if capacity_bytes <= 0 or capacity_bytes % 256:
            raise ValueError(f"capacity_bytes: {capacity_bytes} must be a positive multiple of 256")
        return cls(
            rank=rank,
            world=world,
            data_table=torch.tensor(buffer_ptrs, dtype=torch.int64, device=device),
            slots=torch.zeros(max_programs, dtype=torch.int32, device=device),
            used=torch.zeros(SLOTS, dtype=torch.int32, device=device),
            error=torch.zeros(1, dtype=torch.int32, device=device),
            capacity_bytes=capacity_bytes,
            max_programs=max_programs,
        )  # fmt: skip

    def reset(self) -> None:
        """EMPTY into every byte of this rank's own buffer, and the counters to their start (no
        peer may be pushing into it: before the group's first call)."""
        words = buffer_bytes(self.world, self.capacity_bytes) // 4
        _fill_kernel[(min(1024, triton.cdiv(words, CLEAR_BLOCK)),)](
            self.data_table, self.rank, words, EMPTY=EMPTY32, BLOCK=CLEAR_BLOCK
        )  # fmt: skip
        self.slots.zero_()
        self.used.zero_()
        self.error.zero_()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return one_shot_all_reduce(self, x)

    def all_reduce_rms_norm(self, x, residual, weight, eps, fp8_dtype=None) -> tuple:
        return one_shot_all_reduce_rms_norm(self, x, residual, weight, eps, fp8_dtype)

    def check(self) -> None:
        """Raise if a kernel gave up waiting for a peer (dead, or its writes never arrived)."""
        if int(self.error.item()):
            raise RuntimeError(
                f"one-shot all-reduce on rank {self.rank}: a peer's signal never arrived; the "
                "peer mapping does not work on this machine (set HAL_ONESHOT_ALLREDUCE=0 to use "
                "NCCL only)"
            )


def device_reason(device: torch.device) -> str | None:
    """Why the one-shot kernel cannot run on `device` (None when it can): it needs an NVIDIA
    GPU (the push-and-poll protocol is checked there only) and a compiled kernel."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if torch.version.hip is not None:
        return "ROCm: the one-shot kernel's peer stores and polls are checked on NVIDIA GPUs only"
    if interpreting():
        return "TRITON_INTERPRET=1"
    return None


def block_n(cols: int) -> int:
    """Values a row takes in the buffers: cols rounded up to a power of 2, at least 16 (so every
    row starts 16-byte aligned, as the kernel tells the compiler)."""
    return max(16, triton.next_power_of_2(cols))


@triton.jit
def _fill_kernel(data_table, rank, n_words, EMPTY: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.load(data_table + rank).to(tl.pointer_type(tl.int32))
    for start in range(tl.program_id(0) * BLOCK, n_words, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(base + offs, tl.full([BLOCK], EMPTY, tl.int32), mask=offs < n_words)


@triton.jit
def _one_shot_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    h_ptr,
    data_table,
    slot_ptr,
    used_ptr,
    error_ptr,
    rank,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    seg_elems,  # elements of x's dtype in one segment (capacity_bytes)
    spin_limit,
    scale_ptr,  # QUANT: fp32 [rows] per-token scales
    qmax,
    WORLD: tl.constexpr,
    NORM: tl.constexpr,  # residual add + RMSNorm after the sum
    QUANT: tl.constexpr,  # NORM's output quantized per token to FP8 (y_ptr: its codes)
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
    ENCODE_NATIVE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CLEAR: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    grid_wait(PDL)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    WIDE: tl.constexpr = DT.primitive_bitwidth == 32
    IT: tl.constexpr = tl.int32 if WIDE else tl.int16
    EMPTY: tl.constexpr = -2147450880 if WIDE else -32768
    slot = (tl.load(slot_ptr + pid) + 1) % 3
    tl.store(slot_ptr + pid, slot)
    old = (slot + 2) % 3  # the slot this rank's previous call used
    seg = seg_elems.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    # 1. push: this rank's rows into segment `rank` of the slot, on every rank. Rows sit BLOCK_N
    # apart and segments are 256-byte aligned: saying so lets the compiler use 16-byte stores
    # (pointers made from integers carry no alignment).
    out_off = (slot * WORLD + rank).to(tl.int64) * seg
    for row in range(pid, n_rows, nprog):
        r64 = tl.cast(row, tl.int64)
        v = tl.load(x_ptr + r64 * stride_x + cols, mask=cmask, other=0.0)
        zero = tl.zeros_like(v)
        if WIDE:
            zero = -zero  # fp32: EMPTY is a denormal, pushed as -0.0 (16-bit: -0.0 as +0.0)
        v = tl.where(v.to(IT, bitcast=True) == EMPTY, zero, v)
        for p in tl.static_range(WORLD):
            dst = tl.load(data_table + p).to(tl.pointer_type(DT)) + out_off
            tl.store(tl.multiple_of(dst + r64 * BLOCK_N + cols, 16), v, mask=cmask)
    # 2. empty the slot of this rank's previous call (its segments' used bytes, own buffer only)
    own = tl.load(data_table + rank)
    words = tl.load(used_ptr + old) // 4
    if pid == 0:
        tl.store(used_ptr + slot, n_rows * BLOCK_N * (DT.primitive_bitwidth // 8))
    seg_words = seg * (DT.primitive_bitwidth // 8) // 4
    for p in tl.static_range(WORLD):
        base = own.to(tl.pointer_type(tl.int32)) + (old * WORLD + p).to(tl.int64) * seg_words
        for start in range(pid * CLEAR, words, nprog * CLEAR):
            offs = start + tl.arange(0, CLEAR)
            tl.store(base + offs, tl.full([CLEAR], -2147450880, tl.int32), mask=offs < words)
    # 3. poll this rank's slot until every segment's rows arrived; sum them in rank order
    mine = own.to(tl.pointer_type(DT)) + (slot * WORLD).to(tl.int64) * seg
    for row in range(pid, n_rows, nprog):
        r64 = tl.cast(row, tl.int64)
        acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            at = tl.multiple_of(mine + p * seg + r64 * BLOCK_N + cols[None, :], [1, 16])
            part = tl.load(at, mask=cmask[None, :], other=0.0, volatile=True)
            missing = tl.sum((part.to(IT, bitcast=True) == EMPTY).to(tl.int32))
            polls = 0
            while (missing > 0) & (polls < spin_limit):
                part = tl.load(at, mask=cmask[None, :], other=0.0, volatile=True)
                missing = tl.sum((part.to(IT, bitcast=True) == EMPTY).to(tl.int32))
                polls += 1
            if missing > 0:
                tl.atomic_xchg(error_ptr, 1)
            acc += part.to(tl.float32)
        total = cast_rtne(acc, DT, INTERPRET)
        if NORM:
            res = tl.load(residual_ptr + r64 * stride_r + cols[None, :], mask=cmask[None, :],
                          other=0.0)  # fmt: skip
            hx = cast_rtne(total.to(tl.float32) + res.to(tl.float32), DT, INTERPRET)
            tl.store(h_ptr + r64 * stride_h + cols[None, :], hx, mask=cmask[None, :])
            h = hx.to(tl.float32)
            rstd = _rstd(tl.sum((h * h).to(tl.float64), axis=1), n_cols, eps)
            rows = row + tl.arange(0, 1)
            _norm_output(h, rstd, weight_ptr, y_ptr, scale_ptr, rows, rows < n_rows,
                         rows.to(tl.int64)[:, None], cols, cmask[None, :], stride_y, n_cols,
                         qmax, DT, QUANT, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ,
                         HAS_INF, ENCODE_NATIVE, INTERPRET)  # fmt: skip
        else:
            tl.store(y_ptr + r64 * stride_y + cols[None, :], total, mask=cmask[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(ws: OneShotWorkspace, x, residual, weight, eps, y, h, scale=None, fp8_dtype=None):
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return
    r2 = _rows(residual) if residual is not None else x2
    y2, h2 = y.reshape(n_rows, n_cols), (h.view(n_rows, n_cols) if h is not None else x2)
    bn = block_n(n_cols)
    codec = fp8_codec(fp8_dtype or torch.float8_e4m3fn)
    native = fp8_encode_mode(fp8_dtype, x2.device) if fp8_dtype is not None else 0
    _one_shot_kernel[(ws.max_programs,)](
        x2, r2, weight if weight is not None else x2, y2, h2, ws.data_table, ws.slots, ws.used,
        ws.error, ws.rank, n_rows, n_cols, x2.stride(0), r2.stride(0), y2.stride(0),
        h2.stride(0), float(eps), ws.capacity_bytes // x2.element_size(), ws.spin_limit,
        scale if scale is not None else ws.used, float(codec["FP8_MAX"]), WORLD=ws.world,
        NORM=residual is not None, QUANT=fp8_dtype is not None, ENCODE_NATIVE=native, **codec,
        BLOCK_N=bn, CLEAR=CLEAR_BLOCK, INTERPRET=interpreting(),
        num_warps=min(16, max(4, bn // 512)), **pdl_args(x2.device, "allreduce"),
    )  # fmt: skip


def one_shot_all_reduce(ws: OneShotWorkspace, x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the group's ranks (a new tensor, x's shape and dtype; every rank gets
    the same bits: fp32 sums in rank order, rounded once). Collective: every rank calls it with
    the same shape, in the same order as its other one-shot calls."""
    if not ws.fits(x):
        raise ValueError(
            f"x: shape {tuple(x.shape)} {x.dtype} on {x.device} does not fit the one-shot "
            f"all-reduce ({ws.capacity_bytes} bytes, last dim <= {MAX_COLS}, float dtypes, "
            f"{ws.slots.device})"
        )
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(ws, x, None, None, 0.0, y, None)
    return y


def one_shot_all_reduce_rms_norm(
    ws: OneShotWorkspace,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fp8_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """(rms_norm(h), h) with h = all_reduce(x) + residual: `rms_norm(all_reduce(x), weight,
    eps, residual)` in one launch, bit for bit the Triton RMSNorm of that sum. With fp8_dtype:
    (q, scale, h) as `rms_norm_quant_fp8` gives them (x: [T, hidden])."""
    if not ws.fits(x):
        raise ValueError(
            f"x: shape {tuple(x.shape)} {x.dtype} does not fit the one-shot all-reduce"
        )
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual: {tuple(residual.shape)} {residual.dtype}, expected x's "
            f"{tuple(x.shape)} {x.dtype}"
        )
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected [{x.shape[-1]}]")
    if not eps > 0:
        raise ValueError(f"eps: {eps} must be > 0")
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if fp8_dtype is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _launch(ws, x, residual, weight.contiguous(), eps, y, h)
        return y, h
    fp8_codec(fp8_dtype)  # raises, naming the dtype, when it is not an FP8 format
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [T, hidden] tensor, got shape {tuple(x.shape)}")
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    _launch(ws, x, residual, weight.contiguous(), eps, q.view(torch.uint8), h, scale, fp8_dtype)
    return q, scale, h


def buffer_bytes(world: int, capacity_bytes: int) -> int:
    """Bytes of one rank's buffer: SLOTS slots of `world` segments of capacity_bytes (a multiple
    of 256) each."""
    if capacity_bytes <= 0 or capacity_bytes % 256:
        raise ValueError(f"capacity_bytes: {capacity_bytes} must be a positive multiple of 256")
    return SLOTS * world * capacity_bytes


__all__ = [
    "DTYPES",
    "buffer_bytes",
    "device_reason",
    "MAX_COLS",
    "OneShotWorkspace",
    "one_shot_all_reduce",
    "one_shot_all_reduce_rms_norm",
]
