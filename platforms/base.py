"""The platform base class, platform errors, and YAML device profiles (loading and validation).

A profile states a device's facts from its vendor's spec sheet; the rules in `platforms.rules`
derive dtypes, FP8 format, warp size and graph capture from its arch, and loading checks that the
profile agrees with them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from hal.capabilities import DTYPE_NAMES, Capabilities, LibraryInfo
from hal.errors import HalError
from platforms import rules
from platforms.libraries import LIBRARY_NAMES

logger = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).with_name("profiles")
GIB = 1 << 30


class ProfileError(HalError):
    """An unknown profile name, or a profile file that is malformed or contradicts the rules."""


class PlatformError(HalError):
    """Detection found something it cannot turn into exactly one platform."""


@dataclass(frozen=True)
class Probe:
    """What one platform saw, without creating a device context."""

    platform: str  # "cuda", "rocm", "cpu"
    usable: bool
    found: str = ""  # e.g. "2 x NVIDIA H100 80GB HBM3 (NVML)"; empty when nothing was seen
    reason: str = ""  # why it cannot be used, when not usable


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as a vendor library or torch reports it."""

    name: str
    arch: str  # "sm_90", "gfx942"
    memory_bytes: int
    compute_units: int | None = None  # None where the source does not say (NVML has no SM count)
    compute_capability: tuple[int, int] | None = None


class Platform(ABC):
    """One vendor's detection. `probe()` is cheap and never raises; `capabilities()` is called
    only after a usable probe."""

    name: ClassVar[str]

    @abstractmethod
    def probe(self) -> Probe:
        """Whether this platform is present and usable by this torch build, and what was seen."""

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """Capabilities of device 0 of this platform."""


# -- shared detection helper -----------------------------------------------------------------


def gpu_capabilities(
    vendor: str,
    device_name: str,
    arch: str,
    compute_capability: tuple[int, int] | None,
    memory_bytes: int,
    compute_units: int | None,
    device_count: int,
    runtime_version: str | None,
    libraries: dict[str, LibraryInfo],
    notes: list[str],
) -> Capabilities:
    """A detected GPU's Capabilities: rules from its arch, spec-sheet numbers from its profile."""
    profile = match_profile(vendor, arch, device_name)
    bandwidth = None
    peak: dict[str, float] = {}
    if profile is not None:
        bandwidth, peak = profile.memory_bandwidth_gbps, dict(profile.peak_tflops)
        compute_units = compute_units or profile.compute_units
        notes.append(f"spec-sheet numbers from profile {profile.source.split(':', 1)[1]}")
    else:
        notes.append(
            f"no profile matches {device_name!r} ({arch}): "
            "memory bandwidth and peak TFLOP/s unknown"
        )
    return Capabilities(
        vendor=vendor,  # type: ignore[arg-type]
        device_name=device_name,
        arch=arch,
        source="detected",
        compute_capability=compute_capability,
        memory_bytes=memory_bytes,
        memory_bandwidth_gbps=bandwidth,
        compute_units=compute_units or 0,
        warp_size=rules.warp_size_for(vendor, arch),
        dtypes=rules.dtypes_for(vendor, arch, compute_capability),
        fp8_format=rules.fp8_format_for(vendor, arch, compute_capability),
        graph_capture=rules.graph_capture_for(vendor),
        peak_tflops=peak,
        libraries=libraries,
        torch_version=str(torch.__version__),
        runtime_version=runtime_version,
        device_count=device_count,
        notes=tuple(notes),
    )


# -- profiles --------------------------------------------------------------------------------

_NUMBER = (int, float)
# field -> (types, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "vendor": ((str,), True),
    "device_name": ((str,), True),
    "arch": ((str,), True),
    "spec_source": ((str,), True),
    "memory_gib": (_NUMBER, True),
    "memory_bandwidth_gbps": (_NUMBER, True),
    "compute_units": ((int,), True),
    "warp_size": ((int,), True),
    "fp8_format": ((str, type(None)), True),
    "graph_capture": ((bool,), True),
    "peak_tflops": ((dict,), True),
    "compute_capability": ((str, float), False),
    "cpu_flags": ((list,), False),
    "match": ((list,), False),
    "libraries": ((dict,), False),
    "device_count": ((int,), False),
    "runtime_version": ((str,), False),
}
_PEAK_KEYS = ("fp64", "fp8", *DTYPE_NAMES)


