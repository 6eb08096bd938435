"""Runs one matrix cell (backend x op x dtype) through a derandomized Hypothesis loop and records
how many cases ran, the worst error, and the shrunk failing case; pytest and the CLI share it."""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass

from hypothesis import HealthCheck, Phase, given, settings

from hal.backend import Backend
from tests.conformance.cases import CaseResult, Dispatch, OpSpec
from tests.conformance.strategies import limits_for
from tests.conformance.targets import expected_dispatch

PROFILES = ("ci", "thorough")
_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register_profiles() -> None:
    """ "ci": the same examples every run (derandomized, no example database), ~25 per cell;
    "thorough": random exploration, ~500 per cell. Both print the reproduce blob on failure."""
    common = dict(deadline=None, print_blob=True, suppress_health_check=_SUPPRESSED)
    settings.register_profile("ci", derandomize=True, database=None, max_examples=25, **common)
    settings.register_profile("thorough", max_examples=500, **common)


register_profiles()


class ConformanceFailure(AssertionError):
    """A case whose result is outside tolerance (or not bitwise equal)."""


@dataclass
class CellResult:
    backend: str
    op: str
    dtype: str
    status: str  # "pass", "fail" or "skip"
    reason: str = ""  # skip reason or failure summary
    cases: int = 0
    max_abs_err: float = 0.0
    worst_ratio: float = 0.0  # worst |err| / allowed over the cell's cases (<= 1 passes)
    impl: str = ""  # backend.chosen(family), plus "(ran X)" when other candidate code ran
    failing_case: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        head = f"{self.backend} {self.op} {self.dtype}: {self.status}"
        lines = [f"{head} ({self.cases} cases, impl {self.impl or '?'}) {self.reason}".rstrip()]
        if self.failing_case:
            lines.append(f"drawn case: {self.failing_case}")
        return "\n".join(lines)


def skip(backend: str, op: OpSpec, dtype: str, reason: str) -> CellResult:
    return CellResult(backend, op.name, dtype, "skip", reason)


def run_cell(
    backend: Backend,
    op: OpSpec,
    dtype: str,
    profile: str = "ci",
    max_examples: int | None = None,
    label: str | None = None,
    shrink: bool = True,
) -> CellResult:
    """Run `op` in `dtype` on `backend` for the profile's examples; never raises for a failure.

    `shrink=False` reports the first failing case as drawn instead of the minimal one (faster)."""
    label = label or backend.name
    if dtype not in op.dtypes:
        raise ValueError(f"dtype: {dtype!r} is not a column of {op.name}; valid: {op.dtypes}")
    missing = op.missing(dtype, backend.caps) or (op.unchecked and op.unchecked(backend))
    if missing:
        return skip(label, op, dtype, missing)
    plan = expected_dispatch(backend, op.family)
    cell = CellResult(label, op.name, dtype, "fail", impl=plan.chosen)
    if plan.problems:
        cell.reason = "dispatch: " + "; ".join(plan.problems)
        return cell
    ran: set[str] = set()
    strategy = op.strategy(dtype, backend.caps, limits_for(profile))
    results: list[CaseResult] = []
    last_failing: list[object] = []
    parent = settings.get_profile(profile)

    phases = parent.phases if shrink else tuple(p for p in parent.phases if p != Phase.shrink)

    examples = max_examples or max(1, round(parent.max_examples * op.examples_scale))

    @settings(parent, max_examples=examples, phases=phases)
    @given(case=strategy)
    def run(case: object) -> None:
        d = Dispatch(backend, plan)
        try:
            res = op.check(d, case)
        except Exception:
            last_failing.append(case)
            raise
        ran.update(d.ran)
        if d.missed:
            detail = f"dispatch: no code of {plan.module} ran in {d.missed}"
            res = res.merge(CaseResult(False, detail=detail))
        results.append(res)
        if not res.ok:
            last_failing.append(case)
            raise ConformanceFailure(res.detail)

    start = time.perf_counter()
    try:
        run()
        cell.status = "pass"
    except Exception as exc:  # a failed case, or the backend raised: the cell fails with why
        if isinstance(exc, ConformanceFailure):
            cell.reason = str(exc)
        else:
            frames = traceback.format_exception_only(type(exc), exc)
            cell.reason = f"raised {''.join(frames).strip()}"
        notes = [n for n in getattr(exc, "__notes__", []) if "reproduce" in n or "@reproduce" in n]
        if notes:
            cell.reason += " | " + " ".join(notes)
        if last_failing:
            cell.failing_case = repr(last_failing[-1])
    cell.seconds = time.perf_counter() - start
    if ran - {plan.chosen}:  # a per-input fallback inside the backend: say what really ran
        cell.impl = f"{plan.chosen} (ran {', '.join(sorted(ran))})"
    cell.cases = len(results)
    cell.max_abs_err = max((r.max_abs_err for r in results), default=0.0)
    cell.worst_ratio = max((r.ratio for r in results), default=0.0)
    if cell.status == "pass" and cell.cases == 0:
        cell.status, cell.reason = "fail", "no cases executed (an empty run is a failure)"
    return cell
