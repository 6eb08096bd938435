"""Shared test setup: Hypothesis profiles ("ci": derandomized, no example database, ~25 examples;
"thorough": ~500, on demand) chosen by HYPOTHESIS_PROFILE=ci|thorough (default ci), and fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Without a GPU the shared Triton kernels can only run interpreted. Triton decides at decoration
# time, so the variable must be set before any test module imports a kernel module.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # torch missing: nothing will import the kernels either
        pass

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
