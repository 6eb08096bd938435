"""Where a batch-1 decode step's time goes on a GPU: device busy time per kernel (torch.profiler,
CUDA graphs on, as the engine runs) against the wall time per step, whose difference is the time
the GPU waits for the host (scheduling, batch packing, launches, the sampled token's copy back).

    python bench/step_profile.py                       # Llama-3-8B shape, random weights
    python bench/step_profile.py --shape llama3-1b --steps 128
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_model import write_config_folder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    folder = write_config_folder(args.shape, Path(tempfile.mkdtemp()) / args.shape)
    llm = LLM(model=str(folder), load_format="dummy", dtype="bfloat16", device="cuda",
              max_model_len=4096, gpu_memory_utilization=0.9, max_num_seqs=64)  # fmt: skip
    prompt = [random.Random(0).randrange(100, 30000) for _ in range(args.prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True)

    def run() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()  # warm-up: compiles, captures
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=[prompt], sampling_params=one, use_tqdm=False)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    wall_ms = (run() - prefill) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or 0
        if t > 0 and not e.key.startswith(("aten::", "cuLaunch", "cudaGraph")):
            rows.append((t / 1e3 / (args.steps + 1), e.count / (args.steps + 1), e.key))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"{torch.cuda.get_device_name()}, {args.shape}, batch 1, {args.steps} decode steps")
    print(f"wall {wall_ms:.2f} ms/step; GPU busy {busy:.2f} ms/step; GPU waiting for the host "
          f"{wall_ms - busy:.2f} ms/step ({(wall_ms - busy) / wall_ms:.0%})")  # fmt: skip
    print(f"{'ms/step':>9s} {'calls/step':>10s}  kernel")
    for ms, calls, name in rows[: args.top]:
        print(f"{ms:9.3f} {calls:10.1f}  {name[:100]}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "shape": args.shape, "wall_ms": wall_ms,
            "busy_ms": busy, "kernels": [dict(ms=m, calls=c, name=n) for m, c, n in rows],
        }, indent=1))  # fmt: skip
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
