"""Random weights for benchmarks at real sizes (`load_format="dummy"`, as in vLLM): no files read.

Each tensor is drawn on the target device from a generator seeded by its name, so every rank of a
tensor-parallel run slices the same full tensor and TP=N equals TP=1 on the same weights. A
config.json with a quantization_config gets random tensors in that checkpoint layout (GPTQ 4/8-bit
symmetric, compressed-tensors W8A8 int8 per channel, FP8 e4m3 with 128x128 block scales), scaled
like N(0, INIT_STD) weights.
"""

from __future__ import annotations

import zlib

import torch

from engine.model_config import ModelConfig

INIT_STD = 0.02  # Hugging Face's initializer_range default for Llama


class RandomSource:
    """A `TensorSource` of N(0, INIT_STD) matrices and ones for norm weights, in `dtype`; with a
    quantization_config, the quantized layers' tensors in the checkpoint's layout."""

    def __init__(
        self, config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.shapes = expected_shapes(config)
        self.quantized: dict[str, tuple[str, torch.dtype]] = {}  # name -> (kind, dtype)
        if config.quantization_config:
            self.shapes, self.quantized = quantized_shapes(self.shapes, config.quantization_config)

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
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        if name in self.quantized:
            full = self._quantized(name, shape, gen)
        elif name.endswith("norm.weight"):  # RMSNorm gains; biases are random like matrices
            full = torch.ones(shape, dtype=self.dtype, device=self.device)
        else:
            full = torch.randn(shape, generator=gen, dtype=self.dtype, device=self.device)
            full.mul_(INIT_STD)
        if dim is None:
            return full
        return full.narrow(dim, start, (shape[dim] if stop is None else stop) - start)

    def _quantized(self, name: str, shape, gen: torch.Generator) -> torch.Tensor:
        kind, dtype = self.quantized[name]
        dev = self.device
        if kind == "codes":  # packed codes or int8 weights: every bit pattern uniform
            info = torch.iinfo(dtype)
            return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype, device=dev)
        if kind == "e4m3":  # every finite e4m3fn code uniform: magnitudes 0..0x7E, either sign
            bits = torch.randint(0, 0x7F, shape, generator=gen, dtype=torch.uint8, device=dev)
            sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8, device=dev)
            return (bits | (sign << 7)).view(torch.float8_e4m3fn)
        if kind == "scales_e4m3":  # the std of those codes' values (about 100) to INIT_STD
            values = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
            codes_std = float(values.pow(2).mean().sqrt())
            s = torch.rand(shape, generator=gen, device=dev) * 0.2 + 0.9
            return (s * (INIT_STD / codes_std)).to(dtype)
        if kind.startswith("zeros"):  # GPTQ v1 symmetric: every packed zero 2^(bits-1) - 1
            bits = int(kind.removeprefix("zeros"))
            word = sum(((1 << (bits - 1)) - 1) << (bits * i) for i in range(32 // bits))
            return torch.full(shape, word - (1 << 32) if word >= 1 << 31 else word, dtype=dtype,
                              device=dev)  # fmt: skip
        # scales: codes are uniform, so the weight's std is scale x the codes' std
        bits = int(kind.removeprefix("scales"))
        codes_std = ((1 << (2 * bits)) - 1) ** 0.5 / 12**0.5
        s = torch.rand(shape, generator=gen, device=dev) * 0.2 + 0.9  # +-10% around
        return (s * (INIT_STD / codes_std)).to(dtype)


def quantized_shapes(
    shapes: dict[str, tuple[int, ...]], q: dict
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, torch.dtype]]]:
    """Float shapes -> the checkpoint layout of the quantization_config's format for every
    linear weight of the decoder layers (embeddings, norms and lm_head stay float), and each
    quantized tensor's (kind, dtype). Supported: gptq (bits 4 or 8, sym, no desc_act),
    compressed-tensors int8 W8A8 per channel and fp8 with weight_block_size."""
    method = str(q.get("quant_method", "")).lower()
    out, kinds = {}, {}
    for name, shape in shapes.items():
        linear = ".layers." in name and name.endswith("_proj.weight")
        if not linear:
            out[name] = shape
            continue
        n, k = shape
        base = name.removesuffix(".weight")
        if method == "gptq":
            bits, g = int(q.get("bits", 4)), int(q.get("group_size", 128))
            g = k if g == -1 else g
            if bits not in (4, 8) or q.get("desc_act") or not q.get("sym", True):
                raise ValueError(
                    "load_format='dummy': random GPTQ weights are symmetric 4- or 8-bit without "
                    f"desc_act; this quantization_config asks bits={bits}, "
                    f"desc_act={q.get('desc_act')}, sym={q.get('sym')}"
                )
            pack = 32 // bits
            out[f"{base}.qweight"] = (k // pack, n)
            kinds[f"{base}.qweight"] = ("codes", torch.int32)
            out[f"{base}.qzeros"] = (k // g, n // pack)
            kinds[f"{base}.qzeros"] = (f"zeros{bits}", torch.int32)
            out[f"{base}.scales"] = (k // g, n)
            kinds[f"{base}.scales"] = (f"scales{bits}", torch.float16)
        elif method == "fp8" and q.get("weight_block_size") is not None:
            bn, bk = (int(b) for b in q["weight_block_size"])
            out[name], kinds[name] = (n, k), ("e4m3", torch.float8_e4m3fn)
            out[f"{base}.weight_scale_inv"] = (-(-n // bn), -(-k // bk))
            kinds[f"{base}.weight_scale_inv"] = ("scales_e4m3", torch.float32)
        elif method == "compressed-tensors" and q.get("format") == "int-quantized":
            out[name], kinds[name] = (n, k), ("codes", torch.int8)
            out[f"{base}.weight_scale"] = (n, 1)
            kinds[f"{base}.weight_scale"] = ("scales8", torch.bfloat16)
        else:
            raise ValueError(
                f"load_format='dummy': no random weights for quant_method {method!r} (format "
                f"{q.get('format')!r}); supported: gptq, compressed-tensors int-quantized, fp8 "
                "with weight_block_size"
            )
    return out, kinds


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
