"""The CUDA backend's selection rules: each returns why a candidate cannot run (empty: it can).

Rules read only `Capabilities` (and, for a detected device, the running torch build), so
`hal info --profile t4` explains a T4 on any machine. Importing this module loads no kernels.
"""

from __future__ import annotations

import re

import torch

from hal.capabilities import Capabilities

# FlashAttention-2 runs on Ampere, Ada and Hopper only (flash-attn README, "FlashAttention-2 with
# CUDA currently supports: Ampere, Ada, or Hopper GPUs"; Turing needs FlashAttention 1.x).
FLASH_ATTN_MIN_CC = (8, 0)
# Soft-capping arrived in flash-attn 2.6 (README changelog), the same release whose
# flash_attn_varlen_func takes a block_table; older versions cannot serve the attention contract.
FLASH_ATTN_MIN_VERSION = (2, 6)
# FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) and newer.
FP8_MIN_CC = (8, 9)
# torch._scaled_mm row-wise scaling (per-token x per-channel, bf16 out) is a Hopper kernel.
FP8_ROWWISE_MIN_CC = (9, 0)
# Block-wise scales in torch._scaled_mm (cuBLASLt VEC128 / BLK128x128 scale modes).
BLOCK_SCALED_MM_MIN_CUDA = (12, 9)
BLOCK_SCALED_MM_MIN_TORCH = (2, 9)
# torch._int_mm lowers to cuBLASLt IMMA, the int8 tensor-core GEMM of Turing (sm_75) and newer.
INT8_MIN_CC = (7, 5)
# Triton's NVIDIA backend supports compute capability 8.0+ (Triton README, "Supported Hardware").
TRITON_MIN_CC = (8, 0)
# `Capabilities.source` of the description `backends.cuda.interpreter_capabilities()` returns: the
# Triton kernels on CPU tensors under TRITON_INTERPRET=1, for CI without a GPU.
INTERPRETER_SOURCE = "triton-interpreter"


def _cc_reason(caps: Capabilities, need: tuple[int, int], what: str) -> list[str]:
    if caps.cc_at_least(*need):
        return []
    return [f"{what} compute capability >= {need[0]}.{need[1]}, this is {caps.cc_str}"]


def _version_tuple(version: str | None) -> tuple[int, ...]:
    # "2.6.3", "2.7.0.post2", "2.5.9+cu121" -> (2, 6, 3), ...; unparsable -> ()
    if not version:
        return ()
    parts = re.findall(r"\d+", version.split("+")[0])[:3]
    return tuple(int(p) for p in parts)


# -- the backend itself --------------------------------------------------------------------------
def backend_reasons(caps: Capabilities) -> list[str]:
    """The CUDA backend needs an NVIDIA GPU; on a detected device also a torch built with CUDA."""
    if caps.vendor != "nvidia":
        return [f"no NVIDIA GPU: this device is {caps.vendor} {caps.device_name}"]
    if caps.source == INTERPRETER_SOURCE:
        return triton_reasons(caps)
    if caps.source != "detected":
        # A profile ("profile:h100") describes a device for reports; this machine's torch is moot.
        return []
    if torch.version.cuda is None:
        return [
            f"torch {torch.__version__} was built without CUDA (torch.version.cuda is None); "
            "install a CUDA build of torch"
        ]
    if not torch.cuda.is_available():
        return ["torch.cuda.is_available() is False: no usable NVIDIA driver or visible GPU"]
    return []


# -- attention -----------------------------------------------------------------------------------
def flash_attn_reasons(caps: Capabilities) -> list[str]:
    """flash_attn (FlashAttention-2): sm_80+, the library installed and importable, version 2.6+."""
    reasons = _cc_reason(caps, FLASH_ATTN_MIN_CC, "FlashAttention-2 needs")
    why = caps.library_reason("flash_attn")
    if why:
        reasons.append(why)
    else:
        version = caps.libraries["flash_attn"].version
        found = _version_tuple(version)
        need = FLASH_ATTN_MIN_VERSION
        if found and found < need:
            reasons.append(
                f"flash_attn {version} is too old: paged varlen attention with soft-cap needs "
                f">= {need[0]}.{need[1]}"
            )
    return reasons


def triton_reasons(caps: Capabilities) -> list[str]:
    """The shared Triton kernels (`backends/triton`): Triton usable, and on a GPU sm_80+; under
    the interpreter (capabilities from `interpreter_capabilities()`) any machine will do."""
    reasons = []
    why = caps.library_reason("triton")
    if why:
        reasons.append(why)
    if caps.source != INTERPRETER_SOURCE:
        reasons += _cc_reason(caps, TRITON_MIN_CC, "Triton kernels need")
    return reasons


def sdpa_reasons(caps: Capabilities) -> list[str]:
    """torch scaled_dot_product_attention runs on every CUDA device torch supports."""
    return []


# -- linear --------------------------------------------------------------------------------------
def cublas_reasons(caps: Capabilities) -> list[str]:
    """Dense GEMM through torch (cuBLAS) runs everywhere; TF32 is a policy, not a requirement."""
    return []


def scaled_mm_reasons(caps: Capabilities) -> list[str]:
    """torch._scaled_mm: FP8 tensor cores (sm_89+)."""
    return _cc_reason(caps, FP8_MIN_CC, "FP8 tensor cores need")


def block_scaled_mm_reasons(caps: Capabilities) -> list[str]:
    """torch._scaled_mm with 1x128 activation and 128x128 weight block scales: cuBLASLt's
    block-scaled FP8 GEMM of Hopper (sm_90; CUDA 12.9+, torch 2.9+)."""
    if caps.cc_str != "9.0":
        return [f"cuBLASLt's block-scaled FP8 GEMM is Hopper's (sm_90), this is {caps.cc_str}"]
    reasons = []
    cuda = _version_tuple(caps.runtime_version)
    if cuda and cuda < BLOCK_SCALED_MM_MIN_CUDA:
        reasons.append(
            f"cuBLASLt block scaling needs CUDA >= 12.9, torch has {caps.runtime_version}"
        )
    found = _version_tuple(caps.torch_version)
    if found and found < BLOCK_SCALED_MM_MIN_TORCH:
        reasons.append(f"torch {caps.torch_version} has no block-wise _scaled_mm (needs >= 2.9)")
    return reasons


def int_mm_reasons(caps: Capabilities) -> list[str]:
    """torch._int_mm: int8 tensor cores (cuBLASLt IMMA, sm_75+)."""
    return _cc_reason(caps, INT8_MIN_CC, "INT8 tensor cores (torch._int_mm, cuBLASLt) need")


def dequant_gemm_reasons(caps: Capabilities) -> list[str]:
    """Dequantize to the activation dtype, then a dense cuBLAS GEMM: runs everywhere."""
    return []


# -- small ops, KV cache, graphs -----------------------------------------------------------------
def torch_ops_reasons(caps: Capabilities) -> list[str]:
    """Plain torch ops on CUDA tensors (KV write, quantize, RMSNorm, rotary, SiLU-and-mul)."""
    return []


def cuda_graph_reasons(caps: Capabilities) -> list[str]:
    """CUDA graphs need the device and driver to support stream capture."""
    if caps.graph_capture:
        return []
    return [f"graph capture is not supported on {caps.device_name} (capabilities say no)"]


def eager_graph_reasons(caps: Capabilities) -> list[str]:
    """Running the step eagerly behind the graph interface works everywhere."""
    return []
