"""bench/trace_path.py: the per-kernel exposed time and the collective wait read from Chrome
traces (the figures docs/benchmarks.md and docs/distributed.md draw on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import trace_path  # noqa: E402


def kernel(name: str, ts: float, dur: float, stream: int = 7) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_exposed_time_charges_only_what_moves_the_finish() -> None:
    events = [
        kernel("a", 0, 10),
        kernel("b", 5, 10),  # started early (PDL), ends at 15: 5 us exposed, 10 own
        kernel("c", 20, 2),  # 5 us idle before it
        kernel("d", 21, 0.5),  # inside c: nothing exposed
        kernel("x", 0, 100, stream=9),  # another stream, the busiest by kernel time
    ]
    picked = trace_path.kernel_events({"traceEvents": events}, stream=7)
    rows, idle, span = trace_path.critical_path(picked)
    assert rows == {"a": [1, 10.0, 10.0], "b": [1, 10.0, 5.0], "c": [1, 2.0, 2.0],
                    "d": [1, 0.5, 0.0]}  # fmt: skip
    assert idle == 5.0 and span == 22.0
    assert sum(r[2] for r in rows.values()) + idle == span
    busiest = trace_path.kernel_events({"traceEvents": events})
    assert [e["name"] for e in busiest] == ["x"]
    with pytest.raises(ValueError, match="stream 3: not in the trace"):
        trace_path.kernel_events({"traceEvents": events}, stream=3)
    with pytest.raises(ValueError, match="no kernel events"):
        trace_path.kernel_events({"traceEvents": []})


def test_collective_wait_splits_skew_from_latency(tmp_path) -> None:
    # Two calls of "ar" per rank; rank 1's GEMM ends 2 us later before the first, 1 us earlier
    # before the second; rank 0's call ends 1 / 4 us after the later rank was ready.
    r0 = [kernel("gemm", 0, 10), kernel("ar", 8, 5), kernel("gemm", 13, 10), kernel("ar", 20, 7)]
    r1 = [kernel("gemm", 0, 12), kernel("ar", 9, 6), kernel("gemm", 15, 7), kernel("ar", 21, 6)]
    got = trace_path.collective_wait([r0, r1], "ar")
    assert got == {"calls": 2, "spread_us": 1.5, "latency_us": 2.5}
    with pytest.raises(ValueError, match="nope: not on every rank"):
        trace_path.collective_wait([r0, r1], "nope")
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": r0}))
    lines = trace_path.report(str(path), top=5)
    assert "4 kernels, span 0.027 ms" in lines[0]
