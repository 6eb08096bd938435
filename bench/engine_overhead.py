"""Host (Python) time per engine step with the model's time taken out: scheduler, KV-cache manager,
batch packing, sampler, stop checks and output building, at 64 and 256 sequences on the CPU.

The model is a tiny random Llama (tests/engine/models_fixtures.py); its forward and LM head are
replaced IN THIS BENCH ONLY by stubs (zeros hidden, a bank of random logits rows), so what is
timed is everything the engine does around the model. Each request has a 16-128 token prompt and
decodes exactly 128 tokens (ignore_eos).

    python bench/engine_overhead.py                    # 64 and 256 seqs, greedy and top-p/top-k
    python bench/engine_overhead.py --seqs 256 --profile /tmp/eo.prof   # cProfile the steps
    python bench/engine_overhead.py --seqs 256 --modes greedy --async-scheduling  # the GPU path
    python bench/engine_overhead.py --seqs 1024 --modes greedy --no-freeze   # heap not frozen
    python bench/engine_overhead.py --seqs 256 --min-prompt 900 --max-prompt 1000 \
        --output-len 256 --modes greedy                 # long contexts (block tables of ~80)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stub_model(engine, vocab: int, seed: int = 0) -> None:
    """Replace the runner's forward and the LM head with O(1)-ish stubs (bench only)."""
    runner = engine.runner
    hidden_size = runner.model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(4096, vocab, generator=g) * 3.0  # rows of plausible logits
    state = {"offset": 0}

    def forward(batch, intermediate=None):
        return torch.zeros(batch.num_tokens, hidden_size)

    def compute_logits(hidden):
        n = hidden.shape[0]
        start = state["offset"] % (bank.shape[0] - n)
        state["offset"] += 7 * n + 1
        return bank[start : start + n].clone()

    runner.forward = forward
    runner.model.compute_logits = compute_logits


def _time_method(obj, name: str, parts: dict[str, float]) -> None:
    """Accumulate the wall time of obj.name into parts[name] (bench instrumentation)."""
    fn = getattr(obj, name)
    parts[name] = 0.0

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            parts[name] += time.perf_counter() - t0

    setattr(obj, name, timed)


def run_case(folder: Path, num_seqs: int, mode: str, stream: bool, args, profiler=None) -> dict:
    import engine.llm_engine as llm_engine
    from engine.engine_config import EngineConfig
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    # The engine as a GPU runs it: its start-up heap frozen (engine.llm_engine._freeze_heap)
    # unless --no-freeze.
    llm_engine._freezes_heap = lambda config, caps: not args.no_freeze
    llm = LLM(
        model=str(folder),
        device="cpu",
        enforce_eager=True,
        max_num_seqs=args.max_num_seqs or max(256, num_seqs),
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks=min(num_seqs, args.max_num_seqs or num_seqs)
        * -(-(args.max_prompt + args.output_len) // 16)
        + 64,
        seed=0,
        async_scheduling=args.async_scheduling,
    )
    engine = llm.engine
    assert isinstance(engine.config, EngineConfig)
    vocab = engine.model_config.vocab_size
    _stub_model(engine, vocab)
    rng = random.Random(1234)
    if mode == "greedy":
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    else:
        params = SamplingParams(
            temperature=0.8, top_p=0.9, top_k=50, max_tokens=args.output_len, ignore_eos=True
        )
    for _ in range(num_seqs):
        length = rng.randint(args.min_prompt, args.max_prompt)
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        engine.add_request(None, params, prompt_token_ids=prompt)

    sched = engine.scheduler
    orig_schedule = sched.schedule
    kinds: list[bool] = []

    def schedule():
        out = orig_schedule()
        kinds.append(bool(out.scheduled) and all(s.num_new_tokens == 1 for s in out.scheduled))
        return out

    sched.schedule = schedule
    parts: dict[str, float] = {}
    if args.breakdown:
        for obj, name in (
            (sched, "schedule"),
            (engine.runner, "build_batch"),
            (engine, "_sampling_rows"),
            (engine.sampler, "sample"),
            (engine, "_apply_samples"),
            (sched, "update_from_output"),
            (sched, "schedule_ahead"),
            (engine, "_record_kv_peak"),
            (engine, "_collect_outputs"),
        ):
            _time_method(obj, name, parts)
    times: list[float] = []
    produced = 0
    if profiler is not None:
        profiler.enable()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step(stream=stream)
        times.append(time.perf_counter() - t0)
        produced += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    if profiler is not None:
        profiler.disable()
    expected = num_seqs * args.output_len
    if produced != expected:
        raise RuntimeError(f"produced {produced} tokens, expected {expected}")
    if len(kinds) == len(times):
        full = [t for t, d in zip(times, kinds, strict=True) if d]
    else:  # asynchronous: most steps come from schedule_ahead; the prefill steps come first
        full = times[sum(not d for d in kinds) :]
    if args.breakdown:  # whole run, per step
        print("   " + ", ".join(f"{k} {1e3 * v / len(times):.2f}" for k, v in parts.items()))
    return {
        "seqs": num_seqs,
        "mode": mode,
        "stream": stream,
        "steps": len(times),
        "decode_steps": len(full),
        "decode_ms_median": 1e3 * statistics.median(full) if full else float("nan"),
        "decode_ms_mean": 1e3 * statistics.fmean(full) if full else float("nan"),
        "total_s": sum(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--modes", nargs="+", default=["greedy", "topp"], choices=["greedy", "topp"])
    ap.add_argument("--stream", action="store_true", help="step(stream=True), the server's path")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--max-num-seqs", type=int, default=None, help="default: all requests run at once"
    )
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per case")
    ap.add_argument("--breakdown", action="store_true", help="ms/step of each engine part")
    ap.add_argument("--profile", type=str, default=None, help="write cProfile stats here")
    ap.add_argument(
        "--async-scheduling",
        action="store_true",
        help="the GPUs' default: step N + 1 scheduled and launched before N's tokens are read",
    )
    ap.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the start-up heap to the collector (GPU engines freeze it; CPU ones do not)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from tests.engine.models_fixtures import build_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        # 384-token vocab: the sampler's tensor work stays small, as it is on a GPU.
        build_model("llama", folder)
        need = args.max_prompt + args.output_len
        if need > 256:  # the stubbed forward never reads positions: widen the context only
            cfg_path = folder / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["max_position_embeddings"] = need
            cfg_path.write_text(json.dumps(cfg))
        prof = cProfile.Profile() if args.profile else None
        print(f"{'seqs':>5} {'mode':>7} {'stream':>6} {'steps':>5} {'decode':>6} "
              f"{'ms/step med':>11} {'ms/step mean':>12} {'total s':>8}")  # fmt: skip
        for n in args.seqs:
            for mode in args.modes:
                best = None
                for _ in range(args.repeats):
                    r = run_case(folder, n, mode, args.stream, args, prof)
                    if best is None or r["decode_ms_median"] < best["decode_ms_median"]:
                        best = r
                r = best
                print(
                    f"{r['seqs']:>5} {r['mode']:>7} {str(r['stream']):>6} {r['steps']:>5} "
                    f"{r['decode_steps']:>6} {r['decode_ms_median']:>11.2f} "
                    f"{r['decode_ms_mean']:>12.2f} {r['total_s']:>8.2f}",
                    flush=True,
                )
        if prof is not None:
            prof.dump_stats(args.profile)
            print(f"profile written to {args.profile}")


if __name__ == "__main__":
    main()
