"""One test per hardware rule in platforms.rules (dtype support, FP8 format, warp size, graphs)."""

from __future__ import annotations

import pytest

from hal.capabilities import DTYPE_NAMES, Capabilities
from platforms import rules

# -- NVIDIA --------------------------------------------------------------------------------------


def test_nvidia_arch_name():
    assert rules.nvidia_arch((9, 0)) == "sm_90"
    assert rules.nvidia_arch((8, 9)) == "sm_89"
    assert rules.parse_cc("7.5") == (7, 5)
    with pytest.raises(ValueError, match="'sm_90'"):
        rules.parse_cc("sm_90")


def test_tf32_needs_sm80():
    assert rules.nvidia_dtypes((7, 5))["tf32"] == "none"
    assert rules.nvidia_dtypes((8, 0))["tf32"] == "native"


def test_bf16_native_needs_sm80_else_emulated():
    assert rules.nvidia_dtypes((7, 0))["bf16"] == "emulated"
    assert rules.nvidia_dtypes((7, 5))["bf16"] == "emulated"
    assert rules.nvidia_dtypes((8, 0))["bf16"] == "native"


def test_fp16_native_from_sm53():
    assert rules.nvidia_dtypes((5, 2))["fp16"] == "emulated"
    assert rules.nvidia_dtypes((5, 3))["fp16"] == "native"


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_native_needs_sm89(dtype):
    assert rules.nvidia_dtypes((8, 0))[dtype] == "emulated"
    assert rules.nvidia_dtypes((8, 6))[dtype] == "emulated"
    assert rules.nvidia_dtypes((8, 9))[dtype] == "native"
    assert rules.nvidia_dtypes((9, 0))[dtype] == "native"


def test_nvidia_fp8_format_is_e4m3fn_from_sm89():
    assert rules.nvidia_fp8_format((8, 6)) is None
    assert rules.nvidia_fp8_format((8, 9)) == "e4m3fn"
    assert rules.nvidia_fp8_format((10, 0)) == "e4m3fn"


def test_nvidia_never_computes_fnuz():
    for cc in [(7, 0), (8, 0), (8, 9), (9, 0), (12, 0)]:
        assert rules.nvidia_dtypes(cc)["fp8_e4m3fnuz"] == "emulated"


def test_int8_native_from_sm61_dp4a():
    assert rules.nvidia_dtypes((6, 0))["int8"] == "emulated"
    assert rules.nvidia_dtypes((6, 1))["int8"] == "native"


def test_int4_is_weight_only_everywhere():
    assert rules.nvidia_dtypes((9, 0))["int4"] == "emulated"
    assert rules.amd_dtypes("gfx942")["int4"] == "emulated"
    assert rules.cpu_dtypes(["avx512f"])["int4"] == "emulated"


def test_nvidia_support_is_monotonic_in_compute_capability():
    # A newer GPU never loses native support an older one had (up to the archs we rule on).
    ccs = [(m, n) for m in range(5, 13) for n in range(10)]
    rank = {"none": 0, "emulated": 1, "native": 2}
    for lo, hi in zip(ccs, ccs[1:], strict=False):
        a, b = rules.nvidia_dtypes(lo), rules.nvidia_dtypes(hi)
        assert all(rank[b[k]] >= rank[a[k]] for k in a), (lo, hi)


def test_every_rule_covers_every_dtype():
    for d in (rules.nvidia_dtypes((7, 5)), rules.amd_dtypes("gfx90a"), rules.cpu_dtypes(())):
        assert set(d) == set(DTYPE_NAMES)


# -- AMD -----------------------------------------------------------------------------------------


def test_parse_gfx_drops_target_features():
    assert rules.parse_gfx("gfx942:sramecc+:xnack-") == "gfx942"
    assert rules.parse_gfx("gfx90a") == "gfx90a"
    assert rules.parse_gfx("gfx1100") == "gfx1100"
    with pytest.raises(ValueError, match="'sm_90'"):
        rules.parse_gfx("sm_90")


def test_gfx942_uses_e4m3fnuz():
    d = rules.amd_dtypes("gfx942")
    assert rules.amd_fp8_format("gfx942") == "e4m3fnuz"
    assert d["fp8_e4m3fnuz"] == "native"
    assert d["fp8_e4m3fn"] == "emulated"  # OCP FP8 is not what MI300 computes
    assert d["fp8_e5m2"] == "emulated"  # MI300's e5m2 is the FNUZ flavour, not OCP


