"""AMD detection: amdsmi when installed, else torch (torch.version.hip, gcnArchName). Code here may
assume ROCm.

amdsmi reads market name, gfx target and VRAM without creating a HIP context.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch

from hal.capabilities import Capabilities
from platforms import rules
from platforms.base import DeviceInfo, Platform, Probe, gpu_capabilities
from platforms.libraries import probe_libraries

logger = logging.getLogger(__name__)

_VISIBILITY_VARS = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def amdsmi_devices(notes: list[str]) -> list[DeviceInfo] | None:
    """All AMD GPUs through amdsmi; None if amdsmi cannot say, or if a *_VISIBLE_DEVICES variable
    reorders them (then only torch knows which one is device 0)."""
    if importlib.util.find_spec("amdsmi") is None:
        return None
    if any(v in os.environ for v in _VISIBILITY_VARS):
        notes.append("a *_VISIBLE_DEVICES variable is set; asked torch for the visible devices")
        return None
    try:
        amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
    except Exception as exc:  # no driver, old library: fall back to torch
        notes.append(f"amdsmi unusable ({type(exc).__name__}: {exc}); asked torch")
        return None
    try:
        devices = []
        for handle in amdsmi.amdsmi_get_processor_handles():
            asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
            arch = gfx_arch(asic.get("target_graphics_version", ""), notes)
            units = asic.get("num_compute_units", asic.get("num_of_compute_units"))
            vram = amdsmi.amdsmi_get_gpu_memory_total(handle, amdsmi.AmdSmiMemoryType.VRAM)
            devices.append(
                DeviceInfo(
                    name=str(asic.get("market_name", "")) or f"AMD {arch}",
                    arch=arch,
                    memory_bytes=int(vram),
                    compute_units=int(units) if isinstance(units, int) and units > 0 else None,
                )
            )
    except Exception as exc:
        notes.append(f"amdsmi query failed ({type(exc).__name__}: {exc}); asked torch")
        return None
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception:
            pass
    return devices


def gfx_arch(raw: object, notes: list[str]) -> str:
    """An arch string from torch ("gfx942:sramecc+:xnack-") or amdsmi ("gfx942") -> "gfx942";
    one that does not parse is kept as "unknown" with a note and a warning, never an error."""
    try:
        return rules.parse_gfx(str(raw or ""))
    except ValueError as exc:
        msg = f"{exc}; dtypes and FP8 are derived as for an unknown arch (none native)"
        logger.warning("rocm: %s", msg)
        notes.append(msg)
        return "unknown"


def _note_unknown_arch(arch: str, notes: list[str]) -> None:
    if arch != "unknown" and not rules.amd_fp8_format(arch) and arch not in KNOWN_ARCHS:
        msg = f"gfx arch {arch} is not one this engine knows ({', '.join(KNOWN_ARCHS)}); "
        msg += "capabilities are derived from its family, unchecked"
        logger.warning("rocm: %s", msg)
        notes.append(msg)


# Archs of the shipped profiles plus their siblings; others get a warning in the report.
KNOWN_ARCHS = ("gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")


def torch_devices(notes: list[str] | None = None) -> list[DeviceInfo]:
    """Visible devices through torch's HIP build ("cuda" device type)."""
    notes = [] if notes is None else notes
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        arch = gfx_arch(getattr(p, "gcnArchName", ""), notes)
        out.append(
            DeviceInfo(p.name or f"AMD {arch}", arch, int(p.total_memory), p.multi_processor_count)
        )
    return out


def amdsmi_summary() -> str:
    devices = amdsmi_devices([]) or []
    if not devices:
        return ""
    return f"{len(devices)} x {', '.join(sorted({d.name for d in devices}))} (amdsmi)"


class RocmPlatform(Platform):
    name = "rocm"

    def probe(self) -> Probe:
        if not getattr(torch.version, "hip", None):
            seen = amdsmi_summary()
            return Probe("rocm", False, seen, f"torch {torch.__version__} is built without ROCm")
        count = torch.cuda.device_count()
        if count == 0:
            return Probe("rocm", False, amdsmi_summary(), "torch sees no ROCm device")
        return Probe("rocm", True, f"{count} ROCm device(s), torch {torch.__version__}")

    def capabilities(self) -> Capabilities:
        notes: list[str] = []
        devices = amdsmi_devices(notes)
        via = "amdsmi"
        if not devices:
            devices, via = torch_devices(notes), "torch (gcnArchName)"
        dev = devices[0]
        _note_unknown_arch(dev.arch, notes)
        notes.insert(0, f"detected through {via}")
        if len({(d.name, d.arch) for d in devices}) > 1:
            names = ", ".join(sorted({d.name for d in devices}))
            notes.append(f"devices differ ({names}); this describes device 0 (HIP_VISIBLE_DEVICES)")
        return gpu_capabilities(
            vendor="amd",
            device_name=dev.name,
            arch=dev.arch,
            compute_capability=None,
            memory_bytes=dev.memory_bytes,
            compute_units=dev.compute_units,
            device_count=len(devices),
            runtime_version=torch.version.hip,
            libraries=probe_libraries(),
            notes=notes,
        )
