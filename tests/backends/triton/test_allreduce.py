"""The one-shot all-reduce kernel (`backends.triton.allreduce`) with its ranks simulated in one
process: every rank's buffer is an ordinary tensor on one device, and the ranks run one after
another. A rank polls its own buffer until every peer's rows arrived, so before rank r runs, the
test does what the peers that have not run yet would have done by then (pushed their rows into
r's buffer). The earlier ranks' real pushes are already there. Runs under the interpreter on the
CPU (CI) and compiled on one GPU; the real multi-GPU run is `bench/multi_gpu.py --parts
allreduce,correctness,oneshot`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from backends.triton import allreduce as ar  # noqa: E402
from backends.triton.norm import rms_norm, rms_norm_quant_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and torch.version.hip is None else "cpu"


def make_group(world: int, max_programs: int, capacity: int):
    """Every rank's buffer (as the engine maps them) and workspace, made and reset as the
    engine does (`OneShotWorkspace.create`, then `reset` on every rank)."""
    size = ar.buffer_bytes(world, capacity)
    bufs = [torch.zeros(size, dtype=torch.uint8, device=DEVICE) for _ in range(world)]
    ptrs = [b.data_ptr() for b in bufs]
    wss = [
        ar.OneShotWorkspace.create(r, world, ptrs, capacity, max_programs, torch.device(DEVICE))
        for r in range(world)
    ]
    for ws in wss:
        ws.reset()
        ws.spin_limit = 1 << 12  # a missing push fails the test (error word) instead of hanging
    return wss, bufs


def segment(bufs, owner: int, slot: int, src: int, capacity: int) -> torch.Tensor:
    """Bytes of `owner`'s buffer holding `src`'s rows in `slot`."""
    world = len(bufs)
    at = (slot * world + src) * capacity
    return bufs[owner][at : at + capacity]


def is_empty(t: torch.Tensor) -> bool:
    return bool((t.view(torch.int16) == ar.EMPTY16).all())


def pushed(rows: torch.Tensor) -> torch.Tensor:
    """Rows as the kernel pushes them: the EMPTY pattern (-0.0 in 16-bit dtypes, 0x80008000
    in fp32) replaced by a zero (+0.0 / -0.0)."""
    if rows.dtype == torch.float32:
        empty = rows.view(torch.int32) == ar.EMPTY32
        return torch.where(empty, torch.tensor(-0.0, device=rows.device), rows)
    empty = rows.view(torch.int16) == ar.EMPTY16
    return torch.where(empty, torch.zeros((), dtype=rows.dtype, device=rows.device), rows)


def run_round(wss, bufs, xs, call):
    """Every rank's call (call(ws, x) -> result) in rank order, the later ranks' pushes done for
    them before each earlier rank runs. Returns the results and the slot the call used."""
    world, cap = len(wss), wss[0].capacity_bytes
    slot = (int(wss[0].slots[0]) + 1) % ar.SLOTS
    outs = []
    for r in range(world):
        for p in range(r + 1, world):  # what peer p will have pushed before rank r's poll ends
            rows = pushed(xs[p].reshape(-1, xs[p].shape[-1]))  # rows sit block_n apart
            padded = torch.full((rows.shape[0], ar.block_n(rows.shape[1])), float("nan"),
                                dtype=rows.dtype, device=DEVICE)  # fmt: skip
            padded[:, : rows.shape[1]] = rows
            flat = padded.reshape(-1).view(torch.uint8)
            mask = torch.zeros_like(padded, dtype=torch.bool)
            mask[:, : rows.shape[1]] = True  # the kernel writes the row's columns only
            seg = segment(bufs, r, slot, p, cap)
            view = seg[: flat.numel()].view(rows.dtype).view(padded.shape)
            view[mask] = padded[mask]
        outs.append(call(wss[r], xs[r]))
    return outs, slot


def reference_sum(xs) -> torch.Tensor:
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=DEVICE)
    for x in xs:
        acc += x.float()
    return acc.to(xs[0].dtype)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_rows", [1, 5])
def test_sum_matches_rank_order_fp32_sum(world, dtype, n_rows) -> None:
    torch.manual_seed(world * 10 + n_rows)
    nprog, cap = 4, 8192
    wss, bufs = make_group(world, nprog, capacity=cap)
    cols = 96 if n_rows > 1 else 5  # rows padded to 128 / 16 values in the buffers
    used = n_rows * ar.block_n(cols) * torch.empty((), dtype=dtype).element_size()
    for rnd in range(4):  # slots 1, 2, 0, 1: every slot, one of them emptied and used again
        xs = [torch.randn(n_rows, cols, device=DEVICE).to(dtype) for _ in range(world)]
        if rnd == 1:  # zeros of either sign, and in fp32 the EMPTY pattern itself, sum as zeros
            xs[0].view(-1)[:3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
            xs[1].view(-1)[:3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
            if dtype == torch.float32:
                xs[1].view(-1)[2:3].view(torch.int32).fill_(ar.EMPTY32)
            for x in xs[2:]:
                x.view(-1)[:3] = 0.0
        outs, slot = run_round(wss, bufs, xs, ar.OneShotWorkspace.all_reduce)
        assert slot == (rnd + 1) % ar.SLOTS
        want = reference_sum(xs)
        if rnd == 1:
            assert (want.view(-1)[:3].float().abs() < 1e-30).all()
            want.view(-1)[:3] = 0.0  # the EMPTY pattern is pushed as a zero
        for r, y in enumerate(outs):
            assert y.dtype == dtype and y.shape == xs[0].shape
            assert torch.equal(y, want), f"rank {r}, round {rnd}"
        for r in range(world):
            # every program counts every call, rows or not; the slot's bytes are recorded
            assert wss[r].slots.tolist() == [slot] * nprog
            assert int(wss[r].used[slot]) == used and int(wss[r].error) == 0
            # the previous call's slot is empty again, this call's holds every rank's rows
            prev = (slot + 2) % ar.SLOTS
            for p in range(world):
                assert is_empty(segment(bufs, r, prev, p, wss[r].capacity_bytes))
                assert not is_empty(segment(bufs, r, slot, p, wss[r].capacity_bytes)[:2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_norm_is_the_norm_of_the_sum(dtype) -> None:
    torch.manual_seed(3)
    world, hidden, n_rows = 2, 256, 6
    wss, bufs = make_group(world, 4, capacity=n_rows * hidden * 2)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    residual = torch.randn(n_rows, hidden, device=DEVICE).to(dtype)
    for _ in range(2):
        xs = [torch.randn(n_rows, hidden, device=DEVICE).to(dtype) for _ in range(world)]
        outs, _ = run_round(
            wss, bufs, xs,
            lambda ws, x: ws.all_reduce_rms_norm(x, residual, weight, 1e-5),
        )  # fmt: skip
        want_y, want_h = rms_norm(reference_sum(xs), weight, 1e-5, residual)
        for y, h in outs:
            assert torch.equal(h, want_h)
            assert torch.equal(y, want_y)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fused_norm_quant_is_rms_norm_quant_fp8_of_the_sum(fp8) -> None:
    torch.manual_seed(4)
    world, hidden, n_rows = 2, 128, 3
    wss, bufs = make_group(world, 2, capacity=n_rows * hidden * 2)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    residual = torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16)
    xs = [torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16) for _ in range(world)]
    outs, _ = run_round(
        wss, bufs, xs,
        lambda ws, x: ar.one_shot_all_reduce_rms_norm(ws, x, residual, weight, 1e-5, fp8),
    )  # fmt: skip
    want_q, want_scale, want_h = rms_norm_quant_fp8(reference_sum(xs), weight, 1e-5, fp8, residual)
    for q, scale, h in outs:
        assert q.dtype == fp8 and scale.shape == (n_rows, 1)
        assert torch.equal(h, want_h)
        assert torch.equal(scale, want_scale)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_a_missing_peer_sets_the_error_word() -> None:
    wss, bufs = make_group(2, 2, capacity=1024)
    ws = wss[0]
    ws.spin_limit = 50  # rank 1 never pushes
    ar.one_shot_all_reduce(ws, torch.ones(1, 16, device=DEVICE))
    with pytest.raises(RuntimeError, match="signal never arrived.*HAL_ONESHOT_ALLREDUCE=0"):
        ws.check()


def test_bad_input_is_refused() -> None:
    wss, _ = make_group(2, 2, capacity=1024)
    ws = wss[0]
    with pytest.raises(ValueError, match="does not fit the one-shot all-reduce"):
        ar.one_shot_all_reduce(ws, torch.ones(8, 128, device=DEVICE))  # 4 KiB > 1 KiB
    assert not ws.fits(torch.ones(2, 8, dtype=torch.int32, device=DEVICE))
    x = torch.ones(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        ar.one_shot_all_reduce_rms_norm(ws, x, x.half(), torch.ones(16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="weight: shape"):
        ar.one_shot_all_reduce_rms_norm(ws, x, x, torch.ones(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        ar.one_shot_all_reduce_rms_norm(ws, x, x, torch.ones(16, device=DEVICE), 0.0)


def test_buffer_layout() -> None:
    assert ar.buffer_bytes(2, 4096) == 3 * 2 * 4096
    with pytest.raises(ValueError, match="multiple of 256"):
        ar.buffer_bytes(2, 1000)
    wss, bufs = make_group(2, 2, capacity=256)
    assert all(is_empty(b) for b in bufs)  # reset: EMPTY in every byte of the own buffer
    assert wss[0].used.tolist() == [0, 0, 0] and wss[0].slots.tolist() == [0, 0]


def test_device_reason() -> None:
    assert "not a CUDA GPU" in ar.device_reason(torch.device("cpu"))
    if DEVICE == "cuda":
        assert ar.device_reason(torch.device("cuda", 0)) is None
