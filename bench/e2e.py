"""End to end on a Llama-3-8B-shaped model with random weights (load_format="dummy"), one GPU.

    python bench/e2e.py --out /tmp/e2e.json                     # decode, fixed, mixed, fp8
    python bench/e2e.py --modes decode --shape llama3-1b        # quicker

decode: ms per decode step at batch 1, eager and with CUDA graphs, against the floor (bytes a step
reads / copy bandwidth measured in this run). fixed: offline throughput at fixed input/output
lengths, beside TensorRT-LLM's published H200 FP8 figures for Llama-3-8B. mixed: a mixed workload
through this engine and through transformers `generate` (same shape, random weights, the
fastest of --hf-batch-sizes), in this run. fp8: the fixed workloads again with quantization="fp8";
fp8kv: the same with kv_cache_dtype="fp8" too (an FP8 KV cache: half the KV bytes per step).
quant: batch-1 decode (graphs) against its own floor and the fixed workloads on random quantized
checkpoints of the same shape (--quants: gptq4 = W4A16 GPTQ G=128, gptq8, w8a8 =
compressed-tensors int8 per channel with dynamic per-token activations, fp8block = FP8 e4m3 with
128x128 block scales and dynamic per-token-group activations), beside bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_model import llama_config, write_config_folder  # noqa: E402

# TensorRT-LLM's published Llama-3-8B FP8 output tokens/s on one H200 (its perf-overview table).
TRT_LLM_H200_FP8 = {(128, 128): 27_900, (1000, 1000): 17_700, (2048, 2048): 12_200}


QUANT_CONFIGS = {
    "gptq4": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
              "desc_act": False},
    "gptq8": {"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True,
              "desc_act": False},
    "w8a8": {
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                  "dynamic": True, "symmetric": True},
        }},
    },
    "fp8block": {"quant_method": "fp8", "activation_scheme": "dynamic",
                 "weight_block_size": [128, 128]},
}  # fmt: skip


def quant_folder(folder: Path, name: str) -> Path:
    """A copy of the config folder whose config.json carries QUANT_CONFIGS[name]."""
    out = folder.parent / f"{folder.name}-{name}"
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = QUANT_CONFIGS[name]
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def step_floor(llm, bw: float) -> tuple[float, float]:
    """(bytes a batch-1 decode step reads, its floor in ms): every weight but the embedding
    table (read one row), in the layout the backend keeps (quantized weights at their size)."""
    from engine.memory import weight_bytes

    model = llm.engine.model
    emb = model.embed_tokens.weight
    step_bytes = weight_bytes(model) - emb.numel() * emb.element_size()
    if model.lm_head.weight is emb:
        step_bytes += emb.numel() * emb.element_size()  # tied: the head reads it
    return step_bytes, step_bytes / bw * 1e3


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s (read + write), median of `reps` clones."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times[3:])[reps // 2]


def free_gpu() -> None:
    """Give the device memory back once the caller has dropped its references."""
    gc.collect()
    torch.cuda.empty_cache()


def make_llm(folder: Path, args, **kw):
    from engine import LLM

    return LLM(
        model=str(folder),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        mixed_graph_sizes=getattr(args, "mixed_graph_sizes", None),
        **kw,
    )


def decode_ms(llm, prompt_len: int = 128, steps: int = 256) -> float:
    """Wall ms per decode step at batch 1: (time for steps+1 tokens - time for 1) / steps."""
    from engine import SamplingParams

    prompt = [random.Random(0).randrange(100, 30000) for _ in range(prompt_len)]

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    # Prefix caching would serve the second run's prompt from cache; both runs see the same.
    return (timed(steps + 1) - timed(1)) / steps * 1e3


def warm_up(llm, work: list[tuple[list[int], int]]) -> None:
    """Compile the kernels a run will use before timing it: a full prefill chunk (up to 8192
    tokens of the workload's prompt lengths) and a few decode steps, on reversed prompts (so the
    timed run gets no prefix-cache hits from them)."""
    from engine import SamplingParams

    prompts, total = [], 0
    for prompt, _ in work:
        if total >= 8192:
            break
        prompts.append(prompt[::-1])
        total += len(prompt)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


class StepLog:
    """Records, for every step the engine's scheduler plans (`schedule` and, with async
    scheduling, `schedule_ahead`), when it was planned and its sequences and new tokens; the
    interval to the next plan is charged to that step (with async scheduling step N + 1 is
    planned while N runs, so the intervals are the steps' times in steady state). summary()
    groups them by kind: decode (every sequence one token), mixed (prefill chunks and decodes),
    prefill (no decodes). For finding where an end-to-end run's time goes."""

    def __init__(self, llm) -> None:
        self.sched = llm.engine.scheduler
        self.rows: list[tuple[float, int, int, int]] = []  # (time, seqs, tokens, decode seqs)

    def _log(self, out) -> None:
        new = [s.num_new_tokens for s in out.scheduled]
        if new:
            self.rows.append((time.perf_counter(), len(new), sum(new), sum(n == 1 for n in new)))

    def __enter__(self) -> StepLog:
        sched, log = self.sched, self._log
        self._orig = sched.schedule, getattr(sched, "schedule_ahead", None)

        def schedule(*a, **k):
            out = self._orig[0](*a, **k)
            log(out)
            return out

        sched.schedule = schedule
        if self._orig[1] is not None:

            def schedule_ahead(*a, **k):
                plan = self._orig[1](*a, **k)
                if plan is not None:
                    log(plan[0])
                return plan

            sched.schedule_ahead = schedule_ahead
        return self

    def __exit__(self, *exc) -> None:
        self.rows.append((time.perf_counter(), 0, 0, 0))  # the end of the last step
        del self.sched.schedule
        if self._orig[1] is not None:
            del self.sched.schedule_ahead

    def summary(self) -> list[str]:
        groups: dict[str, list[tuple[float, int, int]]] = {}
        for (t0, seqs, tokens, dec), (t1, *_) in zip(self.rows, self.rows[1:], strict=False):
            if not seqs:
                continue
            kind = "decode" if dec == seqs else ("prefill" if dec == 0 else "mixed")
            groups.setdefault(kind, []).append((t1 - t0, seqs, tokens))
        total = sum(dt for g in groups.values() for dt, _, _ in g)
        lines = [f"steps: {sum(len(g) for g in groups.values())} in {total:.2f} s"]
        for kind, g in sorted(groups.items()):
            secs = sum(dt for dt, _, _ in g)
            lines.append(
                f"  {kind:8s} {len(g):5d} steps {secs:7.2f} s ({secs / max(total, 1e-9):.0%}): "
                f"{secs / len(g) * 1e3:6.2f} ms/step, {sum(s for _, s, _ in g) / len(g):6.1f} "
                f"seqs, {sum(t for _, _, t in g) / len(g):7.1f} tokens on average"
            )
        return lines


def throughput(llm, work: list[tuple[list[int], int]], on_start=None) -> tuple[float, int, float]:
    """(output tokens/s, tokens, seconds) for the whole batch at once; on_start() runs after the
    warm-up, just before the timed run."""
    from engine import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    warm_up(llm, work)
    torch.cuda.synchronize()
    if on_start is not None:
        on_start()
    start = time.perf_counter()
    prompts = [p for p, _ in work]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return produced / elapsed, produced, elapsed


def fixed_work(n: int, prompt: int, out: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, 30000) for _ in range(prompt)], out) for _ in range(n)]


