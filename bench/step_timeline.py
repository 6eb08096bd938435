"""Where an offline run's time goes, step by step: wall time of each engine step grouped by what
the step held (decode-only steps replayed from a CUDA graph, steps with prefill tokens run eagerly),
for bf16 and online FP8 on the same workload, so the FP8 / bf16 ratio can be split into its parts.

    python bench/step_timeline.py                          # 8B shape, 128/128 x 1024
    python bench/step_timeline.py --prompt 1000 --new 1000 --requests 160

Wall time per step is host + device (with asynchronous scheduling a step's wall time is the
time until its tokens are back, overlapping the next step's launch); the sum is the run's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import fixed_work, free_gpu, make_llm, warm_up  # noqa: E402
from make_random_model import write_config_folder  # noqa: E402


def timeline(llm, work) -> dict:
    """Run `work` through the engine one step at a time; per step kind: count, seconds, tokens."""
    from engine import SamplingParams

    engine = llm.engine
    warm_up(llm, work)
    for i, (prompt, n) in enumerate(work):
        engine.add_request(None, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                           prompt_token_ids=prompt, request_id=f"r{i}")  # fmt: skip
    seen = []  # the SchedulerOutput each step processed
    process = engine._process_output

    def spy(out, result, stream=True):
        seen.append(out)
        return process(out, result, stream)

    engine._process_output = spy
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])  # steps, s, tokens, seqs
    graphs = engine.runner.graphs if engine.runner is not None else None
    produced = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        ahead = engine._ahead is not None
        replays = graphs.replays if graphs is not None else 0
        t0 = time.perf_counter()
        outs = engine.step(stream=False)
        dt = time.perf_counter() - t0
        out = seen[-1]
        prefill = sum(ss.num_new_tokens for ss in out.scheduled if ss.num_new_tokens > 1)
        decode = sum(1 for ss in out.scheduled if ss.num_new_tokens == 1)
        graphed = graphs is not None and graphs.replays > replays
        kind = ("prefill+decode" if decode else "prefill") if prefill else "decode"
        kind += ", graph" if graphed else ", eager"
        kind += ", ahead" if ahead else ""
        k = kinds[kind]
        k[0] += 1
        k[1] += dt
        k[2] += prefill + decode
        k[3] += len(out.scheduled)
        produced += sum(len(o.outputs[0].token_ids) for o in outs)
    total = time.perf_counter() - start
    engine._process_output = process
    return {"seconds": total, "tok_s": produced / total, "kinds": {
        k: dict(steps=v[0], seconds=v[1], tokens=v[2], mean_ms=v[1] / v[0] * 1e3,
                mean_seqs=v[3] / v[0]) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][1])
    }}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--modes", default="bf16,fp8")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    folder = write_config_folder(args.shape, Path(tempfile.mkdtemp()) / args.shape)
    work = fixed_work(args.requests, args.prompt, args.new, 0)
    res = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv)}
    for mode in args.modes.split(","):
        llm = make_llm(folder, args, **({"quantization": "fp8"} if mode == "fp8" else {}))
        r = res[mode] = timeline(llm, work)
        print(f"{mode}: {r['tok_s']:.0f} output tok/s, {r['seconds']:.2f} s")
        for kind, v in r["kinds"].items():
            print(f"  {kind:<32} {v['steps']:>5} steps {v['seconds']:7.2f} s "
                  f"{v['mean_ms']:8.2f} ms/step  {v['tokens'] / v['steps']:8.0f} tokens/step "
                  f"{v['mean_seqs']:6.0f} seqs/step")  # fmt: skip
        llm.shutdown()
        llm = None
        free_gpu()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
