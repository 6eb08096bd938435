"""The multi-LoRA delta op (`Backend.lora_add`) on one GPU: the Triton shrink / expand kernels
(`backends/triton/lora.py`, the "triton" candidate) against the masked GEMMs over every slot
(`backends/cuda/linear.lora_add`, the "torch" candidate, cuBLAS) on one decoder layer's four
projections (qkv, o, gate_up, down) of a Llama shape, per step size T, in the same run.

    python bench/lora_ops.py --shape llama3-8b --slots 4 --rank 16 --tokens 1 4 16 32 64

Every token has an adapter (slots drawn at random). Timing: a CUDA graph of the layer's four
calls repeated to at least 48 calls (`bench/int4_gemm.py`'s timer), median of the replays, per
layer; the torch path's mask is made once before capture, as a step makes it once for all its
layers. The CUDA backend takes the kernels for T <= backends.triton.lora.MAX_TOKENS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from int4_gemm import timed  # noqa: E402
from make_random_model import SHAPES  # noqa: E402

from backends.cuda import linear as torch_path  # noqa: E402
from backends.triton import lora as kernels  # noqa: E402
from hal.backend import LoRABatch  # noqa: E402


def layer_projections(shape: dict) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (K, the parts' output sizes) for one decoder layer."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    return {"qkv": (h, (h, kv, kv)), "o": (h, (h,)), "gate_up": (h, (inter, inter)),
            "down": (inter, (h,))}  # fmt: skip


def make_calls(shape: dict, tokens: int, slots: int, rank: int, dtype, gen) -> tuple[list, list]:
    """Per projection, a no-argument call of each path on the same random inputs."""
    dev = torch.device("cuda")
    token_slots = torch.randint(0, slots, (tokens,), generator=gen, dtype=torch.int32).to(dev)
    batch = LoRABatch(token_slots, slots, rank)
    ours, peer = [], []
    for k, sizes in layer_projections(shape).values():
        n, width = sum(sizes), len(sizes) * slots * rank
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        parts = tuple(zip(bounds[:-1], bounds[1:], strict=True))
        x = torch.randn(tokens, k, generator=gen).to(dev, dtype)
        y = torch.randn(tokens, n, generator=gen).to(dev, dtype)
        a = (torch.randn(width, k, generator=gen) * 0.02).to(dev, dtype)
        b = torch.zeros(n, width, device=dev, dtype=dtype)
        for p, (lo, hi) in enumerate(parts):
            cols = slice(p * slots * rank, (p + 1) * slots * rank)
            b[lo:hi, cols] = (torch.randn(hi - lo, slots * rank, generator=gen) * 0.02).to(
                dev, dtype
            )
        ours.append(lambda x=x, y=y, a=a, b=b, parts=parts: kernels.lora_add(
            x, y, a, b, token_slots, slots, rank, parts))  # fmt: skip
        peer.append(lambda x=x, y=y, a=a, b=b: torch_path.lora_add(x, y, a, b, batch))
    peer[0]()  # the mask, once (a step makes it once for every layer)
    return ours, peer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'tokens':>6} {'triton us/layer':>16} {'torch us/layer':>15} {'torch / triton':>15}")
    for t in args.tokens:
        ours, peer = make_calls(SHAPES[args.shape], t, args.slots, args.rank, dtype, gen)
        t_ours = timed(ours, args.reps, 10) * len(ours) * 1e3
        t_peer = timed(peer, args.reps, 10) * len(peer) * 1e3
        rows.append(dict(tokens=t, triton_us=t_ours, torch_us=t_peer, ratio=t_peer / t_ours))
        print(f"{t:>6} {t_ours:>16.2f} {t_peer:>15.2f} {t_peer / t_ours:>14.2f}x", flush=True)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        meta = dict(device=torch.cuda.get_device_name(), date=str(datetime.date.today()),
                    commit=commit, command=" ".join(sys.argv), shape=args.shape,
                    slots=args.slots, rank=args.rank, dtype=args.dtype)  # fmt: skip
        Path(args.out).write_text(json.dumps(dict(**meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
