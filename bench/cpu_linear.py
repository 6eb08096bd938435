"""The CPU engine's fp32 linear: the "onednn" gemm (oneDNN's matmul primitive) against F.linear
(torch's default CPU path, MKL's sgemv / sgemm: what transformers runs), on the default model's
shapes (SmolLM2-135M: qkv 960 x 576, o 576 x 576, gate_up 3072 x 576, down 576 x 1536, LM head
49152 x 576) or a Llama-3.2-1B's, in one run; prints each one's time and GB/s of weights read,
and the ratio (> 1: ours faster).

    /work/venv/bin/python bench/cpu_linear.py [--model smollm2-135m|llama-3.2-1b] [--ms 1 4 16 128]

Each call reads a different copy of the weight (about 400 MB cycled), so weights come from DRAM
as in a decode step, not from the cache; the best of --repeats rounds counts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from backends.cpu.native import onednn_linear, onednn_reasons

SHAPES = {  # name -> (N, K)
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576),
                     "down": (576, 1536), "lm_head": (49152, 576)},
    "llama-3.2-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                     "down": (2048, 8192), "lm_head": (128256, 2048)},
}  # fmt: skip


def per_call(fn, weights, x, rounds: int) -> float:
    """Seconds per call of fn(x, w), cycling through the weight copies; best of rounds."""
    fn(x, weights[0])
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 128])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycle-mb", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reasons = onednn_reasons()
    if reasons:
        raise SystemExit(f"oneDNN's matmul cannot run in this torch: {'; '.join(reasons)}")
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads, fp32, {args.model}")  # fmt: skip
    print(f"{'shape':>8} {'N x K':>13} {'M':>4} {'F.linear us':>12} {'GB/s':>6} "
          f"{'onednn us':>10} {'GB/s':>6} {'ratio':>6}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    total = {"linear": 0.0, "onednn": 0.0}
    for name, (n, k) in SHAPES[args.model].items():
        copies = max(2, args.cycle_mb * 2**20 // (n * k * 4))
        weights = [torch.randn(n, k, generator=g) for _ in range(copies)]
        for m in args.ms:
            x = torch.randn(m, k, generator=g)
            t_lin = per_call(F.linear, weights, x, args.repeats)
            t_dnn = per_call(onednn_linear, weights, x, args.repeats)
            if m == 1:
                total["linear"] += t_lin
                total["onednn"] += t_dnn
            gb = n * k * 4 / 1e9
            print(f"{name:>8} {f'{n} x {k}':>13} {m:4d} {t_lin * 1e6:12.1f} {gb / t_lin:6.1f} "
                  f"{t_dnn * 1e6:10.1f} {gb / t_dnn:6.1f} {t_lin / t_dnn:5.2f}x")  # fmt: skip
        del weights
    if 1 in args.ms:
        lin, dnn = total["linear"] * 1e3, total["onednn"] * 1e3
        print(f"\nM = 1, one of each shape: F.linear {lin:.2f} ms, onednn {dnn:.2f} ms, "
              f"{lin / dnn:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
