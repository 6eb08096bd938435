"""Block-scaled FP8 GEMMs on Llama-3-8B shapes, FP8 weights with 128 x 128 block scales and
per-128-column activation scales, against the peers a user has in the same run: bf16 F.linear
(cuBLAS) and the per-channel FP8 GEMM (row-wise torch._scaled_mm, what a per-channel FP8
checkpoint runs). Ours: the Triton kernel (backends/triton/fp8_block.py), cuBLASLt's block-scaled
GEMM through torch._scaled_mm (backends/cuda/linear.py), and "engine" = what an FP8 block layer
runs (the group quantize, then the CUDA backend's pick by M).

    python bench/fp8_block.py                          # M = 1 ... 4096 on the four 8B linears
    python bench/fp8_block.py --ms 1 16 --sweep        # also a grid of Triton configs

Timing: CUDA graphs over several weight copies (together > 3x L2, so each call reads its weight
from DRAM), the median replay between CUDA events, per call (bench/int4_gemm.py's method). "of
copy" = weight bytes / the faster GEMM's time / a measured 1 GiB device copy; TFLOP/s = 2 M N K /
that time. Both GEMMs are first checked against float64 (the conformance bound for an FP8
tensor-core GEMM).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hal  # noqa: E402
from backends.cuda import linear  # noqa: E402
from backends.triton import fp8_block as fb  # noqa: E402
from backends.triton import quant as tq  # noqa: E402
from bench.int4_gemm import timed  # noqa: E402
from bench.int8_gemv import SHAPES, copy_bandwidth  # noqa: E402
from platforms import detect  # noqa: E402
from tests.conformance.tolerances import tolerance  # noqa: E402

BLOCK = 128
FP8 = torch.float8_e4m3fn


def weight_sets(k: int, n: int, l2: int) -> list[tuple]:
    """(w fp8 [N, K], w_scale [G, N / 128] (passed transposed: a checkpoint's 128 x 128 blocks),
    w bf16 [N, K], row-wise scale [N, 1]) copies, enough fp8 bytes to exceed 3x L2."""
    count = max(2, math.ceil(3 * l2 / (n * k)))
    sets = []
    for _ in range(count):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq = (w.float() * 448 / w.float().abs().amax()).to(FP8)
        ws = torch.rand(k // BLOCK, n // BLOCK, device="cuda") * 1e-4 + 1e-5
        row = torch.rand(n, 1, device="cuda") * 1e-4 + 1e-5
        sets.append((wq, ws, w, row))
    return sets


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q, s = tq.quantize_fp8(x.reshape(m * (k // BLOCK), BLOCK), FP8, per_token=True)
    return q.reshape(m, k), s.reshape(m, k // BLOCK)


def check(x_q, x_s, wq, ws, y) -> str:
    # ws: [N / R, G]
    b = x_q.shape[1] // x_s.shape[1]
    x = x_q.double() * x_s.double().repeat_interleave(b, dim=1)
    ws = ws.double().repeat_interleave(wq.shape[0] // ws.shape[0], dim=0)
    w = wq.double() * ws.repeat_interleave(b, dim=1)
    ref = x @ w.t()
    allowed = tolerance(y.dtype, fp8_gemm=True).allowed(
        ref, float(x.abs().max() * w.abs().max()), x.shape[1]
    )
    err = (y.double() - ref).abs()
    return "ok" if bool((err <= allowed).all()) else f"FAIL (max err {float(err.max()):.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qkv", "o", "gate_up", "down"])
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 4, 16, 64, 128, 256, 1024, 4096])
    ap.add_argument(
        "--sweep",
        nargs="?",
        const="both",
        choices=("block", "rowwise", "both"),
        help="also time a grid of Triton configs (block-scaled, per-channel, both)",
    )
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    backend = hal.load_backend(detect(), device="cuda")
    print(f"# {props.name}, torch {torch.__version__}, copy {copy:.0f} GB/s; backend "
          f"fp8_block_gemm: {backend.chosen('fp8_block_gemm')} from M = "
          f"{backend.fp8_block_scaled_mm_min_m}")  # fmt: skip
    print("shape M | engine us (ran) | triton us | cublas block us | of copy | TFLOP/s | bf16 us "
          "| fp8 row us | bf16/engine | fp8row/engine | check triton / cublas")  # fmt: skip
    for shape in args.shapes:
        k, n = SHAPES[shape]
        sets = weight_sets(k, n, props.L2_cache_size)
        for m in args.ms:
            row(shape, m, k, n, sets, copy, backend, args)


def row(shape: str, m: int, k: int, n: int, sets: list, copy: float, backend, args) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x_q, x_s = quantize_groups(x)
    wq, ws, _, _ = sets[0]
    status = check(x_q, x_s, wq, ws.t(), fb.fp8_block_linear(x_q, x_s, wq, ws.t()))

    def each(fn) -> float:  # fn(weight set) timed over all sets
        return timed([functools.partial(fn, s) for s in sets], args.reps, 3)

    def engine(s):  # what an FP8 block layer runs: group quantize, then the backend's choice
        q, qs = quantize_groups(x)
        return backend.fp8_linear(q, qs, s[0], s[1].t())

    triton_us = each(lambda s: fb.fp8_block_linear(x_q, x_s, s[0], s[1].t())) * 1e3
    try:
        y = linear.fp8_block_linear_scaled_mm(x_q, x_s, wq, ws.t())
        status += " / " + check(x_q, x_s, wq, ws.t(), y)
        us = each(lambda s: linear.fp8_block_linear_scaled_mm(x_q, x_s, s[0], s[1].t())) * 1e3
        cublas = f"{us:.1f}"
    except Exception as e:  # noqa: BLE001 - report why the peer is absent
        cublas = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    backend.ran.clear()
    engine_us = each(engine) * 1e3
    ran = backend.ran.get("fp8_block_gemm", "?")
    bf16 = each(lambda s: F.linear(x, s[2])) * 1e3
    fp8_row = each(
        lambda s: linear.fp8_linear_scaled_mm(
            *tq.quantize_fp8(x, FP8, per_token=True), s[0], s[3], rowwise=True
        )
    )
    fp8_row *= 1e3
    # The per-channel FP8 GEMM on the same Triton kernel (K tiles accumulated in the MMA)
    xr, xr_s = tq.quantize_fp8(x, FP8, per_token=True)
    y = fb.fp8_rowwise_linear(xr, xr_s, wq, sets[0][3])
    status += " / row " + check(xr, xr_s, wq, sets[0][3], y)
    tri_row = each(lambda s: fb.fp8_rowwise_linear(xr, xr_s, s[0], s[3])) * 1e3
    fp8_row_gemm = each(lambda s: linear.fp8_linear_scaled_mm(xr, xr_s, s[0], s[3], rowwise=True))
    fp8_row_gemm *= 1e3
    best = min(triton_us, float(cublas) if cublas[0].isdigit() else triton_us)
    frac = n * k / (best * 1e-6) / 1e9 / copy
    tflops = 2 * m * n * k / (best * 1e-6) / 1e12
    print(f"{shape} {m} | {engine_us:.1f} ({ran}) | {triton_us:.1f} | {cublas} | {frac:.2f} | "
          f"{tflops:.0f} | {bf16:.1f} | {fp8_row:.1f} | {bf16 / engine_us:.2f} | "
          f"{fp8_row / engine_us:.2f} | per-channel GEMM alone: triton {tri_row:.1f} / "
          f"_scaled_mm {fp8_row_gemm:.1f} us | {status}", flush=True)  # fmt: skip
    if args.sweep in ("block", "both"):
        sweep(m, each, x_q, x_s)
    if args.sweep in ("rowwise", "both"):
        sweep(m, each, xr, xr_s, rowwise=True)


def sweep(m: int, each, x_q, x_s, rowwise: bool = False) -> None:
    if m <= fb.SWAP_MAX_M:
        grid = [
            fb.Fp8BlockConfig(True, 16 if m <= 16 else 32, bn, 4, st, sp)
            for bn in (32, 64, 128)
            for st in (3, 4)
            for sp in (0, 2, 4)
        ]
    else:
        grid = [
            fb.Fp8BlockConfig(False, bm, bn, w, st, sp)
            for bm in (64, 128)
            for bn in (64, 128, 256)
            for w in (4, 8)
            for st in (3, 4)
            for sp in ((0, 1) if m <= 512 else (1,))
        ]
    results = []
    for cfg in grid:
        try:
            t = each(functools.partial(_call_with, x_q, x_s, cfg, rowwise))
        except Exception as e:  # noqa: BLE001 - out of shared memory and the like
            print(f"  {cfg}: {type(e).__name__}")
            continue
        results.append((t, cfg))
    results.sort(key=lambda r: r[0])
    for t, cfg in results[:4]:
        print(f"  sweep{' rowwise' if rowwise else ''} M={m}: {t * 1e3:.1f} us {cfg}")


def _call_with(x_q, x_s, cfg, rowwise, s):
    if rowwise:
        return fb.fp8_rowwise_linear(x_q, x_s, s[0], s[3], config=cfg)
    return fb.fp8_block_linear(x_q, x_s, s[0], s[1].t(), config=cfg)


if __name__ == "__main__":
    main()
