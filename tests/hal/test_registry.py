"""The registry: priority order, reasons for every passed-over candidate, prefer/require/unknown."""

from __future__ import annotations

import pytest

from hal.backend import OP_FAMILIES
from hal.capabilities import Capabilities
from hal.registry import (
    REGISTRY,
    Candidate,
    Choice,
    Registry,
    Selection,
    SelectionError,
    env_choice,
)
from hal.select import select_backend, select_ops
from platforms import load_profile


def _needs_cc80(caps: Capabilities) -> list[str]:
    return (
        []
        if caps.cc_at_least(8, 0)
        else [f"needs compute capability >= 8.0, this is {caps.cc_str}"]
    )


def _never(caps: Capabilities) -> list[str]:
    return ["not built here"]


def _always(caps: Capabilities) -> list[str]:
    return []


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    # Registration order is deliberately not priority order.
    r.register(Candidate("attention", "sdpa", 10, _always, scope="gpu"))
    r.register(Candidate("attention", "flash", 100, _needs_cc80, scope="gpu"))
    r.register(Candidate("attention", "broken", 50, _never, scope="gpu"))
    r.register(Candidate("gemm", "cublas", 10, _always, scope="gpu"))
    return r


T4 = load_profile("t4")
H100 = load_profile("h100")


def test_candidates_sorted_by_priority(reg):
    assert [c.name for c in reg.candidates("attention", "gpu")] == ["flash", "broken", "sdpa"]
    assert reg.families("gpu") == ["attention", "gemm"] and reg.families("other") == []


def test_first_runnable_wins_and_every_other_has_its_reason(reg):
    sel = reg.select("attention", T4, scope="gpu")
    assert sel.chosen == "sdpa"
    assert sel.rejected == {
        "flash": ["needs compute capability >= 8.0, this is 7.5"],
        "broken": ["not built here"],
    }
    assert "flash needs compute capability >= 8.0, this is 7.5" in sel.summary()
    h100 = reg.select("attention", H100, scope="gpu")
    assert h100.chosen == "flash" and h100.not_tried == ["sdpa"]
    assert "sdpa can run, lower priority" in h100.summary()


def test_require_that_cannot_run_raises_with_reasons(reg):
    with pytest.raises(SelectionError, match=r"'flash' required by config .*this is 7.5"):
        reg.select("attention", T4, scope="gpu", choice=Choice.parse("flash"))


def test_prefer_that_cannot_run_falls_back_with_a_note(reg):
    sel = reg.select("attention", T4, scope="gpu", choice=Choice.parse("prefer:flash"))
    assert sel.chosen == "sdpa" and "preferred flash by config cannot run" in sel.note
    assert sel.to_dict()["forced"] == "prefer:flash"


def test_require_that_can_run_overrides_priority(reg):
    sel = reg.select("attention", H100, scope="gpu", choice=Choice.parse("require:sdpa", "X"))
    assert sel.chosen == "sdpa" and sel.note == "required by X"


def test_unknown_name_lists_valid_choices(reg):
    with pytest.raises(
        SelectionError, match=r"unknown attention 'nope'; valid: flash, broken, sdpa"
    ):
        reg.select("attention", H100, scope="gpu", choice=Choice.parse("nope"))


def test_nothing_runnable_names_every_reason():
    r = Registry()
    r.register(Candidate("attention", "flash", 100, _needs_cc80))
    r.register(Candidate("attention", "broken", 50, _never))
    with pytest.raises(SelectionError, match=r"flash: needs compute.*broken: not built here"):
        r.select("attention", T4)
    with pytest.raises(SelectionError, match="no candidates registered for 'gemm'"):
        r.select("gemm", T4)


def test_duplicate_registration_is_refused(reg):
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Candidate("attention", "sdpa", 1, _always, scope="gpu"))


def test_choice_parse():
    assert Choice.parse("cuda") == Choice("cuda", "require", "config")
    assert Choice.parse(" prefer:XFormers ", "HAL_X") == Choice("xformers", "prefer", "HAL_X")
    with pytest.raises(SelectionError, match="mode 'want' is not one of prefer, require"):
        Choice.parse("want:cuda")


def test_env_choice(monkeypatch):
    monkeypatch.delenv("HAL_BACKEND", raising=False)
    assert env_choice("backend") is None
    monkeypatch.setenv("HAL_BACKEND", "prefer:cuda")
    assert env_choice("backend") == Choice("cuda", "prefer", "HAL_BACKEND")
    assert env_choice("backend", "cpu") == Choice("cpu", "require", "config")  # config wins
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "sdpa")
    assert env_choice("attention").origin == "HAL_ATTENTION_BACKEND"


def test_selection_to_dict():
    sel = Selection("attention", "sdpa", {"flash": ["r"]}, ["naive"])
    assert sel.to_dict() == {
        "family": "attention",
        "chosen": "sdpa",
        "rejected": {"flash": ["r"]},
        "lower_priority": ["naive"],
        "forced": None,
        "note": "",
    }


def test_real_registry_cpu_backend_covers_every_op_family(monkeypatch, cpu_caps):
    for var in ["HAL_BACKEND"] + [f"HAL_{f.upper()}_BACKEND" for f in OP_FAMILIES]:
        monkeypatch.delenv(var, raising=False)
    assert select_backend(cpu_caps).chosen == "cpu"
    ops = select_ops("cpu", cpu_caps)
    assert set(ops) == set(OP_FAMILIES)
    assert {c.name for c in REGISTRY.candidates("backend")} >= {"cpu"}


def test_real_registry_cannot_require_an_unknown_backend(cpu_caps):
    with pytest.raises(SelectionError, match="unknown backend 'tpu'; valid: .*cpu"):
        select_backend(cpu_caps, configured="tpu")
