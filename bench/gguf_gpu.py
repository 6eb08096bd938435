"""GGUF GEMM on the GPU at decode sizes: the Triton kernel on raw blocks (`backends.triton.gguf`)
against a bf16 torch matmul on the dequantized weight, Llama-3-8B MLP shapes, M = 1..16, with the
bandwidth each reaches reading its weights (and a device copy's bandwidth as the ceiling).

Run on a CUDA device: python bench/gguf_gpu.py [--types Q4_0,Q4_K] [--m 1,2,4,8,16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backends.cpu.gguf import block_type, dequantize_gguf
from backends.triton.gguf import gguf_linear

SHAPES = {"gate/up": (14336, 4096), "down": (4096, 14336)}  # Llama-3-8B (N, K)
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, rows: int, cols: int) -> torch.Tensor:
    bt = block_type(qtype)
    rng = np.random.default_rng(0)
    nb = cols // bt.block_size
    b = rng.integers(0, 256, size=(rows, nb, bt.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = (rng.standard_normal((rows, nb)) * 0.002).astype(np.float16)
        b[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return torch.from_numpy(b.reshape(rows, -1))


def cuda_time(fn, iters: int = 50) -> float:
    """Median seconds per call (CUDA events), after warm-up; the L2 is flushed before each."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K,Q6_K")
    parser.add_argument("--m", default="1,2,4,8,16")
    parser.add_argument("--check", action="store_true", help="also compare against bf16 matmul")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gguf_gpu.py needs a CUDA device")
    dev = torch.device("cuda")
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / cuda_time(lambda: dst.copy_(src), 20)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write)")
    print(f"{'qtype':6} {'shape':8} {'M':>3} {'ours us':>8} {'GB/s':>6} {'of copy':>7} "
          f"{'bf16 us':>8} {'GB/s':>6} {'speedup':>7}")  # fmt: skip
    for qtype in args.types.split(","):
        for label, (n, k) in SHAPES.items():
            blocks = random_blocks(qtype, n, k).to(dev)
            w = dequantize_gguf(blocks.cpu(), qtype, (n, k)).to(dev, torch.bfloat16)
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                if args.check:
                    y, want = gguf_linear(x, blocks, qtype, n, k), x @ w.t()
                    rel = ((y.float() - want.float()).norm() / want.float().norm()).item()
                    print(f"  check {qtype} {label} M={m}: relative error {rel:.2e}")
                t = cuda_time(lambda x=x, b=blocks, q=qtype, n=n, k=k: gguf_linear(x, b, q, n, k))
                t_bf16 = cuda_time(lambda x=x, w=w: x @ w.t())
                bw = (blocks.numel() + x.numel() * 2 + m * n * 2) / t
                bw_bf16 = (w.numel() * 2 + x.numel() * 2 + m * n * 2) / t_bf16
                print(f"{qtype:6} {label:8} {m:3} {t * 1e6:8.1f} {bw / 1e9:6.0f} "
                      f"{bw / (copy_bw / 2):7.2f} {t_bf16 * 1e6:8.1f} {bw_bf16 / 1e9:6.0f} "
                      f"{t_bf16 / t:6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
