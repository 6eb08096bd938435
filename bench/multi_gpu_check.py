"""Multi-GPU correctness: greedy tokens at TP/PP > 1 over NCCL against TP=1 on the same GPUs.

    python bench/multi_gpu_check.py --layouts 1x1,2x1,1x2 --dtype float32

A random Llama-3.2-1B-shaped model is written first unless --model is given. A sequence that
differs from TP=1 passes only if, at its first differing step, TP=1's top two log-probabilities are
within --near-tie (the distributed issue's rule). NVLink multicast stays off (the device's rule).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

for _var, _val in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_var] = _val  # inherited by spawned workers


def run(model: str, dtype: str, tp: int, pp: int, prompts, max_tokens: int):
    from engine import LLM, SamplingParams

    kw = {}
    if tp * pp > 1:
        kw = dict(
            tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp"
        )
    llm = LLM(model=model, dtype=dtype, device="cuda", gpu_memory_utilization=0.5, **kw)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    del llm
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()  # the next layout's workers need this process's memory back
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], elapsed


def compare(base, other, near_tie: float) -> tuple[int, int, list[str]]:
    same, ties, bad = 0, 0, []
    for i, ((bt, blp), (ot, _)) in enumerate(zip(base, other, strict=True)):
        if bt == ot:
            same += 1
            continue
        step = next(j for j, (a, b) in enumerate(zip(bt, ot, strict=True)) if a != b)
        top = sorted(blp[step].values(), reverse=True)[:2]
        if len(top) == 2 and top[0] - top[1] <= near_tie:
            ties += 1
        else:
            bad.append(f"prompt {i}: step {step}, top-2 gap {top[0] - top[1]:.4f}")
    return same, ties, bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layouts", default="1x1,2x1", help="TPxPP list; 1x1 is the baseline")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--near-tie", type=float, default=1e-2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = args.model
    if model is None:
        model = "/tmp/multi_gpu_llama3_1b"
        subprocess.run(
            [sys.executable, "bench/make_random_model.py", "--shape", "llama3-1b", "--out", model,
             "--dtype", "bfloat16"],
            check=True,
        )  # fmt: skip
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(rng.randint(8, 200))]
        for _ in range(args.num_prompts)
    ]
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")]
    base, t_base = run(model, args.dtype, 1, 1, prompts, args.max_tokens)
    results = [{"layout": "1x1", "seconds": t_base}]
    ok = True
    for tp, pp in layouts:
        if (tp, pp) == (1, 1):
            continue
        out, t = run(model, args.dtype, tp, pp, prompts, args.max_tokens)
        same, ties, bad = compare(base, out, args.near_tie)
        ok &= not bad
        print(f"TP={tp} PP={pp}: {same} identical, {ties} near-tie, {len(bad)} real differences "
              f"{bad} ({t:.1f}s vs {t_base:.1f}s at 1x1)")  # fmt: skip
        results.append({"layout": f"{tp}x{pp}", "identical": same, "near_tie": ties,
                        "bad": bad, "seconds": t})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
