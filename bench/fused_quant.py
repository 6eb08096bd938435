"""The FP8 path's fused activation quantize kernels at decode batch sizes, against torch doing the
same math in the same run: `silu_and_mul_quant_fp8` (what an FP8 down projection reads) on the
Llama-3-8B MLP (d = 14336) and `rms_norm_quant_fp8` with the residual add (what qkv and gate_up
read) on its hidden size (4096), plus the plain `rms_norm` the bf16 path runs.

    python bench/fused_quant.py --out fused_quant.json
    python bench/fused_quant.py --ms 256 --sweep      # also the SiLU kernel's chunk x warps grid

Timing: each call captured in a CUDA graph and replayed between torch.cuda.Event pairs (median
of the reps, per call); inputs stay in L2 as they do after the GEMM that wrote them. GB/s counts
the bytes read and written once; "torch/ours" > 1 means ours is faster. "same bits" compares
ours with the two unfused kernels (the op, then `quantize_fp8`), the contract the tests hold;
torch's exp / rsqrt may differ from ours in a last bit.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import timed as graph_timed  # noqa: E402

from backends.triton import activation, norm, quant  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-12  # backends.cpu.quant.SCALE_EPS


def timed(fn, reps: int) -> float:
    """Median microseconds per call of fn: ten calls captured in one CUDA graph, replayed."""
    return graph_timed([fn] * 10, reps) * 1e3


def torch_quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    yf = y.float()
    s = yf.abs().amax(-1, keepdim=True).clamp(min=EPS) / FP8_MAX
    return (yf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def torch_silu_quant(x: torch.Tensor):
    d = x.shape[-1] // 2
    g, u = x[:, :d].float(), x[:, d:].float()
    return torch_quant((g / (1.0 + torch.exp(-g)) * u).to(x.dtype))


def torch_norm_quant(x, w, r):
    h = (x.float() + r.float()).to(x.dtype)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).to(x.dtype)
    return (*torch_quant(y), h)


def torch_norm(x, w, r):
    return F.rms_norm((x + r).float(), (x.shape[-1],), w.float(), 1e-5).to(x.dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a.view(torch.uint8) != b.view(torch.uint8)).sum() == 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64, 128, 256, 512])
    p.add_argument("--d", type=int, default=14336, help="SiLU-and-mul output width")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--sweep", action="store_true", help="SiLU kernel chunk x warps grid")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'op':<22} {'M':>4} {'ours us':>8} {'GB/s':>6} {'torch us':>9} {'torch/ours':>10}"
          f" {'whole-row us':>12}  same bits")  # fmt: skip
    for m in args.ms:
        x = torch.randn(m, 2 * args.d, device=dev, dtype=torch.bfloat16) * 2
        nbytes = x.numel() * 2 + m * args.d + m * 4
        ours = timed(functools.partial(activation.silu_and_mul_quant_fp8, x, FP8), args.reps)
        whole = timed(
            functools.partial(activation.silu_and_mul_quant_fp8, x, FP8, chunk=16384, num_warps=16),
            args.reps,
        )
        ref = timed(functools.partial(torch_silu_quant, x), args.reps)
        q, s = activation.silu_and_mul_quant_fp8(x, FP8)
        qr, sr = quant.quantize_fp8(activation.silu_and_mul(x), FP8, per_token=True)
        ok = same(q, qr) and torch.equal(s, sr)
        rows.append(dict(op="silu_and_mul_quant_fp8", m=m, ours_us=ours, torch_us=ref,
                         whole_row_us=whole, same_bits=ok))  # fmt: skip
        print(f"{'silu_and_mul_quant_fp8':<22} {m:>4} {ours:>8.2f} {nbytes / ours / 1e3:>6.0f} "
              f"{ref:>9.2f} {ref / ours:>10.2f} {whole:>12.2f}  {ok}")  # fmt: skip
        if args.sweep:
            for chunk in (2048, 4096, 8192, 16384):
                for warps in (4, 8, 16, 32):
                    t = timed(functools.partial(activation.silu_and_mul_quant_fp8,
                        x, FP8, chunk=chunk, num_warps=warps), args.reps)  # fmt: skip
                    print(f"    chunk {chunk:>5} warps {warps:>2}: {t:.2f} us")
    for m in args.ms:
        x = torch.randn(m, args.hidden, device=dev, dtype=torch.bfloat16)
        r = torch.randn(m, args.hidden, device=dev, dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(args.hidden, device=dev)).to(torch.bfloat16)
        nbytes = 3 * x.numel() * 2 + x.numel() + m * 4
        ours = timed(functools.partial(norm.rms_norm_quant_fp8, x, w, 1e-5, FP8, r), args.reps)
        ref = timed(functools.partial(torch_norm_quant, x, w, r), args.reps)
        got = norm.rms_norm_quant_fp8(x, w, 1e-5, FP8, r)
        y, h = norm.rms_norm(x, w, 1e-5, r)
        want = (*quant.quantize_fp8(y, FP8, per_token=True), h)
        ok = same(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        rows.append(dict(op="rms_norm_quant_fp8", m=m, ours_us=ours, torch_us=ref, same_bits=ok))
        print(f"{'rms_norm_quant_fp8':<22} {m:>4} {ours:>8.2f} {nbytes / ours / 1e3:>6.0f} "
              f"{ref:>9.2f} {ref / ours:>10.2f} {'':>12}  {ok}")  # fmt: skip
        nbytes = 4 * x.numel() * 2
        ours = timed(functools.partial(norm.rms_norm, x, w, 1e-5, r), args.reps)
        ref = timed(functools.partial(torch_norm, x, w, r), args.reps)
        rows.append(dict(op="rms_norm", m=m, ours_us=ours, torch_us=ref))
        print(f"{'rms_norm (residual)':<22} {m:>4} {ours:>8.2f} {nbytes / ours / 1e3:>6.0f} "
              f"{ref:>9.2f} {ref / ours:>10.2f}")  # fmt: skip
    if args.out:
        commit = (
            os.environ.get("BENCH_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        )
        Path(args.out).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
            commit=commit, command="bench/fused_quant.py " + " ".join(sys.argv[1:]), rows=rows,
        ), indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
