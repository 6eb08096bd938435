"""`python -m ci.conformance`: every available backend x op x dtype against the CPU reference.

Prints the matrix (pass / fail / skip with its reason, cases run, max error), writes
conformance.md and conformance.json to --out, and exits non-zero if any cell fails (a cell
that ran zero cases fails too).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # tests/ is not installed; it is read from the checkout
    sys.path.insert(0, str(_ROOT))

from tests.conformance.cases import DTYPE_COLUMNS, OPS, OpSpec  # noqa: E402
from tests.conformance.runner import PROFILES, CellResult, run_cell, skip  # noqa: E402
from tests.conformance.targets import (  # noqa: E402
    BackendTarget,
    available_backends,
    detect_capabilities,
)
from tests.conformance.tolerances import TOLERANCES  # noqa: E402

logger = logging.getLogger("ci.conformance")


def _pick(names: list[str] | None, valid: list[str], what: str) -> list[str]:
    """Exact names, or a prefix before '/' ("fp8_linear" selects both of its variants)."""
    if not names:
        return valid
    picked = []
    for name in names:
        hits = [v for v in valid if v == name or v.split("/")[0] == name]
        if not hits:
            raise SystemExit(f"--{what}: unknown {what} {name!r}; valid: {', '.join(valid)}")
        picked += [h for h in hits if h not in picked]
    return picked


def run_matrix(
    targets: list[BackendTarget],
    ops: list[OpSpec],
    dtypes: list[str] | None,
    profile: str,
    max_examples: int | None,
    on_cell=None,
) -> tuple[list[CellResult], dict[str, dict]]:
    """All cells; also each loaded backend's device, settings and per-op selections.
    on_cell(cells, described), when given, runs after every cell (partial reports)."""
    cells, described = [], {}
    for target in targets:
        backend, load_error = None, ""
        if target.mode != "unavailable":
            try:
                backend = target.load()
                described[target.label] = {
                    "device": str(backend.device),
                    "settings": dict(backend.info.settings),
                    "selections": backend.describe(),
                }
            except Exception as exc:  # a backend that cannot be built fails all its cells
                load_error = f"backend did not load: {type(exc).__name__}: {exc}"
        for op in ops:
            for dtype in op.dtypes:
                if dtypes and dtype not in dtypes:
                    continue
                if backend is None and not load_error:
                    cell = skip(target.label, op, dtype, f"backend unavailable: {target.reason}")
                elif backend is None:
                    cell = CellResult(target.label, op.name, dtype, "fail", load_error)
                else:
                    cell = run_cell(backend, op, dtype, profile, max_examples, target.label)
                logger.info("%s", cell.report().splitlines()[0])
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cells, described)
    return cells, described


def _cell_text(cell: CellResult | None, ratio: bool = False) -> str:
    """ "pass 25 3.1e-03": status, cases run, max |error|; `ratio` adds the worst error as a
    percentage of the tolerance (bitwise cells: 0%)."""
    if cell is None:
        return "-"
    if cell.status == "skip":
        return "skip"
    if cell.status == "fail":
        return f"FAIL {cell.cases}"
    text = f"pass {cell.cases} {cell.max_abs_err:.1e}"
    return f"{text} ({100 * cell.worst_ratio:.0f}%)" if ratio else text


def matrix_rows(cells: list[CellResult], ratio: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (backend, op), one column per dtype that any op has."""
    used = [d for d in DTYPE_COLUMNS if any(c.dtype == d for c in cells)]
    by_key = {(c.backend, c.op, c.dtype): c for c in cells}
    rows, seen = [], []
    for c in cells:
        if (c.backend, c.op) not in seen:
            seen.append((c.backend, c.op))
    for backend, op in seen:
        impls = [c.impl for c in cells if (c.backend, c.op) == (backend, op) and c.impl]
        impl = " / ".join(dict.fromkeys(impls))  # distinct, e.g. a per-dtype fallback
        texts = [_cell_text(by_key.get((backend, op, d)), ratio) for d in used]
        rows.append([backend, op, impl or "-", *texts])
    return ["backend", "op", "impl", *used], rows


def format_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def notes(cells: list[CellResult]) -> list[str]:
    """One line per failure (with its drawn case) and per distinct skip reason."""
    out = []
    for c in cells:
        if c.status == "fail":
            out.append(f"FAIL {c.backend} {c.op} {c.dtype}: {c.reason}")
            if c.failing_case:
                out.append(f"  drawn case: {c.failing_case}")
    reasons: dict[str, list[str]] = {}
    for c in cells:
        if c.status == "skip":
            reasons.setdefault(f"{c.backend}: {c.reason}", []).append(f"{c.op} {c.dtype}")
    for why, where in reasons.items():
        backend = why.split(": ", 1)[0]
        total = sum(1 for c in cells if c.backend == backend)
        out.append(f"skip {why} ({'all cells' if len(where) == total else ', '.join(where)})")
    return out


