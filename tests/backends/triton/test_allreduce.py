"""The one-shot all-reduce kernel (`backends.triton.allreduce`) with its ranks simulated in one
process: every rank's buffer is an ordinary tensor on one device, and the ranks run one after
another. A rank waits for its peers' signals, so before rank r runs, the test does what the
peers that have not run yet would have done by then (their rows in their buffer half, their
epoch in r's flag slots). The later ranks then find the earlier ranks' real signals. Runs under
the interpreter on the CPU (CI) and compiled on one GPU; the real multi-GPU run is
`bench/multi_gpu.py --parts allreduce,correctness`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from backends.triton import allreduce as ar  # noqa: E402
from backends.triton import gemv  # noqa: E402
from backends.triton.norm import rms_norm, rms_norm_quant_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and torch.version.hip is None else "cpu"


def make_group(world: int, max_programs: int, capacity: int, ll_max_rows: int = ar.LL_MAX_ROWS):
    """Every rank's buffer (as the engine maps them) and workspace, made as the CUDA backend
    makes them (`OneShotWorkspace.create`); ll_max_rows 0: the flag-and-read protocol only."""
    fbytes = ar.flag_bytes(max_programs, world)
    size = ar.buffer_bytes(world, capacity, max_programs)
    bufs = [torch.zeros(size, dtype=torch.uint8, device=DEVICE) for _ in range(world)]
    ptrs = [b.data_ptr() for b in bufs]
    wss = [
        ar.OneShotWorkspace.create(r, world, ptrs, capacity, max_programs, torch.device(DEVICE))
        for r in range(world)
    ]
    for ws in wss:
        ws.ll_max_rows = ll_max_rows
    return wss, bufs, fbytes


def flags(bufs, fbytes, rank, max_programs, world) -> torch.Tensor:
    return bufs[rank][:fbytes].view(torch.int32)[: max_programs * world].view(max_programs, world)


def ll_words(x: torch.Tensor, epoch: int) -> torch.Tensor:
    """x's rows as the low-latency protocol sends them: int64 (epoch << 32 | fp32 bits), rows
    block_n words apart."""
    rows = x.reshape(-1, x.shape[-1])
    bits = rows.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = rows.new_zeros(rows.shape[0], ar.block_n(rows.shape[1]), dtype=torch.int64)
    words[:, : rows.shape[1]] = bits | (epoch << 32)
    return words.reshape(-1)


def run_round(wss, bufs, fbytes, xs, call):
    """Every rank's call (call(ws, x) -> result) in rank order, the later ranks' part of the
    protocol done for them before each earlier rank runs."""
    world, nprog = len(wss), wss[0].max_programs
    epoch = int(wss[0].epochs[0]) + 1
    n_rows = xs[0].reshape(-1, xs[0].shape[-1]).shape[0]
    half = (epoch & 1) * wss[0].capacity_bytes
    ll = wss[0].takes_ll(xs[0])
    ll_at = fbytes + 2 * wss[0].capacity_bytes + (epoch & 1) * world * ar.LL_SOURCE_BYTES
    outs = []
    for r in range(world):
        for p in range(r + 1, world):  # what peer p will have done before rank r's wait ends
            if ll:  # its words in slot p of rank r's LL area
                words = ll_words(xs[p], epoch).view(torch.uint8)
                at = ll_at + p * words.numel()  # slots: n_rows rows of block_n words each
                bufs[r][at : at + words.numel()] = words
                continue
            rows = xs[p].reshape(-1, xs[p].shape[-1])  # the buffer holds rows block_n apart
            padded = rows.new_zeros(rows.shape[0], ar.block_n(rows.shape[1]))
            padded[:, : rows.shape[1]] = rows
            flat = padded.reshape(-1).view(torch.uint8)
            bufs[p][fbytes + half : fbytes + half + flat.numel()] = flat
            flags(bufs, fbytes, r, nprog, world)[: min(n_rows, nprog), p] = epoch
        outs.append(call(wss[r], xs[r]))
    return outs, epoch


def reference_sum(xs) -> torch.Tensor:
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=DEVICE)
    for x in xs:
        acc += x.float()
    return acc.to(xs[0].dtype)


PROTOCOLS = {"flags": 0, "ll": ar.LL_MAX_ROWS}  # -> ll_max_rows


def ll_slot(bufs, fbytes, capacity, area, src, epoch, nbytes) -> torch.Tensor:
    """Slot `src` of rank `area`'s LL area in half epoch & 1 (nbytes bytes), as int64 words."""
    world = len(bufs)
    at = fbytes + 2 * capacity + (epoch & 1) * world * ar.LL_SOURCE_BYTES + src * nbytes
    return bufs[area][at : at + nbytes].view(torch.int64)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("world", [2, 4, 8])  # 8: LL polls one rank after another
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_rows", [1, 5])
def test_sum_matches_rank_order_fp32_sum(world, dtype, n_rows, protocol) -> None:
    torch.manual_seed(world * 10 + n_rows)
    nprog = 4
    wss, bufs, fbytes = make_group(world, nprog, capacity=8192, ll_max_rows=PROTOCOLS[protocol])
    for rnd in range(3):  # epochs 1, 2, 3: both halves of the buffer, one of them twice
        cols = 96 if n_rows > 1 else 5  # rows padded to 128 / 16 values in the buffers
        xs = [torch.randn(n_rows, cols, device=DEVICE).to(dtype) for _ in range(world)]
        outs, epoch = run_round(wss, bufs, fbytes, xs, ar.OneShotWorkspace.all_reduce)
        assert epoch == rnd + 1
        want = reference_sum(xs)
        for r, y in enumerate(outs):
            assert y.dtype == dtype and y.shape == xs[0].shape
            assert torch.equal(y, want), f"rank {r}, round {rnd}"
        assert wss[0].takes_ll(xs[0]) == (protocol == "ll")
        for r in range(world):
            # every program counts every call, rows or not; each program with rows signalled
            assert wss[r].epochs.tolist() == [epoch] * nprog
            assert int(wss[r].error) == 0
            if protocol == "ll":  # every rank's words reached every rank's area (its own too)
                for src in range(world):
                    want_words = ll_words(xs[src], epoch)
                    got = ll_slot(bufs, fbytes, 8192, r, src, epoch, want_words.numel() * 8)
                    assert torch.equal(got, want_words), f"area {r}, slot {src}"
                continue
            got = flags(bufs, fbytes, r, nprog, world)
            assert (got[: min(n_rows, nprog)] == epoch).all()


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_norm_is_the_norm_of_the_sum(dtype, protocol) -> None:
    torch.manual_seed(3)
    world, hidden, n_rows = 2, 256, 6
    wss, bufs, fbytes = make_group(world, 4, capacity=n_rows * hidden * 2,
                                   ll_max_rows=PROTOCOLS[protocol])  # fmt: skip
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    residual = torch.randn(n_rows, hidden, device=DEVICE).to(dtype)
    for _ in range(2):
        xs = [torch.randn(n_rows, hidden, device=DEVICE).to(dtype) for _ in range(world)]
        outs, _ = run_round(
            wss, bufs, fbytes, xs,
            lambda ws, x: ws.all_reduce_rms_norm(x, residual, weight, 1e-5),
        )  # fmt: skip
        want_y, want_h = rms_norm(reference_sum(xs), weight, 1e-5, residual)
        for y, h in outs:
            assert torch.equal(h, want_h)
            assert torch.equal(y, want_y)


