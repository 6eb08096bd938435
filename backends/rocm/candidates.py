"""The ROCm backend's selection rules: each returns why a candidate cannot run (empty: it can).

Rules read only `Capabilities` (and, for a detected device, the running torch build), so
`hal info --profile mi300x` explains an MI300X on any machine. Importing this loads no kernels.
"""

from __future__ import annotations

import torch

from backends.cuda.candidates import INTERPRETER_SOURCE, _version_tuple
from hal.capabilities import Capabilities

# Triton's AMD backend targets CDNA 2/3/4 and RDNA 3/4 (Triton README, "Supported Hardware":
# "AMD GPUs (ROCm 6.2+)"; third_party/amd lists gfx90a, gfx942, gfx950, gfx11xx, gfx12xx).
TRITON_ARCH_PREFIXES = ("gfx90a", "gfx942", "gfx950", "gfx11", "gfx12")
# ROCm FlashAttention's CK backend builds for MI200, MI300 and MI350 (ROCm/flash-attention README,
# "AMD ROCm Support": "MI200x, MI250x, MI300x, MI355x").
CK_FLASH_ATTN_ARCHS = ("gfx90a", "gfx942", "gfx950")
CK_FLASH_ATTN_MIN_VERSION = (2, 6)
# hipBLASLt FP8 GEMM (torch._scaled_mm on ROCm): MI300 (FNUZ) and MI350 (OCP) only.
HIPBLASLT_FP8_ARCHS = ("gfx942", "gfx950")


def _amd_reason(caps: Capabilities) -> list[str]:
    if caps.vendor != "amd":
        return [f"no AMD GPU: this device is {caps.vendor} {caps.device_name}"]
    return []


# -- the backend itself --------------------------------------------------------------------------
def backend_reasons(caps: Capabilities) -> list[str]:
    """The ROCm backend needs an AMD GPU; on a detected device also a torch built with ROCm."""
    reasons = _amd_reason(caps)
    if reasons:
        return reasons
    if caps.source == INTERPRETER_SOURCE:
        return triton_reasons(caps)
    if caps.source != "detected":
        return []  # a profile ("profile:mi300x") describes a device; this machine's torch is moot
    if not getattr(torch.version, "hip", None):
        return [
            f"torch {torch.__version__} was built without ROCm (torch.version.hip is None); "
            "install a ROCm build of torch"
        ]
    if not torch.cuda.is_available():
        return ["torch.cuda.is_available() is False: no usable amdgpu driver or visible GPU"]
    return []


# -- attention -----------------------------------------------------------------------------------
def ck_flash_attn_reasons(caps: Capabilities) -> list[str]:
    """ROCm FlashAttention (CK): gfx90a/gfx942/gfx950, flash_attn installed as the ROCm build."""
    reasons = _amd_reason(caps)
    if caps.vendor == "amd" and caps.arch not in CK_FLASH_ATTN_ARCHS:
        reasons.append(
            f"ROCm FlashAttention (CK) builds for {', '.join(CK_FLASH_ATTN_ARCHS)}, "
            f"this is {caps.arch}"
        )
    why = caps.library_reason("flash_attn")
    if why:
        reasons.append(f"{why} (the ROCm build: pip install from ROCm/flash-attention)")
        return reasons
    version = caps.libraries["flash_attn"].version
    found = _version_tuple(version)
    if found and found < CK_FLASH_ATTN_MIN_VERSION:
        need = ".".join(map(str, CK_FLASH_ATTN_MIN_VERSION))
        reasons.append(f"flash_attn {version} is too old: varlen with windows needs >= {need}")
    if caps.source == "detected" and not getattr(torch.version, "hip", None):
        reasons.append("the installed flash_attn is not a ROCm build (torch.version.hip is None)")
    return reasons


def triton_reasons(caps: Capabilities) -> list[str]:
    """The shared Triton kernels with AMD tuning: Triton usable and, on a GPU, an arch Triton's
    AMD backend compiles for; under the interpreter any machine will do."""
    reasons = []
    why = caps.library_reason("triton")
    if why:
        reasons.append(why)
    if caps.source != INTERPRETER_SOURCE and not caps.arch.startswith(TRITON_ARCH_PREFIXES):
        reasons.append(
            f"Triton's AMD backend compiles for gfx90a, gfx942, gfx950, gfx11xx, gfx12xx; "
            f"this is {caps.arch}"
        )
    return reasons


def sdpa_reasons(caps: Capabilities) -> list[str]:
    """torch scaled_dot_product_attention runs on every device torch's ROCm build supports."""
    return []


# -- linear --------------------------------------------------------------------------------------
def hipblaslt_reasons(caps: Capabilities) -> list[str]:
    """Dense GEMM through torch (hipBLASLt / rocBLAS) runs on every ROCm device."""
    return []


def hipblaslt_fp8_reasons(caps: Capabilities) -> list[str]:
    """torch._scaled_mm on hipBLASLt: FP8 matrix cores in the arch's own format (gfx942: FNUZ,
    gfx950: OCP), and a real device (the interpreter has no hipBLASLt)."""
    reasons = _amd_reason(caps)
    if caps.source == INTERPRETER_SOURCE:
        reasons.append("hipBLASLt needs a GPU; the Triton interpreter runs on CPU tensors")
    if caps.fp8_format is None or caps.arch not in HIPBLASLT_FP8_ARCHS:
        reasons.append(
            f"FP8 matrix cores need gfx942 (MI300, e4m3fnuz) or gfx950 (MI350, e4m3fn), "
            f"this is {caps.arch}"
        )
    return reasons


def dequant_gemm_reasons(caps: Capabilities) -> list[str]:
    """Dequantize, then a dense GEMM: runs everywhere."""
    return []


def torch_ops_reasons(caps: Capabilities) -> list[str]:
    """Plain torch ops on ROCm tensors (KV write, quantize, RMSNorm, rotary, SiLU-and-mul)."""
    return []


# -- graphs --------------------------------------------------------------------------------------
def hip_graph_reasons(caps: Capabilities) -> list[str]:
    """HIP graphs through torch.cuda.CUDAGraph (ROCm's torch maps it to hipGraph)."""
    if caps.graph_capture:
        return []
    return [f"graph capture is not supported on {caps.device_name} (capabilities say no)"]


def eager_graph_reasons(caps: Capabilities) -> list[str]:
    return []
