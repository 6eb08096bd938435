"""The Llama family in one implementation: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM.

Per-model differences come from `ModelConfig` (QKV bias, q/k norm, sliding window, tied
embeddings, rope scaling). Every op runs through the HAL backend; layers are tensor-parallel.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.batch import ForwardBatch
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    check_quantized_weights,
    describe_quantization,
)
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.model_config import ModelConfig
from engine.parallel import SINGLE, ParallelContext, TensorSource
from engine.quantization import QuantizationConfig, get_quantization_config
from engine.quantization.base import QuantizedActivation
from engine.quantization.gguf import GGUFConfig
from hal.backend import Backend, GGUFDecoderLayer, GGUFDecoderStack

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]  # K, V: [num_blocks, block_size, kv_heads, head_dim]


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        rotary: RotaryEmbedding,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            d,
            config.num_heads,
            config.num_kv_heads,
            backend,
            parallel,
            dtype,
            bias=config.attention_bias,
            quant_config=quant_config,
            prefixes=(f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"),
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * d,
            config.hidden_size,
            backend,
            parallel,
            dtype,
            config.o_proj_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.q_norm = RMSNorm(d, config.rms_norm_eps, backend, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps, backend, dtype) if config.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            d,
            d**-0.5,
            backend,
            sliding_window=config.sliding_window_for(layer),
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        if self.q_norm is None:
            # The projection, rotary and the KV-cache write as one backend op (the qkv GEMM's
            # epilogue on a fused GPU backend at decode sizes), then attention over the cache.
            q = self.qkv_proj.forward_rotary_write_kv(
                hidden, self.rotary, positions, *kv_cache, batch.slot_mapping, self.attn.kv_scale
            )
            return self.o_proj(self.attn.attend(q, batch, kv_cache))  # [T, hidden]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))  # [T, heads, D], [T, kv_heads, D] x2
        q, k = self.q_norm(q), self.k_norm(k)  # Qwen3: per-head RMSNorm before rotary
        # Rotary and the KV-cache write run as one backend op (one launch on the GPU).
        out = self.attn(q, k, v, batch, kv_cache, rotary=self.rotary, positions=positions)
        return self.o_proj(out)  # [T, hidden]

    def load(self, source: TensorSource, prefix: str) -> None:
        self.qkv_proj.load(source, f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj")
        self.o_proj.load(source, f"{prefix}.o_proj")
        if self.q_norm is not None:
            self.q_norm.load(source, f"{prefix}.q_norm.weight")
            self.k_norm.load(source, f"{prefix}.k_norm.weight")


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one column-parallel GEMM."""

    def __init__(
        self,
        config: ModelConfig,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.backend = backend
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [size, size],
            backend,
            parallel,
            dtype,
            config.mlp_bias,
            quant_config=quant_config,
            prefixes=[f"{prefix}.gate_proj", f"{prefix}.up_proj"],
        )
        self.down_proj = RowParallelLinear(
            size,
            config.hidden_size,
            backend,
            parallel,
            dtype,
            config.mlp_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, 2 * intermediate / tp] -> [T, intermediate / tp] -> [T, hidden]
        fp8 = self.down_proj.fp8_input_dtype()
        if fp8 is None:
            return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x))
        # An FP8 down projection with per-token activations: one launch activates and quantizes.
        h = self.gate_up_proj(x)
        return self.down_proj(
            QuantizedActivation(*self.backend.silu_and_mul_quant_fp8(h, fp8), h.dtype)
        )

    def load(self, source: TensorSource, prefix: str) -> None:
        self.gate_up_proj.load(source, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(source, f"{prefix}.down_proj")


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        rotary: RotaryEmbedding,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        prefix = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(config.hidden_size, eps, backend, dtype)
        self.self_attn = LlamaAttention(
            config, layer, rotary, backend, parallel, dtype, quant_config, f"{prefix}.self_attn"
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, backend, dtype)
        self.mlp = LlamaMLP(config, backend, parallel, dtype, quant_config, f"{prefix}.mlp")
        # At tp_size > 1 the row-parallel projections (o_proj, down_proj) hand out this rank's
        # partial sums and the norm that reads them does the all-reduce: one launch for the sum,
        # the residual add and RMSNorm where the collectives have a fused path (the one-shot
        # all-reduce on NVIDIA GPUs), the all-reduce and then the norm otherwise. A bias must be
        # added after the sum, so a layer with one reduces in the projection as before.
        self.parallel = parallel
        self.partial_out = parallel.tp_size > 1 and not config.o_proj_bias and not config.mlp_bias
        if self.partial_out:
            self.self_attn.o_proj.reduce_results = False
            self.mlp.down_proj.reduce_results = False

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        kv_cache: KVCache,
        partial: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add of the previous sublayer is fused into the next norm, and so is the
        # per-token FP8 quantize of an FP8 linear that reads the norm (None otherwise). partial:
        # hidden is this rank's partial sum (the previous layer's partial_out, so a residual
        # comes with it); the returned hidden is one when self.partial_out.
        attn_fp8 = self.self_attn.qkv_proj.fp8_input_dtype()
        if residual is None:
            hidden, residual = self.input_layernorm(hidden, quant_dtype=attn_fp8), hidden
        else:
            reduce = self.parallel if partial else None
            hidden, residual = self.input_layernorm(hidden, residual, attn_fp8, reduce)
        hidden = self.self_attn(positions, hidden, batch, kv_cache)
        mlp_fp8 = self.mlp.gate_up_proj.fp8_input_dtype()
        reduce = self.parallel if self.partial_out else None
        hidden, residual = self.post_attention_layernorm(hidden, residual, mlp_fp8, reduce)
        return self.mlp(hidden), residual

    def load(self, source: TensorSource, prefix: str) -> None:
        self.input_layernorm.load(source, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(source, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(source, f"{prefix}.post_attention_layernorm.weight")
        self.mlp.load(source, f"{prefix}.mlp")


class LlamaForCausalLM(nn.Module):
    """forward(batch, kv_caches) -> final hidden states; compute_logits(rows) -> logits.

    The linear layers are quantized as config.quantization_config says (a GPTQ, AWQ, ...
    checkpoint) or, for a float checkpoint, as `quantization` asks ("fp8": online FP8).
    """

    def __init__(
        self,
        config: ModelConfig,
        backend: Backend,
        dtype: torch.dtype = torch.float32,
        parallel: ParallelContext = SINGLE,
        max_model_len: int | None = None,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.quant_config = get_quantization_config(
            config.quantization_config, quantization, backend, config.source
        )
        self.config = config
        self.backend = backend
        self.dtype = dtype
        self.parallel = parallel
        self.max_model_len = max_model_len or config.max_position_embeddings
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len: {self.max_model_len} must be >= 1")
        h = config.hidden_size
        # Pipeline stage: this rank builds (and loads) only its contiguous range of layers; the
        # embedding lives on the first stage, the final norm and LM head on the last.
        self.layer_start, self.layer_stop = parallel.stage_layers(config.num_layers)
        self.embed_tokens = None
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, h, backend, parallel, dtype
            )
        self.rotary = RotaryEmbedding(
            config.head_dim, self.max_model_len, config.rope_theta, backend, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.rotary, backend, parallel, dtype, self.quant_config)
            for i in range(self.layer_start, self.layer_stop)
        )
        if self.quant_config is not None:
            logger.info("quantization: %s", self.quant_config.describe())
            for line in describe_quantization(self):
                logger.info("  %s", line)
        self.norm = self.lm_head = None
        if parallel.is_last_stage:
            self.norm = RMSNorm(h, config.rms_norm_eps, backend, dtype)
            self.lm_head = ParallelLMHead(config.vocab_size, h, backend, parallel, dtype)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.tie(self.embed_tokens)
        # This rank's KV heads: the per-layer cache is [num_blocks, block_size, these, head_dim].
        self.num_kv_heads = self.layers[0].self_attn.qkv_proj.num_kv_heads
        # The GGUF decoder stack (`_gguf_decoder_stack`): None until built, False if none.
        self._gguf_stack: GGUFDecoderStack | bool | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return (num_blocks, block_size, self.num_kv_heads, self.config.head_dim)

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[KVCache],
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run this stage's layers over the packed tokens.

        The first stage embeds batch.input_ids; a later stage continues from `intermediate`, the
        previous stage's (hidden, residual), each [num_tokens, hidden]. The last stage returns the
        final-norm hidden [num_tokens, hidden]; an earlier one returns its (hidden, residual).
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(
                f"kv_caches: got {len(kv_caches)} layers, this stage has {len(self.layers)} "
                f"(layers {self.layer_start}..{self.layer_stop - 1})"
            )
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(batch.input_ids), None  # [T, hidden]
        elif intermediate is None:
            raise ValueError(
                f"intermediate: pipeline stage {self.parallel.pp_rank} needs the previous "
                "stage's (hidden, residual)"
            )
        else:
            hidden, residual = intermediate
        partial = False  # hidden is this rank's partial sum (see LlamaDecoderLayer.partial_out)
        stack = self._gguf_decoder_stack()
        if stack is not None:  # the backend runs the whole stack (Backend.gguf_decoder_layers)
            hidden, residual = self.backend.gguf_decoder_layers(
                hidden, residual, stack, batch.positions, kv_caches, batch.slot_mapping,
                batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.max_query_len,
                batch.max_seq_len,
            )  # fmt: skip
        else:
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden, residual = layer(
                    batch.positions, hidden, residual, batch, kv_cache, partial
                )
                partial = layer.partial_out
        if self.norm is None:
            return (self.parallel.all_reduce(hidden) if partial else hidden), residual
        hidden, _ = self.norm(hidden, residual, reduce=self.parallel if partial else None)
        return hidden

    def _gguf_decoder_stack(self) -> GGUFDecoderStack | None:
        """The layers as one `GGUFDecoderStack` for a backend that runs whole GGUF stacks
        (`fused_gguf_decoder`), built once after loading; None (its modules run op by op) for
        another backend, another quantization, tensor parallelism, q/k norms, biases, soft-cap,
        an FP8 KV scale or linears split in segments."""
        if self._gguf_stack is not None:
            return self._gguf_stack or None
        self._gguf_stack = False
        c = self.config
        if (
            not self.backend.fused_gguf_decoder
            or self.layers[0].self_attn.qkv_proj.lora is not None  # LoRA: the modules add it
            or not isinstance(self.quant_config, GGUFConfig)
            or self.parallel.tp_size != 1
            or c.qk_norm
            or c.attention_bias
            or c.o_proj_bias
            or c.mlp_bias
        ):
            return None
        layers = []
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            weights = [getattr(m, "gguf_weights", None) for m in linears]
            if any(w is None or len(w) != 1 for w in weights):
                return None
            if a.attn.soft_cap is not None or a.attn.kv_scale is not None:
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if norms[0].eps != norms[1].eps:
                return None
            layers.append(
                GGUFDecoderLayer(
                    norms[0].weight.data,
                    norms[1].weight.data,
                    norms[0].eps,
                    *(w[0] for w in weights),
                    a.qkv_proj.num_heads,
                    a.qkv_proj.num_kv_heads,
                    a.attn.scale,
                    a.attn.sliding_window,
                )  # fmt: skip
            )
        self._gguf_stack = GGUFDecoderStack(
            tuple(layers), self.rotary.cos_sin_cache, self.rotary.is_neox
        )
        return self._gguf_stack

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor | None:
        """hidden [rows, hidden] -> logits [rows, vocab_size], fp32 (`float32=False`: the model's
        dtype, for a consumer that widens what it needs); None on non-driver ranks.

        Only the last pipeline stage has the LM head."""
        if self.lm_head is None:
            raise ValueError(f"compute_logits: pipeline stage {self.parallel.pp_rank} is not last")
        return self.lm_head(hidden, float32)

    @torch.inference_mode()
    def compute_greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [rows, hidden] -> int64 [rows]: each row's greedy token, on every rank of the
        last stage (`ParallelLMHead.greedy`: no logits gathered)."""
        if self.lm_head is None:
            raise ValueError(f"compute_greedy: pipeline stage {self.parallel.pp_rank} is not last")
        return self.lm_head.greedy(hidden)

    def load_weights(self, source: TensorSource) -> None:
        """Fill every parameter from `source` (Hugging Face names): this rank's stage and shards.

        Every quantized layer's tensors are checked first, so bad input fails before any read."""
        check_quantized_weights(self, source)
        self._gguf_stack = None  # built again from the loaded weights at the next forward
        if self.embed_tokens is not None:
            self.embed_tokens.load(source, "model.embed_tokens.weight")
        for i, layer in zip(range(self.layer_start, self.layer_stop), self.layers, strict=True):
            layer.load(source, f"model.layers.{i}")
        if self.norm is None:
            return
        self.norm.load(source, "model.norm.weight")
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        if not self.config.tie_word_embeddings:
            self.lm_head.load(source, head)
        elif self.embed_tokens is None:  # tied, but the embedding lives on another stage
            self.lm_head.load(source, head)
        if isinstance(self.quant_config, GGUFConfig) and self.lm_head.load_gguf(source, head):
            logger.info("LM head: %s blocks through gguf_linear", self.lm_head.gguf.qtype)
