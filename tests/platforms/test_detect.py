"""Detection: CPU parsing, exactly-one-platform logic, NVML/amdsmi/torch paths through fakes, and
library probes. No GPU is needed: vendor libraries and torch device queries are faked."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import platforms
from hal.capabilities import Capabilities
from platforms import PlatformError, Probe, detect_with
from platforms.base import Platform
from platforms.cpu import CpuPlatform, parse_cpuinfo, parse_meminfo
from platforms.cuda import CudaPlatform, nvml_devices
from platforms.libraries import probe_library
from platforms.rocm import RocmPlatform, amdsmi_devices

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16 amx_tile amx_bf16 hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes asimdhp sve bf16 i8mm
CPU implementer\t: 0x41
"""


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


# -- this machine ---------------------------------------------------------------------------------


def test_detect_returns_exactly_one_platform_and_never_crashes():
    platforms.detect.cache_clear()
    caps = platforms.detect()
    assert isinstance(caps, Capabilities) and caps.source == "detected"
    if not torch.version.cuda and not getattr(torch.version, "hip", None):
        assert caps.vendor == "cpu" and caps.warp_size == 1 and caps.fp8_format is None
        assert caps.compute_units >= 1 and caps.memory_bytes > 0
    assert platforms.current_capabilities(None) is caps
    assert platforms.current_capabilities("t4").source == "profile:t4"


# -- CPU -----------------------------------------------------------------------------------------


def test_parse_cpuinfo_x86_and_arm():
    model, flags = parse_cpuinfo(X86_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert "amx_bf16" in flags and "hypervisor" in flags
    model, flags = parse_cpuinfo(ARM_CPUINFO)
    assert model == "" and {"asimdhp", "bf16", "sve"} <= set(flags)


def test_parse_meminfo():
    assert parse_meminfo("MemTotal:       24731708 kB\nMemFree: 1 kB\n") == 24731708 * 1024
    assert parse_meminfo("nothing here") == 0


def test_cpu_platform_from_files(tmp_path):
    (tmp_path / "cpuinfo").write_text(X86_CPUINFO)
    (tmp_path / "meminfo").write_text("MemTotal: 1048576 kB\n")
    caps = CpuPlatform(str(tmp_path / "cpuinfo"), str(tmp_path / "meminfo")).capabilities()
    assert caps.vendor == "cpu" and caps.memory_bytes == 1 << 30
    assert caps.device_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert "hypervisor" not in caps.cpu_flags and "avx512_bf16" in caps.cpu_flags
    assert caps.dtypes["bf16"] == "native" and caps.dtypes["fp16"] == "emulated"
    assert caps.dtypes["fp8_e4m3fn"] == "emulated" and caps.dtypes["tf32"] == "none"
    assert not caps.graph_capture and caps.warp_size == 1


def test_cpu_platform_without_proc_files(tmp_path):
    caps = CpuPlatform(str(tmp_path / "none"), str(tmp_path / "none")).capabilities()
    assert caps.dtypes["bf16"] == "emulated" and caps.memory_bytes == 0
    assert any("no CPU flags" in n for n in caps.notes)
    assert any("no MemTotal" in n for n in caps.notes)


# -- choosing exactly one platform ---------------------------------------------------------------


class FakeGpu(Platform):
    def __init__(self, name, probe, caps=None, fail=None):
        self.name, self._probe, self._caps, self._fail = name, probe, caps, fail

    def probe(self):
        if self._fail == "probe":
            raise RuntimeError("driver exploded")
        return self._probe

    def capabilities(self):
        if self._fail == "caps":
            raise RuntimeError("cudaErrorNoDevice")
        return self._caps


def test_one_usable_gpu_platform_wins():
    h100 = platforms.load_profile("h100")
    caps = detect_with([FakeGpu("cuda", Probe("cuda", True, "1 x H100"), h100)])
    assert caps is not None and caps.vendor == "nvidia" and caps.arch == "sm_90"


def test_two_usable_gpu_platforms_is_an_error_naming_both():
    gpus = [
        FakeGpu("cuda", Probe("cuda", True, "1 x H100")),
        FakeGpu("rocm", Probe("rocm", True, "1 x MI300X")),
    ]
    with pytest.raises(PlatformError, match=r"cuda: 1 x H100; rocm: 1 x MI300X"):
        detect_with(gpus)


def test_gpu_seen_but_unusable_falls_back_to_cpu_with_a_note():
    probe = Probe("cuda", False, "2 x NVIDIA H100 (NVML)", "torch 2.13.0+cpu is built without CUDA")
    caps = detect_with([FakeGpu("cuda", probe)])
    assert caps.vendor == "cpu"
    assert any("found 2 x NVIDIA H100 (NVML), but torch" in n for n in caps.notes)


@pytest.mark.parametrize("fail", ["probe", "caps"])
def test_broken_gpu_stack_falls_back_to_cpu(fail):
    caps = detect_with([FakeGpu("cuda", Probe("cuda", True, "1 x H100"), fail=fail)])
    assert caps.vendor == "cpu"
    if fail == "caps":
        assert any("cudaErrorNoDevice" in n for n in caps.notes)


# -- NVIDIA through a fake NVML -----------------------------------------------------------------


def _fake_pynvml(devices: list[tuple[str, tuple[int, int], int]]):
    handles = {i: d for i, d in enumerate(devices)}
    uuids = {f"GPU-{i:04d}": i for i in handles}
    calls = []
    return _module(
        "pynvml",
        calls=calls,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetHandleByUUID=lambda u: handles[uuids[u]],
        nvmlDeviceGetName=lambda h: h[0].encode(),  # old releases return bytes
        nvmlDeviceGetCudaComputeCapability=lambda h: h[1],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h[2]),
    )


