"""Multi-GPU run over NCCL: TP/PP correctness against TP=1, all-reduce bandwidth, and scaling.

    python bench/multi_gpu.py --out /tmp/mgpu.json                      # everything, 8B shape
    python bench/multi_gpu.py --parts correctness --tp 1,2 --shape llama3-1b

Parts (each prints its figures and adds them to the JSON):
- correctness: greedy tokens of a fixed prompt batch at each TP (and PP=2) with CUDA graphs on
  and off, against TP=1 with graphs off; a differing sequence passes only when TP=1's top-2
  log-probabilities at the first differing step are within --near-tie (the distributed issue's
  rule). Random weights (load_format="dummy"), the same on every rank.
- oneshot: TP=2 greedy tokens with the one-shot all-reduce and with NCCL only, bf16 and FP8,
  graphs on: identical (at two ranks the one-shot sum is NCCL's, bit for bit).
- allreduce: bus bandwidth of the engine's all-reduce (TorchCollectives, eager and captured in a
  CUDA graph as a decode step runs it) against plain torch.distributed.all_reduce, at the sizes a
  decode step reduces (tokens x hidden, bf16), as a ratio.
- scaling: batch-1 ms per decode step at each TP against its floor (bytes each rank reads per
  step / measured copy bandwidth), and offline throughput on a mixed workload.
- big: the 70B shape at TP=2 and TP=4: batch-1 decode against the same floor.
NVLink multicast stays off (the device's rule), in this process and in spawned workers.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

for _var, _val in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_var] = _val  # inherited by spawned workers

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import copy_bandwidth, decode_ms, free_gpu, throughput  # noqa: E402
from make_random_model import write_config_folder  # noqa: E402


def make_llm(folder: Path, tp: int, pp: int, eager: bool, args, dtype: str = "bfloat16", **kw):
    from engine import LLM

    par = {}
    if tp * pp > 1:
        par = dict(
            tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp"
        )
    return LLM(
        model=str(folder),
        load_format="dummy",
        dtype=dtype,
        device="cuda",
        enforce_eager=eager,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        mixed_graph_sizes=getattr(args, "mixed_graph_sizes", None),
        **par,
        **kw,
    )


def close(llm) -> None:
    llm.shutdown()  # stops workers; frees an in-process model's device memory


def greedy(llm, prompts, max_tokens: int):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def compare(base, other, near_tie: float) -> tuple[int, int, list[str]]:
    """(identical, near-tie, real differences) of `other` against the baseline."""
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


def part_correctness(folder, args, res) -> bool:
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 30000) for _ in range(rng.randint(8, 200))]
        for _ in range(args.num_prompts)
    ]
    llm = make_llm(folder, 1, 1, True, args, dtype=args.check_dtype)
    base = greedy(llm, prompts, args.max_tokens)
    close(llm)
    llm = None
    free_gpu()
    ok, rows = True, []
    layouts = [(tp, 1) for tp in args.tp] + [(1, 2)] * args.with_pp
    for tp, pp in layouts:
        for eager in (True, False):
            if (tp, pp, eager) == (1, 1, True):
                continue
            if tp * pp > torch.cuda.device_count():
                continue
            llm = make_llm(folder, tp, pp, eager, args, dtype=args.check_dtype)
            out = greedy(llm, prompts, args.max_tokens)
            close(llm)
            llm = None
            free_gpu()
            same, ties, bad = compare(base, out, args.near_tie)
            ok &= not bad
            tag = f"TP={tp} PP={pp} graphs={'off' if eager else 'on'}"
            print(f"{tag}: {same} identical, {ties} near-tie, {len(bad)} real differences {bad}")
            rows.append(dict(tp=tp, pp=pp, graphs=not eager, identical=same, near_tie=ties,
                             bad=bad))  # fmt: skip
    res["correctness"] = dict(prompts=len(prompts), max_tokens=args.max_tokens,
                              near_tie=args.near_tie, dtype=args.check_dtype, rows=rows,
                              ok=ok)  # fmt: skip
    return ok


def part_oneshot(folder, args, res) -> bool:
    """TP=2 greedy tokens with the one-shot all-reduce (HAL_ONESHOT_ALLREDUCE=1, the default)
    and with NCCL only (=0), graphs on, bf16 and online FP8: at two ranks the one-shot sum is
    NCCL's to the bit, so the tokens must be identical (not only near-ties)."""
    rng = random.Random(2)
    prompts = [
        [rng.randrange(100, 30000) for _ in range(rng.randint(8, 200))]
        for _ in range(args.num_prompts)
    ]
    ok, rows = True, []
    for quant in (None, "fp8"):
        outs = {}
        for flag in ("1", "0"):
            os.environ["HAL_ONESHOT_ALLREDUCE"] = flag  # inherited by the spawned workers
            llm = make_llm(folder, 2, 1, False, args, quantization=quant)
            outs[flag] = [tokens for tokens, _ in greedy(llm, prompts, args.max_tokens)]
            close(llm)
            llm = None
            free_gpu()
        os.environ.pop("HAL_ONESHOT_ALLREDUCE")
        same = sum(a == b for a, b in zip(outs["1"], outs["0"], strict=True))
        ok &= same == len(prompts)
        rows.append(dict(quantization=quant or "none", identical=same, prompts=len(prompts)))
        print(f"one-shot vs NCCL, TP=2 graphs on, {quant or 'bf16'}: {same}/{len(prompts)} "
              "identical greedy sequences")  # fmt: skip
    res["oneshot"] = dict(rows=rows, ok=ok)
    return ok


