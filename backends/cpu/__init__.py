"""The CPU reference backend. Importing this only declares candidates (no op module loads)."""

from __future__ import annotations

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

# The CPU engine's fast attention: batched SDPA over the gathered pages, checked against the
# reference above (which stays the oracle). HAL_ATTENTION_BACKEND=reference forces the reference.
REGISTRY.register(
    Candidate(
        family="attention",
        name="sdpa",
        priority=10,
        check=_always,
        description="batched torch SDPA over the paged KV (one call per step)",
        scope="cpu",
        target="backends.cpu.sdpa:sdpa_attention",
    )
)
REGISTRY.register(
    Candidate(
        family="gemm",
        name="native",
        priority=10,
        check=_always,
        description="torch's CPU GEMM in the input dtype (oneDNN, AMX/AVX-512 bf16 where present)",
        scope="cpu",
        target="backends.cpu.native:native_linear",
    )
)
REGISTRY.register(
    Candidate(
        family="kv_write",
        name="native",
        priority=10,
        check=_always,
        description="one index_copy_ per cache over the flattened slots",
        scope="cpu",
        target="backends.cpu.native:native_write_kv",
    )
)
REGISTRY.register(
    Candidate(
        family="rms_norm",
        name="native",
        priority=10,
        check=_always,
        description="torch's F.rms_norm on fp32 values, one rounding (bitwise the reference)",
        scope="cpu",
        target="backends.cpu.native:native_rms_norm",
    )
)
REGISTRY.register(
    Candidate(
        family="rotary",
        name="native",
        priority=10,
        check=_always,
        description="NeoX pairs written into one buffer per input (bitwise the reference)",
        scope="cpu",
        target="backends.cpu.native:native_rotary",
    )
)
# GGUF weights kept quantized: the exact fp32 path by default (blocks unpacked once into int8
# codes and fp32 scales, dequantized one row tile at a time per call; the first
# HAL_GGUF_DENSE_BYTES, 1 GiB, of fp32 values kept whole instead). HAL_GGUF_INT4PACK=1 opts
# Q4_0 / Q4_1 / Q4_K into torch's int4pack matmul, which is faster but bf16-accurate (x, scales
# and offsets rounded to bf16), so it is never the silent default.
REGISTRY.register(
    Candidate(
        family="gguf_gemm",
        name="cpu_fast",
        priority=10,
        check=_always,
        description="blocks repacked once at load: exact fp32 values (whole up to "
        "HAL_GGUF_DENSE_BYTES, then tiles of int8 codes x scales) "
        "(HAL_GGUF_INT4PACK=1: torch's bf16 int4pack matmul for Q4_0/Q4_1/Q4_K)",
        scope="cpu",
        target="backends.cpu.gguf_fast:gguf_linear_cpu",
    )
)
