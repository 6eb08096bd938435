"""The PTX-dequantizing 4-bit GEMM (backends/triton/int4_gemv_asm.py) on the Llama-3-8B MLP shapes
at decode sizes, against the existing packed int4 kernel (backends/triton/int4_gemm.py) and bf16
F.linear, as fractions of the copy bandwidth measured in the same run.

    python bench/int4_gemv_asm.py --out int4_gemv_asm.json

Timing: bench/int4_gemm.py's `timed` (CUDA graphs over enough weight sets to exceed 3x L2, so
every call reads cold weights; median of the reps per call). Bytes: qweight + scales + zeros
(int4), the bf16 weight (F.linear). Copy bandwidth: bench/attention.py's `copy_bandwidth`. Every
timed result is checked against x.float() @ dequantize_packed(p).T. The sweep (SWEEP below) is
compiled in parallel worker processes first; the run stops sweeping new configs past --budget-s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda.quant import dequantize_int4  # noqa: E402
from backends.triton import int4_gemm as ig  # noqa: E402
from backends.triton import int4_gemv_asm as ga  # noqa: E402
from bench.attention import Timer, copy_bandwidth  # noqa: E402
from bench.int4_gemm import nbytes, timed, weight_sets  # noqa: E402

SHAPES = {"gate/up K=4096 N=14336": (4096, 14336), "down K=14336 N=4096": (14336, 4096)}
MS = (1, 2, 4, 8, 16)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (block_n, block_k, num_warps, num_stages) x split_k: split 1 compiles the direct-store variant,
# any other split the partials variant (2 compilations per base).
BASES = ((64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 4), (64, 256, 4, 3),
         (128, 256, 8, 3), (32, 128, 4, 4), (256, 128, 8, 3))  # fmt: skip
SPLITS = (0, 1, 2, 4)
SWEEP = [ga.AsmConfig(bn, bk, s, w, st) for (bn, bk, w, st) in BASES for s in SPLITS]


def _compile_job(job: tuple[ga.AsmConfig, str]) -> str:
    # In a worker: small launches with the real shapes' specialisations (K = 4096, N a multiple
    # of 16, direct store and partials) fill Triton's on-disk cache for the main process.
    cfg, dtype_name = job
    dtype = DTYPES[dtype_name]
    (q, s, z), = weight_sets(4096, 256, 128, dtype, l2=0)[:1]  # fmt: skip
    p = ig.repack_int4_for_triton(q, s, z, 128)
    x = torch.randn(2, 4096, device="cuda").to(dtype)
    for split in (1, 2):
        ga.int4_linear_packed_asm(x, p, config=dataclasses.replace(cfg, split_k=split))
    torch.cuda.synchronize()
    return str(cfg)


def precompile(configs: list[ga.AsmConfig], dtype_name: str) -> None:
    bases = sorted({dataclasses.replace(c, split_k=1) for c in configs}, key=str)
    workers = max(1, min(len(bases), os.cpu_count() or 1, 16))
    start = time.perf_counter()
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futs = [pool.submit(_compile_job, (c, dtype_name)) for c in bases]
            for fut in concurrent.futures.as_completed(futs):
                if fut.exception() is not None:
                    exc = fut.exception()
                    print(f"  precompile: {type(exc).__name__}: {str(exc)[:300]}")
        print(f"precompiled {len(bases)} configs x 2 variants on {workers} processes in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the sweep compiles lazily instead
        print(f"precompile failed ({type(exc).__name__}: {exc}); compiling during the sweep")


def max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|."""
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop sweeping new configs")
    ap.add_argument("--no-precompile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    copy_gbs = copy_bandwidth(device, Timer(device, warmup=5, reps=args.reps))
    print(f"{props.name}: copy {copy_gbs / 1e9:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB, {args.dtype}, "
          f"G={args.group_size}, asm runs: {ga._asm_runs_on(device)}")  # fmt: skip
    if not args.no_precompile:
        precompile(SWEEP, args.dtype)
    results: dict = {
        "device": props.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": ig.triton.__version__, "dtype": args.dtype,
        "group_size": args.group_size, "copy_gbs": copy_gbs / 1e9, "rows": [], "sweep": [],
    }  # fmt: skip
    best_sum: dict[int, dict[ga.AsmConfig, float]] = {m: {} for m in args.ms}
    shapes_timed: dict[int, dict[ga.AsmConfig, int]] = {m: {} for m in args.ms}
    head = (
        f"{'shape':24s} {'M':>3s} | {'asm ms':>7s} {'copy':>5s} {'err':>7s} | {'old ms':>7s} "
        f"{'copy':>5s} {'err':>7s} | {'bf16 ms':>7s} {'copy':>5s} | {'x old':>5s}  best config"
    )
    print(head)
    for label, (k, n) in SHAPES.items():
        canon = weight_sets(k, n, args.group_size, dtype, l2)
        packed = [ig.repack_int4_for_triton(q, s, z, args.group_size) for q, s, z in canon]
        wbytes = nbytes(packed[0].qweight, packed[0].scales, packed[0].zeros)
        w_ref = ig.dequantize_packed(packed[0])  # fp32 [N, K]
        dense = [dequantize_int4(q, s, z, args.group_size, out_dtype=dtype)
                 for q, s, z in canon[: max(2, math.ceil(3 * l2 / (n * k * 2)))]]  # fmt: skip
        for m in args.ms:
            x = torch.randn(m, k, device=device).to(dtype)
            ref = x.float() @ w_ref.t()
            row = {"shape": label, "m": m, "k": k, "n": n, "bytes": wbytes}
            tried = {}
            for cfg in SWEEP:
                if time.perf_counter() - start > args.budget_s and tried:
                    break
                try:
                    err = max_err(ga.int4_linear_packed_asm(x, packed[0], config=cfg), ref)
                    ms = timed([lambda w=w, c=cfg, x=x: ga.int4_linear_packed_asm(x, w, config=c)
                                for w in packed], args.reps, 3)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - a config that fails is reported
                    print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                tried[cfg] = ms
                frac = wbytes / (ms * 1e-3) / copy_gbs
                results["sweep"].append({"shape": label, "m": m, "config": vars(cfg), "ms": ms,
                                         "frac_copy": frac, "max_rel_err": err})  # fmt: skip
                best_sum[m][cfg] = best_sum[m].get(cfg, 0.0) + ms
                shapes_timed[m][cfg] = shapes_timed[m].get(cfg, 0) + 1
                row["sweep_max_rel_err"] = max(row.get("sweep_max_rel_err", 0.0), err)
            if not tried:
                print(f"{label:24s} {m:3d} | every asm config failed")
                continue
            best = min(tried, key=tried.get)
            row.update(
                asm_ms=tried[best],
                asm_config=vars(best),
                asm_err=max_err(ga.int4_linear_packed_asm(x, packed[0], config=best), ref),
            )
            old_err = max_err(ig.int4_linear(x, packed[0]), ref)
            row.update(old_ms=timed([lambda w=w, x=x: ig.int4_linear(x, w) for w in packed],
                                    args.reps, 3), old_err=old_err)  # fmt: skip
            row["bf16_ms"] = timed([lambda w=w, x=x: F.linear(x, w) for w in dense], args.reps, 3)
            row["bf16_err"] = max_err(F.linear(x, dense[0]), x.float() @ dense[0].float().t())
            for name, nb in (("asm", wbytes), ("old", wbytes), ("bf16", n * k * 2)):
                row[f"{name}_frac_copy"] = nb / (row[f"{name}_ms"] * 1e-3) / copy_gbs
            results["rows"].append(row)
            print(f"{label:24s} {m:3d} | {row['asm_ms']:7.4f} {row['asm_frac_copy']:5.2f} "
                  f"{row['asm_err']:7.1e} | {row['old_ms']:7.4f} {row['old_frac_copy']:5.2f} "
                  f"{old_err:7.1e} | {row['bf16_ms']:7.4f} {row['bf16_frac_copy']:5.2f} | "
                  f"{row['old_ms'] / row['asm_ms']:5.2f}  {best} ({len(tried)} tried, worst err "
                  f"{row['sweep_max_rel_err']:.1e})")  # fmt: skip
        del dense, packed, canon
        torch.cuda.empty_cache()
    fracs = [r["asm_frac_copy"] for r in results["rows"]]
    if fracs:
        print(f"asm kernel: min {min(fracs):.2f}, max {max(fracs):.2f} of copy over M in "
              f"{args.ms} (target >= 0.7)")  # fmt: skip
    print("\nSuggested ASM_CONFIGS (best summed over both shapes; the first row with max_m >= M):")
    for i, m in enumerate(sorted(args.ms)):
        both = {c: t for c, t in best_sum[m].items() if shapes_timed[m][c] == len(SHAPES)}
        if both:
            c = min(both, key=both.get)
            max_m = "16" if i == len(args.ms) - 1 else str(m)
            print(f"    ({max_m}, AsmConfig({c.block_n}, {c.block_k}, split_k={c.split_k}, "
                  f"num_warps={c.num_warps}, num_stages={c.num_stages})),")  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
