"""One-shot all-reduce over peer-mapped GPU memory, optionally fused with the residual add and
RMSNorm that follow a row-parallel linear (NVIDIA GPUs with peer access, e.g. NVLink).

At decode sizes (one to a few hundred rows of the hidden size) an all-reduce is all latency:
NCCL's ring takes 12-18 us per call inside a CUDA graph on 2 x H200 (8-512 KiB), and its kernel
cannot be chained to its neighbours with programmatic dependent launch. Here every rank owns one
buffer that every other rank can read (torch symmetric memory; `engine.distributed.oneshot`),
and one Triton kernel per call (5-8 us there; docs/benchmarks.md, thirteenth session):

1. copies this rank's rows of x into its own buffer (half `epoch & 1` of it),
2. signals every peer (a release store of the call's epoch into the peer's flag slot for this
   program and rank) and waits until every peer has signalled the same epoch (acquire loads),
3. sums the rows of every rank's buffer in rank order in fp32 (so every rank gets the same bits),
   rounds to x's dtype and stores it, or with a residual: h = sum + residual rounded to x's
   dtype, y = rms_norm(h) exactly as `backends.triton.norm` computes it, (y, h) stored, or
   y's per-token FP8 codes and scales as `rms_norm_quant_fp8` gives them.

Program k of every rank handles the same rows and waits only for program k of the peers. The
two halves of the buffer alternate with the epoch: a rank writes half e & 1 at epoch e only after
its program 0 passed the epoch e - 1 barrier, which every peer entered after finishing epoch
e - 2, the last reader of that half. Epochs live in device memory (one counter per program,
bumped by the kernel), so the kernel replays correctly inside CUDA graphs. A program with no
rows skips the barrier (flags compare as "at least this epoch", in wrapping int32 arithmetic).
A wait that spins past SPIN_LIMIT polls (seconds) gives up and sets the error word, so a broken
peer mapping shows up as an error on the host instead of a hung GPU (`OneShotWorkspace.check`).

Few rows (at most `ll_max_rows`, default LL_MAX_ROWS, of at most LL_MAX_COLS values, and
LL_SOURCE_BYTES of words per source): the low-latency protocol instead, NCCL's "LL" idea. Each
value goes out as one 8-byte word, its fp32 bits in the low half and the call's epoch in the high
half, stored straight into every rank's LL area (slot of this rank, half `epoch & 1`); a rank
then polls its own area until every word of its rows carries the epoch (an aligned 8-byte store
lands whole), and sums those fp32 values in rank order: the same bits as above (x's values are
exact in fp32). No flag round, no fence, no read across the link: one one-way trip. The halves
alternate as above (a rank writes half e & 1 of a peer's area at epoch e only after it received
that peer's epoch e - 1 words, sent after the peer's epoch e - 2 call, the last reader of that
half, had ended); stale words hold an older epoch. The LL area is its own part of the buffer, so
the classic path's data never reads as an LL word.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.triton.norm import _norm_output_w, _rstd
from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import cast_rtne, fp8_codec, fp8_encode_mode, interpreting

MAX_COLS = 16384  # a row is one register tile
SPIN_LIMIT = 1 << 26  # polls of one flag before a program gives up (several seconds)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LL_SOURCE_BYTES = 512 * 1024  # one source rank's words in one half of an LL area
# Calls with more rows, or rows wider than LL_MAX_COLS values, take the flag-and-read protocol.
# 2 x H200 in CUDA graphs (twentieth session, same call): 1 / 8 / 32 x 4096 bf16 4.6 / 5.4 / 6.9
# us against 5.1 / 6.1 / 6.9; 1 / 8 x 8192 7.2 / 8.0 against 5.4 / 5.8 (slower: kept off there).
LL_MAX_ROWS = 16
LL_MAX_COLS = 4096
# HAL_ONESHOT_EARLY_EPOCH (on; =0 off): a call on a GEMM-pushed output (PUSHED) reads its epoch
# counter before the PDL wait (from L2), off the path after it. Right because the counter's last
# writer, the previous call, ran before the pushing GEMM, so it finished before this kernel could
# start (a kernel starts only once every program of the one before it passed its own wait). 2 x
# H200, TP=2 batch-1 decode (twenty-second session): 2.60-2.61 -> 2.60 ms alone, 2.57-2.59 with
# HAL_ATTN_EARLY_META. EARLY_POLL below reads the epoch early in any case.
EARLY_EPOCH = os.environ.get("HAL_ONESHOT_EARLY_EPOCH", "1") != "0"
# HAL_ONESHOT_EARLY_POLL (on; =0 off): a call on a GEMM-pushed output (PUSHED) reads its epoch,
# the residual and every rank's words, and computes the sum and the norm, before the PDL wait;
# only its stores (epoch counter, h, y) follow the wait. Right because the words carry the epoch
# (a word of this call is never confused with an older one, and polling them needs no order with
# the pushing GEMM), the epoch's and the residual's last writers finished before this kernel
# started (as for EARLY_EPOCH), and the stores, which may land in memory the GEMM still reads
# (the allocator reuses freed buffers along the stream), wait for it to end. 2 x H200, TP=2
# batch-1 decode, alternated in one call (twenty-second session): 2.63 / 2.63 -> 2.57 / 2.57 ms;
# the call's end 2.88 us after the later rank's GEMM ended, against 4.10 (`bench/trace_path.py`).
EARLY_POLL = os.environ.get("HAL_ONESHOT_EARLY_POLL", "1") != "0"
# LL: a row goes out in pieces of this many values, one piece per program (many SMs pushing).
# The interpreter runs programs one after another, so there a row's own program sends it whole
# (a program polling for a piece a later program sends would wait forever).
LL_SEND_N = 512


@dataclass
class LLPush:
    """Where a GEMM's epilogue writes its [rows, cols] output as the low-latency words of the
    one-shot all-reduce that comes next (`OneShotWorkspace.ll_push`, `gemv.linear_small_m`'s
    ll_push): every rank's LL area (table), this rank's slot, the epoch counters, the words of
    one half and of one row. done: set by the launch (whether it pushed)."""

    table: torch.Tensor
    rank: int
    world: int
    epochs: torch.Tensor
    half_words: int
    row_words: int
    rows: int
    cols: int
    done: bool = False


@dataclass
class OneShotWorkspace:
    """One rank's view of the group's peer-mapped buffers.

    data_table / flag_table: int64 [world] device tensors with the address, valid in this
    process and readable from this GPU, of every rank's data area (2 x capacity_bytes) and flag
    area (int32 [max_programs, world], zeroed on every rank before first use). epochs: int32
    [max_programs] on this GPU, zeroed once; error: int32 [1], set when a wait gave up.
    """

    rank: int
    world: int
    data_table: torch.Tensor
    flag_table: torch.Tensor
    epochs: torch.Tensor
    error: torch.Tensor
    capacity_bytes: int
    max_programs: int
    ll_table: torch.Tensor | None = None  # int64 [world]: every rank's LL area (see `ll_bytes`)
    ll_max_rows: int = LL_MAX_ROWS  # 0: never the LL protocol
    spin_limit: int = SPIN_LIMIT
    # The output a GEMM pushed as LL words (`ll_push` then `mark_pushed`): its (data_ptr,
    # numel, last dim, dtype). The next call consumes it: on that tensor it only polls (no
    # send); any call clears it, so a mark never outlives the call right after the push.
    pushed: tuple | None = None
    gemm_push: bool = True  # False: `ll_push` offers no target (HAL_ONESHOT_GEMM_PUSH=0)

    @property
    def ll_half_words(self) -> int:
        """8-byte words in one half of an LL area (a slot of LL_SOURCE_BYTES per rank)."""
        return self.world * LL_SOURCE_BYTES // 8

    def ll_push(self, rows: int, cols: int, dtype: torch.dtype) -> LLPush | None:
        """A target for a GEMM whose [rows, cols] output of `dtype` the next call will reduce,
        when that call takes the LL protocol (None otherwise)."""
        if not self.gemm_push or dtype not in DTYPES or not self._takes_ll_shape(rows, cols):
            return None
        if rows * block_n(cols) * dtype.itemsize > self.capacity_bytes:  # not `fits`: NCCL's
            return None
        return LLPush(self.ll_table, self.rank, self.world, self.epochs, self.ll_half_words,
                      block_n(cols), rows, cols)  # fmt: skip

    def mark_pushed(self, y: torch.Tensor) -> None:
        """y (a GEMM's output) went out as LL words: the next call, on y, skips its send."""
        self.pushed = _push_key(y)

    def takes_ll(self, x: torch.Tensor) -> bool:
        """Whether a call on x (which `fits`) goes by the low-latency protocol: at most
        ll_max_rows rows of at most LL_MAX_COLS values whose 8-byte words fit one source's share
        of an LL half."""
        cols = x.shape[-1]
        return self._takes_ll_shape(x.numel() // cols if cols else 0, cols)

    def _takes_ll_shape(self, rows: int, cols: int) -> bool:
        small = 0 < rows <= self.ll_max_rows and 0 < cols <= LL_MAX_COLS
        return self.ll_table is not None and small and rows * block_n(cols) * 8 <= LL_SOURCE_BYTES

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x can go through the one-shot kernel: a tensor of a float dtype on this
        workspace's device whose rows (last dim <= MAX_COLS, each padded to a power of 2) fit
        in one half of the buffer."""
        if x.device != self.epochs.device or x.dtype not in DTYPES or x.dim() < 1:
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
        """The workspace over every rank's buffer (`buffer_bytes` bytes each, zeroed on every
        rank before the first call; buffer_ptrs: their addresses as this process sees them)."""
        fbytes = flag_bytes(max_programs, world)
        ll_off = fbytes + 2 * capacity_bytes
        return cls(
            rank=rank,
            world=world,
            data_table=torch.tensor([p + fbytes for p in buffer_ptrs], dtype=torch.int64,
                                    device=device),
            flag_table=torch.tensor(buffer_ptrs, dtype=torch.int64, device=device),
            ll_table=torch.tensor([p + ll_off for p in buffer_ptrs], dtype=torch.int64,
                                  device=device),
            epochs=torch.zeros(max_programs, dtype=torch.int32, device=device),
            error=torch.zeros(1, dtype=torch.int32, device=device),
            capacity_bytes=capacity_bytes,
            max_programs=max_programs,
        )  # fmt: skip

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
    GPU (the system-scope flag protocol is checked there only) and a compiled kernel."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if torch.version.hip is not None:
        return "ROCm: the one-shot kernel's system-scope flags are checked on NVIDIA GPUs only"
    if interpreting():
        return "TRITON_INTERPRET=1"
    return None


def block_n(cols: int) -> int:
    """Values a row takes in the buffers: cols rounded up to a power of 2, at least 16 (so every
    row starts 16-byte aligned, as the kernel tells the compiler)."""
    return max(16, triton.next_power_of_2(cols))


@triton.jit
def _barrier(flag_table, error_ptr, rank, pid, epoch, spin_limit, WORLD: tl.constexpr):
    # Tell every rank's program `pid` that this rank reached `epoch`; wait for all of them.
    slot = pid * WORLD + rank
    for p in tl.static_range(WORLD):
        flags = tl.load(flag_table + p).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + slot, epoch, sem="release", scope="sys")
    mine = tl.load(flag_table + rank).to(tl.pointer_type(tl.int32)) + pid * WORLD
    for p in tl.static_range(WORLD):
        seen = tl.atomic_add(mine + p, 0, sem="acquire", scope="sys")
        polls = 0
        while (seen - epoch < 0) & (polls < spin_limit):
            seen = tl.atomic_add(mine + p, 0, sem="acquire", scope="sys")
            polls += 1
        if seen - epoch < 0:
            tl.atomic_xchg(error_ptr, 1)


@triton.jit
def ll_word(v, epoch):
    # A value's low-latency word: its fp32 bits in the low half, the call's epoch in the high.
    bits = v.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return bits | (epoch.to(tl.int64) << 32)


@triton.jit
def _ll_send(x_ptr, ll_table, rank, row, n_rows, n_cols, stride_x, half, epoch, cols, cmask,
             WORLD: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # This rank's row as (epoch << 32 | fp32 bits) words into slot `rank` of every rank's area.
    r64 = tl.cast(row, tl.int64)
    word = ll_word(tl.load(x_ptr + r64 * stride_x + cols, mask=cmask, other=0.0), epoch)
    at = (rank * n_rows + r64) * BLOCK_N + half
    for p in tl.static_range(WORLD):
        area = tl.load(ll_table + p).to(tl.pointer_type(tl.int64))
        tl.store(tl.multiple_of(area + at + cols, 16), word, mask=cmask)


@triton.jit
def _late_words(word, epoch, mask):
    # How many of the words (2-D, mask the same shape) do not carry this call's epoch yet.
    late = (((word >> 32).to(tl.int32) != epoch) & mask).to(tl.int32)
    return tl.sum(tl.sum(late, axis=1), axis=0)


@triton.jit
def _poll(at, mask, epoch, error_ptr, spin_limit):
    # The fp32 values of the words at `at` (2-D, mask the same shape), loaded until every one
    # carries the epoch (or spin_limit polls, then the error word is set).
    word = tl.load(at, mask=mask, other=0, volatile=True)
    late = _late_words(word, epoch, mask)
    polls = 0
    while (late > 0) & (polls < spin_limit):
        word = tl.load(at, mask=mask, other=0, volatile=True)
        late = _late_words(word, epoch, mask)
        polls += 1
    if late > 0:
        tl.atomic_xchg(error_ptr, 1)
    return (word & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _ll_receive(ll_table, error_ptr, rank, row, n_rows, half, epoch, spin_limit, cols, cmask,
                WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # The rank-order fp32 sum of this row's words from every rank, each polled until it carries
    # the epoch ([1, BLOCK_N]). Up to 4 ranks: every rank's words in one [WORLD_P2, BLOCK_N]
    # load, so one poll round trip sees them all (one rank after another, a late first rank
    # cost a second trip after it arrived); more ranks poll one after another (registers).
    r64 = tl.cast(row, tl.int64)
    area = tl.load(ll_table + rank).to(tl.pointer_type(tl.int64)) + half
    acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    if WORLD <= 4:
        src = tl.arange(0, WORLD_P2)
        m2 = (src < WORLD)[:, None] & cmask[None, :]
        at = tl.multiple_of(area + (src[:, None] * n_rows + r64) * BLOCK_N + cols[None, :],
                            [1, 16])  # fmt: skip
        vals = _poll(at, m2, epoch, error_ptr, spin_limit)
        for p in tl.static_range(WORLD):  # rank order: each step adds one rank's row exactly
            acc += tl.sum(tl.where(src[:, None] == p, vals, 0.0), axis=0)[None, :]
    else:
        for p in tl.static_range(WORLD):
            at = tl.multiple_of(area + (p * n_rows + r64) * BLOCK_N + cols[None, :], [1, 16])
            acc += _poll(at, cmask[None, :], epoch, error_ptr, spin_limit)
    return acc


@triton.jit
def _one_shot_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    h_ptr,
    data_table,
    flag_table,
    ll_table,
    epoch_ptr,
    error_ptr,
    rank,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    half_elems,  # elements of x's dtype in one half of a data area
    ll_half_words,  # 8-byte words in one half of an LL area
    spin_limit,
    scale_ptr,  # QUANT: fp32 [rows] per-token scales
    qmax,
    WORLD: tl.constexpr,
    WORLD_P2: tl.constexpr,  # the next power of two
    LL: tl.constexpr,  # the low-latency protocol (module docstring)
    PUSHED: tl.constexpr,  # LL: a GEMM's epilogue already sent x's words (`LLPush`): poll only
    EARLY_EPOCH: tl.constexpr,  # PUSHED: the epoch read before the PDL wait (EARLY_EPOCH)
    EARLY_POLL: tl.constexpr,  # PUSHED, one row per program: poll before the wait (EARLY_POLL)
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
    SEND_N: tl.constexpr,  # LL: values of a row one program sends (a power of 2 <= BLOCK_N)
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if NORM:  # a parameter: loaded before the wait, off the call's path
        w = tl.load(weight_ptr + cols, mask=cmask, other=0.0)
    else:
        w = cmask  # unused
    if PUSHED and EARLY_POLL:  # see EARLY_POLL: all but the stores before the PDL wait
        epoch = tl.load(epoch_ptr + pid, cache_modifier=".cg") + 1
        ll_half = (epoch & 1).to(tl.int64) * ll_half_words
        rmask = cmask & (cols * 0 + pid < n_rows)  # one row per program (the launch sees to it)
        r64 = tl.cast(pid, tl.int64)
        if NORM:
            res = tl.load(residual_ptr + r64 * stride_r + cols[None, :], mask=rmask[None, :],
                          other=0.0)  # fmt: skip
        else:
            res = 0.0
        acc = _ll_receive(ll_table, error_ptr, rank, pid, n_rows, ll_half, epoch, spin_limit,
                          cols, rmask, WORLD, WORLD_P2, BLOCK_N)  # fmt: skip
        hx, rstd = _sum_and_norm(acc, res, n_cols, eps, DT, NORM, INTERPRET)
        grid_wait(PDL)
        tl.store(epoch_ptr + pid, epoch)
        _store_row(hx, rstd, w, y_ptr, h_ptr, scale_ptr, pid, n_rows, cols, rmask, stride_y,
                   stride_h, qmax, DT, NORM, QUANT, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ,
                   HAS_INF, ENCODE_NATIVE, INTERPRET)  # fmt: skip
    else:
        if PUSHED and EARLY_EPOCH:  # see EARLY_EPOCH
            epoch = tl.load(epoch_ptr + pid, cache_modifier=".cg") + 1
            grid_wait(PDL)
        else:
            grid_wait(PDL)
            epoch = tl.load(epoch_ptr + pid) + 1
        tl.store(epoch_ptr + pid, epoch)
        half = (epoch & 1).to(tl.int64) * half_elems
        ll_half = (epoch & 1).to(tl.int64) * ll_half_words
        if LL:
            if not PUSHED:
                # Every program sends: row pieces of SEND_N values round-robin over the grid, so
                # many SMs push at once; program `row` then polls that row's words. (Every program's
                # epoch counter moves with every call, so all of them stamp the same epoch.)
                CHUNKS: tl.constexpr = BLOCK_N // SEND_N
                scols = tl.arange(0, SEND_N)
                for task in range(pid, n_rows * CHUNKS, nprog):
                    c = (task % CHUNKS) * SEND_N + scols
                    _ll_send(x_ptr, ll_table, rank, task // CHUNKS, n_rows, n_cols, stride_x,
                             ll_half, epoch, c, c < n_cols, WORLD, BLOCK_N)  # fmt: skip
        elif pid < n_rows:
            # Rows sit BLOCK_N apart in the buffers and the areas are 256-byte aligned: saying so
            # lets the compiler use 16-byte loads (pointers made from integers carry no alignment).
            mine = tl.load(data_table + rank).to(tl.pointer_type(DT)) + half
            for row in range(pid, n_rows, nprog):
                r64 = tl.cast(row, tl.int64)
                v = tl.load(x_ptr + r64 * stride_x + cols, mask=cmask)
                tl.store(tl.multiple_of(mine + r64 * BLOCK_N + cols, 16), v, mask=cmask)
            tl.debug_barrier()  # every thread's copy before the release below
            _barrier(flag_table, error_ptr, rank, pid, epoch, spin_limit, WORLD)
        for row in range(pid, n_rows, nprog):
            r64 = tl.cast(row, tl.int64)
            if NORM:  # issued before the wait for the peers' values, which it does not need
                res = tl.load(residual_ptr + r64 * stride_r + cols[None, :], mask=cmask[None, :],
                              other=0.0)  # fmt: skip
            else:
                res = 0.0
            if LL:
                acc = _ll_receive(ll_table, error_ptr, rank, row, n_rows, ll_half, epoch,
                                  spin_limit, cols, cmask, WORLD, WORLD_P2, BLOCK_N)  # fmt: skip
            else:
                acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
                for p in tl.static_range(WORLD):
                    src = tl.load(data_table + p).to(tl.pointer_type(DT)) + half
                    at = tl.multiple_of(src + r64 * BLOCK_N + cols[None, :], [1, 16])
                    part = tl.load(at, mask=cmask[None, :], other=0.0,
                                   cache_modifier=".cg")  # fmt: skip
                    acc += part.to(tl.float32)
            hx, rstd = _sum_and_norm(acc, res, n_cols, eps, DT, NORM, INTERPRET)
            _store_row(hx, rstd, w, y_ptr, h_ptr, scale_ptr, row, n_rows, cols, cmask, stride_y,
                       stride_h, qmax, DT, NORM, QUANT, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ,
                       HAS_INF, ENCODE_NATIVE, INTERPRET)  # fmt: skip


@triton.jit
def _sum_and_norm(acc, res, n_cols, eps, DT: tl.constexpr, NORM: tl.constexpr,
                  INTERPRET: tl.constexpr):  # fmt: skip
    # A row's sum rounded to x's dtype ([1, BLOCK_N]); with NORM: h = sum + residual rounded
    # again, and its 1 / rms ([1]).
    total = cast_rtne(acc, DT, INTERPRET)
    if NORM:
        hx = cast_rtne(total.to(tl.float32) + res.to(tl.float32), DT, INTERPRET)
        h = hx.to(tl.float32)
        rstd = _rstd(tl.sum((h * h).to(tl.float64), axis=1), n_cols, eps)
    else:
        hx = total
        rstd = tl.zeros([1], dtype=tl.float32)
    return hx, rstd


@triton.jit
def _store_row(hx, rstd, w, y_ptr, h_ptr, scale_ptr, row, n_rows, cols, cmask, stride_y, stride_h,
               qmax, DT: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr,
               MAN_BITS: tl.constexpr, EXP_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
               NAN_CODE: tl.constexpr, FNUZ: tl.constexpr, HAS_INF: tl.constexpr,
               ENCODE_NATIVE: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    # The row's outputs: the sum (y), or h and y = rms_norm(h) (or its FP8 codes and scale).
    r64 = tl.cast(row, tl.int64)
    if NORM:
        tl.store(h_ptr + r64 * stride_h + cols[None, :], hx, mask=cmask[None, :])
        rows = row + tl.arange(0, 1)
        _norm_output_w(hx.to(tl.float32), rstd, w, y_ptr, scale_ptr, rows, rows < n_rows,
                       rows.to(tl.int64)[:, None], cols, cmask[None, :], stride_y, qmax, DT,
                       QUANT, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF, ENCODE_NATIVE,
                       INTERPRET)  # fmt: skip
    else:
        tl.store(y_ptr + r64 * stride_y + cols[None, :], hx, mask=cmask[None, :])


def _push_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.numel(), t.shape[-1] if t.dim() else 1, t.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(ws: OneShotWorkspace, x, residual, weight, eps, y, h, scale=None, fp8_dtype=None):
    pushed = ws.pushed is not None and ws.pushed == _push_key(x) and x.is_contiguous()
    ws.pushed = None
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return
    r2 = _rows(residual) if residual is not None else x2
    y2, h2 = y.reshape(n_rows, n_cols), (h.view(n_rows, n_cols) if h is not None else x2)
    bn = block_n(n_cols)
    half_elems = ws.capacity_bytes // x2.element_size()
    codec = fp8_codec(fp8_dtype or torch.float8_e4m3fn)
    native = fp8_encode_mode(fp8_dtype, x2.device) if fp8_dtype is not None else 0
    ll = ws.takes_ll(x2)
    _one_shot_kernel[(ws.max_programs,)](
        x2, r2, weight if weight is not None else x2, y2, h2, ws.data_table, ws.flag_table,
        ws.ll_table if ll else ws.data_table, ws.epochs, ws.error, ws.rank, n_rows, n_cols,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), float(eps), half_elems,
        ws.ll_half_words, ws.spin_limit,
        scale if scale is not None else ws.epochs, float(codec["FP8_MAX"]), WORLD=ws.world,
        WORLD_P2=triton.next_power_of_2(ws.world),
        LL=ll, PUSHED=ll and pushed, EARLY_EPOCH=EARLY_EPOCH,
        EARLY_POLL=EARLY_POLL and n_rows <= ws.max_programs, NORM=residual is not None,
        QUANT=fp8_dtype is not None, ENCODE_NATIVE=native,
        **codec, BLOCK_N=bn, SEND_N=bn if interpreting() else min(bn, LL_SEND_N),
        INTERPRET=interpreting(),
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
            f"{ws.epochs.device})"
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


def flag_bytes(max_programs: int, world: int) -> int:
    """Bytes of a rank's flag area (int32 [max_programs, world]), rounded up to 256."""
    return -(-max_programs * world * 4 // 256) * 256


def ll_bytes(world: int) -> int:
    """Bytes of a rank's LL area: two halves, each a slot of LL_SOURCE_BYTES per source rank."""
    return 2 * world * LL_SOURCE_BYTES


def buffer_bytes(world: int, capacity_bytes: int, max_programs: int) -> int:
    """Bytes of one rank's buffer: the flag area, two halves of capacity_bytes (a multiple of
    256), then the LL area (`ll_bytes`)."""
    if capacity_bytes <= 0 or capacity_bytes % 256:
        raise ValueError(f"capacity_bytes: {capacity_bytes} must be a positive multiple of 256")
    return flag_bytes(max_programs, world) + 2 * capacity_bytes + ll_bytes(world)


__all__ = [
    "DTYPES",
    "buffer_bytes",
    "device_reason",
    "MAX_COLS",
    "LLPush",
    "OneShotWorkspace",
    "flag_bytes",
    "ll_bytes",
    "one_shot_all_reduce",
    "one_shot_all_reduce_rms_norm",
]