def format_markdown(cells: list[CellResult], meta: dict) -> str:
    header, rows = matrix_rows(cells, ratio=True)
    md = [
        "# Conformance matrix",
        "",
        f"Generated by `python -m ci.conformance` on {meta['device']} ({meta['arch']}), "
        f"Hypothesis profile `{meta['profile']}`, {meta['seconds']:.0f} s"
        f"{' (PARTIAL: the run had not finished)' if meta.get('partial') else ''}. Each cell: "
        "status, cases run, max |backend - float64 reference|, worst error as a share of the "
        "tolerance.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Tolerances (atol per sqrt(reduction length) x input magnitude, rtol): "
        + ", ".join(f"{d} ({a:.2g}, {r:.2g})" for d, (a, r) in TOLERANCES.items())
        + "; quantize, KV write and copy are bitwise. gguf_linear/<type> rows: random valid "
        "ggml blocks of that type, columns = activation dtype; a backend that declares its "
        "opt-in bf16 int4pack path (settings gguf_int4) is held to 4 bf16 roundings for "
        "Q4_0/Q4_1/Q4_K.",
        "",
    ]
    lines = notes(cells)
    if lines:
        md += ["## Failures and skips", "", *(f"- {line}" for line in lines), ""]
    return "\n".join(md)


def write_report(out: Path, caps, targets, names, described, cells, meta) -> None:
    """conformance.md and conformance.json in `out` (meta["partial"]: the run is still going)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.md").write_text(format_markdown(cells, meta))
    report = {
        **meta,
        "capabilities": caps.to_dict(),
        "backends": [
            {"name": t.name, "mode": t.mode, "reason": t.reason, **described.get(t.label, {})}
            for t in targets
            if t.name in names
        ],
        "tolerances": {d: {"atol": a, "rtol": r} for d, (a, r) in TOLERANCES.items()},
        "cells": [c.to_dict() for c in cells],
    }
    (out / "conformance.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ci.conformance", description=__doc__)
    ap.add_argument("--backend", action="append", help="backend name (repeatable); default all")
    ap.add_argument("--op", action="append", help="op name or family prefix (repeatable)")
    ap.add_argument("--dtype", action="append", help="dtype column (repeatable)")
    ap.add_argument("--profile", choices=PROFILES, default="ci")
    ap.add_argument("--max-examples", type=int, default=None, help="override the profile's count")
    ap.add_argument("--out", type=Path, default=_ROOT / "ci" / "out", help="report folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each cell as it finishes")
    args = ap.parse_args(argv)
    if args.max_examples is not None and args.max_examples < 1:
        ap.error(f"--max-examples: {args.max_examples} must be >= 1")
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    caps = detect_capabilities()
    targets = available_backends(caps)
    names = _pick(args.backend, [t.name for t in targets], "backend")
    op_names = _pick(args.op, [op.name for op in OPS], "op")
    dtypes = _pick(args.dtype, list(DTYPE_COLUMNS), "dtype") if args.dtype else None
    start = time.perf_counter()

    def meta_now(partial: bool) -> dict:
        return {
            "device": caps.device_name,
            "arch": caps.arch,
            "profile": args.profile,
            "max_examples": args.max_examples,
            "seconds": time.perf_counter() - start,
            "partial": partial,
        }

    def write(cells, described, meta) -> None:
        write_report(args.out, caps, targets, names, described, cells, meta)

    # A report after every cell, marked partial, so a run cut short (a time limit) keeps its cells.
    cells, described = run_matrix(
        [t for t in targets if t.name in names],
        [op for op in OPS if op.name in op_names],
        dtypes,
        args.profile,
        args.max_examples,
        on_cell=lambda c, d: write(c, d, meta_now(partial=True)),
    )
    meta = meta_now(partial=False)
    header, rows = matrix_rows(cells)
    print(format_text(header, rows))
    for label, info in described.items():
        settings = ", ".join(f"{k} {v}" for k, v in info["settings"].items())
        print(f"{label}: device {info['device']}" + (f"; {settings}" if settings else ""))
    for line in notes(cells):
        print(line)
    failed = [c for c in cells if c.status == "fail"]
    passed = [c for c in cells if c.status == "pass"]
    print(
        f"{len(passed)} passed, {len(failed)} failed, {len(cells) - len(passed) - len(failed)} "
        f"skipped in {meta['seconds']:.0f} s ({args.profile} profile)"
    )
    write(cells, described, meta)
    print(f"wrote {args.out / 'conformance.md'} and {args.out / 'conformance.json'}")
    if not passed:
        print("no cell passed: an empty run is a failure", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
