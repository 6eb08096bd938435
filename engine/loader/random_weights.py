"""Random weights for benchmarks at real sizes (`load_format="dummy"`, as in vLLM): no files read.

Each tensor is drawn on the target device from a generator seeded by its name, so every rank of a
tensor-parallel run slices the same full tensor and TP=N equals TP=1 on the same weights.
"""

from __future__ import annotations

import zlib

import torch

from engine.model_config import ModelConfig

INIT_STD = 0.02  # Hugging Face's initializer_range default for Llama


class RandomSource:
    """A `TensorSource` of N(0, INIT_STD) matrices and ones for norm weights, in `dtype`."""

    def __init__(
        self, config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.shapes = expected_shapes(config)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise KeyError(f"random weights: no tensor {name!r} in this model's layout")
        return self.shapes[name]

    def location(self, name: str) -> str:
        return "random weights (load_format='dummy')"

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        shape = self.shape(name)
        if name.endswith("norm.weight"):  # RMSNorm gains; biases are random like matrices
            full = torch.ones(shape, dtype=self.dtype, device=self.device)
        else:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=gen, dtype=self.dtype, device=self.device)
            full.mul_(INIT_STD)
        if dim is None:
            return full
        return full.narrow(dim, start, (shape[dim] if stop is None else stop) - start)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names -> full shapes for a Llama-family model."""
    h, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
        }
        if config.attention_bias:
            for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[f"{p}.self_attn.{name}.bias"] = (n,)
        if config.o_proj_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if config.mlp_bias:
            for name, n in (("gate_proj", inter), ("up_proj", inter), ("down_proj", h)):
                shapes[f"{p}.mlp.{name}.bias"] = (n,)
        if config.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
    return shapes
