"""Declarative selection: candidates state what they need; selection returns a choice and reasons.

One mechanism for every platform and every op family. A candidate's `check(caps)` returns the list
of reasons it cannot run here (empty: it can). `select` walks the candidates in priority order and
returns the first that can run, with the reasons every other candidate was passed over. That one
function feeds the start-up log, `hal info` and the conformance report.

A user can prefer or require a candidate through config or an environment variable:
`HAL_BACKEND=cuda` (require), `HAL_BACKEND=prefer:cuda` (fall back with a logged reason),
`HAL_ATTENTION_BACKEND=require:sdpa`. A required candidate that cannot run raises `SelectionError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from hal.capabilities import Capabilities
from hal.errors import HalError

logger = logging.getLogger(__name__)

Check = Callable[[Capabilities], list[str]]


class SelectionError(HalError):
    """A required or forced choice cannot run here, or names no known candidate."""


@dataclass(frozen=True)
class Candidate:
    """One implementation of one op family (or one whole backend, family "backend")."""

    family: str
    name: str
    priority: int  # higher is tried first
    check: Check
    description: str = ""
    scope: str = ""  # the backend that owns it ("" for the backend family itself)
    target: str = ""  # "module:attribute" that implements it, imported only when chosen


@dataclass(frozen=True)
class Choice:
    """A user's wish for one family: `mode` is "prefer" or "require"."""

    name: str
    mode: str = "require"
    origin: str = "config"  # "config" or the environment variable's name

    @classmethod
    def parse(cls, value: str, origin: str = "config") -> Choice:
        value = value.strip()
        mode = "require"
        if ":" in value:
            mode, value = (s.strip() for s in value.split(":", 1))
            if mode not in ("prefer", "require"):
                raise SelectionError(
                    f"{origin}: mode {mode!r} is not one of prefer, require "
                    f"(write 'prefer:NAME', 'require:NAME' or just 'NAME' to require)"
                )
        return cls(name=value.lower(), mode=mode, origin=origin)


@dataclass
class Selection:
    """The result of one selection: what was chosen and why each other candidate was not."""

    family: str
    chosen: str
    rejected: dict[str, list[str]] = field(default_factory=dict)  # name -> reasons
    not_tried: list[str] = field(default_factory=list)  # could run, lower priority than chosen
    choice: Choice | None = None
    note: str = ""  # e.g. "preferred xformers cannot run; fell back"

    def summary(self) -> str:
        parts = [f"{name} {'; '.join(reasons)}" for name, reasons in self.rejected.items()]
        parts += [f"{name} can run, lower priority" for name in self.not_tried]
        why = f" ({'; '.join(parts)})" if parts else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.family}: {self.chosen}{why}{note}"

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "chosen": self.chosen,
            "rejected": {k: list(v) for k, v in self.rejected.items()},
            "lower_priority": list(self.not_tried),
            "forced": None if self.choice is None else f"{self.choice.mode}:{self.choice.name}",
            "note": self.note,
        }


class Registry:
    """Holds candidates by (scope, family). Registration order does not matter; priority does."""

    def __init__(self) -> None:
        self._candidates: dict[tuple[str, str], list[Candidate]] = {}

    def register(self, candidate: Candidate) -> Candidate:
        key = (candidate.scope, candidate.family)
        existing = self._candidates.setdefault(key, [])
        if any(c.name == candidate.name for c in existing):
            raise ValueError(f"candidate {candidate.name!r} already registered for {key}")
        existing.append(candidate)
        existing.sort(key=lambda c: -c.priority)
        return candidate

    def families(self, scope: str) -> list[str]:
        return [f for (s, f) in self._candidates if s == scope]

    def candidates(self, family: str, scope: str = "") -> list[Candidate]:
        return list(self._candidates.get((scope, family), []))

    def select(
        self,
        family: str,
        caps: Capabilities,
        scope: str = "",
        choice: Choice | None = None,
    ) -> Selection:
        cands = self.candidates(family, scope)
        if not cands:
            raise SelectionError(f"no candidates registered for {family!r} in {scope or 'hal'}")
        names = [c.name for c in cands]
        if choice is not None and choice.name not in names:
            raise SelectionError(
                f"{choice.origin}: unknown {family} {choice.name!r}; valid: {', '.join(names)}"
            )
        reasons = {c.name: c.check(caps) for c in cands}
        runnable = [c.name for c in cands if not reasons[c.name]]
        rejected = {n: r for n, r in reasons.items() if r}
        note = ""
        if choice is not None:
            if not reasons[choice.name]:
                chosen = choice.name
                note = f"{choice.mode}d by {choice.origin}"
            elif choice.mode == "require":
                raise SelectionError(
                    f"{family} {choice.name!r} required by {choice.origin} cannot run here: "
                    + "; ".join(reasons[choice.name])
                )
            else:
                note = (
                    f"preferred {choice.name} by {choice.origin} cannot run "
                    f"({'; '.join(reasons[choice.name])}); fell back"
                )
                logger.warning("%s: %s", family, note)
                chosen = runnable[0] if runnable else ""
        else:
            chosen = runnable[0] if runnable else ""
        if not chosen:
            detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
            raise SelectionError(f"no {family} candidate can run here ({detail})")
        not_tried = [n for n in runnable if n != chosen]
        return Selection(family, chosen, rejected, not_tried, choice, note)


def env_choice(family: str, configured: str | None = None) -> Choice | None:
    """The user's wish for `family`: config wins over the environment variable.

    family "backend" reads HAL_BACKEND; any other family reads HAL_<FAMILY>_BACKEND.
    """
    if configured:
        return Choice.parse(configured, origin="config")
    var = "HAL_BACKEND" if family == "backend" else f"HAL_{family.upper()}_BACKEND"
    value = os.environ.get(var, "").strip()
    return Choice.parse(value, origin=var) if value else None


# The process-wide registry; backends add their candidates when `backends` is imported.
REGISTRY = Registry()


def op_candidate(
    scope: str, family: str, name: str, priority: int, check: Check, target: str, description: str
) -> Candidate:
    """A backend's candidate for one op family (positional, for compact candidate tables)."""
    return Candidate(family, name, priority, check, description, scope=scope, target=target)


def register_backend(backend: Candidate, ops: tuple[Candidate, ...]) -> None:
    """Register a backend and its op candidates; idempotent, so a module reload (tests) does not
    trip the duplicate check."""
    if all(c.name != backend.name for c in REGISTRY.candidates("backend")):
        REGISTRY.register(backend)
    for cand in ops:
        if all(c.name != cand.name for c in REGISTRY.candidates(cand.family, cand.scope)):
            REGISTRY.register(cand)
