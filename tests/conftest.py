"""Shared test setup: Hypothesis profiles ("ci": derandomized, no example database, ~25 examples;
"thorough": ~500, on demand) chosen by HYPOTHESIS_PROFILE=ci|thorough (default ci), and fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# `tests.conformance` is imported as a package from the repository root.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from hal.capabilities import Capabilities  # noqa: E402
from tests.conformance.runner import PROFILES, register_profiles  # noqa: E402
from tests.conformance.targets import detect_capabilities, fallback_cpu_capabilities  # noqa: E402

register_profiles()
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"HYPOTHESIS_PROFILE: {PROFILE!r} is not one of {', '.join(PROFILES)}")
settings.load_profile(PROFILE)


@pytest.fixture(scope="session")
def cpu_caps() -> Capabilities:
    """This machine as a CPU `Capabilities` (platforms.detect() if it reports a CPU)."""
    caps = detect_capabilities()
    return caps if caps.vendor == "cpu" else fallback_cpu_capabilities()


@pytest.fixture(scope="session")
def hypothesis_profile() -> str:
    return PROFILE
