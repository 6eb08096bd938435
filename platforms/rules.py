"""Hardware rules: dtype support, FP8 format, warp size and graph capture by arch.

Each rule cites the vendor's own documentation. Profiles and detection both derive these facts from
here, so a YAML profile cannot claim what its arch does not have (see `base.validate_profile`).
"""

from __future__ import annotations

import re

from hal.capabilities import Capabilities, Support

# Helpers for candidates' checks: each returns the reasons a need is not met (empty: met).


def needs_cc(caps: Capabilities, major: int, minor: int = 0) -> list[str]:
    """ "needs compute capability >= 8.0, this is 7.5" unless caps is NVIDIA at or above it."""
    if caps.vendor != "nvidia":
        return [f"needs an NVIDIA GPU, this is {caps.vendor}"]
    if caps.cc_at_least(major, minor):
        return []
    return [f"needs compute capability >= {major}.{minor}, this is {caps.cc_str}"]


def needs_vendor(caps: Capabilities, *vendors: str) -> list[str]:
    if caps.vendor in vendors:
        return []
    return [f"needs {' or '.join(vendors)}, this is {caps.vendor}"]


def needs_dtype(caps: Capabilities, dtype: str, native: bool = True) -> list[str]:
    if caps.supports(dtype, native=native):
        return []
    have = caps.dtypes.get(dtype, "none")
    return [f"needs {'native ' if native else ''}{dtype}, this device has it {have}"]


def needs_library(caps: Capabilities, name: str) -> list[str]:
    return [] if caps.has_library(name) else [caps.library_reason(name)]


# -- NVIDIA --------------------------------------------------------------------------------------


def nvidia_arch(cc: tuple[int, int]) -> str:
    """Compute capability (9, 0) -> "sm_90" (CUDA C Programming Guide, "Compute Capability")."""
    return f"sm_{cc[0]}{cc[1]}"


def parse_cc(text: str) -> tuple[int, int]:
    """ "8.9" -> (8, 9); raises ValueError naming the value otherwise."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"compute capability {text!r} is not of the form MAJOR.MINOR, e.g. 8.9")
    return int(m.group(1)), int(m.group(2))


def nvidia_dtypes(cc: tuple[int, int]) -> dict[str, Support]:
    """Dtype support of an NVIDIA GPU of compute capability `cc`."""
    return {
        "fp32": "native",
        # TF32 tensor cores arrive with Ampere: NVIDIA A100 Tensor Core GPU Architecture whitepaper,
        # "TF32"; cuBLAS docs, CUBLAS_COMPUTE_32F_FAST_TF32 (compute capability 8.0 and above).
        "tf32": "native" if cc >= (8, 0) else "none",
        # bfloat16 arithmetic needs sm_80: CUDA Math API, "Bfloat16 Precision Intrinsics" (the
        # __nv_bfloat16 arithmetic is "only supported on devices of compute capability 8.0 or
        # higher"); below that torch stores bf16 and computes in fp32 (emulated).
        "bf16": "native" if cc >= (8, 0) else "emulated",
        # Half arithmetic needs sm_53: CUDA Math API, "Half Precision Intrinsics".
        "fp16": "native" if cc >= (5, 3) else "emulated",
        # FP8 (E4M3, E5M2) tensor cores need sm_89 (Ada) or sm_90 (Hopper): CUDA Math API, "FP8
        # Intrinsics", and cuBLASLt docs: FP8 matmul "requires compute capability 8.9 or above".
        # torch converts fp8 on any device, so older GPUs can still store it (emulated).
        "fp8_e4m3fn": "native" if cc >= (8, 9) else "emulated",
        "fp8_e5m2": "native" if cc >= (8, 9) else "emulated",
        # e4m3fnuz is AMD's (and Graphcore's) encoding; no NVIDIA GPU computes in it.
        "fp8_e4m3fnuz": "emulated",
        # DP4A int8 dot product needs sm_61: CUDA C Programming Guide, __dp4a ("compute capability
        # 6.1 or higher"); Turing (sm_75) adds int8 tensor cores.
        "int8": "native" if cc >= (6, 1) else "emulated",
        # int4 here is weight-only (GPTQ/AWQ layout): every backend dequantizes it to a float type
        # inside the GEMM, so no device multiplies it natively in this engine.
        "int4": "emulated",
    }


def nvidia_fp8_format(cc: tuple[int, int]) -> str | None:
    """The FP8 format an NVIDIA GPU computes natively: OCP e4m3fn from sm_89 on (same sources)."""
    return "e4m3fn" if cc >= (8, 9) else None


# -- AMD -----------------------------------------------------------------------------------------


def parse_gfx(gcn_arch_name: str) -> str:
    """torch's gcnArchName "gfx942:sramecc+:xnack-" -> "gfx942" (target features dropped)."""
    arch = gcn_arch_name.strip().split(":", 1)[0].lower()
    if not re.fullmatch(r"gfx[0-9a-f]{3,4}", arch):
        raise ValueError(f"gfx arch {gcn_arch_name!r} is not of the form gfxNNN, e.g. gfx942")
    return arch


def _is_cdna(gfx: str) -> bool:
    # gfx9xx are GCN/CDNA (gfx908 MI100, gfx90a MI200, gfx94x MI300, gfx950 MI350); gfx10+ is RDNA.
    return len(gfx) == 6 and gfx.startswith("gfx9")


def amd_warp_size(gfx: str) -> int:
    """HIP's warpSize: 64 on GCN/CDNA (gfx9), 32 on RDNA (gfx10, gfx11, gfx12).

    HIP Programming Guide, "Hardware implementation" / "Warp size": "64 on CDNA, 32 on RDNA".
    """
    return 64 if _is_cdna(gfx) else 32


