"""Every available backend against the float64 CPU reference, op by op and dtype by dtype, on
Hypothesis-drawn cases (tests/conformance); a cell passes only if cases ran and the dispatch hit
the implementation the backend reports. HYPOTHESIS_PROFILE=thorough explores further."""

from __future__ import annotations

import pytest

from hal.backend import Backend
from tests.conformance.cases import OPS, OpSpec
from tests.conformance.runner import run_cell
from tests.conformance.targets import BackendTarget, available_backends

TARGETS = available_backends()
CELLS = [
    pytest.param(target, op, dtype, id=f"{target.name}-{op.name}-{dtype}")
    for target in TARGETS
    for op in OPS
    for dtype in op.dtypes
]
_LOADED: dict[str, Backend] = {}


def _backend(target: BackendTarget) -> Backend:
    if target.mode == "unavailable":
        pytest.skip(f"backend {target.name} cannot run here: {target.reason}")
    if target.name not in _LOADED:
        _LOADED[target.name] = target.load()
    return _LOADED[target.name]


def test_registry_offers_cpu() -> None:
    # The reference runs everywhere, so a conformance run can never be empty.
    assert any(t.name == "cpu" and t.mode == "native" for t in TARGETS), TARGETS


@pytest.mark.parametrize(("target", "op", "dtype"), CELLS)
def test_conformance(target: BackendTarget, op: OpSpec, dtype: str, hypothesis_profile: str):
    cell = run_cell(_backend(target), op, dtype, hypothesis_profile, label=target.label)
    if cell.status == "skip":
        pytest.skip(cell.reason)
    assert cell.status == "pass", cell.report()
    assert cell.cases > 0
