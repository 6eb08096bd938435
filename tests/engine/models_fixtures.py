"""Tiny random Llama-family checkpoints built with transformers, and a paged single-sequence runner.

`build_model(variant, folder)` saves a float32 safetensors checkpoint plus a small byte-level BPE
tokenizer with a chat template, as a Hugging Face folder the engine's loader reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from engine.batch import ForwardBatch

VOCAB = 384
BLOCK_SIZE = 16
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # larger than the default so greedy choices are not near-ties
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# name -> (model_type, config overrides). Each exercises one per-model difference.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama3_rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "linear_rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
    ),
    "mistral_sliding": ("mistral", {"sliding_window": 5, "head_dim": 16}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32, "attention_bias": False}),
}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE small enough to train in milliseconds, with ChatML-style specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"]
    tok.train_from_iterator(corpus * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(variant: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """Build a random float32 model of `variant`, save it (+ tokenizer) to `folder`, return it."""
    model_type, overrides = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **{**_BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a loader that skips them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return model


class PagedSequence:
    """One sequence over a paged KV cache with its blocks in random order (block size 16)."""

    def __init__(self, model, num_blocks: int = 8, seed: int = 0, kv_dtype=None) -> None:
        self.model = model
        g = torch.Generator().manual_seed(seed)
        shape = model.kv_cache_shape(num_blocks, BLOCK_SIZE)
        dtype = model.dtype if kv_dtype is None else kv_dtype
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(model.config.num_layers)
        ]
        self.block_table = torch.randperm(num_blocks, generator=g).to(torch.int32)
        self.length = 0

    def batch(self, token_ids: list[int], all_logits: bool = False) -> ForwardBatch:
        n = len(token_ids)
        positions = torch.arange(self.length, self.length + n, dtype=torch.int64)
        blocks = self.block_table.to(torch.int64)[positions // BLOCK_SIZE]
        seq_len = self.length + n
        return ForwardBatch(
            input_ids=torch.tensor(token_ids, dtype=torch.int64),
            positions=positions,
            slot_mapping=blocks * BLOCK_SIZE + positions % BLOCK_SIZE,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32),
            block_tables=self.block_table[None, :].clone(),
            logits_indices=torch.arange(n) if all_logits else torch.tensor([n - 1]),
            max_query_len=n,
            max_seq_len=seq_len,
        )

    def step(self, token_ids: list[int], all_logits: bool = False) -> torch.Tensor | None:
        """Feed tokens; return fp32 logits of the last (or every) new token."""
        batch = self.batch(token_ids, all_logits)
        hidden = self.model(batch, self.kv_caches)
        self.length += len(token_ids)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def greedy(self, prompt: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy-decode num_tokens after prompt; return tokens and each one's log-probability."""
        logits = self.step(prompt)
        tokens, logprobs = [], []
        for _ in range(num_tokens):
            lp = torch.log_softmax(logits[-1], dim=-1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            logits = self.step([token])
        return tokens, logprobs


def hf_greedy(model, prompt: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """transformers generate(do_sample=False): tokens and each one's log-probability.

    EOS is switched off so both sides decode exactly num_tokens tokens.
    """
    # generate() fills unset fields from model.generation_config, so switch EOS off there.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        model.generation_config.eos_token_id = saved
    tokens = out.sequences[0, len(prompt) :].tolist()
    if len(tokens) != num_tokens:
        raise AssertionError(f"transformers stopped after {len(tokens)} of {num_tokens} tokens")
    logprobs = [
        float(torch.log_softmax(score[0].float(), -1)[t])
        for score, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (HF NeoX layout -> GPT-J layout)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(hf_model, path: Path, drop: tuple[str, ...] = (), arch: str = "llama") -> Path:
    """Write a Llama / Qwen2 / Qwen3 `hf_model` as an F32 GGUF the way llama.cpp converts it
    (llama: q/k rows permuted; qwen3: q/k norms, the head size as attention.key_length).

    `drop` leaves out the named GGUF tensors; `arch` sets general.architecture.
    """
    import gguf

    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
    }
    for name, tensor in hf_model.state_dict().items():
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers.") :].split(".", 1)
            base, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{parts[base]}.{kind}"
        elif name in names:
            gguf_name = names[name]
        else:
            raise KeyError(name)
        if gguf_name in drop:
            continue
        if arch == "llama" and ".attn_q." in gguf_name:
            tensor = _llama_cpp_permute(tensor, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            tensor = _llama_cpp_permute(tensor, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.detach().float().numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cpu_llm(folder: Path, **kw):
    """An fp32 CPU `LLM` over `folder` with an 8 MiB KV cache unless kw says otherwise."""
    from engine import LLM

    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    return LLM(model=str(folder), dtype="float32", device="cpu", **kw)