def test_gfx950_uses_ocp_e4m3fn():
    d = rules.amd_dtypes("gfx950")
    assert rules.amd_fp8_format("gfx950") == "e4m3fn"
    assert d["fp8_e4m3fn"] == "native" and d["fp8_e5m2"] == "native"
    assert d["fp8_e4m3fnuz"] == "emulated"


def test_gfx12_uses_ocp_fp8():
    assert rules.amd_fp8_format("gfx1201") == "e4m3fn"


def test_gfx90a_has_no_fp8():
    d = rules.amd_dtypes("gfx90a")
    assert rules.amd_fp8_format("gfx90a") is None
    assert all(d[k] == "emulated" for k in ("fp8_e4m3fn", "fp8_e4m3fnuz", "fp8_e5m2"))
    assert d["bf16"] == "native" and d["fp16"] == "native"


def test_amd_tf32_only_on_gfx94x():
    assert rules.amd_dtypes("gfx942")["tf32"] == "native"
    assert rules.amd_dtypes("gfx90a")["tf32"] == "none"
    assert rules.amd_dtypes("gfx950")["tf32"] == "none"  # xf32 removed in CDNA 4


def test_amd_bf16_native_on_cdna_and_rdna3_emulated_on_rdna2():
    assert rules.amd_dtypes("gfx908")["bf16"] == "native"
    assert rules.amd_dtypes("gfx1100")["bf16"] == "native"
    assert rules.amd_dtypes("gfx1030")["bf16"] == "emulated"


def test_amd_warp_size_64_on_cdna_32_on_rdna():
    assert rules.amd_warp_size("gfx90a") == 64
    assert rules.amd_warp_size("gfx942") == 64
    assert rules.amd_warp_size("gfx950") == 64
    assert rules.amd_warp_size("gfx1100") == 32
    assert rules.amd_warp_size("gfx1201") == 32


# -- CPU -----------------------------------------------------------------------------------------


def test_cpu_bf16_native_only_with_avx512_bf16_or_amx():
    assert rules.cpu_dtypes(["avx2", "fma"])["bf16"] == "emulated"
    assert rules.cpu_dtypes(["avx512f", "avx512_bf16"])["bf16"] == "native"
    assert rules.cpu_dtypes(["amx_tile", "amx_bf16"])["bf16"] == "native"
    assert rules.cpu_dtypes(["asimd", "bf16"])["bf16"] == "native"  # Arm FEAT_BF16


def test_cpu_fp16_emulated_unless_avx512_fp16():
    assert rules.cpu_dtypes(["avx2", "f16c"])["fp16"] == "emulated"  # F16C only converts
    assert rules.cpu_dtypes(["avx512_fp16"])["fp16"] == "native"


def test_cpu_fixed_dtypes():
    d = rules.cpu_dtypes(["avx2"])
    assert d["fp32"] == "native" and d["int8"] == "native" and d["tf32"] == "none"
    assert all(d[k] == "emulated" for k in ("fp8_e4m3fn", "fp8_e4m3fnuz", "fp8_e5m2"))
    assert rules.fp8_format_for("cpu", "x86_64", None) is None


# -- whole device --------------------------------------------------------------------------------


def test_warp_size_and_graph_capture_by_vendor():
    assert rules.warp_size_for("nvidia", "sm_75") == 32
    assert rules.warp_size_for("amd", "gfx942") == 64
    assert rules.warp_size_for("cpu", "x86_64") == 1
    assert rules.graph_capture_for("nvidia") and rules.graph_capture_for("amd")
    assert not rules.graph_capture_for("cpu")


def _caps(**kw) -> Capabilities:
    base = dict(vendor="nvidia", device_name="t", arch="sm_75", compute_capability=(7, 5))
    base.update(kw)
    base["dtypes"] = rules.dtypes_for(base["vendor"], base["arch"], base["compute_capability"])
    return Capabilities(**base)


def test_needs_cc_names_the_need_and_the_device():
    assert rules.needs_cc(_caps(), 8, 0) == ["needs compute capability >= 8.0, this is 7.5"]
    assert rules.needs_cc(_caps(arch="sm_80", compute_capability=(8, 0)), 8, 0) == []
    amd = _caps(vendor="amd", arch="gfx942", compute_capability=None)
    assert rules.needs_cc(amd, 8, 0) == ["needs an NVIDIA GPU, this is amd"]


def test_needs_dtype_vendor_and_library():
    t4 = _caps()
    assert rules.needs_dtype(t4, "bf16") == ["needs native bf16, this device has it emulated"]
    assert rules.needs_dtype(t4, "bf16", native=False) == []
    assert rules.needs_vendor(t4, "amd") == ["needs amd, this is nvidia"]
    assert rules.needs_library(t4, "flash_attn") == ["flash_attn not installed"]