def mixed_work(args) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [
        (
            [rng.randrange(100, 30000) for _ in range(rng.randint(*args.mixed_prompt))],
            rng.randint(*args.mixed_new),
        )
        for _ in range(args.mixed_requests)
    ]


def transformers_best(args, work) -> tuple[float, int, float, int]:
    """transformers `generate` at each of --hf-batch-sizes (one that runs out of memory is
    skipped): (tok/s, tokens, seconds, batch size) of the fastest."""
    from transformers import LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_config(args.shape)).to(torch.bfloat16).eval()
    best = None
    for bs in args.hf_batch_sizes:
        try:
            tps, tokens, secs = transformers_throughput(model, work, bs)
        except torch.OutOfMemoryError:
            print(f"transformers generate at batch {bs}: out of memory, skipped")
            free_gpu()
            continue
        print(f"transformers generate at batch {bs}: {tps:.0f} tok/s ({tokens} in {secs:.1f}s)")
        if best is None or tps > best[0]:
            best = (tps, tokens, secs, bs)
    del model
    free_gpu()
    if best is None:
        raise RuntimeError(f"transformers ran out of memory at batch sizes {args.hf_batch_sizes}")
    return best


def transformers_throughput(model, work, bs: int) -> tuple[float, int, float]:
    """transformers `generate` on a random model of the same shape, batches of bs sorted by
    prompt length (left-padded); only the requested tokens count."""
    order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    with torch.inference_mode():  # warm-up
        model.generate(input_ids=torch.ones((1, 8), dtype=torch.long, device="cuda"),
                       max_new_tokens=2, do_sample=False, pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    start, produced = time.perf_counter(), 0
    for b in batches:
        width = max(len(work[i][0]) for i in b)
        ids = torch.zeros((len(b), width), dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            p = work[i][0]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        new = max(work[i][1] for i in b)
        with torch.inference_mode():
            model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
        produced += sum(work[i][1] for i in b)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return produced / elapsed, produced, elapsed


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--modes", default="decode,fixed,mixed,fp8,quant")
    p.add_argument("--quants", default="gptq4,w8a8", help=f"of {', '.join(QUANT_CONFIGS)}")
    p.add_argument("--fixed", default="128x128:1024,1000x1000:160",
                   help="INxOUT:REQUESTS,... fixed-length workloads")  # fmt: skip
    p.add_argument("--mixed-requests", type=int, default=256)
    p.add_argument("--mixed-prompt", type=int, nargs=2, default=(128, 1024))
    p.add_argument("--mixed-new", type=int, nargs=2, default=(64, 256))
    p.add_argument(
        "--hf-batch-sizes",
        type=int,
        nargs="+",
        default=[256, 128, 64],
        help="transformers batch sizes tried; the fastest counts",
    )
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--mixed-graph-sizes", type=int, nargs="*", default=None,
                   help="token counts to capture for steps with prefill tokens (default: the "
                        "engine's, powers of two from 128; given with no sizes: none, those "
                        "steps run eagerly)")  # fmt: skip
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile the batch-1 decode steps")
    p.add_argument(
        "--async-ab",
        action="store_true",
        help="also run each fixed workload with synchronous steps (same engine)",
    )
    p.add_argument(
        "--step-log",
        action="store_true",
        help="print where each fixed run's time goes by kind of step (StepLog)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    modes = set(args.modes.split(","))
    folder = write_config_folder(args.shape, Path(tempfile.mkdtemp()) / args.shape)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": os.environ.get("BENCH_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "shape": args.shape,
    }
    bw = copy_bandwidth()
    res["copy_bandwidth_tb_s"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {res['device']}")
    fixed = []
    for item in args.fixed.split(","):
        lens, n = item.split(":")
        i, o = (int(x) for x in lens.split("x"))
        fixed.append((i, o, int(n)))

    if "decode" in modes:
        llm = make_llm(folder, args, enforce_eager=True)
        step_bytes, floor = step_floor(llm, bw)
        eager = decode_ms(llm)
        print(f"batch-1 decode eager: {eager:.2f} ms ({eager / floor:.2f}x floor {floor:.2f} ms)")
        llm.shutdown()
        llm = None
        free_gpu()
        llm = make_llm(folder, args)
        graphs = decode_ms(llm)
        # The same engine stepping synchronously (each step waits for the previous tokens).
        was, llm.engine.async_scheduling = llm.engine.async_scheduling, False
        graphs_sync = decode_ms(llm)
        llm.engine.async_scheduling = was
        print(f"batch-1 decode graphs: async scheduling {graphs:.2f} ms, synchronous "
              f"{graphs_sync:.2f} ms ({graphs_sync / graphs:.2f}x)")  # fmt: skip
        if args.profile:  # where the host time of a batch-1 decode step goes
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            decode_ms(llm, steps=64)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        res["decode"] = dict(step_gb=step_bytes / 1e9, floor_ms=floor, eager_ms=eager,
                             graphs_ms=graphs, graphs_over_floor=graphs / floor,
                             graphs_sync_ms=graphs_sync)  # fmt: skip
        print(f"batch-1 decode: floor {floor:.2f} ms ({step_bytes / 1e9:.2f} GB/step); eager "
              f"{eager:.2f} ms ({eager / floor:.2f}x floor); graphs {graphs:.2f} ms "
              f"({graphs / floor:.2f}x floor)")  # fmt: skip
        save(args, res)
    else:
        llm = None

    def run_fixed(llm, tag: str) -> None:
        for i, o, n in fixed:
            sync = None
            if args.async_ab:  # the same engine stepping synchronously, on other prompts (no
                # prefix-cache hits from this run; it also warms up the kernels for both)
                was, llm.engine.async_scheduling = llm.engine.async_scheduling, False
                sync, _, _ = throughput(llm, fixed_work(n, i, o, args.seed + 1))
                llm.engine.async_scheduling = was
            log = StepLog(llm) if args.step_log else None
            tps, tokens, secs = throughput(llm, fixed_work(n, i, o, args.seed),
                                           on_start=log.__enter__ if log else None)  # fmt: skip
            if log is not None:
                log.__exit__(None, None, None)
                print("\n".join(f"{tag} {i}/{o} {line}" for line in log.summary()))
            trt = TRT_LLM_H200_FP8.get((i, o))
            key = f"fixed_{tag}_{i}x{o}"
            ratio = tps / trt if trt else None
            res[key] = dict(tok_s=tps, tokens=tokens, seconds=secs, requests=n,
                            trt_llm_h200_fp8=trt, ratio_to_trt=ratio)  # fmt: skip
            vs = f"; TensorRT-LLM H200 FP8 {trt} tok/s, ratio {tps / trt:.2f}" if trt else ""
            print(f"{tag} {i}/{o} x {n}: {tps:.0f} output tok/s ({tokens} in {secs:.1f}s){vs}")
            if sync is not None:
                res[key].update(sync_tok_s=sync, async_over_sync=tps / sync)
                print(f"{tag} {i}/{o}: synchronous steps (run first) {sync:.0f} tok/s; async / "
                      f"sync {tps / sync:.2f}x")  # fmt: skip
            save(args, res)

    if modes & {"fixed", "mixed"}:
        llm = llm or make_llm(folder, args)
        if "fixed" in modes:
            run_fixed(llm, "bf16")
        if "mixed" in modes:
            work = mixed_work(args)
            tps, tokens, secs = throughput(llm, work)
            res["mixed_engine"] = dict(tok_s=tps, tokens=tokens, seconds=secs)
            print(f"mixed x {len(work)}: engine {tps:.0f} tok/s ({tokens} in {secs:.1f}s)")
            save(args, res)
    if llm is not None:
        llm.shutdown()
    llm = None
    free_gpu()
    for mode, tag, kw in (("fp8", "fp8", {}), ("fp8kv", "fp8_fp8kv", {"kv_cache_dtype": "fp8"})):
        if mode not in modes:
            continue
        llm = make_llm(folder, args, quantization="fp8", **kw)
        run_fixed(llm, tag)
        llm.shutdown()
        llm = None
        free_gpu()
        for i, o, _ in fixed:
            b, f = res.get(f"fixed_bf16_{i}x{o}"), res.get(f"fixed_{tag}_{i}x{o}")
            if b and f:
                print(f"{tag} / bf16 at {i}/{o}: {f['tok_s'] / b['tok_s']:.2f}x")
                f["ratio_to_bf16"] = f["tok_s"] / b["tok_s"]
    if "quant" in modes:
        for name in args.quants.split(","):
            llm = make_llm(quant_folder(folder, name), args)
            step_bytes, floor = step_floor(llm, bw)
            ms = decode_ms(llm)
            res[f"decode_{name}"] = dict(step_gb=step_bytes / 1e9, floor_ms=floor, graphs_ms=ms,
                                         graphs_over_floor=ms / floor)  # fmt: skip
            print(f"{name} batch-1 decode: floor {floor:.2f} ms ({step_bytes / 1e9:.2f} GB/step);"
                  f" graphs {ms:.2f} ms ({ms / floor:.2f}x floor)")  # fmt: skip
            save(args, res)
            run_fixed(llm, name)
            llm.shutdown()
            llm = None
            free_gpu()
            for i, o, _ in fixed:
                b, q = res.get(f"fixed_bf16_{i}x{o}"), res.get(f"fixed_{name}_{i}x{o}")
                if b and q:
                    q["ratio_to_bf16"] = q["tok_s"] / b["tok_s"]
                    print(f"{name} / bf16 at {i}/{o}: {q['ratio_to_bf16']:.2f}x")
            save(args, res)
    if "mixed" in modes:
        work = mixed_work(args)
        tps, tokens, secs, bs = transformers_best(args, work)
        res["mixed_transformers"] = dict(tok_s=tps, tokens=tokens, seconds=secs, batch=bs)
        ratio = res["mixed_engine"]["tok_s"] / tps
        res["mixed_ratio"] = ratio
        print(f"mixed: transformers generate {tps:.0f} tok/s (best batch {bs}); "
              f"engine / transformers {ratio:.2f}x")  # fmt: skip
    save(args, res)
    return 0


def save(args, res: dict) -> None:
    """Write the results so far (each section saves, so a later failure keeps them)."""
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
