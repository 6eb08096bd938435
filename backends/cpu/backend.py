"""The CPU backend: the plain-PyTorch reference every other backend is checked against.

Each method delegates to a device-agnostic function in this package (`kv_cache`, `attention`,
`linear`, `quant`, `norm`, `rotary`, `activation`, `graphs`); the docstrings in
`hal.backend.Backend` are the contracts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from backends.cpu import (
    activation,
    attention,
    graphs,
    kv_cache,
    linear,
    native,
    norm,
    quant,
    rotary,
    sdpa,
)
from hal.backend import Backend, GraphRunner
from hal.capabilities import Capabilities
from hal.registry import Selection

logger = logging.getLogger(__name__)


class CpuBackend(Backend):
    """Reference semantics, clear over fast: fp32 accumulation, no TF32, eager 'graphs'."""

    name = "cpu"

    def __init__(
        self,
        caps: Capabilities,
        device: str | torch.device = "cpu",
        selections: dict[str, Selection] | None = None,
    ) -> None:
        super().__init__(caps, device, selections)
        self.info.settings.update({"tf32": "off", "accumulate": "fp32", "graphs": "eager"})
        logger.debug("cpu reference backend on %s", self.device)

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
    ) -> torch.Tensor:
        fn = (
            sdpa.sdpa_attention if self.chosen("attention") == "sdpa" else attention.paged_attention
        )
        return fn(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, soft_cap, kv_scale,
        )  # fmt: skip

    # -- linear --------------------------------------------------------------------------------
    def linear(self, x, weight, bias=None) -> torch.Tensor:
        if self.chosen("gemm") == "native":
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
        return norm.rms_norm(x, weight, eps, residual)

    def rotary(self, positions, query, key, cos_sin_cache, is_neox=True):
        return rotary.rotary(positions, query, key, cos_sin_cache, is_neox)

    def silu_and_mul(self, x) -> torch.Tensor:
        return activation.silu_and_mul(x)

    # -- graphs --------------------------------------------------------------------------------
    def capture_graph(
        self, fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], pool: object | None = None
    ) -> GraphRunner:
        return graphs.capture_graph(fn, pool)
