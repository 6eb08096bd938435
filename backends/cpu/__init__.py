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
    "int8_gemm": "backends.cpu.linear:int8_linear",
    "int4_gemm": "backends.cpu.linear:int4_linear",
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
