"""GEMV/GEMM timings of GGUF weights kept quantized on CPU: the SmolLM2-135M MLP shapes at M = 1
and 16, our paths (bf16 int4pack, exact fp32 tiled) against a dense fp32 linear on the weight.

Run: /work/venv/bin/python bench/gguf_cpu.py [--threads N] [--iters N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from backends.cpu.gguf import block_type, dequantize_gguf
from backends.cpu.gguf_fast import gguf_linear_cpu, prepare_gguf_cpu

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M
SHAPES = {"gate/up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, rows: int, cols: int) -> torch.Tensor:
    bt = block_type(qtype)
    rng = np.random.default_rng(0)
    nb = cols // bt.block_size
    b = rng.integers(0, 256, size=(rows, nb, bt.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = (rng.standard_normal((rows, nb)) * 0.01).astype(np.float16)
        b[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return torch.from_numpy(b.reshape(rows, -1))


def timeit(fn, iters: int) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}; ratio = dense time / ours"
    )
    print(
        f"{'qtype':6} {'shape':8} {'M':>3} {'path':9} {'ours us':>9} {'dense us':>9} {'ratio':>6}"
    )
    for qtype in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"):
        for label, (n, k) in SHAPES.items():
            if k % block_type(qtype).block_size:
                print(f"{qtype:6} {label:8} skipped: K={k} is not a multiple of 256")
                continue
            blocks = random_blocks(qtype, n, k)
            dense = dequantize_gguf(blocks, qtype, (n, k))
            paths = {p: prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=p == "int4pack")
                     for p in ("int4pack", "tiled")}  # fmt: skip
            for m in (1, 16):
                x = torch.randn(m, k)
                t_dense = timeit(lambda x=x, w=dense: torch.nn.functional.linear(x, w), args.iters)
                for name, w in paths.items():
                    if w.path != name:
                        continue  # int4pack asked for an 8-bit type: same as tiled
                    t = timeit(lambda x=x, w=w: gguf_linear_cpu(x, w), args.iters)
                    print(f"{qtype:6} {label:8} {m:3} {name:9} {t * 1e6:9.1f} "
                          f"{t_dense * 1e6:9.1f} {t_dense / t:6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
