"""Every shipped profile loads, fills every device field and agrees with the rules; bad profiles
fail with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hal.capabilities import DTYPE_NAMES
from platforms import ProfileError, list_profiles, load_profile, match_profile, rules
from platforms.base import PROFILE_DIR
from platforms.libraries import LIBRARY_NAMES

REQUIRED = {
    "h100", "h200", "a100", "l40s", "rtx4090", "t4", "v100",
    "mi300x", "mi325x", "mi250x", "mi355x", "cpu-x86-64",
}  # fmt: skip


def test_required_profiles_ship():
    assert REQUIRED <= set(list_profiles())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_loads_and_fills_every_device_field(name):
    caps = load_profile(name)
    assert caps.source == f"profile:{name}"
    assert caps.vendor in ("nvidia", "amd", "cpu")
    assert caps.device_name and caps.arch
    assert caps.memory_bytes > 0 and caps.memory_bandwidth_gbps > 0 and caps.compute_units > 0
    assert caps.peak_tflops and all(v > 0 for v in caps.peak_tflops.values())
    assert set(caps.dtypes) == set(DTYPE_NAMES)
    assert set(caps.libraries) == set(LIBRARY_NAMES)
    assert caps.torch_version and caps.device_count >= 1 and caps.notes
    assert (caps.compute_capability is not None) == (caps.vendor == "nvidia")
    assert bool(caps.cpu_flags) == (caps.vendor == "cpu")
    # Derived facts agree with the rules for the arch.
    assert caps.warp_size == rules.warp_size_for(caps.vendor, caps.arch)
    assert caps.fp8_format == rules.fp8_format_for(caps.vendor, caps.arch, caps.compute_capability)
    assert caps.graph_capture == rules.graph_capture_for(caps.vendor)


def test_profile_libraries_default_to_not_installed():
    caps = load_profile("h100")
    assert not any(lib.usable for lib in caps.libraries.values())
    assert (
        caps.library_reason("flash_attn") == "flash_attn not installed (not listed by the profile)"
    )
    assert any("treated as not installed" in n for n in caps.notes)


@pytest.mark.parametrize(
    "name, arch, cc, fp8, warp",
    [
        ("h100", "sm_90", (9, 0), "e4m3fn", 32),
        ("h200", "sm_90", (9, 0), "e4m3fn", 32),
        ("a100", "sm_80", (8, 0), None, 32),
        ("l40s", "sm_89", (8, 9), "e4m3fn", 32),
        ("rtx4090", "sm_89", (8, 9), "e4m3fn", 32),
        ("t4", "sm_75", (7, 5), None, 32),
        ("v100", "sm_70", (7, 0), None, 32),
        ("mi300x", "gfx942", None, "e4m3fnuz", 64),
        ("mi325x", "gfx942", None, "e4m3fnuz", 64),
        ("mi250x", "gfx90a", None, None, 64),
        ("mi355x", "gfx950", None, "e4m3fn", 64),
        ("cpu-x86-64", "x86_64", None, None, 1),
    ],
)
def test_profile_key_facts(name, arch, cc, fp8, warp):
    caps = load_profile(name)
    assert (caps.arch, caps.compute_capability, caps.fp8_format, caps.warp_size) == (
        arch, cc, fp8, warp,
    )  # fmt: skip


def test_mi300x_fp8_dtype_is_fnuz_with_max_240():
    import torch

    caps = load_profile("mi300x")
    assert caps.fp8_dtype == torch.float8_e4m3fnuz and caps.fp8_max == 240.0


def test_t4_has_no_native_bf16_and_generic_cpu_emulates_it():
    assert load_profile("t4").dtypes["bf16"] == "emulated"
    cpu = load_profile("cpu-x86-64")
    assert cpu.dtypes["bf16"] == "emulated" and not cpu.graph_capture


def test_names_are_case_insensitive():
    assert load_profile("H100").source == "profile:h100"


def test_unknown_profile_lists_valid_names():
    with pytest.raises(ProfileError) as err:
        load_profile("h900")
    msg = str(err.value)
    assert "'h900'" in msg and "h100" in msg and "mi300x" in msg and "\n" not in msg


def _write(tmp_path: Path, text: str, name: str = "custom.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _doc(name: str = "h100") -> dict:
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


def test_profile_from_a_path(tmp_path):
    doc = _doc("t4")
    doc["device_name"] = "my T4"
    doc["libraries"] = {
        "triton": "3.1.0",
        "flash_attn": {"version": "1.0.9", "usable": False, "reason": "FlashAttention-1 only"},
    }
    caps = load_profile(_write(tmp_path, yaml.safe_dump(doc), "my-t4.yaml"))
    assert caps.source == "profile:my-t4" and caps.device_name == "my T4"
    assert caps.has_library("triton") and caps.libraries["triton"].version == "3.1.0"
    assert caps.library_reason("flash_attn") == "flash_attn FlashAttention-1 only"


def test_malformed_yaml_is_one_line_with_position(tmp_path):
    path = _write(tmp_path, "vendor: nvidia\narch: [sm_90\nmemory_gib: 80\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert "malformed YAML at line" in msg and path in msg and "\n" not in msg


def test_missing_profile_file(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda d: d.pop("memory_gib"), "memory_gib", "missing"),
        (lambda d: d.update(colour="green"), "colour", "unknown field"),
        (lambda d: d.update(vendor="intel"), "vendor", "'intel'"),
        (lambda d: d.update(fp8_format="e4m3fnuz"), "fp8_format", "contradicts the rule"),
        (lambda d: d.update(warp_size=64), "warp_size", "contradicts the rule"),
        (lambda d: d.update(arch="sm_80"), "arch", "contradicts compute capability 9.0"),
        (lambda d: d.update(compute_capability="nine"), "compute_capability", "MAJOR.MINOR"),
        (lambda d: d.update(compute_units=True), "compute_units", "expected int"),
        (lambda d: d.update(memory_gib=0), "memory_gib", "must be > 0"),
        (lambda d: d["peak_tflops"].update(fp4=9000), "peak_tflops.fp4", "unknown dtype"),
        (lambda d: d["peak_tflops"].update(fp8="fast"), "peak_tflops.fp8", "number > 0"),
        (lambda d: d.update(libraries={"cudnn": "9"}), "libraries.cudnn", "unknown library"),
        (lambda d: d.update(match=["H100 ("]), "match", "regular expression"),
        (lambda d: d.update(cpu_flags=["avx2"]), "cpu_flags", "only CPU profiles"),
    ],
)
def test_invalid_profile_names_the_field(tmp_path, change, field, words):
    doc = _doc("h100")
    change(doc)
    with pytest.raises(ProfileError) as err:
        load_profile(_write(tmp_path, yaml.safe_dump(doc)))
    msg = str(err.value)
    assert f"{field}:" in msg and words in msg and "\n" not in msg


def test_peak_for_a_dtype_the_rules_do_not_call_native(tmp_path):
    doc = _doc("t4")
    doc["peak_tflops"]["bf16"] = 65
    with pytest.raises(ProfileError, match=r"peak_tflops.bf16: .*bf16 emulated, not native"):
        load_profile(_write(tmp_path, yaml.safe_dump(doc)))
    doc = _doc("mi250x")
    doc["peak_tflops"]["fp8"] = 1
    with pytest.raises(ProfileError, match="no native FP8"):
        load_profile(_write(tmp_path, yaml.safe_dump(doc), "x.yaml"))


def test_amd_profile_cannot_have_compute_capability(tmp_path):
    doc = _doc("mi300x")
    doc["compute_capability"] = "9.0"
    with pytest.raises(ProfileError, match="only NVIDIA profiles"):
        load_profile(_write(tmp_path, yaml.safe_dump(doc)))


def test_profile_must_be_a_mapping(tmp_path):
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile(_write(tmp_path, "- just\n- a list\n"))


@pytest.mark.parametrize(
    "vendor, arch, name, expected",
    [
        ("nvidia", "sm_90", "NVIDIA H100 80GB HBM3", "profile:h100"),
        ("nvidia", "sm_90", "NVIDIA H200", "profile:h200"),
        ("nvidia", "sm_75", "Tesla T4", "profile:t4"),
        ("nvidia", "sm_80", "NVIDIA A100-SXM4-80GB", "profile:a100"),
        ("nvidia", "sm_89", "NVIDIA GeForce RTX 4090", "profile:rtx4090"),
        ("amd", "gfx942", "AMD Instinct MI300X", "profile:mi300x"),
        ("amd", "gfx90a", "AMD Instinct MI250X/MI250", "profile:mi250x"),
        # Other variants of a part have other clocks or memory: no profile, numbers unknown.
        ("nvidia", "sm_90", "NVIDIA H100 PCIe", None),
        ("nvidia", "sm_90", "NVIDIA H200 NVL", None),
        ("nvidia", "sm_80", "NVIDIA A100-SXM4-40GB", None),
        # The arch must agree too.
        ("nvidia", "sm_80", "NVIDIA H100 80GB HBM3", None),
    ],
)
def test_match_profile(vendor, arch, name, expected):
    caps = match_profile(vendor, arch, name)
    assert (caps.source if caps else None) == expected
