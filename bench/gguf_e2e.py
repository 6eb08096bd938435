"""End to end on CPU: the default SmolLM2-135M Q4_1 GGUF through this engine from its quantized
weights (exact fp32: kept whole, the default for a model this size, with decode-sized GEMMs and the
Q8_0 LM head on the codes through the C codes kernel and decode attention, rotary and RMSNorm in
C, or without the C kernels (HAL_CPU_C_KERNELS=0: the fp32 products through oneDNN, the "onednn"
gemm, or F.linear; attention through SDPA, rotary and RMSNorm through torch ops), or in tiles;
and the opt-in bf16 int4pack), dequantized at load (the old path), and through llama.cpp
(llama-cpp-python), in one run; batch 1 and 16 prompts, generated tokens/s.

    /work/venv/bin/python bench/gguf_e2e.py [--threads 2] [--max-tokens 64] [--repeats 2]

Every side gets the same prompt token ids, greedy decoding, no EOS stop, no prefix reuse and the
same thread count. llama-cpp-python's `Llama` serves one sequence at a time, so its 16 prompts run
one after another (its throughput at 16 is its batch-1 speed, prefill aside). Times include
prefill; the best of --repeats runs counts (the machine may be shared: see the spread).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one paragraph.",
    "List three uses of a paperclip:",
    "In 1969, the first humans",
    "The recipe for pancakes starts with",
    "A good name for a black cat would be",
    "def fibonacci(n):",
    "Translate to French: I like apples.",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "The main difference between a virus and a bacterium is",
    "To make a cup of tea, first",
    "The largest planet in our solar system",
    "Q: What is 12 times 7?\nA:",
    "My favourite book is",
]
# name -> environment for this engine run (read when the LLM is built)
ENGINE_PATHS = {
    "blocks (exact fp32, whole)": {"HAL_GGUF_INT4PACK": "0", "HAL_GGUF_DEQUANTIZE": "0"},
    "whole, op by op": {  # the default but the decoder layers through the modules, op by op
        "HAL_GGUF_INT4PACK": "0",
        "HAL_GGUF_DEQUANTIZE": "0",
        "HAL_CPU_FUSED_DECODER": "0",
    },  # fmt: skip
    "whole, torch RMSNorm": {  # the default but RMSNorm through F.rms_norm (the same bits)
        "HAL_GGUF_INT4PACK": "0",
        "HAL_GGUF_DEQUANTIZE": "0",
        "HAL_RMS_NORM_BACKEND": "native",
    },  # fmt: skip
    "whole, no C kernel": {  # the same, every product an fp32 matmul (oneDNN), torch SDPA, rotary
        "HAL_GGUF_INT4PACK": "0",
        "HAL_GGUF_DEQUANTIZE": "0",
        "HAL_CPU_C_KERNELS": "0",
    },  # fmt: skip
    "whole, F.linear gemm": {  # no C kernel, torch's F.linear (MKL) for the fp32 products
        "HAL_CPU_C_KERNELS": "0",
        "HAL_GGUF_INT4PACK": "0",
        "HAL_GGUF_DEQUANTIZE": "0",
        "HAL_GEMM_BACKEND": "native",
    },  # fmt: skip
    "blocks (exact fp32, tiled)": {
        "HAL_GGUF_INT4PACK": "0",
        "HAL_GGUF_DEQUANTIZE": "0",
        "HAL_GGUF_DENSE_BYTES": "0",
    },  # fmt: skip
    "blocks (int4pack bf16)": {"HAL_GGUF_INT4PACK": "1", "HAL_GGUF_DEQUANTIZE": "0"},
    "dequantized fp32": {"HAL_GGUF_INT4PACK": "0", "HAL_GGUF_DEQUANTIZE": "1"},
}


def best_rate(run, repeats: int) -> tuple[float, list[float], list[list[int]]]:
    """Best generated tokens/s of `repeats` calls of run() -> (tokens per sequence), all rates."""
    rates, outs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = run()
        rates.append(sum(len(o) for o in outs) / (time.perf_counter() - start))
    return max(rates), rates, outs


def engine_side(name: str, env: dict[str, str], prompts: list[list[int]], args) -> dict:
    from engine import LLM
    from engine.sampling_params import SamplingParams

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        llm = LLM(device="cpu", dtype="float32", enable_prefix_caching=False, max_num_seqs=16)
    finally:  # the next path starts from the caller's environment
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=warm, use_tqdm=False)

    def run(batch: list[list[int]]):
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    result = {"weights_mib": llm.engine.memory_plan.weight_bytes / 2**20}
    for size in (1, 16):
        rate, rates, outs = best_rate(lambda s=size: run(prompts[:s]), args.repeats)
        result[size] = (rate, rates)
        result[f"tokens{size}"] = outs
    settings = llm.engine.backend.info.settings
    result["gemm"] = "; ".join(settings.get(k, "-") for k in ("gguf_int4", "gguf_small_batch"))
    llm.shutdown()
    return result


def llama_cpp_side(path: str, prompts: list[list[int]], eos: int, args) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=path, n_ctx=512, n_batch=512, n_threads=args.threads,
        n_threads_batch=args.threads, seed=0, verbose=False,
    )  # fmt: skip

    def one(ids: list[int]) -> list[int]:
        llm.reset()  # no KV prefix reuse between prompts or repeats
        out = llm.create_completion(
            prompt=ids, max_tokens=args.max_tokens, temperature=0.0, top_k=1,
            logit_bias={eos: -1e9}, echo=False,
        )  # fmt: skip
        return [0] * out["usage"]["completion_tokens"]

    one(prompts[0][:4])
    result = {"weights_mib": os.path.getsize(path) / 2**20}
    for size in (1, 16):
        rate, rates, _ = best_rate(lambda s=size: [one(p) for p in prompts[:s]], args.repeats)
        result[size] = (rate, rates)
    llm.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engine.loader.default_model import default_model_path
    from engine.tokenizer import load_tokenizer

    path = default_model_path()
    tokenizer = load_tokenizer(path, None)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    print(
        f"{path.name}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} threads of {os.cpu_count()} cores; {args.max_tokens} new tokens per "
        f"prompt, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
    )
    results = {}
    for name, env in ENGINE_PATHS.items():
        results[name] = engine_side(name, env, prompts, args)
        gc.collect()  # the previous engine's weights go before the next one loads
    if not args.skip_llama_cpp:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
        results["llama.cpp"] = llama_cpp_side(str(path), prompts, eos, args)

    print(f"\n{'path':24} {'weights MiB':>11} {'tok/s b=1':>10} {'tok/s b=16':>11}  runs (tok/s)")
    for name, r in results.items():
        runs = "; ".join(f"b{s}: " + ", ".join(f"{x:.1f}" for x in r[s][1]) for s in (1, 16))
        print(f"{name:24} {r['weights_mib']:11.1f} {r[1][0]:10.1f} {r[16][0]:11.1f}  {runs}")
    default = "blocks (exact fp32, whole)"  # what LLM() runs on this model
    base = results[default]
    print("\nratios (this engine's default path / other; > 1: ours faster)")
    for other in [n for n in results if n != default]:
        o = results[other]
        print(f"  {default} / {other:26} b=1 {base[1][0] / o[1][0]:5.2f}x   "
              f"b=16 {base[16][0] / o[16][0]:5.2f}x")  # fmt: skip
    if "llama.cpp" in results:
        i4, lc = results["blocks (int4pack bf16)"], results["llama.cpp"]
        print(f"  blocks (int4pack bf16) / llama.cpp        b=1 {i4[1][0] / lc[1][0]:5.2f}x   "
              f"b=16 {i4[16][0] / lc[16][0]:5.2f}x")  # fmt: skip
    same = [results[n]["tokens1"] == results["dequantized fp32"]["tokens1"]
            for n in ("blocks (exact fp32, whole)", "blocks (exact fp32, tiled)")]  # fmt: skip
    print(f"\ngreedy tokens, batch 1: exact blocks (whole, tiled) == dequantized: {same}")
    norm_same = results["whole, torch RMSNorm"]["tokens1"] == results[default]["tokens1"]
    print(f"greedy tokens, batch 1: C RMSNorm == torch RMSNorm: {norm_same}")
    for name in ENGINE_PATHS:
        print(f"  {name}: backend gguf settings: {results[name]['gemm']}")


if __name__ == "__main__":
    main()
