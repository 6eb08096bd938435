"""The decode-sized W8A8 GEMM (backends/triton/int8_gemv.py) against torch on Llama-3-8B shapes:
torch._int_mm as the backend runs it (M zero-padded to 17, backends.cuda.linear.int8_linear_int_mm),
the bare _int_mm on pre-padded operands, and bf16 F.linear (cuBLAS) on the same shape.

    python bench/int8_gemv.py                        # M = 1, 4, 16 on the MLP shapes
    python bench/int8_gemv.py --autotune             # sweep configs, print a DEFAULT_CONFIGS table
    python bench/int8_gemv.py --shapes qkv o gate_up down lm_head --ms 1 2 4 8 16 --autotune

Timing as bench/gemv.py: CUDA graphs over several weight copies (together > 3x L2, so each call
reads its weight from DRAM), the median replay between CUDA events, per call. GB/s counts the
weight bytes; "of copy" divides by a measured 1 GiB device copy. Every config timed is first
checked bit for bit against int8_linear_int_mm (both exact int32, same fp32 epilogue).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda import linear  # noqa: E402
from backends.triton import gemv  # noqa: E402
from backends.triton import int8_gemv as ig  # noqa: E402
from bench.attention import Timer  # noqa: E402
from bench.attention import copy_bandwidth as attention_copy_bandwidth  # noqa: E402
from bench.int4_gemm import timed as graph_timed  # noqa: E402

SHAPES = {  # name -> (K, N)
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "up": (4096, 14336),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}
MIN_REPLAY_MS = 0.3


def timed(fns: list, reps: int = 20) -> float:
    """Median ms per call of `fns` captured in one CUDA graph (bench/int4_gemm.py's timing)."""
    return graph_timed(fns, reps, warmup=3)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device copy (bench/attention.py's method)."""
    device = torch.device("cuda")
    return attention_copy_bandwidth(device, Timer(device, warmup=5, reps=20)) / 1e9


@dataclasses.dataclass
class Case:
    k: int
    n: int
    w8: list  # [(w_q int8 [N, K], w_scale fp32 [N, 1])]
    w16: list  # [bf16 [N, K]]

    def calls(self, make, copies: list, nbytes: int, copy_gbs: float) -> list:
        one = [make(c) for c in copies]
        est_ms = nbytes / (copy_gbs * 1e9) * 1e3
        return one * max(1, math.ceil(MIN_REPLAY_MS / (est_ms * len(one))))


def make_case(k: int, n: int, l2: int) -> Case:
    count = max(2, math.ceil(3 * l2 / (n * k)))
    w8 = [(torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda"),
           torch.rand(n, 1, device="cuda") * 1e-3 + 1e-4) for _ in range(count)]  # fmt: skip
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    return Case(k, n, w8, w16)


def candidates(m: int) -> list[gemv.GemvConfig]:
    out = []
    if m <= 2:
        for bn, bk, warps in ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 512, 4),
                              (16, 1024, 8), (32, 256, 4), (32, 512, 8)):  # fmt: skip
            out.append(gemv.GemvConfig("fma", bn, bk, 0, warps, 1))
    for bn, bk, stages in itertools.product((16, 32, 64, 128), (128, 256, 512), (2, 3, 4, 5)):
        if stages * (bn + gemv.DOT_BLOCK_M) * bk <= 160 * 1024:
            out.append(gemv.GemvConfig("dot", bn, bk, 0, 4, stages))
    return out


def _compile_job(cfg: gemv.GemvConfig) -> str:
    # A worker process fills Triton's disk cache: same specialisation as the real shapes.
    x = torch.randint(-128, 128, (2, 4096), dtype=torch.int8, device="cuda")
    w = torch.randint(-128, 128, (64, 4096), dtype=torch.int8, device="cuda")
    xs, ws = torch.ones(2, 1, device="cuda"), torch.ones(64, 1, device="cuda")
    for split in (1, 2):
        ig.int8_linear_small_m(x, xs, w, ws, config=dataclasses.replace(cfg, split_k=split))
    torch.cuda.synchronize()
    return str(cfg)


def precompile(ms: list[int]) -> None:
    jobs = sorted({c for m in ms for c in candidates(m)}, key=str)
    start = time.perf_counter()
    try:
        ctx = multiprocessing.get_context("spawn")
        workers = max(1, min(len(jobs), os.cpu_count() or 1, 16))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            list(pool.map(_compile_job, jobs))
        print(f"precompiled {len(jobs)} configs in {time.perf_counter() - start:.1f} s")
    except Exception as exc:  # noqa: BLE001 - the sweep compiles lazily instead
        print(f"precompile failed ({type(exc).__name__}: {exc}); compiling during the sweep")


def ours(x, xs, cfg=None, configs=None):
    return lambda c: lambda: ig.int8_linear_small_m(x, xs, c[0], c[1], config=cfg,
                                                    configs=configs)  # fmt: skip


