"""CPU detection: ISA flags and model from /proc/cpuinfo, usable cores, memory from /proc/meminfo.

Always usable: when no GPU platform is, this is the machine.
"""

from __future__ import annotations

import logging
import os
import platform as _platform
from pathlib import Path

import torch

from hal.capabilities import Capabilities
from platforms import rules
from platforms.base import Platform, Probe
from platforms.libraries import probe_libraries

logger = logging.getLogger(__name__)

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """/proc/cpuinfo -> (model name, all flags of the first processor). x86 writes "flags" and
    "model name"; arm64 writes "Features" and often no model name."""
    model, flags = "", ()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = tuple(value.split())
    return model, flags


def parse_meminfo(text: str) -> int:
    """/proc/meminfo -> MemTotal in bytes (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = parts[2].lower() if len(parts) > 2 else "kb"
                return int(parts[1]) * (1024 if unit == "kb" else 1)
    return 0


def usable_cores() -> int:
    """Cores this process may run on (affinity and cpusets respected), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CpuPlatform(Platform):
    name = "cpu"

    def __init__(self, cpuinfo_path: str = "/proc/cpuinfo", meminfo_path: str = "/proc/meminfo"):
        self.cpuinfo_path = cpuinfo_path
        self.meminfo_path = meminfo_path

    def probe(self) -> Probe:
        return Probe("cpu", True, f"{usable_cores()} cores ({_platform.machine()})")

    def capabilities(self, notes: list[str] | None = None) -> Capabilities:
        notes = list(notes or [])
        machine = _platform.machine().lower()
        arch = _ARCH_ALIASES.get(machine, machine) or "unknown"
        model, all_flags = parse_cpuinfo(_read(self.cpuinfo_path))
        if not all_flags:
            notes.append(f"no CPU flags in {self.cpuinfo_path}: bf16/fp16 assumed emulated")
        # Keep the flags the rules read; the full list is long and says nothing more here.
        flags = tuple(f for f in rules.CPU_FLAGS_OF_INTEREST if f in set(all_flags))
        memory = parse_meminfo(_read(self.meminfo_path))
        if not memory:
            notes.append(f"no MemTotal in {self.meminfo_path}: memory unknown")
        notes.append("memory bandwidth and peak TFLOP/s are not measured for a detected CPU")
        return Capabilities(
            vendor="cpu",
            device_name=model or _platform.processor() or arch,
            arch=arch,
            source="detected",
            compute_capability=None,
            memory_bytes=memory,
            memory_bandwidth_gbps=None,
            compute_units=usable_cores(),
            warp_size=rules.warp_size_for("cpu", arch),
            dtypes=rules.cpu_dtypes(flags),
            fp8_format=rules.fp8_format_for("cpu", arch, None),
            graph_capture=rules.graph_capture_for("cpu"),
            peak_tflops={},
            cpu_flags=flags,
            libraries=probe_libraries(),
            torch_version=str(torch.__version__),
            runtime_version=None,
            device_count=1,
            notes=tuple(notes),
        )
