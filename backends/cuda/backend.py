"""The CUDA backend: each op dispatches to the implementation selected for its family.

Code in this file may assume CUDA. Selections come from the registry (`backends.cuda` declares
the candidates and their rules); `ran` records which implementation served each family's last
call, so tests can assert the dispatch as well as the numbers. The Triton kernels
(`backends.triton`) are imported on first use only. With the capabilities of
`backends.cuda.interpreter_capabilities()` and TRITON_INTERPRET=1 the backend runs on CPU tensors.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

from backends.cpu import activation, norm
from backends.cpu import graphs as eager_graphs
from backends.cpu.linear import is_block_scaled
from backends.cuda import SCOPE, attention, gguf, graphs, kv_cache, linear, quant, rotary
from backends.cuda import candidates as rules
from hal.backend import Backend, GGUFWeight, GraphRunner, Int4Weight
from hal.capabilities import Capabilities
from hal.env import env_flag
from hal.registry import REGISTRY, Selection, SelectionError, env_choice

logger = logging.getLogger(__name__)

# TF32 for fp32 GEMMs: on by default where the device has it; HAL_ALLOW_TF32=0 turns it off.
TF32_ENV = "HAL_ALLOW_TF32"

_ATTENTION = {"flash_attn": attention.flash_attn_attention, "sdpa": attention.sdpa_attention}
_FP8_GEMM = {"dequant_gemm": linear.fp8_linear_dequant}
_INT8_GEMM = {"int_mm": linear.int8_linear_int_mm, "dequant_gemm": linear.int8_linear_dequant}
_TRITON_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _triton(module: str) -> ModuleType:
    """A `backends.triton` kernel module, imported on first use (Triton loads only if chosen)."""
    return importlib.import_module(f"backends.triton.{module}")


def _float_reasons(**tensors: torch.Tensor | None) -> list[str]:
    """Why the Triton kernels cannot take these tensors: they compute fp32, bf16 and fp16."""
    return [
        f"{name} dtype {t.dtype} is not float32, bfloat16 or float16"
        for name, t in tensors.items()
        if t is not None and t.dtype not in _TRITON_FLOATS
    ]


FUSED_GATE_UP_SILU_ENV = "HAL_FUSED_GATE_UP_SILU"
FUSED_QKV_ROTARY_ENV = "HAL_FUSED_QKV_ROTARY"
# HAL_DECODE_CONTEXT_CLASSES (on; =0 turns it off): small decode batches whose warp-specialized
# attention splits at max_model_len get a second graph with the longest context that runs unsplit
# (no combine kernel after the attention), replayed while every sequence of a step is that short
# (see `decode_context_bounds`). Measured on 2 x H200 (2026-11-29): TP=2 batch-1 decode 2.52-2.53
# -> 2.45-2.46 ms (docs/benchmarks.md, thirty-fifth section).
DECODE_CONTEXT_CLASSES_ENV = "HAL_DECODE_CONTEXT_CLASSES"


class CudaBackend(Backend):
    """NVIDIA GPUs through PyTorch's CUDA ops. allow_tf32=None reads HAL_ALLOW_TF32 (default on)."""

    name = "cuda"
    default_device = "cuda"

    def __init__(
        self,
        caps: Capabilities,
        device: str | torch.device = "cuda",
        selections: dict[str, Selection] | None = None,
        allow_tf32: bool | None = None,
    ) -> None:
        super().__init__(caps, device, selections)
        self.interpreted = caps.source == rules.INTERPRETER_SOURCE
        if self.interpreted:
            if self.device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "") != "1":
                raise ValueError(
                    f"device: {self.device} with the Triton interpreter's capabilities needs "
                    "device 'cpu' and TRITON_INTERPRET=1 set before the kernels are imported"
                )
        elif self.device.type != "cuda":
            raise ValueError(f"device: {self.device} is not a CUDA device (use 'cuda' or 'cuda:N')")
        # Families the caller did not select (direct construction) are selected here, same rules.
        for family in REGISTRY.families(SCOPE):
            if family not in self.info.selections:
                self.info.selections[family] = REGISTRY.select(
                    family, caps, scope=SCOPE, choice=env_choice(family)
                )
        self.allow_tf32 = self._tf32_policy(allow_tf32)
        self.ran: dict[str, str] = {}
        self._fallbacks_logged: set[str] = set()
        self.info.settings["graphs"] = self.chosen("graph")
        self.info.settings["rotary_write_kv"] = self._fused_rotary_write_kv()
        for op, family in (
            ("rms_norm_quant_fp8", "rms_norm"),
            ("silu_and_mul_quant_fp8", "activation"),
        ):
            first, quantize = self.chosen(family), self.chosen("quantize")
            fused = first == quantize == "triton"
            self.info.settings[op] = (
                "fused (triton, one launch)"
                if fused
                else f"{family} ({first}) then quantize ({quantize})"
            )
        # linear_silu_and_mul in one launch where M <= 16: unset, at the shapes where the tuning
        # table measured it faster; HAL_FUSED_GATE_UP_SILU=1 everywhere, 0 nowhere (see there)
        self.fused_gate_up_silu = env_flag(FUSED_GATE_UP_SILU_ENV)
        if self.chosen("gemm") == "triton_small_m" and self.chosen("activation") == "triton":
            self.info.settings["linear_silu_and_mul"] = {
                None: "fused (triton, one launch) at M <= 16 where the table measured it faster "
                f"(gemv.SILU_CONFIGS; {FUSED_GATE_UP_SILU_ENV}=1: at every M <= 16, 0: never)",
                True: f"fused (triton, one launch at M <= 16; {FUSED_GATE_UP_SILU_ENV}=1)",
                False: f"GEMM then activation ({FUSED_GATE_UP_SILU_ENV}=0)",
            }[self.fused_gate_up_silu]
        # HAL_FUSED_QKV_ROTARY=1: linear_rotary_write_kv in one launch where M <= 16 (see there)
        self.fused_qkv_rotary = bool(env_flag(FUSED_QKV_ROTARY_ENV))
        if self.chosen("gemm") == "triton_small_m" and torch.version.hip is None:
            self.info.settings["linear_rotary_write_kv"] = (
                "fused (triton, one launch at M <= 16: NeoX, whole heads)"
                if self.fused_qkv_rotary
                else f"GEMM then rotary_write_kv ({FUSED_QKV_ROTARY_ENV}=1 fuses them)"
            )
        for family in ("gemm", "fp8_gemm", "int8_gemm"):
            if self.chosen(family) == "triton_small_m":
                self.info.settings[f"{family}_large_m"] = f"M > 16: {self.large_m_impl(family)}"
        if self.chosen("gemm") == "triton_small_m":
            # Weight loads ahead of the PDL wait (HAL_GEMV_EARLY; nn.Parameter weights only)
            pdl = _triton("pdl").use_pdl(self.device)
            early = _triton("gemv").EARLY
            self.info.settings["gemm_small_m_early_weights"] = (
                "on (nn.Parameter weights: the first tile loads before the PDL wait)"
                if early and pdl
                else f"off ({'HAL_GEMV_EARLY=0' if not early else 'no PDL on this device'})"
            )
        if self.chosen("int4_gemm") == "triton":
            self.info.settings["int4_gemm_large_m"] = (
                f"M >= {self.int4_dequant_min_m}: triton_dequant+cublas"
            )
            from backends.triton import int4_gluon

            why = int4_gluon.device_reason(caps.cc_at_least(8, 0))
            self.info.settings["int4_gemm_small_m"] = (
                f"M <= {int4_gluon.MAX_M}: gluon (mma.sync, pairs order, registers "
                f"{'capped per launch shape' if int4_gluon.REG_CAP else 'uncapped'})"
                if why is None
                else f"triton pairs at every M (gluon off: {why})"
            )
        if self.chosen("attention") == "triton":
            from backends.triton import attention_ws

            why = attention_ws.device_reason(caps.cc_at_least(9, 0))
            self.info.settings["attention_decode"] = (
                (
                    "gluon warp-specialized (TMA page ring; persistent past one program per SM or "
                    "from 4096 tokens unsplit) for bf16/fp16, head_dim 64/128, pages 16/32, one "
                    "token per sequence; else triton"
                    if attention_ws.PERSISTENT_ENABLED
                    else "gluon warp-specialized (TMA page ring) where num_seqs x kv_heads <= SMs "
                    "(bf16/fp16, head_dim 64/128, pages 16/32, one token per sequence; persistent "
                    "off: HAL_ATTN_WS_PERSISTENT=0), else triton"
                )
                if why is None
                else f"triton (warp-specialized off: {why})"
            )
            self.info.settings["decode_graph_context_classes"] = (
                f"on: small decode buckets also captured unsplit up to "
                f"{attention_ws.SPLIT_MIN_PAGES - 1} pages ({DECODE_CONTEXT_CLASSES_ENV}=0: off)"
                if env_flag(DECODE_CONTEXT_CLASSES_ENV) is not False
                else f"off ({DECODE_CONTEXT_CLASSES_ENV}=0; unset: a second capture of small "
                "decode buckets for contexts the attention runs unsplit)"
            )
        if "scaled_mm" in (self.chosen("fp8_gemm"), self.large_m_impl("fp8_gemm")):
            rowwise = caps.cc_at_least(*rules.FP8_ROWWISE_MIN_CC)
            self.info.settings["fp8_rowwise"] = "on" if rowwise else "off (needs sm_90)"
            # FP8 tensor cores accumulate with fewer bits than fp32 (about 14 on Hopper per the
            # DeepSeek-V3 report), visible in fp32 outputs; conformance bounds can read this.
            self.info.settings["fp8_accumulate"] = "tensor-core"

    def _tf32_policy(self, allow_tf32: bool | None) -> bool:
        wanted = env_flag(TF32_ENV) if allow_tf32 is None else allow_tf32
        origin = TF32_ENV if allow_tf32 is None and wanted is not None else "config"
        if not self.caps.supports("tf32"):
            setting = f"off ({self.caps.device_name} has no TF32)"
        elif wanted is False:
            setting = f"off (disabled by {origin})"
        else:
            setting = "on"  # exactly "on": conformance widens fp32 GEMM bounds on this value
        self.info.settings["tf32"] = setting
        logger.info("cuda: tf32 %s for fp32 GEMMs", setting)
        return setting == "on"

    def _mark(self, family: str, impl: str) -> None:
        self.ran[family] = impl

    def _triton_or(self, family: str, fallback: str, why: list[str]) -> str:
        """The family's choice, or `fallback` when it is "triton" and the inputs give reasons."""
        impl = self.chosen(family)
        if impl == "triton":
            impl = self._input_fallback(family, impl, why, fallback)
        self._mark(family, impl)
        return impl

    # -- KV cache ------------------------------------------------------------------------------
    def write_kv(self, key, value, key_cache, value_cache, slot_mapping, kv_scale=None) -> None:
        why = _float_reasons(key=key, value=value)
        if not key_cache.is_contiguous() or not value_cache.is_contiguous():
            why.append("caches are not contiguous")
        if self._triton_or("kv_write", "torch", why) == "triton":
            _triton("kv_cache").write_kv(key, value, key_cache, value_cache, slot_mapping, kv_scale)
        else:
            kv_cache.write_kv(key, value, key_cache, value_cache, slot_mapping, kv_scale)

    def copy_blocks(self, caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        why = ["a cache is not contiguous"] if any(not c.is_contiguous() for c in caches) else []
        if self._triton_or("kv_write", "torch", why) == "triton":
            _triton("kv_cache").copy_blocks(caches, src, dst)
        else:
            kv_cache.copy_blocks(caches, src, dst)

    def _input_fallback(self, family: str, impl: str, why: list[str], fallback: str) -> str:
        """`impl` cannot take these inputs: use `fallback` (logged once per reason), or fail
        with the reasons when the user required `impl`."""
        if not why:
            return impl
        sel = self.info.selections[family]
        if sel.choice is not None and sel.choice.mode == "require" and sel.choice.name == impl:
            raise SelectionError(
                f"{family} {impl!r} required by {sel.choice.origin} cannot take these inputs: "
                + "; ".join(why)
            )
        key = f"{family}: {'; '.join(why)}"
        if key not in self._fallbacks_logged:
            self._fallbacks_logged.add(key)
            logger.warning("%s: %s cannot take these inputs (%s); using %s", family, impl,
                           "; ".join(why), fallback)  # fmt: skip
        return fallback

    # -- attention -----------------------------------------------------------------------------
    def _attention_impl(self, query: torch.Tensor, key_cache: torch.Tensor, kv_scale) -> str:
        impl = self.chosen("attention")
        if impl == "triton":
            why = _triton("attention").input_reasons(query, key_cache, kv_scale)
            return self._input_fallback("attention", impl, why, "sdpa")
        if impl != "flash_attn":
            return impl
        why = attention.flash_attn_input_reasons(query, key_cache, kv_scale)
        return self._input_fallback("attention", impl, why, "sdpa")

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
        max_query_len=None,
        max_seq_len=None,
    ) -> torch.Tensor:
        impl = self._attention_impl(query, key_cache, kv_scale)
        self._mark("attention", impl)
        args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, soft_cap, kv_scale)  # fmt: skip
        if impl == "triton":
            return _triton("attention").attention(
                *args, max_query_len=max_query_len, max_seq_len=max_seq_len
            )
        return _ATTENTION[impl](*args)

    # -- linear --------------------------------------------------------------------------------
    # The Triton small-M GEMM's tuning table ({(weight bytes, M bucket, N, K): GemvConfig});
    # None: its DEFAULT_CONFIGS. A vendor backend reusing this class sets its own.
    gemv_configs: dict | None = None

    def large_m_impl(self, family: str) -> str:
        """The candidate that serves what "triton_small_m" hands on (M > 16, other dtypes): the
        best other candidate that can run here, as the selection ranked them."""
        sel = self.info.selections.get(family)
        if sel is None or sel.chosen != "triton_small_m":
            return self.chosen(family)
        if not sel.not_tried:
            raise SelectionError(f"{family}: no candidate besides triton_small_m can run here")
        return sel.not_tried[0]

    def linear(self, x, weight, bias=None) -> torch.Tensor:
        # triton_small_m: the decode-sized kernel where M <= 16 (M = product of x's leading
        # dims), bf16/fp16 and K % 16 == 0; everything else by design to the next candidate.
        impl = self.chosen("gemm")
        if impl == "triton_small_m":
            gemv = _triton("gemv")
            if not gemv.small_m_reasons(x, weight):
                self._mark("gemm", impl)
                y = gemv.linear_small_m(x.reshape(-1, x.shape[-1]), weight, bias,
                                        configs=self.gemv_configs)  # fmt: skip
                return y.reshape(*x.shape[:-1], weight.shape[0])
            impl = self.large_m_impl("gemm")
        self._mark("gemm", impl)
        return linear.linear(x, weight, bias, self.allow_tf32)

    def linear_push(self, x, weight, push) -> torch.Tensor | None:
        """`linear(x, weight)` on the decode-sized kernel that also writes y as the one-shot
        all-reduce's low-latency words (push: `allreduce.LLPush`; push.done says whether the
        launch did), or None where that kernel does not take x (the caller runs `linear`)."""
        if self.chosen("gemm") != "triton_small_m":
            return None
        gemv = _triton("gemv")
        if gemv.small_m_reasons(x, weight):
            return None
        self._mark("gemm", "triton_small_m")
        y = gemv.linear_small_m(x.reshape(-1, x.shape[-1]), weight, None,
                                configs=self.gemv_configs, ll_push=push)  # fmt: skip
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def lora_add(self, x, y, a, b, batch, parts) -> torch.Tensor:
        # triton: decode-sized steps (<= 16 tokens; larger ones by design to torch, unlogged),
        # bf16 / fp16; other inputs fall back to torch with the reason logged once.
        impl = self.chosen("lora")
        if impl == "triton":
            lora = _triton("lora")
            why = lora.unsupported(x, y, a, b, batch.token_slots, batch.num_slots, batch.rank,
                                   parts)  # fmt: skip
            if why is not None and x.shape[0] > lora.MAX_TOKENS:
                impl = "torch"
            elif why is not None:
                impl = self._input_fallback("lora", impl, [why], "torch")
        self._mark("lora", impl)
        if impl == "triton":
            return lora.lora_add(x, y, a, b, batch.token_slots, batch.num_slots, batch.rank,
                                 parts)  # fmt: skip
        return linear.lora_add(x, y, a, b, batch)

    def fp8_linear(
        self, x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16
    ) -> torch.Tensor:
        if is_block_scaled(x_scale, w_scale):
            return self.fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        impl = self.chosen("fp8_gemm")
        if impl == "triton_small_m":
            gemv = _triton("gemv")
            if not gemv.fp8_small_m_reasons(x_q):
                self._mark("fp8_gemm", impl)
                return gemv.fp8_linear_small_m(x_q, x_scale, w_q, w_scale, bias, out_dtype,
                                               configs=self.gemv_configs)  # fmt: skip
            impl = self.large_m_impl("fp8_gemm")  # M > 16: by design, not a fallback
        if impl == "scaled_mm":
            why = linear.scaled_mm_input_reasons(x_q, w_q)
            impl = self._input_fallback("fp8_gemm", impl, why, "dequant_gemm")
        self._mark("fp8_gemm", impl)
        if impl == "scaled_mm":
            rowwise = self.caps.cc_at_least(*rules.FP8_ROWWISE_MIN_CC)
            return linear.fp8_linear_scaled_mm(
                x_q, x_scale, w_q, w_scale, bias, out_dtype, rowwise=rowwise
            )
        return _FP8_GEMM[impl](x_q, x_scale, w_q, w_scale, bias, out_dtype)

    # Up to this M the block-scaled Triton kernel's swapped decode tiles beat cuBLASLt's
    # block-scaled GEMM (H100, bench/fp8_block.py).
    fp8_block_scaled_mm_min_m: int = 65

    def fp8_block_linear(
        self, x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16
    ) -> torch.Tensor:
        """`fp8_linear`'s block-scaled case, through the "fp8_block_gemm" family: cuBLASLt's
        block-scaled GEMM from M = fp8_block_scaled_mm_min_m, the Triton kernel below it (by
        design) and for blockings cuBLASLt does not take (logged), the dequant path last."""
        family = "fp8_block_gemm"
        impl = self.chosen(family)
        if impl == "scaled_mm":
            why = linear.block_scaled_mm_input_reasons(x_q, x_scale, w_q, w_scale)
            if x_q.shape[0] < self.fp8_block_scaled_mm_min_m:
                impl = self.next_impl(family, impl)  # decode sizes: by design, not a fallback
            else:
                impl = self._input_fallback(family, impl, why, self.next_impl(family, impl))
        if impl == "triton":
            why = _triton("fp8_block").block_reasons(x_q, x_scale)
            impl = self._input_fallback(family, impl, why, "dequant_gemm")
        self._mark(family, impl)
        if impl == "scaled_mm":
            return linear.fp8_block_linear_scaled_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        if impl == "triton":
            return _triton("fp8_block").fp8_block_linear(
                x_q, x_scale, w_q, w_scale, bias, out_dtype
            )
        return linear.fp8_linear_dequant(x_q, x_scale, w_q, w_scale, bias, out_dtype)

    def next_impl(self, family: str, impl: str) -> str:
        """The candidate ranked after `impl` that can run here (the family's last resort when
        none is left)."""
        sel = self.info.selections[family]
        ranked = [sel.chosen, *sel.not_tried]
        later = ranked[ranked.index(impl) + 1 :] if impl in ranked else []
        return later[0] if later else ranked[-1]

    # The Triton small-M W8A8 kernel's tuning table ({(M bucket, N, K): GemvConfig}); None: its
    # DEFAULT_CONFIGS. A vendor backend reusing this class sets its own.
    int8_gemv_configs: dict | None = None

    def int8_linear(
        self, x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16
    ) -> torch.Tensor:
        # triton_small_m: the decode-sized kernel where M <= 16 (int8 weights read once at full
        # bandwidth; _int_mm pads M to 17); larger M by design to the next candidate (int_mm).
        impl = self.chosen("int8_gemm")
        if impl == "triton_small_m":
            int8_gemv = _triton("int8_gemv")
            if not int8_gemv.int8_small_m_reasons(x_q):
                self._mark("int8_gemm", impl)
                return int8_gemv.int8_linear_small_m(x_q, x_scale, w_q, w_scale, bias, out_dtype,
                                                     configs=self.int8_gemv_configs)  # fmt: skip
            impl = self.large_m_impl("int8_gemm")  # M > 16: by design, not a fallback
        self._mark("int8_gemm", impl)
        return _INT8_GEMM[impl](x_q, x_scale, w_q, w_scale, bias, out_dtype)

    # The Triton int4 kernel's tuning table, [(max_m, Int4Config)]; None: its DEFAULT_CONFIGS.
    # A vendor backend reusing this class (ROCm) sets its own.
    int4_configs: tuple | None = None

    def int4_linear(
        self, x, qweight, scales, zeros, group_size, g_idx=None, bias=None
    ) -> torch.Tensor:
        why = _float_reasons(x=x, scales=scales, bias=bias)
        if self._triton_or("int4_gemm", "dequant_gemm", why) == "triton":
            return _triton("int4_gemm").int4_linear(
                x, qweight, scales, zeros, group_size, g_idx, bias,
                allow_tf32=self.allow_tf32, configs=self.int4_configs,
            )  # fmt: skip
        return linear.int4_linear_dequant(
            x, qweight, scales, zeros, group_size, g_idx, bias, self.allow_tf32
        )

    # The packed layout's table; None: the Triton module's PACKED_CONFIGS.
    int4_packed_configs: tuple | None = None
    # Repack 4-bit weights in the tensor-core kernel's "pairs" order where it can take them (K
    # and the group size multiples of 128; bf16/fp16 x), and its table (None: PAIRS_CONFIGS).
    int4_pairs_order: bool = True
    int4_pairs_configs: tuple | None = None
    # Pairs words in tiles of this many rows (each kernel step one contiguous run; 0: row-major).
    # H100, Triton 3.6, bf16, G = 128, M = 1: the fused gate_up (K 4096, N 28672) 37.7 -> 31.5 us
    # (0.54 -> 0.64 of copy bandwidth), down (K 14336, N 4096) 20.6 -> 18.8 us; 1.05-1.2x at
    # M = 2-16 (docs/benchmarks.md, ninth session).
    int4_tile_rows: int = 128
    # From this many rows of x (M) up, a packed weight is dequantized by the Triton kernel into
    # x's dtype and multiplied by cuBLAS. Measured on an H100 (K=4096, N=14336, bf16): packed
    # kernel / dequant + cuBLAS 112 / 120 us at M = 128, 127 / 171 at 256, 237 / 159 at 512,
    # 897 / 401 at 2048 (bf16 cuBLAS alone: 72, 60, 97, 341): the crossing lies near M = 384.
    int4_dequant_min_m: int = 384

    def prepare_int4(self, qweight, scales, zeros, group_size, g_idx=None) -> Int4Weight:
        # With the Triton kernel chosen, repack once into its packed layout (each output
        # column's K contiguous: 1.6x faster at decode than the canonical layout on an H100).
        if self.chosen("int4_gemm") != "triton":
            return super().prepare_int4(qweight, scales, zeros, group_size, g_idx)
        dev = self.device
        ig = _triton("int4_gemm")
        g_idx = None if g_idx is None else g_idx.to(dev)
        order = "k"
        if self.int4_pairs_order:
            k = qweight.shape[0] * 8
            why = ig.pairs_reason(k, scales.shape[0], group_size, g_idx)
            if why:
                logger.info("int4: packed k order (not the tensor-core pairs order): %s", why)
            else:
                order = "pairs"
        tile_rows = self.int4_tile_rows if order == "pairs" else 0
        p = ig.repack_int4_for_triton(
            qweight.to(dev), scales.to(dev), zeros.to(dev), group_size, g_idx, order, tile_rows
        )
        parts = (("qweight", p.qweight), ("scales", p.scales), ("zeros", p.zeros),
                 ("perm", p.perm), ("g_idx", p.g_idx))  # fmt: skip
        tensors = {key: t for key, t in parts if t is not None}
        return Int4Weight(p.out_features, p.in_features, group_size, "packed", tensors, data=p)

    def int4_linear_prepared(self, x, weight: Int4Weight, bias=None) -> torch.Tensor:
        if weight.layout != "packed":
            return super().int4_linear_prepared(x, weight, bias)
        ig = _triton("int4_gemm")
        why = _float_reasons(x=x, bias=bias)
        impl = self._input_fallback("int4_gemm", "triton", why, "dequant_gemm")
        if impl == "triton" and x.dim() == 2 and x.shape[0] >= self.int4_dequant_min_m:
            # Large M: W [N, K] once in x's dtype (packed channel order, so x's columns take
            # the repack's permutation, as the kernel does), then cuBLAS; same one rounding of
            # each weight as dequant_gemm.
            self._mark("int4_gemm", "triton_dequant+cublas")
            p = weight.data
            if x.shape[1] != p.in_features:
                raise ValueError(f"x: K={x.shape[1]} differs from the packed weight's K="
                                 f"{p.in_features}")  # fmt: skip
            w = ig.dequantize_packed_triton(p, x.dtype)  # [N, K]
            xp = x if p.perm is None else x.index_select(1, p.perm)  # [M, K] packed order
            return linear.linear(xp, w, bias, self.allow_tf32)
        self._mark("int4_gemm", impl)
        if impl == "triton":
            return ig.int4_linear(x, weight.data, bias=bias, allow_tf32=self.allow_tf32,
                                  configs=self.int4_packed_configs,
                                  pairs_configs=self.int4_pairs_configs)  # fmt: skip
        w = ig.dequantize_packed(weight.data).to(x.dtype)
        return linear.linear(x, w, bias, self.allow_tf32)

    def prepare_gguf(self, blocks, qtype, out_features, in_features, role="linear") -> GGUFWeight:
        # The raw blocks stay as they are, on the device: both candidates read them directly.
        bt = gguf.check_blocks(blocks, qtype, out_features, in_features)
        blocks = blocks.to(self.device).contiguous()
        return GGUFWeight(bt.name, out_features, in_features, "blocks", {"blocks": blocks})

    def gguf_linear(self, x, weight: GGUFWeight, bias=None) -> torch.Tensor:
        if weight.layout != "blocks":
            raise ValueError(
                f"weight: layout {weight.layout!r}; the {self.name} backend runs raw 'blocks' "
                "(prepare the weight with this backend's prepare_gguf)"
            )
        blocks, qtype = weight.tensors["blocks"], weight.qtype
        n, k = weight.out_features, weight.in_features
        # Anything but the Triton kernel (a backend without a gguf_gemm selection) dequantizes.
        impl = self.chosen("gguf_gemm")
        if impl == "triton":
            impl = self._input_fallback("gguf_gemm", impl, _float_reasons(x=x), "dequant_gemm")
        else:
            impl = "dequant_gemm"
        self._mark("gguf_gemm", impl)
        if impl == "triton":
            return _triton("gguf").gguf_linear(x, blocks, qtype, n, k, bias)
        return gguf.gguf_linear_dequant(x, blocks, qtype, n, k, bias, self.allow_tf32)

    # -- quantize / dequantize (the reference math, bit for bit) ---------------------------------
    def _quant(self, why: list[str]) -> ModuleType:
        """The quantize module: Triton's when chosen and the inputs suit it, else torch's."""
        return _triton("quant") if self._triton_or("quantize", "torch", why) == "triton" else quant

    def quantize_fp8(self, x, fp8_dtype, scale=None, per_token=False):
        return self._quant(_float_reasons(x=x)).quantize_fp8(x, fp8_dtype, scale, per_token)

    def dequantize_fp8(self, q, scale, out_dtype=torch.float32) -> torch.Tensor:
        why = [] if out_dtype in _TRITON_FLOATS else [f"out_dtype {out_dtype} is not supported"]
        return self._quant(why).dequantize_fp8(q, scale, out_dtype)

    def quantize_int8(self, x, scale=None, per_token=True):
        return self._quant(_float_reasons(x=x)).quantize_int8(x, scale, per_token)

    def quantize_int4(self, weight, group_size, symmetric=False):
        impl = self._quant(_float_reasons(weight=weight))
        return impl.quantize_int4(weight, group_size, symmetric)

    def dequantize_int4(self, qweight, scales, zeros, group_size, g_idx=None) -> torch.Tensor:
        impl = self._quant(_float_reasons(scales=scales))
        return impl.dequantize_int4(qweight, scales, zeros, group_size, g_idx)

    # -- fused small ops -----------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None):
        why = _float_reasons(x=x, weight=weight, residual=residual)
        if self._triton_or("rms_norm", "torch", why) == "triton":
            return _triton("norm").rms_norm(x, weight, eps, residual)
        return norm.rms_norm(x, weight, eps, residual)

    def _fused_quant(self, family: str, **tensors) -> bool:
        """Whether the fused op with quantize serves: family's op and the quantize both chose
        Triton and the inputs suit them (otherwise the HAL's composition runs the two ops,
        with their own fallbacks, logs and errors)."""
        fused = self.chosen(family) == self.chosen("quantize") == "triton"
        if fused and not _float_reasons(**tensors):
            self._mark(family, "triton")
            self._mark("quantize", "triton")
            return True
        return False

    def rms_norm_quant_fp8(self, x, weight, eps, fp8_dtype, residual=None):
        if not self._fused_quant("rms_norm", x=x, weight=weight, residual=residual):
            return super().rms_norm_quant_fp8(x, weight, eps, fp8_dtype, residual)
        return _triton("norm").rms_norm_quant_fp8(x, weight, eps, fp8_dtype, residual)

    # -- tensor-parallel all-reduce over peer-mapped memory ----------------------------------
    def peer_all_reduce_reason(self):
        return _triton("allreduce").device_reason(self.device)

    def peer_all_reduce_buffer_bytes(self, world, capacity_bytes, max_programs):
        return _triton("allreduce").buffer_bytes(world, capacity_bytes, max_programs)

    def make_peer_all_reduce(self, rank, world, buffer_ptrs, capacity_bytes, max_programs):
        ws = _triton("allreduce").OneShotWorkspace
        return ws.create(rank, world, buffer_ptrs, capacity_bytes, max_programs, self.device)

    def rotary(self, positions, query, key, cos_sin_cache, is_neox=True):
        why = _float_reasons(query=query, key=key)
        if self._triton_or("rotary", "torch", why) == "triton":
            return _triton("rotary").rotary(positions, query, key, cos_sin_cache, is_neox)
        return rotary.rotary(positions, query, key, cos_sin_cache, is_neox)

    def _fused_rotary_write_kv(self) -> str:
        """The info line for `rotary_write_kv`: one Triton launch when both families chose
        Triton (and the inputs suit it), else the composition of the two choices."""
        rot, kv = self.chosen("rotary"), self.chosen("kv_write")
        if rot == kv == "triton":
            return "fused (triton, one launch)"
        return f"rotary ({rot}) then kv_write ({kv})"

    def rotary_write_kv(
        self, positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache,
        slot_mapping, kv_scale=None,
    ):  # fmt: skip
        # The fused kernel serves exactly when `rotary` and `write_kv` would both run Triton;
        # otherwise the composition runs them, with their own fallbacks, logs and errors.
        fused = self.chosen("rotary") == self.chosen("kv_write") == "triton"
        fused = fused and not _float_reasons(query=query, key=key, value=value)
        fused = fused and key_cache.is_contiguous() and value_cache.is_contiguous()
        if not fused:
            return super().rotary_write_kv(
                positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache,
                slot_mapping, kv_scale,
            )  # fmt: skip
        self._mark("rotary", "triton")
        self._mark("kv_write", "triton")
        return _triton("rotary").rotary_write_kv(
            positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache,
            slot_mapping, kv_scale,
        )  # fmt: skip

    def silu_and_mul(self, x) -> torch.Tensor:
        if self._triton_or("activation", "torch", _float_reasons(x=x)) == "triton":
            return _triton("activation").silu_and_mul(x)
        return activation.silu_and_mul(x)

    def linear_silu_and_mul(self, x, weight, bias=None) -> torch.Tensor:
        # Where both halves would run Triton (the decode-sized GEMM and the activation kernel),
        # one launch writes the activation from the GEMM's epilogue: the same bits, one kernel
        # fewer per MLP; by default only at the shapes where it was measured faster (2 x H200,
        # nineteenth session: TP=2 batch-1 3.04 -> 2.97 ms; TP=1 4.42 -> 4.45 with the plain
        # GEMM's launch shape, hence the table). (Its predecessor fused the activation into the
        # down GEMM and was slower: every program recomputed it, eighteenth session.)
        if (
            self.fused_gate_up_silu is not False
            and weight.shape[0] % 2 == 0
            and self.chosen("gemm") == "triton_small_m"
            and self.chosen("activation") == "triton"
        ):
            gemv = _triton("gemv")
            shape = (weight.element_size(), gemv._leading_rows(x), *weight.shape)
            wanted = self.fused_gate_up_silu or gemv.silu_fusion_measured_faster(*shape)
            if wanted and not gemv.small_m_reasons(x, weight):
                self._mark("gemm", "triton_small_m")
                self._mark("activation", "triton")
                y = gemv.linear_silu_and_mul_small_m(x.reshape(-1, x.shape[-1]), weight, bias,
                                                     configs=self.gemv_configs)  # fmt: skip
                return y.reshape(*x.shape[:-1], weight.shape[0] // 2)
        return super().linear_silu_and_mul(x, weight, bias)

    def linear_rotary_write_kv(
        self, x, weight, bias, num_heads, num_kv_heads, positions, cos_sin_cache, is_neox,
        key_cache, value_cache, slot_mapping, kv_scale=None,
    ):  # fmt: skip
        # With HAL_FUSED_QKV_ROTARY=1, where the GEMM, rotary and the KV write would all run
        # Triton (the decode-sized GEMM, the fused rotary + KV-write kernel) for a NeoX table
        # over whole heads on an NVIDIA GPU: one launch, the qkv GEMM's epilogue rotating q and
        # k and writing the cache (the same bits as the two kernels, one launch fewer a layer).
        d = key_cache.shape[-1]
        if (
            self.fused_qkv_rotary
            and is_neox
            and torch.version.hip is None
            and self.chosen("gemm") == "triton_small_m"
            and self.chosen("rotary") == self.chosen("kv_write") == "triton"
            and cos_sin_cache.dim() == 2
            and cos_sin_cache.shape[1] == d  # whole heads (a partial table: the two kernels)
            and key_cache.is_contiguous()
            and value_cache.is_contiguous()
        ):
            gemv = _triton("gemv")
            if not gemv.small_m_reasons(x, weight):
                self._mark("gemm", "triton_small_m")
                self._mark("rotary", "triton")
                self._mark("kv_write", "triton")
                out = gemv.linear_rotary_write_kv_small_m(
                    x, weight, bias, num_heads, num_kv_heads, positions, cos_sin_cache,
                    key_cache, value_cache, slot_mapping, kv_scale, configs=self.gemv_configs,
                )  # fmt: skip
                qkv = out.view(x.shape[0], -1, d)
                return qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
        return super().linear_rotary_write_kv(
            x, weight, bias, num_heads, num_kv_heads, positions, cos_sin_cache, is_neox,
            key_cache, value_cache, slot_mapping, kv_scale,
        )  # fmt: skip

    def silu_and_mul_quant_fp8(self, x, fp8_dtype):
        if not self._fused_quant("activation", x=x):
            return super().silu_and_mul_quant_fp8(x, fp8_dtype)
        return _triton("activation").silu_and_mul_quant_fp8(x, fp8_dtype)

    # -- graphs --------------------------------------------------------------------------------
    def decode_context_bounds(self, num_seqs, num_kv_heads, block_size, max_model_len):
        """Unless HAL_DECODE_CONTEXT_CLASSES=0: the longest context below which the
        warp-specialized decode attention runs whole (`attention_ws.SPLIT_MIN_PAGES` pages),
        when at max_model_len this batch would split (so a combine kernel follows)."""
        if env_flag(DECODE_CONTEXT_CLASSES_ENV) is False or self.chosen("attention") != "triton":
            return ()
        from backends.triton import attention_ws

        if attention_ws.device_reason(self.caps.cc_at_least(9, 0)) is not None:
            return ()
        if block_size not in attention_ws.PAGE_SIZES:
            return ()
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        programs = num_seqs * num_kv_heads
        bound = (attention_ws.SPLIT_MIN_PAGES - 1) * block_size
        if bound >= max_model_len:
            return ()
        shape = (programs, max_model_len, block_size, sms)
        if attention_ws.route(*shape) != "ws" or attention_ws.num_splits(*shape) == 1:
            return ()
        return (bound,)

    def capture_graph(
        self, fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], pool: object | None = None
    ) -> GraphRunner:
        impl = self.chosen("graph")
        self._mark("graph", impl)
        if impl == "cuda_graph":
            return graphs.capture_graph(fn, pool)
        return eager_graphs.capture_graph(fn, pool)