def exact_vs_int_mm(case: Case, x, xs, cfg=None, configs=None) -> bool:
    w, ws = case.w8[0]
    got = ig.int8_linear_small_m(x, xs, w, ws, config=cfg, configs=configs)
    return bool(torch.equal(got, linear.int8_linear_int_mm(x, xs, w, ws)))


def tune(case: Case, m: int, copy_gbs: float, sms: int) -> tuple[gemv.GemvConfig, float]:
    x = torch.randint(-128, 128, (m, case.k), dtype=torch.int8, device="cuda")
    xs = torch.rand(m, 1, device="cuda") * 1e-2
    tried: dict[gemv.GemvConfig, float] = {}

    def measure(cfg: gemv.GemvConfig) -> None:
        if cfg in tried:
            return
        try:
            if not exact_vs_int_mm(case, x, xs, cfg):
                print(f"  MISMATCH vs _int_mm: {cfg}")
                return
            tried[cfg] = timed(case.calls(ours(x, xs, cfg), case.w8, case.n * case.k, copy_gbs), 5)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:100]}")

    for cfg in candidates(m):
        measure(cfg)
    for cfg in sorted(tried, key=tried.get)[:3]:
        auto = gemv.split_plan(cfg, m, case.n, case.k, sms)[0]
        for split in (1, 2, 4, 8):
            if split != auto and split <= math.ceil(case.k / cfg.block_k):
                measure(dataclasses.replace(cfg, split_k=split))
    best = min(tried, key=tried.get)
    if best.split_k == 0:
        best = dataclasses.replace(best, split_k=gemv.split_plan(best, m, case.n, case.k, sms)[0])
    return best, tried[min(tried, key=tried.get)]


def row(label: str, case: Case, m: int, cfg: gemv.GemvConfig | None, copy_gbs: float) -> str:
    """One table row: ours (cfg, else the table / heuristic), int_mm as the backend runs it, the
    bare _int_mm on M padded to 17, bf16 F.linear; and whether ours equals int_mm bit for bit."""
    k, n, nb = case.k, case.n, case.n * case.k
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    xs = torch.rand(m, 1, device="cuda") * 1e-2
    xp = torch.zeros(max(m, 17), k, dtype=torch.int8, device="cuda")
    xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    t_ours = timed(case.calls(ours(x, xs, cfg), case.w8, nb, copy_gbs))
    t_mm = timed(case.calls(lambda c: lambda: linear.int8_linear_int_mm(x, xs, c[0], c[1]),
                            case.w8, nb, copy_gbs))  # fmt: skip
    t_bare = timed(case.calls(lambda c: lambda: torch._int_mm(xp, c[0].t()), case.w8, nb,
                              copy_gbs))  # fmt: skip
    t_bf = timed(case.calls(lambda w: lambda: F.linear(xb, w), case.w16, 2 * nb, copy_gbs))
    frac = nb / (t_ours * 1e-3) / 1e9 / copy_gbs
    used = cfg or ig.pick_config(m, n, k)
    exact = exact_vs_int_mm(case, x, xs, cfg)
    return (f"{label:8s} {k:6d} {n:6d} {m:3d} | {t_ours:8.4f} {frac:7.2f} | {t_mm:9.4f} "
            f"{t_bare:7.4f} | {t_bf:8.4f} | {t_mm / t_ours:8.2f} {t_bf / t_ours:7.2f} | "
            f"{str(exact):5s}  {used}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["up", "down"])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--autotune", action="store_true", help="sweep configs, print the table")
    args = p.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2, sms = props.L2_cache_size, props.multi_processor_count
    copy_gbs = copy_bandwidth()
    print(f"{props.name}, torch {torch.__version__}, copy {copy_gbs:.0f} GB/s")
    table = {}
    if args.autotune:
        precompile(args.ms)
    hdr = (f"{'shape':8s} {'K':>6s} {'N':>6s} {'M':>3s} | {'ours ms':>8s} {'of copy':>7s} | "
           f"{'int_mm ms':>9s} {'bare':>7s} | {'bf16 ms':>8s} | {'x int_mm':>8s} {'x bf16':>7s}"
           " | exact  config")  # fmt: skip
    rows = []
    for label in args.shapes:
        k, n = SHAPES[label]
        case = make_case(k, n, l2)
        for m in args.ms:
            if args.autotune:
                best, _ = tune(case, m, copy_gbs, sms)
                table[gemv.m_bucket(m), n, k] = best
            cfg = table.get((gemv.m_bucket(m), n, k))
            rows.append(row(label, case, m, cfg, copy_gbs))
            print(rows[-1], flush=True)
        del case
        torch.cuda.empty_cache()
    print("\n" + hdr)
    print("\n".join(rows))
    if table:
        print(f"\n    # {props.name}, python bench/int8_gemv.py --autotune")
        for key, cfg in sorted(table.items()):
            print(f"    {key}: GemvConfig({cfg.kernel!r}, {cfg.block_n}, {cfg.block_k}, "
                  f"split_k={cfg.split_k}, num_warps={cfg.num_warps}, "
                  f"num_stages={cfg.num_stages}),")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
