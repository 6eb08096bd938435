"""Speculative decoding with n-gram proposals against plain decoding, in one run: the same model,
prompts and greedy settings, generated tokens/s of each, the ratio, and how many drafts were
accepted. The workload is what n-gram drafts are for: prompts that ask for text they contain
(code to copy or edit, a passage to repeat); --workload chat gives prompts with little to copy.

    python bench/spec_decode.py                              # the default model on the CPU
    python bench/spec_decode.py --model path --device cuda --k 3,5

Greedy outputs must be the same tokens with and without speculation (checked and printed).
Times include prefill; the best of --repeats runs counts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engine import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def copy_prompts(n: int) -> list[str]:
    """Ask the model to reproduce pieces of this repository's source (varied, public text)."""
    files = sorted((ROOT / "engine").glob("*.py"))
    prompts = []
    for i in range(n):
        text = files[i % len(files)].read_text()[:1200]
        prompts.append(f"Repeat this file exactly:\n\n{text}\n\nThe file again:\n\n{text[:120]}")
    return prompts


def chat_prompts(n: int) -> list[str]:
    topics = ["the sea", "a red bicycle", "mountains", "a library", "winter", "a small robot"]
    return [f"Write a short story about {topics[i % len(topics)]}." for i in range(n)]


def run(llm: LLM, prompts: list[str], params, repeats: int):
    """(output tokens / s of the best of `repeats` runs, that run's outputs) after a warm-up;
    params: one SamplingParams or one per prompt. bench/structured_outputs.py times with it too."""
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    best, outs = None, None
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / best, outs


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--k", default="2,4", help="num_speculative_tokens values, comma-separated")
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--lookup-min", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--workload", choices=("copy", "chat"), default="copy")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    make = copy_prompts if args.workload == "copy" else chat_prompts
    prompts = make(args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    common = dict(model=args.model, device=args.device, dtype=args.dtype)
    base_llm = LLM(**common)
    base, outs = run(base_llm, prompts, params, args.repeats)
    want = token_ids(outs)
    base_llm.shutdown()
    print(f"{args.workload}, {len(prompts)} prompt(s) x {args.max_tokens} tokens, greedy, "
          f"lookup {args.lookup_min}..{args.lookup_max} tokens")  # fmt: skip
    print(f"plain decoding: {base:.1f} tok/s")
    for k in (int(v) for v in args.k.split(",")):
        spec = {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min,
        }
        llm = LLM(**common, speculative_config=spec)
        rate, outs = run(llm, prompts, params, args.repeats)
        got = token_ids(outs)
        s = llm.engine.scheduler
        accepted = s.num_accepted_tokens / max(s.num_draft_tokens, 1)
        print(f"ngram k={k}: {rate:.1f} tok/s ({rate / base:.2f}x plain), drafts accepted "
              f"{s.num_accepted_tokens} / {s.num_draft_tokens} ({accepted:.0%}), same tokens: "
              f"{got == want}")  # fmt: skip
        llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