H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 85520809984)
T4 = ("Tesla T4", (7, 5), 16 << 30)


def test_nvml_devices(monkeypatch):
    fake = _fake_pynvml([H100, H100])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    devs = nvml_devices([])
    assert [d.name for d in devs] == [H100[0], H100[0]]
    assert devs[0].compute_capability == (9, 0) and devs[0].arch == "sm_90"
    assert devs[0].memory_bytes == H100[2] and devs[0].compute_units is None
    assert fake.calls == ["init", "shutdown"]


def test_nvml_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([H100, T4]))
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.name for d in nvml_devices([])] == ["Tesla T4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0001,GPU-0000")
    assert [d.name for d in nvml_devices([])] == ["Tesla T4", H100[0]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert nvml_devices([]) == []
    notes: list[str] = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-abc")
    assert nvml_devices(notes) is None and "MIG" in notes[0]


def test_nvml_mixed_devices_need_pci_bus_order(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([H100, T4]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    notes: list[str] = []
    assert nvml_devices(notes) is None and "CUDA_DEVICE_ORDER" in notes[0]


def test_nvml_without_driver_falls_back(monkeypatch):
    def fail():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "pynvml", _module("pynvml", nvmlInit=fail))
    notes: list[str] = []
    assert nvml_devices(notes) is None and "libnvidia-ml" in notes[0]


def test_cuda_platform_capabilities_from_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([H100, H100]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    caps = CudaPlatform().capabilities()
    assert (caps.vendor, caps.arch, caps.compute_capability) == ("nvidia", "sm_90", (9, 0))
    assert caps.device_count == 2 and caps.memory_bytes == H100[2]
    assert caps.fp8_format == "e4m3fn" and caps.dtypes["bf16"] == "native"
    # Spec-sheet numbers come from the matching profile; NVML gives no SM count.
    assert caps.compute_units == 132 and caps.memory_bandwidth_gbps == 3350
    assert caps.runtime_version == "12.4" and caps.notes[0] == "detected through NVML"
    assert caps.has_library("pynvml")


def test_cuda_probe_on_cpu_torch_reports_what_nvml_sees(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([H100]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    probe = CudaPlatform().probe()
    assert not probe.usable and probe.found == f"1 x {H100[0]} (NVML)"
    assert "built without CUDA" in probe.reason
    caps = detect_with([CudaPlatform()])
    assert caps.vendor == "cpu" and any(H100[0] in n for n in caps.notes)


def test_cuda_platform_from_torch_when_nvml_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails -> find_spec raises/None
    monkeypatch.setattr("platforms.cuda.importlib.util.find_spec", lambda name: None)
    props = SimpleNamespace(
        name="NVIDIA L4", major=8, minor=9, total_memory=23 << 30, multi_processor_count=58
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    caps = CudaPlatform().capabilities()
    assert caps.arch == "sm_89" and caps.compute_units == 58 and caps.fp8_format == "e4m3fn"
    assert caps.memory_bandwidth_gbps is None  # no L4 profile
    assert any("no profile matches 'NVIDIA L4'" in n for n in caps.notes)


# -- AMD through a fake amdsmi and a fake HIP torch ----------------------------------------------


def _fake_amdsmi(arch="gfx942", name="AMD Instinct MI300X", cus=304):
    asic = {"market_name": name, "target_graphics_version": arch, "num_compute_units": cus}
    return _module(
        "amdsmi",
        amdsmi_init=lambda: None,
        amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["h0"],
        amdsmi_get_gpu_asic_info=lambda h: asic,
        amdsmi_get_gpu_memory_total=lambda h, kind: 192 << 30,
        AmdSmiMemoryType=SimpleNamespace(VRAM="vram"),
    )


def _clear_visibility(monkeypatch):
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)


def test_rocm_platform_from_amdsmi(monkeypatch):
    _clear_visibility(monkeypatch)
    monkeypatch.setitem(sys.modules, "amdsmi", _fake_amdsmi())
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    caps = RocmPlatform().capabilities()
    assert (caps.vendor, caps.arch, caps.warp_size) == ("amd", "gfx942", 64)
    assert caps.fp8_format == "e4m3fnuz" and caps.dtypes["fp8_e4m3fnuz"] == "native"
    assert caps.compute_units == 304 and caps.memory_bandwidth_gbps == 5300
    assert caps.runtime_version == "6.2.41133" and caps.notes[0] == "detected through amdsmi"


def test_amdsmi_defers_to_torch_when_visibility_is_set(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", _fake_amdsmi())
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    notes: list[str] = []
    assert amdsmi_devices(notes) is None and "VISIBLE_DEVICES" in notes[0]


def test_rocm_platform_from_torch_gcn_arch_name(monkeypatch):
    _clear_visibility(monkeypatch)
    monkeypatch.setattr("platforms.rocm.importlib.util.find_spec", lambda name: None)
    props = SimpleNamespace(
        name="AMD Instinct MI250X/MI250",
        gcnArchName="gfx90a:sramecc+:xnack-",
        total_memory=64 << 30,
        multi_processor_count=110,
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert RocmPlatform().probe().usable and not CudaPlatform().probe().usable
    caps = detect_with([CudaPlatform(), RocmPlatform()])
    assert (caps.vendor, caps.arch, caps.fp8_format, caps.device_count) == (
        "amd",
        "gfx90a",
        None,
        2,
    )
    assert caps.source == "detected" and caps.memory_bandwidth_gbps == 1638.4


def test_rocm_probe_without_hip_build():
    if getattr(torch.version, "hip", None):
        pytest.skip("this torch is a ROCm build")
    probe = RocmPlatform().probe()
    assert not probe.usable and "built without ROCm" in probe.reason


# -- libraries ---------------------------------------------------------------------------------


def test_probe_installed_library_reads_version_without_import():
    import importlib.metadata

    pytest.importorskip("triton")
    lib = probe_library("triton")
    assert lib.usable and lib.version == importlib.metadata.version("triton")


def test_probe_missing_library(monkeypatch):
    monkeypatch.setattr("platforms.libraries.importlib.util.find_spec", lambda name: None)
    lib = probe_library("flash_attn")
    assert (lib.usable, lib.version, lib.reason) == (False, None, "not installed")


def test_probe_unknown_library():
    with pytest.raises(ValueError, match="'cudnn'.*triton"):
        probe_library("cudnn")


def test_xformers_without_its_extension_is_not_usable(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", _module("xformers", _has_cpp_library=False))
    lib = probe_library("xformers")
    assert not lib.usable and "xformers._C" in lib.reason
    monkeypatch.setitem(sys.modules, "xformers", _module("xformers", _has_cpp_library=True))
    assert probe_library("xformers").usable


def test_flash_attn_without_its_cuda_extension_is_not_usable(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", None)  # import raises ImportError
    lib = probe_library("flash_attn")
    assert not lib.usable and "flash_attn_2_cuda does not load" in lib.reason
