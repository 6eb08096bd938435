"""4-bit weight-only GEMM (backends/triton/int4_gemm.py) against torch's bf16 matmul on the
dequantized weight, on the Llama-3-8B MLP shapes, with the copy bandwidth measured in the same run.

    python bench/int4_gemm.py --out int4_gemm.json               # the default tuning table
    python bench/int4_gemm.py --autotune --out int4_tune.json    # try block configs per M
    (under a 10-minute limit, split it: --ms 1 2 4 8, then --ms 16 64 256 2048)

Timing: CUDA graphs of one pass over several weight sets (together > 3x L2, so each call reads
cold weights), replayed between torch.cuda.Event pairs after warm-up; the median of the reps,
divided by the calls per pass. Weight-read GB/s counts qweight + scales + zeros (ours) and the
bf16 weight (the peer); the fraction is of the measured copy bandwidth (read + write of a clone).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda.quant import dequantize_int4  # noqa: E402
from backends.triton import int4_gemm as ig  # noqa: E402

SHAPES = {"gate/up K=4096 N=14336": (4096, 14336), "down K=14336 N=4096": (14336, 4096)}
MS = (1, 2, 4, 8, 16, 64, 256, 2048)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fns: list, reps: int, warmup: int) -> float:
    """Median ms per call of `fns` (one pass over the weight sets, captured in a CUDA graph)."""
    for _ in range(2):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed([lambda: dst.copy_(src)], reps, 5)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def weight_sets(k: int, n: int, group_size: int, dtype: torch.dtype, l2: int) -> list[tuple]:
    per_set = k // 8 * n * 4 + 2 * (k // group_size) * n * 3
    count = max(2, math.ceil(3 * l2 / per_set))
    sets = []
    for _ in range(count):
        qweight = torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int32, device="cuda")
        scales = (torch.rand(k // group_size, n, device="cuda") * 0.02 + 0.001).to(dtype)
        zeros = torch.randint(0, 16, (k // group_size, n), dtype=torch.uint8, device="cuda")
        sets.append((qweight, scales, zeros))
    return sets


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def run_ours(x, sets, group_size, config=None, reps=50, warmup=10) -> float:
    fns = [
        (lambda q=q, s=s, z=z: ig.int4_linear(x, q, s, z, group_size, config=config))
        for q, s, z in sets
    ]
    return timed(fns, reps, warmup)


def check_numerics(x, sets, group_size, config=None) -> float:
    """Relative Frobenius error of ours against the fp32 product on the dequantized weight."""
    q, s, z = sets[0]
    w = dequantize_int4(q, s, z, group_size, out_dtype=torch.float32)
    ref = x.float() @ w.t()
    y = ig.int4_linear(x, q, s, z, group_size, config=config).float()
    return float((y - ref).norm() / ref.norm().clamp(min=1e-30))


def candidates(m: int) -> list[ig.Int4Config]:
    """A few launch shapes per M (about 40-80): FMA for M <= 16, tensor-core tiles, K splits."""
    out = []
    pm = 1 << (m - 1).bit_length()
    if m <= 16:
        bm = min(pm, 4)
        for bn, bk, warps in itertools.product((64, 128, 256), (64, 128), (4, 8)):
            if (warps == 8) != (bn == 256) or bm * (bk // 8) * bn / (32 * warps) > 128:
                continue  # 8 warps only for the wide tile; skip accumulators that would spill
            for split in (0, 1, 2, 4, 8):
                out.append(ig.Int4Config("fma", bm, bn, bk, split, warps, 4))
    block_ms = (16,) if m <= 16 else (16, 32, 64) if m <= 64 else (64, 128)
    splits = (0, 1, 4) if m <= 64 else (0, 1)
    for bm, bn, bk in itertools.product(block_ms, (64, 128), (64, 128)):
        for (warps, stages), split in itertools.product(((4, 3), (4, 4), (8, 3)), splits):
            out.append(ig.Int4Config("dot", bm, bn, bk, split, warps, stages))
    return out


def autotune(args, sets_by_shape, dtype, results) -> None:
    best_by_m: dict[int, dict] = {}
    for m in args.ms:
        totals: dict[ig.Int4Config, float] = {}
        counts: dict[ig.Int4Config, int] = {}
        for label, (k, _n) in SHAPES.items():
            x = torch.randn(m, k, device="cuda").to(dtype)
            sets = sets_by_shape[label]
            for cfg in candidates(m):
                try:
                    ms = run_ours(x, sets, args.group_size, cfg, reps=max(10, args.reps // 3))
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                totals[cfg] = totals.get(cfg, 0.0) + ms
                counts[cfg] = counts.get(cfg, 0) + 1
                results["autotune"].append({"shape": label, "m": m, "config": vars(cfg), "ms": ms})
        complete = {c: t for c, t in totals.items() if counts[c] == len(SHAPES)}
        best = min(complete, key=complete.get)
        err = max(
            check_numerics(torch.randn(m, k, device="cuda").to(dtype), sets_by_shape[lb],
                           args.group_size, best)
            for lb, (k, _) in SHAPES.items()
        )  # fmt: skip
        default_total = sum(
            run_ours(torch.randn(m, k, device="cuda").to(dtype), sets_by_shape[lb],
                     args.group_size, ig.pick_config(m), reps=max(10, args.reps // 3))
            for lb, (k, _) in SHAPES.items()
        )  # fmt: skip
        best_by_m[m] = {"config": vars(best), "ms_both_shapes": complete[best],
                        "default_ms_both_shapes": default_total, "rel_err": err}  # fmt: skip
        print(f"M={m:5d} best {best}  {complete[best]:.4f} ms (both shapes; default table "
              f"{default_total:.4f} ms), rel err {err:.2e}")  # fmt: skip
    results["autotune_best"] = {str(m): v for m, v in best_by_m.items()}
    print("\nSuggested table (paste into DEFAULT_CONFIGS or a backend's int4_configs):")
    for m, v in best_by_m.items():
        c = v["config"]
        print(f"    ({m}, Int4Config({c['kernel']!r}, {c['block_m']}, {c['block_n']}, "
              f"{c['block_k']}, split_k={c['split_k']}, num_warps={c['num_warps']}, "
              f"num_stages={c['num_stages']})),")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--autotune", action="store_true", help="try block configs per M")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--ms", type=int, nargs="+", default=list(MS))
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    copy_gbs = copy_bandwidth(args.reps)
    results: dict = {
        "device": props.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit, "torch": torch.__version__, "triton": ig.triton.__version__,
        "dtype": args.dtype, "group_size": args.group_size, "copy_gbs": copy_gbs,
        "rows": [], "autotune": [],
    }  # fmt: skip
    print(f"{props.name}: copy bandwidth {copy_gbs:.0f} GB/s (1 GiB copy, read + write), "
          f"L2 {l2 / 2**20:.0f} MiB, {args.dtype}, G={args.group_size}")  # fmt: skip
    sets_by_shape = {
        label: weight_sets(k, n, args.group_size, dtype, l2) for label, (k, n) in SHAPES.items()
    }
    if args.autotune:
        autotune(args, sets_by_shape, dtype, results)
    else:
        head = (f"{'shape':24s} {'M':>5s} {'ours ms':>9s} {'GB/s':>7s} {'of copy':>7s} "
                f"{'TFLOP/s':>8s} {'bf16 ms':>9s} {'GB/s':>7s} {'of copy':>7s} {'TFLOP/s':>8s} "
                f"{'speedup':>7s} {'rel err':>8s}")  # fmt: skip
        print(head)
        for label, (k, n) in SHAPES.items():
            sets = sets_by_shape[label]
            qbytes = nbytes(*sets[0])
            w_peer = [dequantize_int4(q, s, z, args.group_size, out_dtype=dtype) for q, s, z in
                      sets[: max(2, math.ceil(3 * l2 / (n * k * 2)))]]  # fmt: skip
            for m in args.ms:
                x = torch.randn(m, k, device="cuda").to(dtype)
                ours = run_ours(x, sets, args.group_size, reps=args.reps)
                peer = timed([lambda x=x, w=w: F.linear(x, w) for w in w_peer], args.reps, 10)
                err = check_numerics(x, sets, args.group_size)
                flops = 2 * m * n * k
                row = {
                    "shape": label, "m": m, "k": k, "n": n, "config": vars(ig.pick_config(m)),
                    "ours_ms": ours, "ours_gbs": qbytes / (ours * 1e-3) / 1e9,
                    "ours_tflops": flops / (ours * 1e-3) / 1e12,
                    "bf16_ms": peer, "bf16_gbs": n * k * 2 / (peer * 1e-3) / 1e9,
                    "bf16_tflops": flops / (peer * 1e-3) / 1e12, "speedup": peer / ours,
                    "rel_err": err,
                }  # fmt: skip
                row["ours_frac_copy"] = row["ours_gbs"] / copy_gbs
                row["bf16_frac_copy"] = row["bf16_gbs"] / copy_gbs
                results["rows"].append(row)
                print(f"{label:24s} {m:5d} {ours:9.4f} {row['ours_gbs']:7.0f} "
                      f"{row['ours_frac_copy']:7.2f} {row['ours_tflops']:8.1f} {peer:9.4f} "
                      f"{row['bf16_gbs']:7.0f} {row['bf16_frac_copy']:7.2f} "
                      f"{row['bf16_tflops']:8.1f} {row['speedup']:7.2f} {err:8.1e}")  # fmt: skip
            del w_peer
        decode = [r["ours_frac_copy"] for r in results["rows"] if r["m"] <= 16]
        if decode:
            print(f"decode (M <= 16) weight read: min {min(decode):.2f} of copy bandwidth "
                  f"(target >= 0.7)")  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