def list_profiles() -> list[str]:
    """Names of the shipped profiles (file stems of platforms/profiles/*.yaml), sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _resolve(name: str) -> tuple[str, Path]:
    """A profile name or a path to a YAML file -> (label, path)."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ProfileError(
                f"profile file {name!r} does not exist; "
                f"known profile names: {', '.join(list_profiles())}"
            )
        return str(path), path
    key = name.strip().lower()
    path = PROFILE_DIR / f"{key}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {name!r}; valid: {', '.join(list_profiles())} "
            "(or a path to a .yaml file)"
        )
    return key, path


def load_profile(name: str) -> Capabilities:
    """Capabilities of a shipped profile (`h100`) or of a YAML file path; ProfileError if bad."""
    label, path = _resolve(name)
    return _load_path(str(path.resolve()), label)


@functools.lru_cache(maxsize=64)
def _load_path(path: str, label: str) -> Capabilities:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {label}: cannot read {path}: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        msg = f"profile {label}: malformed YAML{where}: {problem}"
        raise ProfileError(" ".join(msg.split())) from None
    stem = Path(path).stem
    return profile_capabilities(doc, label, stem)


def profile_capabilities(doc: Any, label: str, name: str) -> Capabilities:
    """Validate one parsed profile document against the schema and the rules; build Capabilities."""

    def bad(field_: str, problem: str) -> ProfileError:
        return ProfileError(f"profile {label}: {field_}: {problem}")

    if not isinstance(doc, dict):
        raise ProfileError(
            f"profile {label}: expected a mapping of fields, got {type(doc).__name__}"
        )
    unknown = sorted(set(doc) - set(_FIELDS), key=str)
    if unknown:
        raise bad(str(unknown[0]), f"unknown field; valid: {', '.join(_FIELDS)}")
    for key, (types, required) in _FIELDS.items():
        if key not in doc:
            if required:
                raise bad(key, "missing (required)")
            continue
        value = doc[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise bad(key, f"{value!r} is a {type(value).__name__}, expected {want}")

    vendor = doc["vendor"]
    if vendor not in ("nvidia", "amd", "cpu"):
        raise bad("vendor", f"{vendor!r} is not one of nvidia, amd, cpu")
    arch = doc["arch"]
    cc: tuple[int, int] | None = None
    if vendor == "nvidia":
        if "compute_capability" not in doc:
            raise bad("compute_capability", "missing (required for an NVIDIA profile)")
        try:
            cc = rules.parse_cc(str(doc["compute_capability"]))
        except ValueError as exc:
            raise bad("compute_capability", str(exc)) from None
        if arch != rules.nvidia_arch(cc):
            raise bad("arch", f"{arch!r} contradicts compute capability {cc[0]}.{cc[1]}")
    elif "compute_capability" in doc:
        raise bad("compute_capability", f"only NVIDIA profiles have one, this is {vendor}")
    if vendor == "amd":
        try:
            if rules.parse_gfx(arch) != arch:
                raise ValueError(f"write the arch in lower case without features, e.g. {arch}")
        except ValueError as exc:
            raise bad("arch", str(exc)) from None
    if vendor == "cpu" and arch not in ("x86_64", "aarch64"):
        raise bad("arch", f"{arch!r} is not one of x86_64, aarch64")
    flags = doc.get("cpu_flags", [])
    if vendor != "cpu" and flags:
        raise bad("cpu_flags", f"only CPU profiles list flags, this is {vendor}")
    if not all(isinstance(f, str) for f in flags):
        raise bad("cpu_flags", f"{flags!r} must be a list of flag names")

    for key in ("memory_gib", "memory_bandwidth_gbps", "compute_units"):
        if doc[key] <= 0:
            raise bad(key, f"{doc[key]!r} must be > 0")
    expected = {
        "warp_size": rules.warp_size_for(vendor, arch),
        "fp8_format": rules.fp8_format_for(vendor, arch, cc),
        "graph_capture": rules.graph_capture_for(vendor),
    }
    for key, want in expected.items():
        if doc[key] != want:
            raise bad(key, f"{doc[key]!r} contradicts the rule for {arch} ({want!r})")
    dtypes = rules.dtypes_for(vendor, arch, cc, flags)
    peak: dict[str, float] = {}
    for key, value in doc["peak_tflops"].items():
        if key not in _PEAK_KEYS:
            raise bad(f"peak_tflops.{key}", f"unknown dtype; valid: {', '.join(_PEAK_KEYS)}")
        if not isinstance(value, _NUMBER) or isinstance(value, bool) or value <= 0:
            raise bad(f"peak_tflops.{key}", f"{value!r} must be a number > 0")
        if key == "fp8" and expected["fp8_format"] is None:
            raise bad("peak_tflops.fp8", f"the rules give {arch} no native FP8")
        if key in DTYPE_NAMES and dtypes[key] != "native":
            raise bad(
                f"peak_tflops.{key}", f"the rules give {arch} {key} {dtypes[key]}, not native"
            )
        peak[key] = float(value)
    for pattern in doc.get("match", []):
        try:
            if not isinstance(pattern, str) or not pattern:
                raise re.error("not a non-empty string")
            re.compile(pattern)
        except re.error as exc:
            raise bad("match", f"{pattern!r} is not a valid regular expression ({exc})") from None
    libraries, lib_note = _profile_libraries(doc.get("libraries"), bad)
    count = doc.get("device_count", 1)
    if count < 1:
        raise bad("device_count", f"{count!r} must be >= 1")
    notes = [f"spec source: {doc['spec_source']}", lib_note]
    if "runtime_version" not in doc:
        notes.append("runtime version: not given by the profile (a property of the torch build)")
    return Capabilities(
        vendor=vendor,
        device_name=doc["device_name"],
        arch=arch,
        source=f"profile:{name}",
        compute_capability=cc,
        memory_bytes=int(doc["memory_gib"] * GIB),
        memory_bandwidth_gbps=float(doc["memory_bandwidth_gbps"]),
        compute_units=doc["compute_units"],
        warp_size=doc["warp_size"],
        dtypes=dtypes,
        fp8_format=doc["fp8_format"],
        graph_capture=doc["graph_capture"],
        peak_tflops=peak,
        cpu_flags=tuple(flags),
        libraries=libraries,
        torch_version=str(torch.__version__),
        runtime_version=doc.get("runtime_version"),
        device_count=count,
        notes=tuple(notes),
    )


def _profile_libraries(spec: dict | None, bad) -> tuple[dict[str, LibraryInfo], str]:
    """A profile's `libraries` (name: version, or name: {version, usable, reason}); libraries it
    does not list count as not installed, since availability belongs to an environment."""
    spec = spec or {}
    out: dict[str, LibraryInfo] = {}
    for name, value in spec.items():
        if name not in LIBRARY_NAMES:
            raise bad(f"libraries.{name}", f"unknown library; valid: {', '.join(LIBRARY_NAMES)}")
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            out[name] = LibraryInfo(name, str(value), True, "")
        elif isinstance(value, dict) and set(value) <= {"version", "usable", "reason"}:
            usable = value.get("usable", True)
            if not isinstance(usable, bool):
                raise bad(f"libraries.{name}.usable", f"{usable!r} must be true or false")
            version = value.get("version")
            out[name] = LibraryInfo(
                name,
                None if version is None else str(version),
                usable,
                str(value.get("reason", "")),
            )
        else:
            raise bad(
                f"libraries.{name}",
                f"{value!r} must be a version string or a mapping of version, usable, reason",
            )
    missing = [n for n in LIBRARY_NAMES if n not in out]
    for name in missing:
        out[name] = LibraryInfo(name, None, False, "not installed (not listed by the profile)")
    if not spec:
        note = (
            "libraries: the profile lists none, so all are treated as not installed "
            "(library availability is a property of a Python environment, not of a device)"
        )
    else:
        note = f"libraries: as listed by the profile; {', '.join(missing) or 'none'} not listed"
    return out, note


@functools.lru_cache(maxsize=1)
def _matchable() -> tuple[tuple[Capabilities, tuple[str, ...]], ...]:
    out = []
    for name in list_profiles():
        path = PROFILE_DIR / f"{name}.yaml"
        try:
            caps = load_profile(name)
            patterns = yaml.safe_load(path.read_text(encoding="utf-8")).get("match", [])
        except (ProfileError, yaml.YAMLError, OSError) as exc:
            logger.warning("profile %s skipped for matching: %s", name, exc)
            continue
        out.append((caps, tuple(patterns)))
    return tuple(out)


def match_profile(vendor: str, arch: str, device_name: str) -> Capabilities | None:
    """The shipped profile whose `match` regular expressions (case-insensitive, searched in the
    driver's device name) fit a detected device of the same vendor and arch; the longest matching
    pattern wins. None if none fits."""
    best: tuple[int, Capabilities] | None = None
    for caps, patterns in _matchable():
        if caps.vendor != vendor or caps.arch != arch:
            continue
        for pattern in patterns:
            if re.search(pattern, device_name, re.IGNORECASE) and (
                best is None or len(pattern) > best[0]
            ):
                best = (len(pattern), caps)
    return best[1] if best else None
