"""Offline throughput: a mixed-length batch through this engine and through transformers `generate`.

Same model, same machine, same run. Prompts are random token ids of lengths drawn from
[--min-prompt, --max-prompt]; each asks for a number of new tokens drawn from [--min-new, --max-new]
with EOS ignored, so both sides produce exactly the requested tokens. transformers gets the prompts
in batches of --hf-batch-size (left-padded, sorted by length so padding is small) with
max_new_tokens set to the largest request in the batch; only requested tokens count as output.

    python bench/throughput.py                      # default SmolLM2 GGUF, issue-sized workload
    python bench/throughput.py --num-prompts 16 --max-prompt 128 --max-new 64   # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_workload(args) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [
        (
            [
                rng.randrange(100, args.vocab_hi)
                for _ in range(rng.randint(args.min_prompt, args.max_prompt))
            ],
            rng.randint(args.min_new, args.max_new),
        )
        for _ in range(args.num_prompts)
    ]


def run_engine(args, work) -> tuple[float, int]:
    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    # Warm up once (allocator, first-call overheads), then time the whole batch.
    llm.generate(
        prompt_token_ids=[work[0][0]], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False
    )
    start = time.perf_counter()
    outs = llm.generate(
        prompt_token_ids=[p for p, _ in work], sampling_params=params, use_tqdm=False
    )
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give transformers the memory back
    return elapsed, produced


def _hf_model(args):
    from transformers import AutoModelForCausalLM

    from engine.loader.default_model import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    dtype = {
        "auto": torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), device


def run_transformers(args, work) -> tuple[float, int]:
    model, device = _hf_model(args)
    order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
    batches = [order[i : i + args.hf_batch_size] for i in range(0, len(order), args.hf_batch_size)]
    pad = 0
    start = time.perf_counter()
    produced = 0
    for b in batches:
        width = max(len(work[i][0]) for i in b)
        ids = torch.full((len(b), width), pad, dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            p = work[i][0]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        new = max(work[i][1] for i in b)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        assert out.shape[1] - width == new
        produced += sum(work[i][1] for i in b)  # only requested tokens are useful output
    return time.perf_counter() - start, produced


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--vocab-hi", type=int, default=40000, help="prompt ids drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    work = make_workload(args)
    t_ours, n_ours = run_engine(args, work)
    ours = n_ours / t_ours
    print(f"engine:       {n_ours} tokens in {t_ours:.1f}s = {ours:.1f} output tok/s")
    result = {"engine_tok_s": ours, "engine_tokens": n_ours, "engine_s": t_ours}
    if not args.skip_transformers:
        t_hf, n_hf = run_transformers(args, work)
        hf = n_hf / t_hf
        print(
            f"transformers: {n_hf} tokens in {t_hf:.1f}s = {hf:.1f} output tok/s "
            f"(generate, batch {args.hf_batch_size})"
        )
        print(f"ratio engine / transformers: {ours / hf:.2f}x")
        result.update(hf_tok_s=hf, hf_tokens=n_hf, hf_s=t_hf, ratio=ours / hf)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result.update(
        commit=commit,
        date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        torch=torch.__version__,
        command=" ".join(sys.argv),
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
