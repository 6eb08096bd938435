"""The capability model: what one device can do, as plain data.

`platforms/` builds a `Capabilities` from the real machine or from a YAML profile; `hal/` and the
backends only read it. Everything a selection rule needs is here, so rules never probe hardware.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Vendor = Literal["nvidia", "amd", "cpu"]
Support = Literal["native", "emulated", "none"]

# Every dtype name the capability model speaks about, in report order.
DTYPE_NAMES: tuple[str, ...] = (
    "fp32",
    "tf32",
    "bf16",
    "fp16",
    "fp8_e4m3fn",
    "fp8_e4m3fnuz",
    "fp8_e5m2",
    "int8",
    "int4",
)

# FP8 formats: torch dtype and largest finite value. e4m3fnuz (AMD MI300) has no negative zero and
# an exponent bias one larger, so its max is 240, not 448.
FP8_FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "e4m3fn": (torch.float8_e4m3fn, 448.0),
    "e4m3fnuz": (torch.float8_e4m3fnuz, 240.0),
    "e5m2": (torch.float8_e5m2, 57344.0),
}

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fnuz": torch.float8_e4m3fnuz,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


@dataclass(frozen=True)
class LibraryInfo:
    """An optional library: whether it imports, its version, and why it cannot be used if not."""

    name: str
    version: str | None = None
    usable: bool = False
    reason: str = ""  # empty when usable; else e.g. "not installed", "CUDA extension does not load"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Capabilities:
    """One device's facts. Immutable; build a new one with `dataclasses.replace`."""

    vendor: Vendor
    device_name: str
    arch: str  # "sm_90", "gfx942", "x86_64", "aarch64"
    source: str = "detected"  # "detected" or "profile:<name>"
    compute_capability: tuple[int, int] | None = None  # NVIDIA only
    memory_bytes: int = 0
    memory_bandwidth_gbps: float | None = None  # GB/s, from the profile or a measurement
    compute_units: int = 0  # SMs, CUs, or CPU cores
    warp_size: int = 1  # 32 on NVIDIA, 64 on CDNA, 1 on CPU (no SIMT)
    dtypes: dict[str, Support] = field(default_factory=dict)
    fp8_format: str | None = None  # the format the hardware computes in natively, if any
    graph_capture: bool = False  # CUDA graphs / HIP graphs
    peak_tflops: dict[str, float] = field(default_factory=dict)
    cpu_flags: tuple[str, ...] = ()
    libraries: dict[str, LibraryInfo] = field(default_factory=dict)
    torch_version: str = ""
    runtime_version: str | None = None  # CUDA or HIP version torch was built with
    device_count: int = 1
    notes: tuple[str, ...] = ()  # warnings from detection ("gfx arch gfx1200 has no profile")

    def __post_init__(self) -> None:
        for name, support in self.dtypes.items():
            if name not in DTYPE_NAMES:
                raise ValueError(f"dtypes: unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)}")
            if support not in ("native", "emulated", "none"):
                raise ValueError(
                    f"dtypes[{name!r}]: {support!r} is not one of native, emulated, none"
                )
        if self.fp8_format is not None and self.fp8_format not in FP8_FORMATS:
            raise ValueError(
                f"fp8_format: {self.fp8_format!r} is not one of {', '.join(FP8_FORMATS)}"
            )

    # -- questions the rules ask -------------------------------------------------------------
    def supports(self, dtype: str, native: bool = False) -> bool:
        s = self.dtypes.get(dtype, "none")
        return s == "native" if native else s in ("native", "emulated")

    def has_library(self, name: str) -> bool:
        lib = self.libraries.get(name)
        return lib is not None and lib.usable

    def library_reason(self, name: str) -> str:
        lib = self.libraries.get(name)
        if lib is None:
            return f"{name} not installed"
        return "" if lib.usable else f"{name} {lib.reason}".strip()

    def cc_at_least(self, major: int, minor: int = 0) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (major, minor)

    @property
    def cc_str(self) -> str:
        cc = self.compute_capability
        return f"{cc[0]}.{cc[1]}" if cc else "n/a"

    @property
    def fp8_dtype(self) -> torch.dtype | None:
        """The platform's FP8 weight/activation dtype (e4m3 flavour), or None without FP8."""
        return FP8_FORMATS[self.fp8_format][0] if self.fp8_format else None

    @property
    def fp8_max(self) -> float | None:
        return FP8_FORMATS[self.fp8_format][1] if self.fp8_format else None

    @property
    def collective_backend(self) -> str:
        """torch.distributed backend for tensor/pipeline parallelism: "nccl" on NVIDIA and on AMD
        (where torch's "nccl" is RCCL), "gloo" on CPUs."""
        return "gloo" if self.vendor == "cpu" else "nccl"

    @property
    def torch_device_type(self) -> str:
        # ROCm builds of torch present AMD GPUs through the "cuda" device type.
        return "cpu" if self.vendor == "cpu" else "cuda"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"] = self.cc_str if self.compute_capability else None
        d["cpu_flags"] = list(self.cpu_flags)
        d["notes"] = list(self.notes)
        d["libraries"] = {k: v.to_dict() for k, v in self.libraries.items()}
        d["fp8_dtype"] = str(self.fp8_dtype).replace("torch.", "") if self.fp8_dtype else None
        return d
