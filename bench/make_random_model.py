"""Write a Llama-shaped Hugging Face folder with random weights, for benchmarks at real sizes.

    python bench/make_random_model.py --shape llama3-8b --out /tmp/llama3-8b-random --dtype bfloat16

The folder holds config.json, safetensors and a small byte-level tokenizer (prompts in the
benchmarks are token ids; the tokenizer only lets the engine load the folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    # Llama-3-8B: 32 layers, hidden 4096, 32 q / 8 kv heads, head_dim 128, MLP 14336, vocab 128256.
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # Llama-3-70B: 80 layers, hidden 8192, 64 q / 8 kv heads, MLP 28672 (~131 GiB in bf16).
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # Llama-3.2-1B.
    "llama3-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def llama_config(shape: str, dtype: str = "bfloat16"):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype=dtype,
    )


def write_config_folder(shape: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    """config.json + tokenizer for `shape`, no weights: the engine's load_format='dummy' input."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llama_config(shape, dtype).save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--config-only",
        action="store_true",
        help="write config.json and the tokenizer, no weights (load with load_format='dummy')",
    )
    args = p.parse_args()
    if args.config_only:
        write_config_folder(args.shape, args.out, args.dtype)
        print(f"wrote {args.shape} config + tokenizer (no weights) to {Path(args.out).resolve()}")
        return 0
    from transformers import LlamaForCausalLM

    config = llama_config(args.shape, args.dtype)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(args.out)
    tokenizer().save_pretrained(args.out)
    n = sum(t.numel() for t in model.parameters())
    print(f"wrote {args.shape} ({n / 1e9:.2f}B params, {args.dtype}) to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
