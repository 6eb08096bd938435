"""The CPU reference backend. Importing this only declares candidates (no op module loads)."""

from __future__ import annotations

import functools

from hal.backend import OP_FAMILIES
from hal.capabilities import Capabilities
from hal.registry import REGISTRY, Candidate

# The function that implements each op family, for reports ("module:attribute").
_TARGETS: dict[str, str] = {
    "kv_write": "backends.cpu.kv_cache:write_kv",
    "attention": "backends.cpu.attention:paged_attention",
    "gemm": "backends.cpu.linear:linear",
    "fp8_gemm": "backends.cpu.linear:fp8_linear",
    "fp8_block_gemm": "backends.cpu.linear:fp8_linear",
    "int8_gemm": "backends.cpu.linear:int8_linear",
    "int4_gemm": "backends.cpu.linear:int4_linear",
    "gguf_gemm": "backends.cpu.gguf:gguf_linear",
    "quantize": "backends.cpu.quant:quantize_fp8",
    "rms_norm": "backends.cpu.norm:rms_norm",
    "rotary": "backends.cpu.rotary:rotary",
    "activation": "backends.cpu.activation:silu_and_mul",
    "lora": "backends.cpu.linear:lora_add",
    "graph": "backends.cpu.graphs:capture_graph",
}


def _always(caps: Capabilities) -> list[str]:
    """Plain PyTorch runs everywhere: never a reason not to."""
    return []


REGISTRY.register(
    Candidate(
        family="backend",
        name="cpu",
        priority=0,
        check=_always,
        description="plain PyTorch reference",
        target="backends.cpu.backend:CpuBackend",
    )
)
for _family in OP_FAMILIES:
    REGISTRY.register(
        Candidate(
            family=_family,
            name="reference",
            priority=0,
            check=_always,
            description="plain PyTorch reference",
            scope="cpu",
            target=_TARGETS.get(_family, ""),
        )
    )


def _engine_path(family: str, name: str, description: str, target: str) -> None:
    """One of the CPU engine's fast paths: outranks the reference, which stays its oracle (tests
    compare them); HAL_<FAMILY>_BACKEND=reference forces the reference."""
    REGISTRY.register(
        Candidate(
            family=family,
            name=name,
            priority=10,
            check=_always,
            description=description,
            scope="cpu",
            target=target,
        )
    )


@functools.cache
def _onednn_probe() -> tuple[str, ...]:
    from backends.cpu.native import onednn_reasons

    return tuple(onednn_reasons())


def _onednn_gemm(caps: Capabilities) -> list[str]:
    """oneDNN's fp32 matmul: reasons not to (torch without oneDNN, or its op failing a probe;
    probed once per process)."""
    return list(_onednn_probe())


REGISTRY.register(
    Candidate(
        family="gemm",
        name="onednn",
        priority=20,
        check=_onednn_gemm,
        description="fp32 through oneDNN's matmul (1.1-2.6x F.linear's MKL sgemv / sgemm at "
        "M = 1-128 on a 2-core AMD EPYC); other dtypes as 'native' "
        "(HAL_GEMM_BACKEND=native: F.linear for fp32 too)",
        scope="cpu",
        target="backends.cpu.native:onednn_linear",
    )
)
_engine_path("attention", "sdpa", "batched torch SDPA over the paged KV (one call per step)",
             "backends.cpu.sdpa:sdpa_attention")  # fmt: skip
_engine_path("gemm", "native",
             "torch's CPU GEMM in the input dtype (oneDNN, AMX/AVX-512 bf16 where present)",
             "backends.cpu.native:native_linear")  # fmt: skip
_engine_path("kv_write", "native", "one index_copy_ per cache over the flattened slots",
             "backends.cpu.native:native_write_kv")  # fmt: skip
_engine_path("rms_norm", "native",
             "torch's F.rms_norm on fp32 values, one rounding (bitwise the reference)",
             "backends.cpu.native:native_rms_norm")  # fmt: skip
_engine_path("rotary", "native",
             "NeoX pairs written into one buffer per input (bitwise the reference)",
             "backends.cpu.native:native_rotary")  # fmt: skip


def _c_candidate(family: str, loader: str, description: str, target: str) -> None:
    """Register the "c" candidate of `family` (priority 20, above the torch paths): a C kernel of
    backends/cpu/ckernels.py whose `loader` gives (kernel, why); it cannot run where that gives
    None (HAL_CPU_C_KERNELS=0, no C compiler, a failed build or self-check; built once per
    process), and the reason is the candidate's."""

    def check(caps: Capabilities) -> list[str]:
        from backends.cpu import ckernels

        kernel, why = getattr(ckernels, loader)()
        return [] if kernel is not None else [why]

    REGISTRY.register(
        Candidate(
            family=family,
            name="c",
            priority=20,
            check=check,
            description=description,
            scope="cpu",
            target=target,
        )
    )


_c_candidate(
    "rotary", "load_rotary_kernel",
    "fp32 NeoX rows in one C pass, and the rotated key and value written into fp32 caches in "
    "the same pass (rotary_write_kv); built at first use (backends/cpu/ckernels.py), bitwise the "
    "reference; other inputs as 'native' (HAL_ROTARY_BACKEND=native: torch ops)",
    "backends.cpu.native:c_rotary",
)  # fmt: skip
_c_candidate(
    "rms_norm", "load_rms_norm_kernel",
    "the residual add and RMSNorm of fp32 rows (16-16384 values) in one C call, squares summed "
    "in torch's order (built at first use, backends/cpu/ckernels.py; bitwise the reference); "
    "other inputs as 'native' (HAL_RMS_NORM_BACKEND=native: torch)",
    "backends.cpu.native:c_rms_norm",
)  # fmt: skip
_c_candidate(
    "attention", "load_attention_kernel",
    "decode batches (one query token per sequence) on fp32 caches in C, K / V read straight "
    "from the pages (built at first use, backends/cpu/ckernels.py; fp32 within roundoff of the "
    "reference); every other call as 'sdpa' (HAL_ATTENTION_BACKEND=sdpa: SDPA for decode too)",
    "backends.cpu.cattention:c_attention",
)  # fmt: skip


# GGUF weights kept quantized: the exact fp32 path by default (blocks unpacked once into int8
# codes and fp32 scales, dequantized one row tile at a time per call; the first
# HAL_GGUF_DENSE_BYTES, 1 GiB, of fp32 values kept whole instead), and calls of up to 8 rows
# on the int8 codes through the C codes kernel (backends/cpu/ckernels.py) where it builds.
# HAL_GGUF_INT4PACK=1 opts Q4_0 / Q4_1 / Q4_K into torch's int4pack matmul, which is faster but
# bf16-accurate (x, scales and offsets rounded to bf16), so it is never the silent default.
_engine_path(
    "gguf_gemm",
    "cpu_fast",
    "blocks repacked once at load: exact fp32 values (whole up to "
    "HAL_GGUF_DENSE_BYTES, then tiles of int8 codes x scales); decode-sized calls on the int8 "
    "codes through a C kernel built at first use (HAL_CPU_C_KERNELS=0: off) "
    "(HAL_GGUF_INT4PACK=1: torch's bf16 int4pack matmul for Q4_0/Q4_1/Q4_K)",
    "backends.cpu.gguf_fast:gguf_linear_cpu",
)
