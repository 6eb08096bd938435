"""The ROCm backend: the CUDA backend's dispatch (ROCm's torch speaks the torch.cuda API) with
AMD's own choices: Triton attention tiled for 64-wide wavefronts, CK FlashAttention, hipBLASLt
FP8 in the arch's format, HIP graphs, XF32 opt-in.

Code in this file may assume ROCm. With `backends.rocm.interpreter_capabilities()` and
TRITON_INTERPRET=1 it runs on CPU tensors, as the CUDA backend does.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

from backends.cpu import graphs as eager_graphs
from backends.cpu.linear import is_block_scaled
from backends.cuda import attention as cuda_attention
from backends.cuda import graphs, linear
from backends.cuda.backend import TF32_ENV, CudaBackend, _triton
from backends.rocm import COLLECTIVE_LIBRARY, SCOPE, fp8
from hal.backend import GraphRunner
from hal.capabilities import Capabilities
from hal.env import env_flag
from hal.registry import REGISTRY, Selection, env_choice

logger = logging.getLogger(__name__)


def ck_input_reasons(
    query: torch.Tensor, key_cache: torch.Tensor, kv_scale: float | None, soft_cap: float | None
) -> list[str]:
    """Why ROCm FlashAttention (CK) cannot take these inputs: FlashAttention-2's limits (fp16/bf16,
    cache in the query dtype, head_dim % 8 == 0 and <= 256), and no logit soft-cap (the CK forward
    kernels are not relied on for it)."""
    reasons = cuda_attention.flash_attn_input_reasons(query, key_cache, kv_scale)
    if soft_cap is not None:
        reasons.append("soft-cap is not taken through the CK kernels")
    return reasons


_ATTENTION = {
    "flash_attn_ck": cuda_attention.flash_attn_attention,
    "sdpa": cuda_attention.sdpa_attention,
}


class RocmBackend(CudaBackend):
    """AMD GPUs through PyTorch's ROCm build. allow_tf32=None reads HAL_ALLOW_TF32 (default off:
    XF32 exists on gfx942 only and changes fp32 results)."""

    name = "rocm"
    default_device = "cuda"  # ROCm's torch calls AMD GPUs "cuda"

    def __init__(
        self,
        caps: Capabilities,
        device: str | torch.device = "cuda",
        selections: dict[str, Selection] | None = None,
        allow_tf32: bool | None = None,
    ) -> None:
        if caps.vendor != "amd":
            raise ValueError(
                f"caps: vendor {caps.vendor!r} ({caps.device_name}); the ROCm backend needs AMD "
                "capabilities (a detected AMD GPU, a profile such as mi300x, or "
                "backends.rocm.interpreter_capabilities())"
            )
        # Families the caller did not select are selected here from the ROCm candidates (the
        # CUDA backend's constructor would fill gaps from its own).
        selections = dict(selections or {})
        for family in REGISTRY.families(SCOPE):
            if family not in selections:
                selections[family] = REGISTRY.select(
                    family, caps, scope=SCOPE, choice=env_choice(family)
                )
        super().__init__(caps, device, selections, allow_tf32)
        self.info.settings["fp8_format"] = (
            f"{caps.fp8_format} (max {caps.fp8_max:g})" if caps.fp8_format else "none (no FP8)"
        )
        self.info.settings["collective"] = (
            f"{COLLECTIVE_LIBRARY} (torch.distributed backend {caps.collective_backend!r})"
        )
        self.info.settings["wavefront"] = str(caps.warp_size)

    def _tf32_policy(self, allow_tf32: bool | None) -> bool:
        wanted = env_flag(TF32_ENV) if allow_tf32 is None else allow_tf32
        if not self.caps.supports("tf32"):
            setting = f"off ({self.caps.arch} has no XF32)"
        elif wanted:
            setting = "on"  # exactly "on": conformance widens fp32 GEMM bounds on this value
        else:
            setting = f"off (opt in with {TF32_ENV}=1 for XF32 on {self.caps.arch})"
        self.info.settings["tf32"] = setting
        logger.info("rocm: tf32 %s for fp32 GEMMs", setting)
        return setting == "on"

    # -- FP8 -------------------------------------------------------------------------------------
    @property
    def fp8_dtype(self) -> torch.dtype:
        """The FP8 dtype this device computes in; raises `fp8.Fp8UnsupportedError` without one."""
        return fp8.fp8_dtype_for(self.caps)

    def load_fp8_weight(
        self, weight: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A checkpoint's FP8 weight and scale in this device's format (`fp8.load_fp8_weight`)."""
        return fp8.load_fp8_weight(self.caps, weight, scale)

    def fp8_linear(
        self, x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16
    ) -> torch.Tensor:
        if is_block_scaled(x_scale, w_scale):
            return self.fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        impl = self.chosen("fp8_gemm")
        if impl == "hipblaslt_fp8":
            native = self.caps.fp8_dtype
            why = [
                f"{name} is {t.dtype}, hipBLASLt on {self.caps.arch} computes {native}"
                for name, t in (("x_q", x_q), ("w_q", w_q))
                if t.dtype != native
            ]
            impl = self._input_fallback("fp8_gemm", impl, why, "dequant_gemm")
        self._mark("fp8_gemm", impl)
        if impl == "hipblaslt_fp8":
            return linear.fp8_linear_scaled_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        return linear.fp8_linear_dequant(x_q, x_scale, w_q, w_scale, bias, out_dtype)

    # -- attention -------------------------------------------------------------------------------
    def _attention_for(self, query, key_cache, kv_scale, soft_cap) -> str:
        """The chosen attention, or the next one down (CK -> triton -> sdpa) that takes these
        inputs, logged once per reason; a required choice that cannot take them raises."""
        impl = self.chosen("attention")
        if impl == "flash_attn_ck":
            why = ck_input_reasons(query, key_cache, kv_scale, soft_cap)
            impl = self._input_fallback("attention", impl, why, "triton")
        if impl == "triton":
            why = _triton("attention").input_reasons(query, key_cache, kv_scale)
            impl = self._input_fallback("attention", impl, why, "sdpa")
        return impl

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
        impl = self._attention_for(query, key_cache, kv_scale, soft_cap)
        self._mark("attention", impl)
        args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                sliding_window, soft_cap, kv_scale)  # fmt: skip
        if impl == "triton":
            tuned = importlib.import_module("backends.rocm.attention")  # loads Triton when used
            return tuned.attention(
                *args, warp_size=self.caps.warp_size, max_query_len=max_query_len,
                max_seq_len=max_seq_len,
            )  # fmt: skip
        return _ATTENTION[impl](*args)

    # -- graphs ----------------------------------------------------------------------------------
    def capture_graph(
        self, fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], pool: object | None = None
    ) -> GraphRunner:
        impl = self.chosen("graph")
        self._mark("graph", impl)
        if impl == "hip_graph":
            return graphs.capture_graph(fn, pool)  # torch.cuda.CUDAGraph is a hipGraph on ROCm
        return eager_graphs.capture_graph(fn, pool)