# -- all-reduce ----------------------------------------------------------------------------------
def _allreduce_worker(rank: int, world: int, port: int, sizes, iters: int, queue) -> None:
    import torch.distributed as dist

    import hal
    import platforms
    from engine.distributed.collectives import TorchCollectives
    from engine.distributed.oneshot import build_workspace

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    # The engine's path as a worker builds it: the backend's one-shot kernel where it serves.
    backend = hal.load_backend(platforms.detect(), device=f"cuda:{rank}")
    coll = TorchCollectives(None, list(range(world)), build_workspace(backend, None))

    rounds_n = 11

    def paired(run_a, run_b) -> tuple[float, float]:
        """Seconds per call of two timed runs, alternated round by round (a, b, a, b, ...) so
        that clock and NVLink jitter hits both alike. A round's time is the least over the
        ranks: a rank that starts its calls early waits inside the first collective for the
        last one, so only the last starter times the calls alone (the host skew after the
        barrier, tens of us, was up to a quarter of a 100-call graph). The median of
        `rounds_n` rounds each."""
        times = torch.zeros(2, rounds_n, dtype=torch.float64)
        for r in range(rounds_n):
            for i, run in enumerate((run_a, run_b)):
                torch.cuda.synchronize()
                dist.barrier()  # both ranks start the round together
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                b.synchronize()
                times[i, r] = a.elapsed_time(b) / 1e3 / iters
        least = times.cuda()
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        med = least.cpu().median(dim=1).values  # the lower middle of 11: the 6th
        return float(med[0]), float(med[1])

    def eager(fn, x):
        """`iters` back-to-back calls, eager (after 5 warm-up calls)."""
        for _ in range(5):
            fn(x)

        def run() -> None:
            for _ in range(iters):
                fn(x)

        return run

    def graphed(fn, x):
        """`iters` calls captured in one CUDA graph, as a decode step runs its all-reduces;
        keeps the graph alive in the returned replay."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn(x)
        g.replay()
        return g.replay

    def plain(t):
        dist.all_reduce(t)

    rows = []
    for tokens, hidden in sizes:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        # The engine's sum against NCCL's, relative to the largest value: equal at two ranks,
        # bf16 roundings apart at more (NCCL's ring adds in another order than the one-shot
        # kernel's fp32 sum in rank order).
        want = x.clone()
        dist.all_reduce(want)
        oneshot = coll.oneshot is not None and coll.oneshot.fits(x)
        if oneshot:  # what the captured path runs (eager calls take NCCL)
            got = coll.oneshot.all_reduce(x)
        else:
            got = coll.all_reduce(x.clone())
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        path = "one-shot in graphs" if oneshot else "nccl"
        plain_e, engine_e = paired(eager(plain, x), eager(coll.all_reduce, x))
        plain_g, engine_g = paired(graphed(plain, x), graphed(coll.all_reduce, x))
        rows.append((tokens, hidden, plain_e, engine_e, plain_g, engine_g, path, err))
    if coll.oneshot is not None:
        coll.oneshot.check()
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def part_allreduce(args, res) -> bool:
    import torch.multiprocessing as mp

    from engine.distributed.executor import free_port

    out = {}
    ok = True
    for world in [w for w in args.tp if w > 1 and w <= torch.cuda.device_count()]:
        sizes = [(t, h) for h in (4096, 8192) for t in (1, 8, 32, 64, 128, 256)]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = free_port()
        procs = [
            ctx.Process(target=_allreduce_worker, args=(r, world, port, sizes, 100, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        rows = queue.get(timeout=300)
        for p in procs:
            p.join(60)
        table = []
        for tokens, hidden, plain, engine, plain_g, engine_g, path, err in rows:
            nbytes = tokens * hidden * 2
            bus = 2 * (world - 1) / world * nbytes
            r = dict(tokens=tokens, hidden=hidden, bytes=nbytes, plain_us=plain * 1e6,
                     engine_us=engine * 1e6, plain_graph_us=plain_g * 1e6,
                     engine_graph_us=engine_g * 1e6, plain_busbw_gb_s=bus / plain / 1e9,
                     engine_graph_busbw_gb_s=bus / engine_g / 1e9,
                     engine_over_plain=plain / engine, graph_engine_over_plain=plain_g / engine_g,
                     engine_graph_over_plain_eager=plain / engine_g, path=path,
                     max_rel_err_vs_nccl=err)  # fmt: skip
            table.append(r)
            ok &= err <= 2**-6  # a few bf16 roundings of the largest value at most
            print(f"TP={world} all-reduce {tokens:>4} x {hidden} bf16 ({nbytes / 1024:.0f} KiB, "
                  f"{path}, rel. err vs NCCL {err:.1e}): "
                  f"eager plain {plain * 1e6:.1f} us, engine {engine * 1e6:.1f} us "
                  f"({r['engine_over_plain']:.2f}x); in a graph plain {plain_g * 1e6:.1f} us, "
                  f"engine {engine_g * 1e6:.1f} us ({r['graph_engine_over_plain']:.2f}x, "
                  f"{r['engine_graph_busbw_gb_s']:.1f} GB/s bus)")  # fmt: skip
        # Pass mark (>= 0.9 of plain) on the CUDA-graph path, the one decode steps run. Eager
        # calls take the same NCCL call in both paths (the one-shot kernel serves graphs only),
        # so their ratio is noise plus the engine's Python around the call: reported, not judged.
        worst = min(r["graph_engine_over_plain"] for r in table)
        worst_eager = min(r["engine_over_plain"] for r in table)
        ok &= worst >= 0.9
        out[f"tp{world}"] = dict(rows=table, worst_graph_engine_over_plain=worst,
                                 worst_eager_engine_over_plain=worst_eager)  # fmt: skip
    res["allreduce"] = out
    return ok


# -- scaling ---------------------------------------------------------------------------------------
def step_bytes_per_rank(folder: Path, tp: int) -> float:
    """Bytes one rank reads per decode step: every weight but the embedding table, / TP."""
    from engine.loader.hf import read_hf_config
    from engine.loader.random_weights import expected_shapes

    shapes = expected_shapes(read_hf_config(folder))
    total = sum(torch.Size(s).numel() for n, s in shapes.items() if "embed_tokens" not in n)
    return total * 2 / tp


def _profile(llm, prompts, params, label: str, top: int, trace_dir: str | None = None) -> None:
    """Generate under LLM.start_profile; print each rank's kernel table (and caching-allocator
    activity) per engine step, headed by `label` and the step count. With trace_dir each rank's
    Chrome trace goes there too, and rank 0's critical path (`bench/trace_path.py`) is printed."""
    first = llm.engine.num_steps
    before = set(Path(trace_dir).glob("rank0-*.json")) if trace_dir else set()
    llm.start_profile(trace_dir)
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    summaries = llm.stop_profile()
    steps = llm.engine.num_steps - first
    print(f"{label}, {steps} steps")
    for s in summaries:
        print("\n".join("  " + line for line in s.table(steps=steps, top=top)))
    if trace_dir:
        from trace_path import collective_wait, kernel_events, report

        for trace in sorted(set(Path(trace_dir).glob("rank0-*.json")) - before):
            print("\n".join("  " + line for line in report(str(trace), top)))
        ranks = sorted(set(Path(trace_dir).glob("rank*-*.json")) - before)
        if len(ranks) > 1:  # the one-shot all-reduce: rank skew against its own latency
            per_rank = [kernel_events(json.loads(t.read_text())) for t in ranks]
            try:
                r = collective_wait(per_rank, "_one_shot_kernel")
            except ValueError as exc:
                print(f"  collective: {exc}")
            else:
                print(f"  one-shot all-reduce over {len(ranks)} ranks: {r['calls']} calls, ranks "
                      f"ready within {r['spread_us']:.2f} us (median), done "
                      f"{r['latency_us']:.2f} us after the last was ready")  # fmt: skip


