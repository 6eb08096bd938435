"""The CPU backend: the plain-PyTorch reference every other backend is checked against.

Each method delegates to a device-agnostic function in this package (`kv_cache`, `attention`,
`linear`, `quant`, `norm`, `rotary`, `activation`, `graphs`); the docstrings in
`hal.backend.Backend` are the contracts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from backends.cpu import (
    activation,
    attention,
    cattention,
    ckernels,
    decoder,
    gguf,
    gguf_fast,
    graphs,
    kv_cache,
    linear,
    native,
    norm,
    quant,
    rotary,
    sdpa,
)
from hal.backend import Backend, GGUFWeight, GraphRunner
from hal.capabilities import Capabilities
from hal.env import env_flag
from hal.registry import Selection

logger = logging.getLogger(__name__)

# Opt-in for the bf16-accurate int4pack GGUF path of "cpu_fast" (see backends/cpu/__init__.py).
GGUF_INT4PACK_ENV = "HAL_GGUF_INT4PACK"
_GGUF_CPU_FIELDS = ("codes", "codes4", "scale", "offset", "packed", "scale_zeros", "dense")
# Bytes of exact GGUF weights kept dequantized in fp32 per backend (the rest stay tiled).
GGUF_DENSE_ENV = "HAL_GGUF_DENSE_BYTES"
GGUF_DENSE_DEFAULT = 1 << 30
# 0: the engine runs a GGUF model's decoder layers through its modules, op by op (see decoder.py).
FUSED_DECODER_ENV = "HAL_CPU_FUSED_DECODER"


def _gguf_dense_budget(wanted: int | None) -> int:
    if wanted is not None:
        budget = wanted
    else:
        value = os.environ.get(GGUF_DENSE_ENV, "").strip()
        try:
            budget = int(value) if value else GGUF_DENSE_DEFAULT
        except ValueError:
            raise ValueError(
                f"{GGUF_DENSE_ENV}: {value!r} is not a whole number of bytes"
            ) from None
    if budget < 0:
        raise ValueError(
            f"{GGUF_DENSE_ENV}: {budget} must be >= 0 bytes (0: keep every weight tiled)"
        )
    return budget


def _gguf_int4pack_policy(wanted: bool | None) -> bool:
    if wanted is not None:
        return wanted
    return bool(env_flag(GGUF_INT4PACK_ENV))


class CpuBackend(Backend):
    """Reference semantics, clear over fast: fp32 accumulation, no TF32, eager 'graphs'.

    gguf_int4pack=None reads HAL_GGUF_INT4PACK (default off): whether "cpu_fast" runs 4-bit GGUF
    weights through torch's bf16 int4pack matmul instead of the exact fp32 values.
    gguf_dense_bytes=None reads HAL_GGUF_DENSE_BYTES (default 1 GiB): how many bytes of those
    exact fp32 values are kept whole at load (one matmul a call) before the rest stay tiled
    (dequantized per call, ~1.2 bytes per value kept)."""

    name = "cpu"

    def __init__(
        self,
        caps: Capabilities,
        device: str | torch.device = "cpu",
        selections: dict[str, Selection] | None = None,
        gguf_int4pack: bool | None = None,
        gguf_dense_bytes: int | None = None,
    ) -> None:
        super().__init__(caps, device, selections)
        self.info.settings.update({"tf32": "off", "accumulate": "fp32", "graphs": "eager"})
        self.gguf_int4pack = _gguf_int4pack_policy(gguf_int4pack)
        self.gguf_dense_left = _gguf_dense_budget(gguf_dense_bytes)
        self.codes_kernel = None
        # the "c" rotary's kernel (loaded when the selection checked it), held for each call
        self.rotary_kernel = (
            ckernels.load_rotary_kernel()[0] if self.chosen("rotary") == "c" else None
        )
        self.attention_kernel = (
            ckernels.load_attention_kernel()[0] if self.chosen("attention") == "c" else None
        )
        self.rms_norm_kernel = (
            ckernels.load_rms_norm_kernel()[0] if self.chosen("rms_norm") == "c" else None
        )
        if self.chosen("gguf_gemm") == "cpu_fast":
            if not self.gguf_int4pack:
                self.codes_kernel, why = ckernels.load_codes_kernel()
                self.info.settings["gguf_small_batch"] = (
                    f"{self.codes_kernel.describe()} ({ckernels.ENV}=0: off)"
                    if self.codes_kernel is not None
                    else f"torch (no C codes kernel: {why})"
                )
            self.info.settings["gguf_int4"] = (
                f"int4pack (bf16 accuracy; {GGUF_INT4PACK_ENV}=1)"
                if self.gguf_int4pack
                else f"exact fp32: whole up to {self.gguf_dense_left / 2**20:.0f} MiB "
                f"({GGUF_DENSE_ENV}), then tiled; {GGUF_INT4PACK_ENV}=1 for bf16 int4pack"
            )
        self._fused_decoder = env_flag(FUSED_DECODER_ENV) is not False
        kernels = (self.rms_norm_kernel, self.rotary_kernel, self.attention_kernel)
        self.info.settings["gguf_decoder"] = (
            f"op by op ({FUSED_DECODER_ENV}=0)"
            if not self._fused_decoder
            else "op by op (the C rms_norm, rotary and attention kernels are not all chosen)"
            if any(k is None for k in kernels)
            else f"decode batches one C call per layer ({FUSED_DECODER_ENV}=0: op by op)"
        )
        logger.debug("cpu reference backend on %s", self.device)

    @property
    def gguf_nibbles(self) -> bool:
        """Whether Q4_0 / Q4_1 / Q4_K codes are kept two per byte: with the AVX-512 build of the
        codes kernel, whose 4-bit loop costs what its int8 loop does (a 16-entry table lookup
        per value); the AVX2 and plain C builds take them too but slower than int8 codes."""
        return self.codes_kernel is not None and self.codes_kernel.vector_width == 16

    @property
    def gguf_lm_head(self) -> bool:
        """A GGUF model's LM head runs from its blocks when the C codes kernel is here (the
        default model's Q8_0 LM head: 1 byte per weight at M = 1 instead of 4)."""
        return self.codes_kernel is not None

    # -- KV cache ------------------------------------------------------------------------------
    def write_kv(self, key, value, key_cache, value_cache, slot_mapping, kv_scale=None) -> None:
        fn = native.native_write_kv if self.chosen("kv_write") == "native" else kv_cache.write_kv
        fn(key, value, key_cache, value_cache, slot_mapping, kv_scale)

    def copy_blocks(self, caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        fn = (
            native.native_copy_blocks
            if self.chosen("kv_write") == "native"
            else kv_cache.copy_blocks
        )
        fn(caches, src, dst)

    # -- attention -----------------------------------------------------------------------------
    def attention(
        self,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window=None,
        soft_cap=None,
        kv_scale=None,
        max_query_len=None,  # hints for kernels that pick a path by them; the CPU needs none
        max_seq_len=None,
    ) -> torch.Tensor:
        choice = self.chosen("attention")
        if choice == "c":
            return cattention.c_attention(
                query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, soft_cap, kv_scale, kernel=self.attention_kernel,
            )  # fmt: skip
        fn = sdpa.sdpa_attention if choice == "sdpa" else attention.paged_attention
        return fn(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, soft_cap, kv_scale,
        )  # fmt: skip

    # -- linear --------------------------------------------------------------------------------
    def linear(self, x, weight, bias=None) -> torch.Tensor:
        gemm = self.chosen("gemm")
        if gemm == "onednn":
            return native.onednn_linear(x, weight, bias)
        if gemm == "native":
            return native.native_linear(x, weight, bias)
        return linear.linear(x, weight, bias)

    def fp8_linear(
        self, x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16
    ) -> torch.Tensor:
        return linear.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)

    def int8_linear(
        self, x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16
    ) -> torch.Tensor:
        return linear.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)

    def int4_linear(
        self, x, qweight, scales, zeros, group_size, g_idx=None, bias=None
    ) -> torch.Tensor:
        return linear.int4_linear(x, qweight, scales, zeros, group_size, g_idx, bias)

    def prepare_gguf(self, blocks, qtype, out_features, in_features, role="linear") -> GGUFWeight:
        if role not in ("linear", "lm_head"):
            raise ValueError(f"role: {role!r} is not 'linear' or 'lm_head'")
        if self.chosen("gguf_gemm") == "cpu_fast":
            # An LM head (its model keeps the float embedding) stays tiled: the codes kernel
            # takes its decode-sized calls in chunks, no second fp32 copy.
            w = gguf_fast.prepare_gguf_cpu(
                blocks, qtype, out_features, in_features, use_int4pack=self.gguf_int4pack,
                dense_budget=0 if role == "lm_head" else self.gguf_dense_left,
                keep_codes=self.codes_kernel is not None,
                nibbles=self.gguf_nibbles,
            )  # fmt: skip
            if w.path == "dense":
                self.gguf_dense_left -= w.dense.numel() * w.dense.element_size()
            tensors = {f: getattr(w, f) for f in _GGUF_CPU_FIELDS if getattr(w, f) is not None}
            # data: the codes kernel's checked handle on the same tensors (decode-sized calls)
            bound = gguf_fast.bind_codes(w, self.codes_kernel)
            return GGUFWeight(w.qtype, out_features, in_features, w.path, tensors, bound)
        bt = gguf.check_blocks(blocks, qtype, out_features, in_features)
        blocks = blocks.to(self.device).contiguous()
        return GGUFWeight(bt.name, out_features, in_features, "blocks", {"blocks": blocks})

    def gguf_linear(self, x, weight: GGUFWeight, bias=None) -> torch.Tensor:
        n, k = weight.out_features, weight.in_features
        if weight.layout == "blocks":
            return gguf.gguf_linear(x, weight.tensors["blocks"], weight.qtype, n, k, bias)
        if weight.data is not None:  # decode-sized calls on the codes (a tiled weight up to
            # CHUNKED_ROWS rows, a dense one up to DENSE_CHUNKED_ROWS, MAX_M a call; a dense
            # one leaves more to its fp32 matmul)
            rows = gguf_fast.chunked_rows(weight.layout)
            y = gguf_fast.codes_linear(x, weight.data, bias, rows)
            if y is not None:
                return y
        onednn = self.chosen("gemm") == "onednn"  # the dense and tiled paths' fp32 products
        if weight.layout == "dense":  # small models' common case: straight to the matmul
            dense = weight.tensors["dense"]
            if tuple(dense.shape) != (n, k):
                raise ValueError(f"weight: dense {tuple(dense.shape)} is not [{n}, {k}]")
            return gguf_fast.dense_linear(x, dense, bias, onednn)
        if weight.layout not in ("tiled", "int4pack"):
            raise ValueError(
                f"weight: layout {weight.layout!r} was not prepared by the CPU backend (blocks, "
                "tiled, int4pack, dense); prepare it with this backend's prepare_gguf"
            )
        prepared = gguf_fast.GGUFCpuWeight(weight.qtype, n, k, weight.layout, **weight.tensors)
        return gguf_fast.gguf_linear_cpu(x, prepared, bias, onednn)

    # -- quantize / dequantize -----------------------------------------------------------------
    def quantize_fp8(self, x, fp8_dtype, scale=None, per_token=False):
        return quant.quantize_fp8(x, fp8_dtype, scale, per_token)

    def dequantize_fp8(self, q, scale, out_dtype=torch.float32) -> torch.Tensor:
        return quant.dequantize_fp8(q, scale, out_dtype)

    def quantize_int8(self, x, scale=None, per_token=True):
        return quant.quantize_int8(x, scale, per_token)

    def quantize_int4(self, weight, group_size, symmetric=False):
        return quant.quantize_int4(weight, group_size, symmetric)

    def dequantize_int4(self, qweight, scales, zeros, group_size, g_idx=None) -> torch.Tensor:
        return quant.dequantize_int4(qweight, scales, zeros, group_size, g_idx)

    # -- fused small ops -----------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None):
        choice = self.chosen("rms_norm")
        if choice == "c":
            return native.c_rms_norm(x, weight, eps, residual, kernel=self.rms_norm_kernel)
        fn = native.native_rms_norm if choice == "native" else norm.rms_norm
        return fn(x, weight, eps, residual)

    def rotary(self, positions, query, key, cos_sin_cache, is_neox=True):
        choice = self.chosen("rotary")
        if choice == "c":
            return native.c_rotary(
                positions, query, key, cos_sin_cache, is_neox, kernel=self.rotary_kernel
            )
        fn = native.native_rotary if choice == "native" else rotary.rotary
        return fn(positions, query, key, cos_sin_cache, is_neox)

    def rotary_write_kv(
        self, positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache,
        slot_mapping, kv_scale=None,
    ):  # fmt: skip
        # The C rotary writes the cache in its pass when the cache write is the engine's own
        # (fp32 caches); anything it does not take is the composition of the two ops.
        if self.chosen("rotary") == "c" and self.chosen("kv_write") == "native":
            out = native.c_rotary_write_kv(
                positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache,
                slot_mapping, self.rotary_kernel,
            )  # fmt: skip
            if out is not None:
                return out
        return super().rotary_write_kv(
            positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache,
            slot_mapping, kv_scale,
        )  # fmt: skip

    def silu_and_mul(self, x) -> torch.Tensor:
        return activation.silu_and_mul(x)

    def lora_add(self, x, y, a, b, batch, parts) -> torch.Tensor:
        return linear.lora_add(x, y, a, b, batch.token_slots, batch.num_slots, batch.rank)

    # -- whole decoder stacks ------------------------------------------------------------------
    @property
    def fused_gguf_decoder(self) -> bool:
        """Whether the engine hands GGUF decoder stacks to `gguf_decoder_layers` (decode batches
        then run the C kernels from one loop, `decoder.run`): on unless HAL_CPU_FUSED_DECODER=0
        when the backend was built."""
        return self._fused_decoder

    def gguf_decoder_layers(
        self, hidden, residual, stack, positions, kv_caches, slot_mapping, block_tables, seq_lens,
        query_start_loc, max_query_len=None, max_seq_len=None,
    ):  # fmt: skip
        if stack.data is None:
            stack.data = decoder.prepare(self, stack) or "composition"
        if isinstance(stack.data, decoder.Plan):
            out = decoder.run(
                stack.data, hidden, residual, stack, positions, kv_caches, slot_mapping,
                block_tables, seq_lens, query_start_loc, max_query_len,
            )  # fmt: skip
            if out is not None:
                return out
        return super().gguf_decoder_layers(
            hidden, residual, stack, positions, kv_caches, slot_mapping, block_tables, seq_lens,
            query_start_loc, max_query_len, max_seq_len,
        )  # fmt: skip

    # -- graphs --------------------------------------------------------------------------------
    def capture_graph(
        self, fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], pool: object | None = None
    ) -> GraphRunner:
        return graphs.capture_graph(fn, pool)
