"""What structured outputs cost: the same prompts decoded free and under a JSON schema (xgrammar's
matcher per sequence, a bitmask of allowed tokens per step), generated tokens/s of each and the
ratio, in one run. The constrained run's outputs are checked against the schema.

    python bench/structured_outputs.py                       # the default model on the CPU
    python bench/structured_outputs.py --model path --device cuda --num-prompts 64

The free run generates, per prompt, as many tokens as the constrained one did (ignore_eos, that
max_tokens), so both carry the same prefill and decode work. Times include prefill; the best of
--repeats runs counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.spec_decode import run  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "tags"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
    names = ["Ada", "Linus", "Grace", "Ken", "Barbara", "Dennis", "Frances", "Edsger"]
    prompts = [
        f"Describe the person {names[i % len(names)]} as a JSON object with name, age, city "
        f"and tags:\n"
        for i in range(args.num_prompts)
    ]
    tight = {"json": SCHEMA, "disable_any_whitespace": True}
    constrained = SamplingParams(
        temperature=0, max_tokens=args.max_tokens, structured_outputs=tight
    )
    ours, outs = run(llm, prompts, [constrained] * len(prompts), args.repeats)
    free = [
        SamplingParams(temperature=0, max_tokens=len(o.outputs[0].token_ids), ignore_eos=True)
        for o in outs
    ]
    base, _ = run(llm, prompts, free, args.repeats)
    valid = finished = 0
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            finished += 1
            value = json.loads(c.text)
            valid += set(SCHEMA["required"]) <= set(value)
    backend = llm.engine.backend.name
    print(f"backend {backend}, {args.num_prompts} prompts x {args.max_tokens} tokens, greedy")
    print(f"free:        {base:8.1f} generated tok/s")
    cut = len(outs) - finished
    print(f"JSON schema: {ours:8.1f} generated tok/s  ({ours / base:.2f}x free; {valid} of "
          f"{finished} finished objects valid, {cut} cut at max_tokens)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
