"""Platforms: detect this machine, or load a named device profile, as a `Capabilities` value.

Detection picks exactly one platform: the one GPU platform this torch build can use, else the CPU.
It never fails for lack of a GPU; GPUs seen but unusable are named in the result's notes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from hal.capabilities import Capabilities
from platforms.base import (
    Platform,
    PlatformError,
    Probe,
    ProfileError,
    list_profiles,
    load_profile,
    match_profile,
)
from platforms.cpu import CpuPlatform
from platforms.cuda import CudaPlatform
from platforms.rocm import RocmPlatform

logger = logging.getLogger(__name__)

__all__ = [
    "Platform",
    "PlatformError",
    "Probe",
    "ProfileError",
    "current_capabilities",
    "detect",
    "detect_with",
    "gpu_platforms",
    "list_profiles",
    "load_profile",
    "match_profile",
]


def gpu_platforms() -> list[Platform]:
    return [CudaPlatform(), RocmPlatform()]


def detect_with(gpus: list[Platform], cpu: CpuPlatform | None = None) -> Capabilities:
    """Detection over the given platforms (tests pass fakes); see `detect`."""
    probes = []
    for plat in gpus:
        try:
            probes.append((plat, plat.probe()))
        except Exception as exc:  # a broken driver stack must not stop the engine on the CPU
            logger.warning("%s probe failed: %s: %s", plat.name, type(exc).__name__, exc)
            probes.append((plat, Probe(plat.name, False, "", f"probe failed: {exc}")))
    usable = [(plat, p) for plat, p in probes if p.usable]
    if len(usable) > 1:
        found = "; ".join(f"{p.platform}: {p.found}" for _, p in usable)
        raise PlatformError(
            f"found more than one usable GPU platform ({found}); expected exactly one"
        )
    notes = [
        f"{p.platform}: found {p.found}, but {p.reason}"
        for _, p in probes
        if p.found and not p.usable
    ]
    for note in notes:
        logger.warning("%s", note)
    if usable:
        plat, probe = usable[0]
        try:
            caps = plat.capabilities()
        except Exception as exc:
            msg = f"{plat.name}: {probe.found}, but reading its properties failed ({exc})"
            msg += "; using the CPU"
            logger.warning("%s", msg)
            notes.append(msg)
        else:
            return dataclasses.replace(caps, notes=(*caps.notes, *notes))
    return (cpu or CpuPlatform()).capabilities(notes)


@functools.cache
def detect() -> Capabilities:
    """This machine's capabilities: exactly one platform (the usable GPU platform, else the CPU).

    Cached for the process; `detect.cache_clear()` re-probes.
    """
    return detect_with(gpu_platforms())


def current_capabilities(profile: str | None = None) -> Capabilities:
    """`load_profile(profile)` when a profile is named, else `detect()`."""
    return load_profile(profile) if profile else detect()
