"""The model description the engine runs on, parsed from HF config.json or GGUF metadata.

One Llama-family implementation covers every supported architecture; their differences live here
as fields (QKV bias, q/k RMSNorm, sliding window, tied embeddings, rope scaling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hal.errors import HalError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")

_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedModelError(HalError):
    """The checkpoint's architecture (or one of its features) is not one this engine implements."""


class ModelConfigError(HalError):
    """config.json or the GGUF metadata lacks a field or holds an invalid value."""


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-family model. Names follow Hugging Face where it has one."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF dict with "rope_type"; None for plain rope
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" / "sliding_attention"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None  # "bfloat16" etc., as the checkpoint states it
    # config.json's quantization_config as written (GPTQ, AWQ, ...); engine.quantization reads it
    quantization_config: dict[str, Any] | None = None
    source: str = "config.json"  # where this was parsed from, for messages

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.source}: architecture {self.architecture!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{self.source}: {name} = {value!r} must be an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"{self.source}: num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"{self.source}: head_dim {self.head_dim} must be even (rotary)")
        if not self.rms_norm_eps > 0:
            raise ModelConfigError(f"{self.source}: rms_norm_eps {self.rms_norm_eps} must be > 0")
        if not self.rope_theta > 0:
            raise ModelConfigError(f"{self.source}: rope_theta {self.rope_theta} must be > 0")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise UnsupportedModelError(
                    f"{self.source}: rope scaling type {rope_type!r} is not supported; supported: "
                    f"{', '.join(ROPE_TYPES)}"
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelConfigError(
                f"{self.source}: sliding_window {self.sliding_window} must be >= 1 or null"
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ModelConfigError(
                    f"{self.source}: layer_types has {len(self.layer_types)} entries, expected "
                    f"num_hidden_layers = {self.num_layers}"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise UnsupportedModelError(
                    f"{self.source}: layer_types {bad} not supported; supported: "
                    f"{', '.join(LAYER_TYPES)}"
                )

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def sliding_window_for(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    # -- parsing -----------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config.json (transformers 4.x or 5.x field names)."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(d.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            found = arch or f"model_type {d.get('model_type')!r}"
            raise UnsupportedModelError(
                f"{source}: architecture {found!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if "text_config" in d and "hidden_size" not in d:
            raise UnsupportedModelError(f"{source}: multimodal configs are not supported")

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ModelConfigError(f"{source}: missing required field {key!r}")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported; only silu")
        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = d.get("head_dim") or hidden // num_heads
        num_layers = need("num_hidden_layers")
        rope_theta, rope_scaling = _parse_rope(d)
        model_type = {v: k for k, v in _MODEL_TYPE_TO_ARCH.items()}[arch]

        attention_bias = bool(d.get("attention_bias", False))
        o_proj_bias = attention_bias
        if model_type == "qwen2":
            attention_bias, o_proj_bias = True, False  # Qwen2 always has q/k/v bias, no o bias
        elif model_type == "mistral":
            attention_bias = o_proj_bias = False
        sliding_window, layer_types = _parse_sliding(d, model_type, num_layers)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=d.get("dtype") or d.get("torch_dtype"),
            quantization_config=_parse_quantization(d, source),
            source=source,
        )

    @classmethod
    def from_gguf_metadata(
        cls, meta: dict[str, Any], tensor_names: set[str], source: str = "model.gguf"
    ) -> ModelConfig:
        """Parse GGUF key/values (already decoded to Python values) of a llama, qwen2 or qwen3
        file (the same keys under the architecture's prefix; qwen3 names its head size in
        attention.key_length)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                raise ModelConfigError(f"{source}: missing GGUF metadata {full!r}")
            return meta[full]

        if "rope_freqs.weight" in tensor_names:
            raise UnsupportedModelError(
                f"{source}: rope_freqs tensor (llama3 rope scaling baked into the GGUF) is not "
                "supported; load the Hugging Face folder instead"
            )
        num_heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        head_dim = int(
            meta.get(
                f"{arch}.attention.key_length",
                meta.get(f"{arch}.rope.dimension_count", hidden // num_heads),
            )
        )
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        rope_scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise UnsupportedModelError(
                    f"{source}: GGUF rope.scaling.type {scaling_type!r} is not supported; "
                    "supported: none, linear"
                )
            rope_scaling = {
                "rope_type": "linear",
                "factor": float(need("rope.scaling.factor")),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        is_mistral = "mistral" in str(meta.get("general.name", "")).lower()
        window = meta.get(f"{arch}.attention.sliding_window")
        architecture = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
            arch, "MistralForCausalLM" if is_mistral else "LlamaForCausalLM"
        )
        return cls(
            architecture=architecture,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            o_proj_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_gate.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_window=int(window) if window else None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            source=source,
        )


def _parse_quantization(d: dict[str, Any], source: str) -> dict[str, Any] | None:
    """config.json's quantization_config (an object naming its quant_method), or None."""
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or not q.get("quant_method"):
        raise ModelConfigError(
            f"{source}: quantization_config must be an object with a quant_method, got {q!r}"
        )
    return dict(q)


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from transformers 5 rope_parameters or 4.x fields."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _parse_sliding(
    d: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers applies them for this model type."""
    window = d.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, ()
    layer_types = tuple(d.get("layer_types") or ())
    if model_type in ("qwen2", "qwen3") and not layer_types:
        if not d.get("use_sliding_window", False):
            return None, ()
        first = int(d.get("max_window_layers", num_layers))
        layer_types = tuple(
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        )
    if layer_types and "sliding_attention" not in layer_types:
        return None, ()
    return int(window), layer_types
