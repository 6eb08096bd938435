"""Where a decode (or prefill) step's time goes on a GPU: device time per kernel (torch.profiler
through `LLM.start_profile`, on every rank, CUDA graphs on, as the engine runs) against the wall
time per step, whose difference is the time the GPU waits for the host (scheduling, batch
packing, launches, the sampled tokens' copy back, and at TP > 1 the driver-worker round trip).

The same requests are profiled once with max_tokens=1 (prefill and one sample) and once with
--steps more tokens; the tables are the per-kernel difference, divided by --steps. With --prefill
the table is the first run alone, divided by its prefill steps (prompts of up to 64k tokens in all
go in one step).

    python bench/step_profile.py                       # Llama-3-8B shape, random weights, batch 1
    python bench/step_profile.py --tp 2                 # per rank, NCCL
    python bench/step_profile.py --batch 256 --quantization fp8 --kv-cache-dtype fp8
    python bench/step_profile.py --prefill --batch 64 --quantization fp8   # one 8192-token step

At TP > 1 the one-shot all-reduce kernel (`_one_shot_kernel`) waits inside the GPU for its peers,
and under the profiler the ranks drift apart, so its time (and with PDL, the time of the kernel
after it) holds that wait: tens of ms per step, not its cost. For a split that adds up, profile
with HAL_ONESHOT_ALLREDUCE=0 HAL_PDL=0 (NCCL, no early launches) and take the one-shot kernel's
cost from `bench/multi_gpu.py --parts allreduce`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_var, _val)  # NVLink multicast off, also in spawned workers

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_model import write_config_folder  # noqa: E402


def _by_name(summary) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))
    for k in summary.kernels:
        ms, n = out[k.name]
        out[k.name] = (ms + k.total_ms, n + k.count)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--quantization", default=None, help="e.g. fp8 (online FP8)")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--eager", action="store_true", help="CUDA graphs off")
    p.add_argument("--prefill", action="store_true",
                   help="profile the prefill steps instead (the max_tokens=1 run: prompts and one "
                   "sample), per prefill step")  # fmt: skip
    p.add_argument("--top", type=int, default=25, help="kernels listed per rank")
    p.add_argument("--trace-dir", default=None, help="also write each rank's Chrome trace here")
    p.add_argument("--out", default=None, help="write the tables as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from engine import LLM, SamplingParams

    folder = write_config_folder(args.shape, Path(tempfile.mkdtemp()) / args.shape)
    # The prompts in one prefill step where they fit 64k tokens: then the profiled run and the
    # max_tokens=1 run schedule the same prefill steps and their difference is decode alone
    # (with several prefill chunks, early sequences decode inside the later chunks' steps).
    budget = min(65536, max(8192, args.batch * args.prompt_len))
    # Prefix caching off: every run below repeats the same prompts, and with it on each prefill
    # after the first would recompute only the tail past the cached blocks (a 128-token prompt's
    # last token), which made --prefill time a fraction of the work (sessions before the 25th).
    par = {}
    if args.tp > 1:
        par = dict(tensor_parallel_size=args.tp, distributed_executor_backend="mp")
    llm = LLM(model=str(folder), load_format="dummy", dtype="bfloat16", device="cuda",
              max_model_len=max(4096, args.prompt_len + args.steps + 8),
              gpu_memory_utilization=0.9, max_num_seqs=max(64, args.batch),
              enforce_eager=args.eager, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, max_num_batched_tokens=budget,
              enable_prefix_caching=False, **par)  # fmt: skip
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 30000) for _ in range(args.prompt_len)] for _ in range(args.batch)
    ]

    def run(max_tokens: int, profile: bool):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        if profile:
            llm.start_profile(args.trace_dir)
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        wall = time.perf_counter() - t0
        return wall, (llm.stop_profile() if profile else None)

    run(args.steps + 1, False)  # warm-up: compiles, captures
    run(1, False)
    prefill_wall, _ = run(1, False)
    full_wall, _ = run(args.steps + 1, False)
    wall_ms = (full_wall - prefill_wall) / args.steps * 1e3
    _, prefill_prof = run(1, True)
    _, full_prof = run(args.steps + 1, True)
    print(f"{torch.cuda.get_device_name()}, {args.shape}, TP={args.tp}, batch {args.batch}, prompt "
          f"{args.prompt_len}, quantization {args.quantization}, KV {args.kv_cache_dtype}, "
          f"graphs {'off' if args.eager else 'on'}, {args.steps} decode steps")  # fmt: skip
    chunks = -(-args.batch * args.prompt_len // budget)
    if args.prefill:  # the max_tokens=1 run alone, per prefill step (its one sample included)
        what, per, wall_ms = "prefill step", chunks, prefill_wall / chunks * 1e3
        print(f"wall {wall_ms:.3f} ms per prefill step of up to {budget} tokens ({chunks} steps "
              "and one sample, unprofiled run)")  # fmt: skip
    else:
        what, per = "decode step", args.steps
        note = "" if chunks == 1 else f"; approximate: the prompts take {chunks} prefill steps"
        print(f"wall {wall_ms:.3f} ms per decode step (unprofiled runs{note})")
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "wall_ms": wall_ms,
              "ranks": []}  # fmt: skip
    for pre, full in zip(prefill_prof, full_prof, strict=True):
        before, after = ({}, _by_name(pre)) if args.prefill else (_by_name(pre), _by_name(full))
        rows = []
        for name, (ms, n) in after.items():
            ms0, n0 = before.get(name, (0.0, 0))
            if ms - ms0 > 0:
                rows.append(((ms - ms0) / per, (n - n0) / per, name))
        rows.sort(reverse=True)
        busy = sum(r[0] for r in rows)
        print(
            f"\nrank {full.rank} ({full.device}): kernels {busy:.3f} ms per {what}; GPU "
            f"waiting for the host {wall_ms - busy:.3f} ms ({(wall_ms - busy) / wall_ms:.0%})"
        )
        print(f"{'ms/step':>9s} {'calls/step':>10s}  kernel ({what})")
        for ms, calls, name in rows[: args.top]:
            print(f"{ms:9.4f} {calls:10.1f}  {name[:110]}")
        result["ranks"].append({
            "rank": full.rank, "busy_ms": busy, "trace": full.trace,
            "kernels": [dict(ms=m, calls=c, name=n) for m, c, n in rows],
        })  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