# FP8 by gfx arch. HIP docs, "Low precision floating point types", supported devices: gfx940/941/942
# compute FNUZ FP8 only; gfx950 and gfx12 compute OCP FP8 (e4m3fn, e5m2). ROCm "Data types and
# precision support" lists MI300 (gfx942) FP8 as FNUZ and MI350 (gfx950) as OCP; CDNA2 (gfx90a)
# and older have no FP8 at all.
_FNUZ_FP8 = ("gfx940", "gfx941", "gfx942")


def _ocp_fp8(gfx: str) -> bool:
    return gfx == "gfx950" or gfx.startswith("gfx12")


def amd_fp8_format(gfx: str) -> str | None:
    if gfx in _FNUZ_FP8:
        return "e4m3fnuz"
    if _ocp_fp8(gfx):
        return "e4m3fn"
    return None


def amd_dtypes(gfx: str) -> dict[str, Support]:
    """Dtype support of an AMD GPU of arch `gfx` (ROCm "Data types and precision support")."""
    fnuz = gfx in _FNUZ_FP8
    ocp = _ocp_fp8(gfx)
    return {
        "fp32": "native",
        # XF32 (TF32) MFMA exists on gfx940/941/942 only (MI300 datasheets list TF32; ROCm
        # precision support: tensorfloat32 on MI300 only; LLVM AMDGPU "xf32-insts" is gfx94x-only,
        # removed in gfx950).
        "tf32": "native" if fnuz else "none",
        # bf16 MFMA from CDNA1 (gfx908) on, WMMA on RDNA3 (gfx11) and RDNA4 (gfx12): AMD CDNA ISA
        # guides, V_MFMA_F32_*BF16*; RDNA3 ISA, V_WMMA_F32_16X16X16_BF16. RDNA1/2 compute in fp32.
        "bf16": "native"
        if gfx in ("gfx908", "gfx90a") or fnuz or gfx == "gfx950" or gfx[:5] in ("gfx11", "gfx12")
        else "emulated",
        # Packed fp16 math is native on every gfx9 and later GPU (Vega ISA, V_PK_FMA_F16).
        "fp16": "native",
        "fp8_e4m3fn": "native" if ocp else "emulated",
        "fp8_e5m2": "native" if ocp else "emulated",
        "fp8_e4m3fnuz": "native" if fnuz else "emulated",
        # int8 dot products (V_DOT4_I32_I8, int8 MFMA) on gfx906 and later: CDNA/RDNA ISA guides.
        "int8": "native",
        "int4": "emulated",  # weight-only in this engine, as on NVIDIA
    }


# -- CPU -----------------------------------------------------------------------------------------

# Flags of /proc/cpuinfo that the rules read, in report order (x86 first, then Arm).
CPU_FLAGS_OF_INTEREST: tuple[str, ...] = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "asimdhp",
    "sve",
    "bf16",
    "i8mm",
)


def cpu_dtypes(flags: tuple[str, ...] | list[str] | set[str]) -> dict[str, Support]:
    """Dtype support of a CPU with /proc/cpuinfo `flags`."""
    f = set(flags)
    return {
        "fp32": "native",
        "tf32": "none",  # a GPU tensor-core format; no CPU has it
        # bf16 arithmetic: Intel SDM, AVX512_BF16 (VDPBF16PS) and AMX-BF16 (TDPBF16PS); Arm
        # Architecture Reference Manual, FEAT_BF16 (cpuinfo "bf16"). Otherwise converted to fp32.
        "bf16": "native" if f & {"avx512_bf16", "amx_bf16", "bf16"} else "emulated",
        # fp16 arithmetic: Intel SDM, AVX512-FP16 and AMX-FP16; Arm FEAT_FP16 (cpuinfo "asimdhp").
        # F16C only converts, so it stays emulated.
        "fp16": "native" if f & {"avx512_fp16", "amx_fp16", "asimdhp"} else "emulated",
        # No CPU computes FP8; torch converts it in software.
        "fp8_e4m3fn": "emulated",
        "fp8_e4m3fnuz": "emulated",
        "fp8_e5m2": "emulated",
        # Integer SIMD multiplies int8 on every x86-64 (PMADDUBSW) and arm64 (SDOT/SMLAL) CPU.
        "int8": "native",
        "int4": "emulated",
    }


# -- whole-device facts ------------------------------------------------------------------------


def dtypes_for(vendor: str, arch: str, cc: tuple[int, int] | None, flags=()) -> dict[str, Support]:
    if vendor == "nvidia":
        if cc is None:
            raise ValueError(f"an NVIDIA device needs a compute capability (arch {arch!r})")
        return nvidia_dtypes(cc)
    if vendor == "amd":
        return amd_dtypes(arch)
    return cpu_dtypes(flags)


def fp8_format_for(vendor: str, arch: str, cc: tuple[int, int] | None) -> str | None:
    if vendor == "nvidia":
        return nvidia_fp8_format(cc) if cc is not None else None
    if vendor == "amd":
        return amd_fp8_format(arch)
    return None  # the CPU backend emulates FP8 ops; no format is native


def warp_size_for(vendor: str, arch: str) -> int:
    if vendor == "nvidia":
        return 32  # CUDA C Programming Guide, "SIMT Architecture": a warp is 32 threads
    if vendor == "amd":
        return amd_warp_size(arch)
    return 1  # no SIMT on a CPU


def graph_capture_for(vendor: str) -> bool:
    """CUDA graphs (CUDA Programming Guide, "CUDA Graphs") and HIP graphs (HIP docs, "HIP graphs")
    exist on every GPU torch supports; the CPU backend runs eagerly."""
    return vendor in ("nvidia", "amd")
