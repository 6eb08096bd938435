"""The CPU engine's linears: the "onednn" gemm (oneDNN's matmul primitive) against F.linear
(torch's default CPU path, MKL's sgemv / sgemm: what transformers runs), and the C codes kernel
(`backends/cpu/ckernels.py`: what a GGUF model's decode-sized calls run, on int8 codes with an
fp32 scale and offset per 32 values, the tiled layout of a Q4_1 weight) against oneDNN on the
same weight's fp32 values, on the default model's shapes (SmolLM2-135M: qkv 960 x 576, o 576 x
576, gate_up 3072 x 576, down 576 x 1536, LM head 49152 x 576) or a Llama-3.2-1B's, in one run;
prints each one's time and GB/s of weights read, and the ratios (> 1: ours faster). The codes
kernel runs M <= its MAX_M (8); "-" past it.

    /work/venv/bin/python bench/cpu_linear.py [--model smollm2-135m|llama-3.2-1b] [--ms 1 4 16 128]

Each call reads a different copy of the weight (about 400 MB cycled), so weights come from DRAM
as in a decode step, not from the cache; the best of --repeats rounds counts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from backends.cpu.ckernels import load_codes_kernel
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
    kernel, why = load_codes_kernel()
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads, fp32, {args.model}; "
          f"{kernel.describe() if kernel else f'no C codes kernel: {why}'}")  # fmt: skip
    print(f"{'shape':>8} {'N x K':>13} {'M':>4} {'F.linear us':>12} {'GB/s':>6} "
          f"{'onednn us':>10} {'GB/s':>6} {'ratio':>6} {'codes us':>9} {'GB/s':>6} "
          f"{'/onednn':>7}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    total = {"linear": 0.0, "onednn": 0.0, "codes": 0.0}
    for name, (n, k) in SHAPES[args.model].items():
        copies = max(2, args.cycle_mb * 2**20 // (n * k * 4))
        weights, tiled = [], []
        for _ in range(copies):  # a Q4_1-like weight: codes 0..15, fp32 scale and offset per 32
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, k // 32, 1, generator=g) * 0.02
            offset = (torch.rand(n, k // 32, 1, generator=g) - 0.5) * 0.2
            weights.append((codes.float().view(n, -1, 32) * scale + offset).view(n, k))
            tiled.append((codes, scale, offset))
        for m in args.ms:
            x = torch.randn(m, k, generator=g)
            t_lin = per_call(F.linear, weights, x, args.repeats)
            t_dnn = per_call(onednn_linear, weights, x, args.repeats)
            codes_cell = f"{'-':>9} {'-':>6} {'-':>7}"
            if kernel is not None and kernel.takes(m, k, 32):
                t_cg = per_call(lambda x, w: kernel(x, *w), tiled, x, args.repeats)
                cg_gb = n * k * (1 + 8 / 32) / 1e9  # codes + scale and offset
                codes_cell = f"{t_cg * 1e6:9.1f} {cg_gb / t_cg:6.1f} {t_dnn / t_cg:6.2f}x"
                if m == 1:
                    total["codes"] += t_cg
            if m == 1:
                total["linear"] += t_lin
                total["onednn"] += t_dnn
            gb = n * k * 4 / 1e9
            print(f"{name:>8} {f'{n} x {k}':>13} {m:4d} {t_lin * 1e6:12.1f} {gb / t_lin:6.1f} "
                  f"{t_dnn * 1e6:10.1f} {gb / t_dnn:6.1f} {t_lin / t_dnn:5.2f}x "
                  f"{codes_cell}")  # fmt: skip
        del weights, tiled
    if 1 in args.ms:
        lin, dnn, cg = total["linear"] * 1e3, total["onednn"] * 1e3, total["codes"] * 1e3
        print(f"\nM = 1, one of each shape: F.linear {lin:.2f} ms, onednn {dnn:.2f} ms "
              f"({lin / dnn:.2f}x)" + (f", codes {cg:.2f} ms ({dnn / cg:.2f}x onednn)"
                                      if cg else ""))  # fmt: skip


if __name__ == "__main__":
    main()
