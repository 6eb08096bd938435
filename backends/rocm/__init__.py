"""The AMD backend on PyTorch's ROCm build (hipBLASLt GEMMs, HIP graphs, ROCm FlashAttention
(CK) when installed) and the shared Triton kernels (`backends.triton`) with AMD tuning.

Importing this package only declares candidates (cheap: no kernels, no flash_attn or Triton
import); `backends.rocm.backend` loads when the registry chooses it. ROCm's torch presents AMD
GPUs as device type "cuda", and its torch.distributed "nccl" backend is RCCL.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util

from backends.cuda.candidates import INTERPRETER_SOURCE
from backends.rocm import candidates as rules
from hal.capabilities import Capabilities, LibraryInfo
from hal.registry import Candidate, op_candidate, register_backend

SCOPE = "rocm"
# The profile `interpreter_capabilities()` describes: the conformance column's device.
INTERPRETER_PROFILE = "mi300x"
# The collective library behind torch.distributed's "nccl" backend on ROCm.
COLLECTIVE_LIBRARY = "rccl"

BACKEND_CANDIDATE = Candidate(
    family="backend",
    name="rocm",
    priority=100,
    check=rules.backend_reasons,
    description="AMD GPUs through PyTorch's ROCm build (hipBLASLt, HIP graphs, CK FlashAttention) "
    "and the shared Triton kernels tuned for 64-wide wavefronts",
    target="backends.rocm.backend:RocmBackend",
)


_op = functools.partial(op_candidate, SCOPE)


_CU = "backends.cuda."
_TR = "backends.triton."


# Higher priority is tried first; every family ends in a candidate that runs everywhere. Where
# ROCm's torch behaves as CUDA's (torch ops, graphs, _scaled_mm), the CUDA code serves both.
OP_CANDIDATES: tuple[Candidate, ...] = (
    _op("kv_write", "triton", 50, rules.triton_reasons, _TR + "kv_cache:write_kv",
        "Triton scatter of new tokens (FP8 encoded from the bits in the cache's format) and "
        "block copies"),
    _op("kv_write", "torch", 10, rules.torch_ops_reasons, _CU + "kv_cache:write_kv",
        "index_copy_ scatter of new tokens into the paged cache (no host sync)"),
    _op("attention", "flash_attn_ck", 100, rules.ck_flash_attn_reasons,
        _CU + "attention:flash_attn_attention",
        "ROCm FlashAttention-2 (Composable Kernel) flash_attn_varlen_func; fp16/bf16, no "
        "soft-cap (else triton)"),
    _op("attention", "triton", 50, rules.triton_reasons, "backends.rocm.attention:attention",
        "Triton unified paged varlen attention with AMD tiles (16-row MFMA decode tiles, 64x64 "
        "prefill, waves_per_eu on HIP); head_dim <= 256, else sdpa"),
    _op("attention", "sdpa", 10, rules.sdpa_reasons, _CU + "attention:sdpa_attention",
        "torch scaled_dot_product_attention on the paged KV gathered per sequence"),
    _op("gemm", "hipblaslt", 10, rules.hipblaslt_reasons, _CU + "linear:linear",
        "torch.nn.functional.linear (hipBLASLt/rocBLAS); fp32 stays fp32 unless HAL_ALLOW_TF32=1 "
        "asks for XF32 on gfx942"),
    _op("fp8_gemm", "hipblaslt_fp8", 100, rules.hipblaslt_fp8_reasons,
        _CU + "linear:fp8_linear_scaled_mm",
        "torch._scaled_mm on hipBLASLt in the arch's FP8 format (e4m3fnuz on gfx942, e4m3fn on "
        "gfx950); per-token scales in an fp32 epilogue"),
    _op("fp8_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:fp8_linear_dequant",
        "FP8 operands upcast to fp32, then one GEMM and the scales (no FP8 matrix cores)"),
    _op("fp8_block_gemm", "triton", 50, rules.triton_reasons, _TR + "fp8_block:fp8_block_linear",
        "Triton block-scaled FP8 GEMM (FP8 block checkpoints): codes decoded exactly to fp16 for "
        "the matrix cores, each block's sum scaled in fp32"),
    _op("fp8_block_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:fp8_linear_dequant",
        "FP8 operands and their block scales dequantized to fp32, then one GEMM"),
    _op("int8_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:int8_linear_dequant",
        "int8 operands multiplied in fp32, then the scales (torch._int_mm on ROCm is not yet "
        "checked on AMD silicon)"),
    _op("int4_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:int4_linear_dequant",
        "4-bit weights dequantized with the reference math, then a hipBLASLt GEMM"),
    _op("gguf_gemm", "triton", 50, rules.triton_reasons, _TR + "gguf:gguf_linear",
        "Triton GEMM on the raw GGUF blocks kept on the device, dequantized in registers"),
    _op("gguf_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "gguf:gguf_linear_dequant",
        "GGUF blocks dequantized with the reference math on the device, then a hipBLASLt GEMM"),
    _op("quantize", "triton", 50, rules.triton_reasons, _TR + "quant:quantize_fp8",
        "Triton FP8 (any format, from the bits) / INT8 / INT4 kernels, the reference bit for bit"),
    _op("quantize", "torch", 10, rules.torch_ops_reasons, _CU + "quant:quantize_fp8",
        "torch ops with the reference math (bit for bit)"),
    _op("rms_norm", "triton", 50, rules.triton_reasons, _TR + "norm:rms_norm",
        "Triton RMSNorm fused with the residual add, fp32 math"),
    _op("rms_norm", "torch", 10, rules.torch_ops_reasons, "backends.cpu.norm:rms_norm",
        "the reference function on ROCm tensors"),
    _op("rotary", "triton", 50, rules.triton_reasons, _TR + "rotary:rotary",
        "Triton rotary embedding, NeoX and GPT-J, fp32 math"),
    _op("rotary", "torch", 10, rules.torch_ops_reasons, _CU + "rotary:rotary",
        "torch ops in fp32 (the reference math, no host-side range check)"),
    _op("activation", "triton", 50, rules.triton_reasons, _TR + "activation:silu_and_mul",
        "Triton SiLU-and-mul, fp32 math"),
    _op("activation", "torch", 10, rules.torch_ops_reasons,
        "backends.cpu.activation:silu_and_mul", "the reference function on ROCm tensors"),
    _op("lora", "triton", 50, rules.triton_reasons, _TR + "lora:lora_add",
        "Triton multi-LoRA shrink / expand for steps of <= 16 tokens: each token reads only its "
        "own slot (fp32 sums); larger steps go to the next candidate (torch)"),
    _op("lora", "torch", 10, rules.torch_ops_reasons, _CU + "linear:lora_add",
        "two GEMMs in the model's dtype over every slot, the other slots masked to zeros"),
    _op("graph", "hip_graph", 100, rules.hip_graph_reasons, _CU + "graphs:capture_graph",
        "HIP graph capture through torch.cuda.CUDAGraph after warm-up on a side stream"),
    _op("graph", "eager", 10, rules.eager_graph_reasons, "backends.cpu.graphs:capture_graph",
        "no capture: replay runs the step eagerly"),
)  # fmt: skip


def interpreter_capabilities() -> Capabilities | None:
    """Capabilities to run this backend on CPU tensors under TRITON_INTERPRET=1 (the conformance
    harness's hook), or None when Triton is not installed.

    They are the MI300X profile's (gfx942: 64-wide wavefronts, native e4m3fnuz, so the AMD tiles
    and FP8 format are the ones checked) with what CPU tensors cannot do taken away: no graph
    capture (graphs run eagerly), no hipBLASLt (FP8 GEMMs dequantize), no flash_attn.
    """
    if importlib.util.find_spec("triton") is None:
        return None
    from platforms import load_profile  # platforms imports no backend; deferred to keep this cheap

    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    profile = load_profile(INTERPRETER_PROFILE)
    libraries = {
        name: LibraryInfo(name, None, False, "not available to the Triton interpreter")
        for name in profile.libraries
    }
    libraries["triton"] = LibraryInfo("triton", version, True)
    return dataclasses.replace(
        profile,
        device_name=f"{profile.device_name} (Triton interpreter, CPU tensors)",
        source=INTERPRETER_SOURCE,
        graph_capture=False,
        libraries=libraries,
        notes=(f"profile {INTERPRETER_PROFILE} ({profile.arch}) emulated: AMD tiles and FP8 "
               f"format {profile.fp8_format}, Triton kernels interpreted on CPU tensors "
               "(TRITON_INTERPRET=1); numerics only, no AMD compile options, no races",),
    )  # fmt: skip


register_backend(BACKEND_CANDIDATE, OP_CANDIDATES)
