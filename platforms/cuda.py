"""NVIDIA detection: NVML (nvidia-ml-py) when installed, else torch.cuda. Code here may assume CUDA.

NVML reads name, compute capability and memory without creating a CUDA context (vLLM's
NvmlCudaPlatform does the same); torch.cuda.get_device_properties is the fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch

from hal.capabilities import Capabilities
from platforms import rules
from platforms.base import DeviceInfo, Platform, Probe, gpu_capabilities, match_profile
from platforms.libraries import probe_libraries

logger = logging.getLogger(__name__)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_ids() -> list[int | str] | None:
    """CUDA_VISIBLE_DEVICES as NVML ids (indices or GPU-UUIDs); None when it uses a form NVML
    lookups here do not follow (MIG ids), so torch must be asked instead."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None  # all devices, in NVML order
    ids: list[int | str] = []
    for item in (s.strip() for s in env.split(",")):
        if item.isdigit():
            ids.append(int(item))
        elif item.startswith("GPU-"):
            ids.append(item)
        else:
            # CUDA stops at the first invalid entry; MIG ids need torch's view.
            return ids if item == "" or item.startswith("-") else None
    return ids


def nvml_devices(notes: list[str]) -> list[DeviceInfo] | None:
    """Visible devices through NVML, in CUDA order; None if NVML cannot say (note appended)."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, old library: detection falls back to torch
        notes.append(f"NVML unusable ({type(exc).__name__}: {exc}); asked torch.cuda")
        return None
    try:
        ids = _visible_ids()
        if ids is None and "CUDA_VISIBLE_DEVICES" in os.environ:
            notes.append("CUDA_VISIBLE_DEVICES uses MIG ids; asked torch.cuda")
            return None
        if ids is None:
            ids = list(range(pynvml.nvmlDeviceGetCount()))
        devices = []
        for ident in ids:
            if isinstance(ident, int):
                handle = pynvml.nvmlDeviceGetHandleByIndex(ident)
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(ident)
            cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            devices.append(
                DeviceInfo(
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    arch=rules.nvidia_arch(cc),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    compute_capability=(int(cc[0]), int(cc[1])),
                )
            )
    except Exception as exc:
        notes.append(f"NVML query failed ({type(exc).__name__}: {exc}); asked torch.cuda")
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    kinds = {(d.name, d.compute_capability) for d in devices}
    if len(kinds) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        # CUDA orders mixed devices fastest first, NVML by PCI bus: only torch knows device 0.
        notes.append("mixed GPUs and CUDA_DEVICE_ORDER is not PCI_BUS_ID; asked torch.cuda")
        return None
    return devices


def torch_devices() -> list[DeviceInfo]:
    """Visible devices through torch.cuda (initializes the CUDA runtime)."""
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = (int(p.major), int(p.minor))
        out.append(
            DeviceInfo(
                p.name, rules.nvidia_arch(cc), int(p.total_memory), p.multi_processor_count, cc
            )
        )
    return out


def nvml_summary() -> str:
    """ "2 x NVIDIA H100 80GB HBM3 (NVML)" or "" when NVML sees nothing or is absent."""
    devices = nvml_devices([]) or []
    if not devices:
        return ""
    names = sorted({d.name for d in devices})
    return f"{len(devices)} x {', '.join(names)} (NVML)"


class CudaPlatform(Platform):
    name = "cuda"

    def probe(self) -> Probe:
        if not torch.version.cuda or getattr(torch.version, "hip", None):
            seen = nvml_summary()
            return Probe("cuda", False, seen, f"torch {torch.__version__} is built without CUDA")
        # torch.cuda.device_count() asks the driver (or NVML) without creating a context.
        count = torch.cuda.device_count()
        if count == 0:
            return Probe("cuda", False, nvml_summary(), "torch sees no CUDA device")
        return Probe("cuda", True, f"{count} CUDA device(s), torch {torch.__version__}")

    def capabilities(self) -> Capabilities:
        notes: list[str] = []
        devices = nvml_devices(notes)
        via = "NVML"
        if not devices:
            devices, via = torch_devices(), "torch.cuda"
        dev = devices[0]
        notes.insert(0, f"detected through {via}")
        if len({(d.name, d.compute_capability) for d in devices}) > 1:
            names = ", ".join(sorted({d.name for d in devices}))
            notes.append(
                f"devices differ ({names}); this describes device 0 (CUDA_VISIBLE_DEVICES)"
            )
        compute_units = dev.compute_units
        if compute_units is None and match_profile("nvidia", dev.arch, dev.name) is None:
            # NVML has no SM count; without a profile, ask the runtime for it.
            compute_units = torch.cuda.get_device_properties(0).multi_processor_count
        return gpu_capabilities(
            vendor="nvidia",
            device_name=dev.name,
            arch=dev.arch,
            compute_capability=dev.compute_capability,
            memory_bytes=dev.memory_bytes,
            compute_units=compute_units,
            device_count=len(devices),
            runtime_version=torch.version.cuda,
            libraries=probe_libraries(),
            notes=notes,
        )