def profile_mixed(llm, work, tp: int) -> None:
    """Profile `work` (a slice of the mixed workload)."""
    from engine import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    prompts = [p[1:] for p, _ in work]  # no prefix-cache hits from the timed run
    _profile(llm, prompts, params, f"scaling TP={tp}: profile of {len(work)} mixed requests", 12)


def profile_decode(llm, steps: int, tp: int, trace_dir: str | None = None) -> None:
    """Profile `steps` batch-1 decode steps (128-token prompt): where a TP size's step time goes
    against its floor (one more step is the prefill)."""
    from engine import SamplingParams

    prompt = [random.Random(2).randrange(100, 30000) for _ in range(128)]
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    trace = trace_dir and str(Path(trace_dir) / f"tp{tp}")
    _profile(llm, [prompt], params, f"scaling TP={tp}: profile of batch-1 decode", 24, trace)


def part_scaling(folder, args, res, bw: float, tps: list[int], key: str) -> None:
    rows = []
    for tp in tps:
        if tp > torch.cuda.device_count():
            continue
        llm = make_llm(folder, tp, 1, False, args)
        ms = decode_ms(llm)
        # The same engine stepping synchronously (each step waits for the previous tokens).
        was, llm.engine.async_scheduling = llm.engine.async_scheduling, False
        sync_ms = decode_ms(llm)
        llm.engine.async_scheduling = was
        if args.profile_decode:
            profile_decode(llm, args.profile_decode, tp, args.trace_dir)
        floor = step_bytes_per_rank(folder, tp) / bw * 1e3
        row = dict(tp=tp, decode_ms=ms, floor_ms=floor, over_floor=ms / floor,
                   decode_sync_ms=sync_ms, async_scheduling=was)  # fmt: skip
        if args.mixed_requests and key == "scaling":
            rng = random.Random(1)
            work = [([rng.randrange(100, 30000) for _ in range(rng.randint(128, 1024))],
                     rng.randint(64, 256)) for _ in range(args.mixed_requests)]  # fmt: skip
            # Engine steps of the timed run, and how many were launched ahead of the previous
            # step's tokens (asynchronous scheduling): where a TP size loses, per step or in steps.
            eng, mark = llm.engine, {}

            def start(eng=eng, mark=mark) -> None:
                mark.update(steps=eng.num_steps, ahead=eng.num_steps_ahead)

            row["mixed_tok_s"], row["mixed_tokens"], row["mixed_s"] = throughput(llm, work, start)
            row["mixed_steps"] = eng.num_steps - mark["steps"]
            row["mixed_steps_ahead"] = eng.num_steps_ahead - mark["ahead"]
            if args.profile_mixed:
                profile_mixed(llm, work[: args.profile_mixed], tp)
        close(llm)
        llm = None
        free_gpu()
        rows.append(row)
        mixed = ""
        if "mixed_tok_s" in row:
            steps = max(row["mixed_steps"], 1)
            mixed = (f"; mixed {row['mixed_tok_s']:.0f} tok/s ({row['mixed_steps']} steps, "
                     f"{row['mixed_steps_ahead']} launched ahead, "
                     f"{row['mixed_s'] / steps * 1e3:.2f} ms a step)")  # fmt: skip
        print(f"{key} TP={tp}: batch-1 decode {ms:.2f} ms, floor {floor:.2f} ms "
              f"({ms / floor:.2f}x; synchronous steps {sync_ms:.2f} ms){mixed}")  # fmt: skip
    res[key] = rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default="correctness,allreduce,scaling,big")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--big-shape", default="llama3-70b")
    p.add_argument("--tp", default="1,2,4", help="tensor-parallel sizes")
    p.add_argument("--with-pp", type=int, default=1, help="1: also PP=2 on two GPUs")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--near-tie", type=float, default=0.05,
                   help="top-2 log-prob gap of TP=1 that counts as a near-tie (fp32 with TF32 "
                        "GEMMs: 10-bit mantissas, logits O(10) -> ~1e-2 noise)")  # fmt: skip
    p.add_argument("--check-dtype", default="float32",
                   help="dtype of the correctness part (bf16 logits are rounded to 8 bits: "
                        "random weights then tie at most steps)")  # fmt: skip
    p.add_argument("--mixed-requests", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="token budget a step (bench/e2e.py's default; at 2048 the mixed "
                        "workload's eager steps are host-bound, most at TP > 1)")  # fmt: skip
    p.add_argument(
        "--verbose",
        action="store_true",
        help="log the engine's start-up (memory plan, graph captures) on every rank",
    )
    p.add_argument("--profile-decode", type=int, default=0,
                   help="after the batch-1 timing, profile this many batch-1 decode steps per TP "
                        "size (kernel tables per rank)")  # fmt: skip
    p.add_argument("--trace-dir", default=None,
                   help="with --profile-decode: write each rank's Chrome trace under DIR/tpN and "
                        "print rank 0's critical path (bench/trace_path.py)")  # fmt: skip
    p.add_argument("--profile-mixed", type=int, default=0,
                   help="after the mixed run, profile this many of its requests per TP size "
                        "(kernel tables and caching-allocator activity per rank)")  # fmt: skip
    p.add_argument("--mixed-graph-sizes", type=int, nargs="*", default=None,
                   help="token counts to capture for steps with prefill tokens (default: the "
                        "engine's, powers of two from 128; given with no sizes: none, those "
                        "steps run eagerly)")  # fmt: skip
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", ""))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.verbose:  # the engine's start-up lines (memory plan, graph captures), every rank
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.tp = [int(t) for t in args.tp.split(",")]
    parts = set(args.parts.split(","))
    res: dict = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
                 "date": time.strftime("%Y-%m-%d"), "commit": args.commit,
                 "torch": torch.__version__, "command": " ".join(sys.argv)}  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    folder = write_config_folder(args.shape, tmp / args.shape)
    ok = True
    bw = copy_bandwidth()
    res["copy_bandwidth_tb_s"] = bw / 1e12
    print(f"{res['device']}: copy bandwidth {bw / 1e12:.2f} TB/s per GPU")

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))

    for name in ("correctness", "oneshot", "allreduce", "scaling", "big"):
        if name not in parts:
            continue
        start = time.perf_counter()
        try:
            if name == "correctness":
                ok &= part_correctness(folder, args, res)
            elif name == "oneshot":
                ok &= part_oneshot(folder, args, res)
            elif name == "allreduce":
                ok &= part_allreduce(args, res)
            elif name == "scaling":
                part_scaling(folder, args, res, bw, args.tp, "scaling")
            else:
                big = write_config_folder(args.big_shape, tmp / args.big_shape)
                part_scaling(big, args, res, bw, [t for t in args.tp if t >= 2], "big")
        except Exception as e:  # record and go on: one part's failure must not hide the others
            ok = False
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: FAILED {type(e).__name__}: {e}")
        gc.collect()
        print(f"[{name} took {time.perf_counter() - start:.0f} s]")
        save()
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
