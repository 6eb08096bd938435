"""What serving LoRA adapters costs: the same engine and workload with and without adapters, on a
Llama-shaped model with random weights (load_format="dummy") and random rank-r adapters on all
seven projections, in one run.

    python bench/lora.py --shape llama3-8b --rank 16 --adapters 4 --fixed 128x128:256

Prints, for the engine without LoRA (the peer), the LoRA engine serving only base-model requests,
and the LoRA engine with every request through an adapter (round-robin over --adapters, all
resident: max_loras = --adapters): batch-1 decode ms per step (graphs) and output tokens/s on
each fixed workload (prompt x output : requests), with the ratios to the peer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import fixed_work, free_gpu, make_llm  # noqa: E402
from make_random_model import SHAPES, write_config_folder  # noqa: E402

from engine.lora import TARGETS  # noqa: E402

MODULES = {name: "self_attn" if i < 4 else "mlp" for i, name in enumerate(TARGETS)}


def write_adapter(folder: Path, shape: dict, rank: int, seed: int) -> Path:
    """A PEFT-format adapter of random A and B (std 0.02 / rank) on every projection."""
    from safetensors.torch import save_file

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    dims = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for module, sub in MODULES.items():
            out, inp = dims[module]
            key = f"base_model.model.model.layers.{layer}.{sub}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * (0.02 / rank)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(MODULES), "bias": "none"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def run(llm, work, loras) -> tuple[float, float]:
    """(batch-1 decode ms per step, output tokens/s of `work`), each request through
    loras[i % len(loras)] (None: the base model)."""
    from engine import SamplingParams

    prompt = work[0][0]

    def one(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False,
                     lora_request=loras[0])  # fmt: skip
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False,
                     lora_request=loras[0])  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - start

    step_ms = (one(257) - one(1)) / 256 * 1e3
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    reqs = [loras[i % len(loras)] for i in range(len(work))]
    warm = [p[::-1] for p, _ in work[:64]]  # kernels compiled, no prefix-cache hits later
    llm.generate(prompt_token_ids=warm, sampling_params=params[: len(warm)], use_tqdm=False,
                 lora_request=reqs[: len(warm)])  # fmt: skip
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=[p for p, _ in work], sampling_params=params,
                        use_tqdm=False, lora_request=reqs)  # fmt: skip
    torch.cuda.synchronize()
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return step_ms, produced / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--fixed", default="128x128:256", help="PROMPTxOUTPUT:REQUESTS[,...]")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from engine import LoRARequest

    tmp = Path(tempfile.mkdtemp())
    folder = write_config_folder(args.shape, tmp / args.shape)
    shape = SHAPES[args.shape]
    loras = [LoRARequest(f"a{i}", i + 1, str(write_adapter(tmp / f"a{i}", shape, args.rank, i)))
             for i in range(args.adapters)]  # fmt: skip
    works = []
    for item in args.fixed.split(","):
        lens, n = item.split(":")
        i, o = (int(x) for x in lens.split("x"))
        works.append((item, fixed_work(int(n), i, o, args.seed)))
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                 "command": " ".join(sys.argv), "rows": []}  # fmt: skip
    cases = [("no LoRA (peer)", {}, [None]),
             ("LoRA engine, base requests", {"enable_lora": True}, [None]),
             (f"LoRA engine, {args.adapters} adapters of rank {args.rank}", {"enable_lora": True},
              loras)]  # fmt: skip
    peer: dict[str, float] = {}
    for name, kw, reqs in cases:
        if kw:
            kw = {**kw, "max_loras": args.adapters, "max_lora_rank": args.rank}
        llm = make_llm(folder, args, **kw)
        for item, work in works:
            ms, tps = run(llm, work, reqs)
            peer.setdefault(f"{item} ms", ms)
            peer.setdefault(f"{item} tps", tps)
            row = {"case": name, "work": item, "decode_ms": ms, "tok_s": tps,
                   "decode_ratio": ms / peer[f"{item} ms"],
                   "tok_s_ratio": tps / peer[f"{item} tps"]}  # fmt: skip
            res["rows"].append(row)
            print(
                f"{name:40s} {item:14s} batch-1 decode {ms:6.2f} ms ({row['decode_ratio']:.2f}x"
                f" the peer)  {tps:8.0f} tok/s ({row['tok_s_ratio']:.2f}x)",
                flush=True,
            )
        llm.shutdown()
        llm = None
        free_gpu()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
