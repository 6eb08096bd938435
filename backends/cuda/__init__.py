"""The NVIDIA backend on PyTorch's CUDA ops (cuBLAS, SDPA, _scaled_mm, _int_mm, CUDA graphs) and
the shared Triton kernels (`backends.triton`).

Importing this package only declares candidates (cheap: no kernels, no flash_attn or Triton
import); the implementation in `backends.cuda.backend` loads when the registry chooses it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os

import torch

from backends.cuda import candidates as rules
from hal.capabilities import Capabilities, LibraryInfo
from hal.registry import Candidate, op_candidate, register_backend

SCOPE = "cuda"

BACKEND_CANDIDATE = Candidate(
    family="backend",
    name="cuda",
    priority=100,
    check=rules.backend_reasons,
    description="NVIDIA GPUs through PyTorch's CUDA ops (cuBLAS, SDPA, _scaled_mm, CUDA graphs)",
    target="backends.cuda.backend:CudaBackend",
)


_op = functools.partial(op_candidate, SCOPE)


_CU = "backends.cuda."
_TR = "backends.triton."


# Higher priority is tried first; every family ends in a candidate that runs everywhere.
OP_CANDIDATES: tuple[Candidate, ...] = (
    _op("kv_write", "triton", 50, rules.triton_reasons, _TR + "kv_cache:write_kv",
        "Triton scatter of new tokens (FP8 encoded from the bits, bit for bit) and block copies"),
    _op("kv_write", "torch", 10, rules.torch_ops_reasons, _CU + "kv_cache:write_kv",
        "index_copy_ scatter of new tokens into the paged cache (no host sync)"),
    _op("attention", "flash_attn", 100, rules.flash_attn_reasons,
        _CU + "attention:flash_attn_attention",
        "FlashAttention-2 flash_attn_varlen_func, paged via block_table when block_size % 256 "
        "== 0, else on the KV packed per sequence; fp16/bf16"),
    _op("attention", "triton", 50, rules.triton_reasons, _TR + "attention:attention",
        "Triton unified paged varlen attention (online softmax over the block table; GQA, "
        "sliding window, soft-cap, FP8 cache); head_dim <= 256, else sdpa"),
    _op("attention", "sdpa", 10, rules.sdpa_reasons, _CU + "attention:sdpa_attention",
        "torch scaled_dot_product_attention on the paged KV gathered per sequence "
        "(always available; slowest)"),
    _op("gemm", "triton_small_m", 50, rules.triton_reasons, _TR + "gemv:linear_small_m",
        "Triton bandwidth-bound GEMM for M <= 16 (decode), bf16/fp16 with K % 16 == 0; "
        "other inputs go to the next candidate that can run (cublas)"),
    _op("gemm", "cublas", 10, rules.cublas_reasons, _CU + "linear:linear",
        "torch.nn.functional.linear (cuBLAS); fp32 uses TF32 when the device and policy allow"),
    _op("fp8_gemm", "triton_small_m", 150, rules.triton_reasons,
        _TR + "gemv:fp8_linear_small_m",
        "Triton bandwidth-bound FP8 GEMM for M <= 16 (decode; exact products, fp32 "
        "accumulation); larger M goes to the next candidate that can run (scaled_mm)"),
    _op("fp8_gemm", "scaled_mm", 100, rules.scaled_mm_reasons, _CU + "linear:fp8_linear_scaled_mm",
        "torch._scaled_mm on FP8 tensor cores; per-tensor, or row-wise scales on sm_90"),
    _op("fp8_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:fp8_linear_dequant",
        "FP8 operands upcast to fp32, then a cuBLAS GEMM and the scales (no FP8 tensor cores)"),
    _op("fp8_block_gemm", "scaled_mm", 100, rules.block_scaled_mm_reasons,
        _CU + "linear:fp8_block_linear_scaled_mm",
        "torch._scaled_mm with 1x128 / 128x128 block scales (cuBLASLt, Hopper) for M > 64; "
        "decode sizes and other blockings go to the next candidate that can run (triton)"),
    _op("fp8_block_gemm", "triton", 50, rules.triton_reasons, _TR + "fp8_block:fp8_block_linear",
        "Triton block-scaled FP8 GEMM (FP8 block checkpoints): one K tile per scale block, each "
        "block's sum scaled in fp32; FP8 tensor cores on sm_89+, swapped split-K tiles at M <= 32"),
    _op("fp8_block_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:fp8_linear_dequant",
        "FP8 operands and their block scales dequantized to fp32, then one cuBLAS GEMM"),
    _op("int8_gemm", "triton_small_m", 150, rules.triton_reasons,
        _TR + "int8_gemv:int8_linear_small_m",
        "Triton bandwidth-bound W8A8 GEMM for M <= 16 (decode; int8 x int8, exact int32 "
        "accumulation); larger M goes to the next candidate that can run (int_mm)"),
    _op("int8_gemm", "int_mm", 100, rules.int_mm_reasons, _CU + "linear:int8_linear_int_mm",
        "torch._int_mm int8 x int8 -> int32 (M padded past 16, K and N to multiples of 8), "
        "then the scales"),
    _op("int8_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:int8_linear_dequant",
        "int8 operands multiplied in fp32 by cuBLAS, then the scales"),
    _op("int4_gemm", "triton", 50, rules.triton_reasons, _TR + "int4_gemm:int4_linear",
        "Triton 4-bit weight-only GEMM on weights repacked at load: split-K FMA kernel for "
        "decode, dequantized tiles into tl.dot up to M = 383; from M = 384 "
        "(int4_dequant_min_m) a Triton kernel dequantizes and cuBLAS multiplies"),
    _op("int4_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "linear:int4_linear_dequant",
        "4-bit weights dequantized with the reference math, then a cuBLAS GEMM"),
    _op("gguf_gemm", "triton", 50, rules.triton_reasons, _TR + "gguf:gguf_linear",
        "Triton GEMM on the raw GGUF blocks (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K) kept on the device, "
        "dequantized in registers, split-K for decode; fp32/fp16/bf16 activations"),
    _op("gguf_gemm", "dequant_gemm", 10, rules.dequant_gemm_reasons,
        _CU + "gguf:gguf_linear_dequant",
        "GGUF blocks dequantized with the reference math on the device, then a cuBLAS GEMM"),
    _op("quantize", "triton", 50, rules.triton_reasons, _TR + "quant:quantize_fp8",
        "Triton FP8 / INT8 / INT4 quantize and dequantize kernels (the reference math, bit for "
        "bit)"),
    _op("quantize", "torch", 10, rules.torch_ops_reasons, _CU + "quant:quantize_fp8",
        "torch ops with the reference math (bit for bit)"),
    _op("rms_norm", "triton", 50, rules.triton_reasons, _TR + "norm:rms_norm",
        "Triton RMSNorm fused with the residual add, fp32 math"),
    _op("rms_norm", "torch", 10, rules.torch_ops_reasons, "backends.cpu.norm:rms_norm",
        "the reference function on CUDA tensors (torch ops in fp32)"),
    _op("rotary", "triton", 50, rules.triton_reasons, _TR + "rotary:rotary",
        "Triton rotary embedding, NeoX and GPT-J, partial rotary_dim, fp32 math"),
    _op("rotary", "torch", 10, rules.torch_ops_reasons, _CU + "rotary:rotary",
        "torch ops in fp32 (the reference math, no host-side range check)"),
    _op("activation", "triton", 50, rules.triton_reasons, _TR + "activation:silu_and_mul",
        "Triton SiLU-and-mul, fp32 math"),
    _op("activation", "torch", 10, rules.torch_ops_reasons,
        "backends.cpu.activation:silu_and_mul",
        "the reference function on CUDA tensors (torch ops in fp32)"),
    _op("lora", "triton", 50, rules.triton_reasons, _TR + "lora:lora_add",
        "Triton multi-LoRA shrink / expand for steps of <= 16 tokens: each token reads only its "
        "own slot (fp32 sums); larger steps go to the next candidate (torch)"),
    _op("lora", "torch", 10, rules.torch_ops_reasons, _CU + "linear:lora_add",
        "two GEMMs in the model's dtype over every slot, the other slots masked to zeros"),
    _op("graph", "cuda_graph", 100, rules.cuda_graph_reasons, _CU + "graphs:capture_graph",
        "torch.cuda.CUDAGraph capture after warm-up on a side stream; optional shared pool"),
    _op("graph", "eager", 10, rules.eager_graph_reasons, "backends.cpu.graphs:capture_graph",
        "no capture: replay runs the step eagerly"),
)  # fmt: skip


def interpreter_capabilities() -> Capabilities | None:
    """Capabilities to run this backend on CPU tensors under TRITON_INTERPRET=1 (the conformance
    harness's hook), or None when Triton is not installed.

    They describe a device whose every selected candidate runs on CPU tensors: the Triton
    kernels (interpreted), and for the families without one the torch candidates that need no
    GPU: no compute capability, so no _scaled_mm / _int_mm (dequant_gemm instead) and no
    flash_attn; no graph capture, so graphs run eagerly; no TF32.
    """
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return Capabilities(
        vendor="nvidia",
        device_name="Triton interpreter (CPU tensors)",
        arch="triton-interpreter",
        source=rules.INTERPRETER_SOURCE,
        compute_units=os.cpu_count() or 1,
        warp_size=32,
        dtypes={
            "fp32": "native",
            "bf16": "native",
            "fp16": "native",
            "fp8_e4m3fn": "emulated",
            "fp8_e4m3fnuz": "emulated",
            "fp8_e5m2": "emulated",
            "int8": "native",
            "int4": "emulated",
        },
        fp8_format="e4m3fn",
        graph_capture=False,
        libraries={"triton": LibraryInfo("triton", version, True)},
        torch_version=torch.__version__,
        notes=("Triton kernels interpreted on CPU tensors (TRITON_INTERPRET=1): numerics only; "
               "programs run one at a time, so races are left to the GPU",),
    )  # fmt: skip


register_backend(BACKEND_CANDIDATE, OP_CANDIDATES)