@pytest.mark.skipif(
    DEVICE == "cpu",
    reason="pieces need the programs running at once (a GPU): "
    "the interpreter runs them in turn, so there a row goes out whole",
)
@pytest.mark.parametrize("send_n", [16, 32])
def test_ll_rows_go_out_in_pieces_from_every_program(monkeypatch, send_n) -> None:
    # Rows of 96 values (128 in the areas) in pieces of 16 / 32 values: 8 / 4 pieces a row, 40 /
    # 20 sends over 4 programs (5 rows); the last piece of each row partly past the row's end.
    monkeypatch.setattr(ar, "LL_SEND_N", send_n)
    torch.manual_seed(send_n)
    world, hidden, n_rows = 2, 96, 5
    wss, bufs, fbytes = make_group(world, 4, capacity=8192)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    residual = torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16)
    for _ in range(2):
        xs = [torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16) for _ in range(world)]
        assert wss[0].takes_ll(xs[0])
        outs, epoch = run_round(
            wss, bufs, fbytes, xs,
            lambda ws, x: ws.all_reduce_rms_norm(x, residual, weight, 1e-5),
        )  # fmt: skip
        want_y, want_h = rms_norm(reference_sum(xs), weight, 1e-5, residual)
        for y, h in outs:
            assert torch.equal(h, want_h) and torch.equal(y, want_y)
        for r in range(world):  # every piece of every row in every rank's area
            for src in range(world):
                want_words = ll_words(xs[src], epoch)
                got = ll_slot(bufs, fbytes, 8192, r, src, epoch, want_words.numel() * 8)
                assert torch.equal(got, want_words), f"area {r}, slot {src}"


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fused_norm_quant_is_rms_norm_quant_fp8_of_the_sum(fp8, protocol) -> None:
    torch.manual_seed(4)
    world, hidden, n_rows = 2, 128, 3
    wss, bufs, fbytes = make_group(world, 2, capacity=n_rows * hidden * 2,
                                   ll_max_rows=PROTOCOLS[protocol])  # fmt: skip
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    residual = torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16)
    xs = [torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16) for _ in range(world)]
    outs, _ = run_round(
        wss, bufs, fbytes, xs,
        lambda ws, x: ar.one_shot_all_reduce_rms_norm(ws, x, residual, weight, 1e-5, fp8),
    )  # fmt: skip
    want_q, want_scale, want_h = rms_norm_quant_fp8(reference_sum(xs), weight, 1e-5, fp8, residual)
    for q, scale, h in outs:
        assert q.dtype == fp8 and scale.shape == (n_rows, 1)
        assert torch.equal(h, want_h)
        assert torch.equal(scale, want_scale)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize(
    "config",
    [
        gemv.GemvConfig("fma", 32, 64, split_k=1, num_warps=4, num_stages=1),
        gemv.GemvConfig("dot", 32, 32, split_k=2, num_warps=4, num_stages=2),  # in-kernel sum
    ],
)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("early", ["", "epoch", "poll"])
def test_gemm_pushes_the_words_the_all_reduce_would_send(monkeypatch, config, world, early):
    # Rank 0's row-parallel GEMM writes its output as LL words from its epilogue; the all-reduce
    # on that output then only polls: the sum and norm are the same bits, and it sent nothing
    # (the output is changed after the push, and the result still holds the pushed values).
    monkeypatch.setattr(ar, "EARLY_EPOCH", early == "epoch")  # HAL_ONESHOT_EARLY_EPOCH
    monkeypatch.setattr(ar, "EARLY_POLL", early == "poll")  # HAL_ONESHOT_EARLY_POLL
    torch.manual_seed(7)
    k, hidden, n_rows = 64, 96, 3
    wss, bufs, fbytes = make_group(world, 4, capacity=8192)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    residual = torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16)
    x = torch.randn(n_rows, k, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(hidden, k, device=DEVICE).to(torch.bfloat16)
    push = wss[0].ll_push(n_rows, hidden, torch.bfloat16)
    y0 = gemv.linear_small_m(x, w, config=config, ll_push=push)
    assert push.done and torch.equal(y0, gemv.linear_small_m(x, w, config=config))
    for area in range(world):  # slot 0 of every rank's area, epoch 1 (half 1)
        want_words = ll_words(y0, 1)
        got = ll_slot(bufs, fbytes, 8192, area, 0, 1, want_words.numel() * 8)
        assert torch.equal(got, want_words), f"area {area}"
    wss[0].mark_pushed(y0)
    sent = y0.clone()
    y0.add_(1.0)  # what a resend would pick up
    peers = [torch.randn(n_rows, hidden, device=DEVICE).to(torch.bfloat16) for _ in range(1, world)]
    for p, yp in enumerate(peers, 1):  # rank p's words in slot p of rank 0's area
        words = ll_words(yp, 1).view(torch.uint8)
        at = fbytes + 2 * 8192 + world * ar.LL_SOURCE_BYTES + p * words.numel()
        bufs[0][at : at + words.numel()] = words
    y, h = wss[0].all_reduce_rms_norm(y0, residual, weight, 1e-5)
    want_y, want_h = rms_norm(reference_sum([sent, *peers]), weight, 1e-5, residual)
    assert torch.equal(h, want_h) and torch.equal(y, want_y)
    assert wss[0].pushed is None and int(wss[0].error) == 0
    # The mark is spent: the next call on the same tensor (epoch 2, half 0) sends as usual.
    for p, yp in enumerate(peers, 1):
        words = ll_words(yp, 2).view(torch.uint8)
        at = fbytes + 2 * 8192 + p * words.numel()
        bufs[0][at : at + words.numel()] = words
    assert torch.equal(wss[0].all_reduce(y0), reference_sum([y0, *peers]))
    assert torch.equal(ll_slot(bufs, fbytes, 8192, 1, 0, 2, words.numel()), ll_words(y0, 2))


def test_push_targets_only_ll_shapes_and_not_two_kernel_sums() -> None:
    wss, _, _ = make_group(2, 4, capacity=1 << 20)
    ws = wss[0]
    assert ws.ll_push(ar.LL_MAX_ROWS + 1, 4096, torch.bfloat16) is None  # flag protocol
    assert ws.ll_push(1, 8192, torch.bfloat16) is None
    assert ws.ll_push(1, 4096, torch.int32) is None
    small = make_group(2, 4, capacity=1024)[0][0]  # the LL shape, but past the one-shot's size
    assert small.ll_push(4, 256, torch.bfloat16) is None and small.ll_push(2, 256, torch.bfloat16)
    ws.gemm_push = False  # HAL_ONESHOT_GEMM_PUSH=0
    assert ws.ll_push(2, 96, torch.bfloat16) is None
    ws.gemm_push = True
    push = ws.ll_push(2, 96, torch.bfloat16)
    assert (push.rows, push.cols, push.row_words, push.world) == (2, 96, 128, 2)
    x = torch.randn(2, 64, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(96, 64, device=DEVICE).to(torch.bfloat16)
    split = gemv.GemvConfig("fma", 32, 16, split_k=2, num_warps=4, num_stages=1)
    gemv.linear_small_m(x, w, config=split, fused_reduce=False, ll_push=push)
    assert not push.done  # the sum in a second kernel: the all-reduce sends as usual
    with pytest.raises(ValueError, match=r"ll_push: made for a \[2, 96\] output, got \[2, 32\]"):
        gemv.linear_small_m(x, w[:32], ll_push=push)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_a_missing_peer_sets_the_error_word(protocol) -> None:
    wss, bufs, fbytes = make_group(2, 2, capacity=1024, ll_max_rows=PROTOCOLS[protocol])
    ws = wss[0]
    ws.spin_limit = 50  # rank 1 never signals
    ar.one_shot_all_reduce(ws, torch.ones(1, 16, device=DEVICE))
    with pytest.raises(RuntimeError, match="signal never arrived.*HAL_ONESHOT_ALLREDUCE=0"):
        ws.check()


def test_bad_input_is_refused() -> None:
    wss, _, _ = make_group(2, 2, capacity=1024)
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


def test_takes_ll_by_rows_and_words() -> None:
    wss, _, _ = make_group(2, 2, capacity=1 << 20)
    ws = wss[0]
    ones = lambda *shape: torch.ones(*shape, device=DEVICE)  # noqa: E731
    assert ws.takes_ll(ones(1, 4096)) and ws.takes_ll(ones(ar.LL_MAX_ROWS, 4096))
    assert not ws.takes_ll(ones(ar.LL_MAX_ROWS + 1, 4096))  # more rows: flags and reads
    assert not ws.takes_ll(ones(1, ar.LL_MAX_COLS + 1))  # wider rows: flags and reads
    words = ar.LL_SOURCE_BYTES // 8  # one source's slot: rows x block_n words
    rows = words // ar.LL_MAX_COLS
    assert ws.takes_ll(ones(rows, ar.LL_MAX_COLS)) == (rows <= ar.LL_MAX_ROWS)
    ws.ll_max_rows = rows + 1
    assert not ws.takes_ll(ones(rows + 1, ar.LL_MAX_COLS))  # more words than a slot holds
    ws.ll_max_rows = 0
    assert not ws.takes_ll(ones(1, 16))


def test_buffer_layout() -> None:
    assert ar.flag_bytes(64, 2) == 512 and ar.flag_bytes(3, 2) == 256
    assert ar.ll_bytes(2) == 2 * 2 * ar.LL_SOURCE_BYTES
    assert ar.buffer_bytes(2, 4096, 64) == 512 + 2 * 4096 + ar.ll_bytes(2)
    with pytest.raises(ValueError, match="multiple of 256"):
        ar.buffer_bytes(2, 1000, 64)


def test_device_reason() -> None:
    assert "not a CUDA GPU" in ar.device_reason(torch.device("cpu"))
    if DEVICE == "cuda":
        assert ar.device_reason(torch.device("cuda", 0)) is None
