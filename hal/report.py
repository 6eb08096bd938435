"""Capability reports: what a device can do and which implementation each op family gets, and why.

`build_report` turns `Capabilities` plus the registry's selections into plain data (the schema is
docs/capabilities.md); `render_table`, `render_json` and `render_yaml` print it.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import yaml

from hal.backend import OP_FAMILIES
from hal.capabilities import DTYPE_NAMES, Capabilities
from hal.registry import REGISTRY, Choice, Registry, SelectionError, env_choice

SCHEMA = "hal-info/1"
_UNIT_KIND = {"nvidia": "SMs", "amd": "CUs", "cpu": "cores"}


def _family_order(families: list[str]) -> list[str]:
    known = [f for f in OP_FAMILIES if f in families]
    return known + sorted(f for f in families if f not in OP_FAMILIES)


def _family_report(
    registry: Registry, caps: Capabilities, scope: str, family: str, strict: bool
) -> dict[str, Any]:
    """One op family inside backend `scope`. `strict`: a forced choice that fails raises (the
    chosen backend would fail to load the same way); otherwise the error is recorded."""
    choice = env_choice(family)
    try:
        sel = registry.select(family, caps, scope=scope, choice=choice)
    except SelectionError as exc:
        if strict and choice is not None:
            raise
        sel, error = None, str(exc)
    else:
        error = None
    candidates = []
    for cand in registry.candidates(family, scope):
        if sel is not None:
            reasons = sel.rejected.get(cand.name, [])
            status = (
                "chosen" if cand.name == sel.chosen else "rejected" if reasons else "lower_priority"
            )
        else:
            reasons = cand.check(caps)
            status = "rejected" if reasons else "runnable"
        candidates.append(
            {
                "name": cand.name,
                "priority": cand.priority,
                "description": cand.description,
                "status": status,
                "reasons": list(reasons),
            }
        )
    return {
        "chosen": sel.chosen if sel else None,
        "forced": f"{choice.mode}:{choice.name} ({choice.origin})" if choice else None,
        "note": sel.note if sel else "",
        "error": error,
        "candidates": candidates,
    }


def _device(caps: Capabilities) -> dict[str, Any]:
    return {
        "vendor": caps.vendor,
        "name": caps.device_name,
        "arch": caps.arch,
        "compute_capability": caps.cc_str if caps.compute_capability else None,
        "memory_bytes": caps.memory_bytes,
        "memory_gib": round(caps.memory_bytes / (1 << 30), 1),
        "memory_bandwidth_gbps": caps.memory_bandwidth_gbps,
        "compute_units": caps.compute_units,
        "compute_unit_kind": _UNIT_KIND[caps.vendor],
        "warp_size": caps.warp_size,
        "device_count": caps.device_count,
        "peak_tflops": dict(caps.peak_tflops),
        "cpu_flags": list(caps.cpu_flags),
        "torch_version": str(caps.torch_version),
        "runtime_version": None if caps.runtime_version is None else str(caps.runtime_version),
    }


def build_report(
    caps: Capabilities, backend: str | None = None, registry: Registry = REGISTRY
) -> dict[str, Any]:
    """The report for `caps`. `backend` requires one backend (as `--backend`), else HAL_BACKEND
    applies; a required backend that cannot run raises SelectionError naming the reasons."""
    importlib.import_module("backends")  # backends declare their candidates on import
    choice = Choice.parse(backend, origin="--backend") if backend else env_choice("backend")
    sel = registry.select("backend", caps, choice=choice)
    backends = []
    for cand in registry.candidates("backend"):
        reasons = sel.rejected.get(cand.name, [])
        chosen = cand.name == sel.chosen
        ops = {
            family: _family_report(registry, caps, cand.name, family, strict=chosen)
            for family in _family_order(registry.families(cand.name))
        }
        backends.append(
            {
                "name": cand.name,
                "priority": cand.priority,
                "description": cand.description,
                "status": "chosen" if chosen else "rejected" if reasons else "lower_priority",
                "reasons": list(reasons),
                "ops": ops,
            }
        )
    chosen_ops = next(b["ops"] for b in backends if b["status"] == "chosen")
    return {
        "schema": SCHEMA,
        "source": caps.source,
        "device": _device(caps),
        "dtypes": {name: caps.dtypes.get(name, "none") for name in DTYPE_NAMES},
        "features": {
            "graph_capture": caps.graph_capture,
            "fp8_format": caps.fp8_format,
            "fp8_dtype": str(caps.fp8_dtype).replace("torch.", "") if caps.fp8_dtype else None,
            "fp8_max": caps.fp8_max,
            "collective_backend": caps.collective_backend,
            "max_tensor_parallel_size_one_host": caps.device_count,
        },
        "libraries": {name: lib.to_dict() for name, lib in caps.libraries.items()},
        "backends": {
            "chosen": sel.chosen,
            "forced": f"{choice.mode}:{choice.name} ({choice.origin})" if choice else None,
            "note": sel.note,
            "candidates": backends,
        },
        "ops": chosen_ops,
        "notes": list(caps.notes),
    }


def add_settings(report: dict[str, Any], caps: Capabilities, backend: str | None = None) -> None:
    """Construct the chosen backend on this machine and put its settings (what it decided at
    start-up beyond the op choices: TF32, graphs, the CPU's C kernels, the CUDA fused paths;
    the lines an engine's start-up report prints under the ops) into
    report["backends"]["settings"]; a backend that fails to start leaves {"error": why}. Only
    for a detected machine: a profile has no device to start a backend on."""
    if caps.source != "detected":
        return
    from hal.select import load_backend  # noqa: PLC0415 - imports the backends

    try:
        started = load_backend(caps, configured=backend)
        settings = {key: str(value) for key, value in started.info.settings.items()}
    except Exception as e:  # noqa: BLE001 - the report says why instead of failing
        settings = {"error": f"{type(e).__name__}: {e}"}
    report["backends"]["settings"] = settings


# -- rendering -----------------------------------------------------------------------------------


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def render_yaml(report: dict[str, Any]) -> str:
    # Through JSON first: the YAML then holds exactly the JSON's plain types and values.
    plain = json.loads(json.dumps(report))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _num(x: float) -> str:
    return f"{x:g}"


def _rows(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k.ljust(width)}  {v}".rstrip() for k, v in rows]


def _ops_lines(ops: dict[str, Any], indent: str = "  ") -> list[str]:
    """family | chosen | the others and why each was passed over."""
    rows = []
    for family, fam in ops.items():
        if fam["error"]:
            rows.append((family, "(none)", fam["error"]))
            continue
        passed = []
        for c in fam["candidates"]:
            if c["status"] == "rejected":
                passed.append(f"{c['name']}: {'; '.join(c['reasons'])}")
            elif c["status"] in ("lower_priority", "runnable"):
                passed.append(f"{c['name']}: can run, lower priority")
        why = " | ".join(passed)
        if fam["note"]:
            why = f"[{fam['note']}] {why}".strip()
        rows.append((family, fam["chosen"], why))
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = max((len(r[1]) for r in rows), default=0)
    return [f"{indent}{a.ljust(w0)}  {b.ljust(w1)}  {c}".rstrip() for a, b, c in rows]


def render_table(report: dict[str, Any]) -> str:
    """A readable text report for a terminal."""
    d, feat = report["device"], report["features"]
    src = report["source"]
    title = "this machine" if src == "detected" else src.replace("profile:", "profile ")
    out = [f"hal info: {d['name']} ({title})", "", "Device"]
    cc = f", compute capability {d['compute_capability']}" if d["compute_capability"] else ""
    memory = f"{d['memory_gib']:g} GiB"
    if d["memory_bandwidth_gbps"]:
        memory += f", {_num(d['memory_bandwidth_gbps'])} GB/s"
    rows = [
        ("vendor", d["vendor"]),
        ("arch", d["arch"] + cc),
        ("devices", str(d["device_count"])),
        ("memory", memory),
        ("compute units", f"{d['compute_units']} {d['compute_unit_kind']}"),
        ("warp size", str(d["warp_size"])),
    ]
    if d["peak_tflops"]:
        peaks = ", ".join(f"{k} {_num(v)}" for k, v in d["peak_tflops"].items())
        rows.append(("peak TFLOP/s", peaks + " (dense)"))
    if d["cpu_flags"]:
        rows.append(("cpu flags", " ".join(d["cpu_flags"])))
    rows.append(("torch", d["torch_version"] or "?"))
    rows.append(("runtime", d["runtime_version"] or "n/a"))
    out += _rows(rows)

    out += ["", "Dtypes"]
    groups: dict[str, list[str]] = {"native": [], "emulated": [], "none": []}
    for name, support in report["dtypes"].items():
        groups[support].append(name)
    out += _rows([(k, " ".join(v) or "-") for k, v in groups.items()])

    out += ["", "Features"]
    fp8 = "none natively (FP8 ops are emulated)"
    if feat["fp8_format"]:
        fp8 = f"{feat['fp8_format']} (torch.{feat['fp8_dtype']}, max {_num(feat['fp8_max'])})"
    rccl = " (RCCL)" if d.get("vendor") == "amd" else ""
    if d.get("vendor") == "cpu":
        parallel = "torch.distributed gloo; ranks are processes (mp executor) or Ray workers"
    else:
        parallel = (
            f"torch.distributed {feat['collective_backend']}{rccl}; up to "
            f"{feat['max_tensor_parallel_size_one_host']} rank(s) per host (one per device) with "
            f"the mp executor, more hosts with Ray"
        )
    out += _rows(
        [
            ("graph capture", "yes" if feat["graph_capture"] else "no"),
            ("fp8", fp8),
            ("parallel", parallel),
        ]
    )

    out += ["", "Libraries"]
    out += _rows(
        [
            (name, f"{lib['version'] or '-':<10} {'usable' if lib['usable'] else lib['reason']}")
            for name, lib in report["libraries"].items()
        ]
    )

    b = report["backends"]
    out += ["", f"Backends (chosen: {b['chosen']})"]
    rows = []
    for cand in b["candidates"]:
        status = {
            "chosen": "chosen",
            "lower_priority": "can run, lower priority",
            "rejected": "cannot run: " + "; ".join(cand["reasons"]),
        }[cand["status"]]
        rows.append(((("* " if cand["status"] == "chosen" else "  ") + cand["name"]), status))
    out += _rows(rows)
    if b["note"]:
        out.append(f"  [{b['note']}]")

    out += ["", f"Ops (backend {b['chosen']}: family, chosen, passed over and why)"]
    out += _ops_lines(report["ops"])
    if b.get("settings"):
        out += ["", f"Settings (backend {b['chosen']}, as started on this machine)"]
        out += _rows(list(b["settings"].items()))
    for cand in b["candidates"]:
        if cand["status"] != "chosen" and cand["ops"]:
            out += ["", f"Ops of backend {cand['name']} (not chosen; what it would use here)"]
            out += _ops_lines(cand["ops"])

    if report["notes"]:
        out += ["", "Notes"] + [f"  - {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"
