"""Which backends the conformance run covers here, how to build them, and a dispatch check.

Backends come from the registry, never from a list of names: every "backend" candidate whose
check passes on this machine's capabilities runs natively; one that cannot may still run its
Triton kernels on CPU tensors under TRITON_INTERPRET=1 if its package defines the hook

    def interpreter_capabilities() -> Capabilities | None

(module level in the backend's package, e.g. `backends/cuda/__init__.py`, which registration
already imports; it must not import Triton kernels). It returns the capabilities to construct the
backend with on the CPU, or None when the interpreter cannot run it here (e.g. Triton missing).
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType

import torch

from hal.backend import Backend
from hal.capabilities import Capabilities
from hal.registry import REGISTRY, Candidate
from hal.select import load_backend, select_ops

INTERPRETER_HOOK = "interpreter_capabilities"


def detect_capabilities() -> Capabilities:
    """This machine: platforms.detect() when that module exists, else a plain CPU description."""
    try:
        from platforms import detect
    except ImportError:
        return fallback_cpu_capabilities()
    return detect()


def fallback_cpu_capabilities() -> Capabilities:
    """What any CPU PyTorch build can compute (low-precision formats emulated by upcasting)."""
    emulated = ("bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fnuz", "fp8_e5m2", "int4")
    return Capabilities(
        vendor="cpu",
        device_name=platform.processor() or platform.machine() or "cpu",
        arch=platform.machine() or "cpu",
        source="fallback",
        compute_units=os.cpu_count() or 1,
        dtypes={"fp32": "native", "int8": "native", **dict.fromkeys(emulated, "emulated")},
        torch_version=torch.__version__,
    )


@dataclass(frozen=True)
class BackendTarget:
    """One registered backend and how (or why not) it runs here."""

    name: str
    mode: str  # "native", "interpreter" or "unavailable"
    caps: Capabilities | None
    reason: str = ""  # why it is unavailable (the candidate's reasons), else ""

    @property
    def label(self) -> str:
        return self.name if self.mode == "native" else f"{self.name} ({self.mode})"

    def load(self) -> Backend:
        """Construct the backend, requiring it by name (a failure says why)."""
        if self.caps is None:
            raise RuntimeError(f"backend {self.name} cannot run here: {self.reason}")
        if self.mode == "interpreter":
            # Triton reads this when kernels are defined, so it must be set before their import.
            os.environ["TRITON_INTERPRET"] = "1"
            return load_backend(self.caps, device="cpu", configured=f"require:{self.name}")
        device = _default_device(self.name)
        return load_backend(self.caps, device=device, configured=f"require:{self.name}")


def _default_device(name: str) -> str | None:
    """The device a backend class defaults to (the CPU backend: "cpu", even on a GPU machine);
    None leaves it to `load_backend` (the capabilities' device type)."""
    cand = next(c for c in REGISTRY.candidates("backend") if c.name == name)
    module, _, attr = cand.target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    param = inspect.signature(cls.__init__).parameters.get("device")
    default = None if param is None else param.default
    return default if isinstance(default, str) else None


def _package(candidate: Candidate) -> str:
    module = candidate.target.partition(":")[0]
    return module.rpartition(".")[0] or module


def _interpreter_caps(candidate: Candidate) -> tuple[Capabilities | None, str]:
    if not candidate.target:
        return None, "no target to import"
    try:
        package = importlib.import_module(_package(candidate))
    except ImportError as exc:
        return None, f"package does not import ({exc})"
    hook = getattr(package, INTERPRETER_HOOK, None)
    if hook is None:
        return None, f"no {INTERPRETER_HOOK}() hook"
    caps = hook()
    return (caps, "") if caps is not None else (None, f"{INTERPRETER_HOOK}() returned None")


def available_backends(caps: Capabilities | None = None) -> list[BackendTarget]:
    """Every registered backend, in priority order: native, under the interpreter, or why not."""
    importlib.import_module("backends")  # registers candidates
    caps = caps or detect_capabilities()
    targets = []
    for cand in REGISTRY.candidates("backend"):
        reasons = cand.check(caps)
        if not reasons:
            targets.append(BackendTarget(cand.name, "native", caps))
            continue
        icaps, why_not = _interpreter_caps(cand)
        if icaps is not None:
            targets.append(BackendTarget(cand.name, "interpreter", icaps))
        else:
            reason = "; ".join(reasons) + f"; no interpreter mode ({why_not})"
            targets.append(BackendTarget(cand.name, "unavailable", None, reason))
    return targets


class DispatchSpy:
    """Watches, inside the `with` block (sys.setprofile), whether code of `module`'s file ran
    (`hit`) and which of the family's candidate functions were entered (`ran`, their names)."""

    def __init__(self, module: str, functions: dict[CodeType, str] | None = None) -> None:
        self.module = module
        mod = importlib.import_module(module)
        file = getattr(mod, "__file__", None)
        self.filename = str(Path(file).resolve()) if file else ""
        self.functions = functions or {}
        self.hit = False
        self.ran: set[str] = set()

    def _hook(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code.co_filename == self.filename:
            self.hit = True
        name = self.functions.get(code)
        if name is not None:
            self.ran.add(name)

    def __enter__(self) -> DispatchSpy:
        self._previous = sys.getprofile()
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(self._previous)


@dataclass(frozen=True)
class DispatchPlan:
    """What a cell expects to run: the reported implementation, its module, and the code objects
    of every candidate function of the family (to name what actually ran)."""

    chosen: str
    module: str
    functions: dict[CodeType, str]
    problems: tuple[str, ...]


def _function_code(target: str) -> CodeType | None:
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None  # e.g. an optional library this candidate needs is absent
    return getattr(fn, "__code__", None)


def expected_dispatch(backend: Backend, family: str) -> DispatchPlan:
    """Problems are empty when the backend's recorded choice equals a fresh selection for its
    capabilities and the chosen candidate names a target module the spy can watch."""
    problems = []
    chosen = backend.chosen(family)
    expected = select_ops(backend.name, backend.caps).get(family)
    if expected is None:
        return DispatchPlan(chosen, "", {}, (f"backend {backend.name} has no {family} candidate",))
    if chosen != expected.chosen:
        problems.append(f"{family}: backend reports {chosen!r}, selection says {expected.chosen!r}")
    cands = REGISTRY.candidates(family, backend.name)
    cand = next((c for c in cands if c.name == chosen), None)
    module = cand.target.partition(":")[0] if cand is not None else ""
    if not module:
        problems.append(f"{family}: candidate {chosen!r} names no target; its run is unverifiable")
    functions = {}
    for c in cands:
        code = _function_code(c.target) if c.target else None
        if code is not None:
            functions[code] = c.name
    return DispatchPlan(chosen, module, functions, tuple(problems))
