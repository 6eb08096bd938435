"""Where a decode step's time goes on the GPU when its kernels overlap: a kernel's own duration
over-counts once programmatic dependent launch (PDL) starts it early and it waits inside for its
predecessor, so this reads a Chrome trace (torch.profiler's, e.g. from `LLM.start_profile(
trace_dir)` or `python bench/multi_gpu.py --parts scaling --profile-decode N --trace-dir DIR`) and
charges each kernel only the time by which it moved the stream's last finish forward:

    exposed = end - max(start, end of the kernels before it on the stream)
    idle    = max(0, start - end of the kernels before it)   (nothing running on the stream)

so exposed + idle over a stream sum to its span. Grouped by kernel name:

    python bench/trace_path.py TRACE.json [--top 30] [--stream S]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def kernel_events(trace: dict, stream: int | None = None) -> list[dict]:
    """The GPU kernels of the busiest stream (or `stream`), in start order."""
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    if not events:
        raise ValueError("no kernel events in this trace: was it recorded with CUDA activities?")
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        by_stream[e.get("args", {}).get("stream", e.get("tid"))].append(e)
    if stream is None:
        stream = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s]))
    elif stream not in by_stream:
        raise ValueError(f"stream {stream}: not in the trace (streams: {sorted(by_stream)})")
    return sorted(by_stream[stream], key=lambda e: e["ts"])


def critical_path(events: list[dict]) -> tuple[dict, float, float]:
    """({name: [count, duration us, exposed us]}, idle us, span us)."""
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    idle, last_end = 0.0, None
    for e in events:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if last_end is None:
            last_end = start
        idle += max(0.0, start - last_end)
        row = rows[e["name"]]
        row[0] += 1
        row[1] += end - start
        row[2] += max(0.0, end - max(start, last_end))
        last_end = max(last_end, end)
    span = last_end - float(events[0]["ts"]) if events else 0.0
    return dict(rows), idle, span


def report(path: str, top: int = 30, stream: int | None = None) -> list[str]:
    with open(path) as f:
        events = kernel_events(json.load(f), stream)
    rows, idle, span = critical_path(events)
    exposed = sum(r[2] for r in rows.values())
    lines = [f"{path}: {len(events)} kernels, span {span / 1e3:.3f} ms = exposed "
             f"{exposed / 1e3:.3f} + idle {idle / 1e3:.3f} ms"]  # fmt: skip
    lines.append(f"  {'exposed ms':>10s} {'own ms':>8s} {'calls':>6s} {'exp/call us':>11s}  kernel")
    for name, (n, dur, exp) in sorted(rows.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"  {exp / 1e3:10.3f} {dur / 1e3:8.3f} {n:6d} {exp / n:11.2f}  {name[:90]}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--stream", type=int, default=None)
    args = p.parse_args()
    for t in args.traces:
        print("\n".join(report(t, args.top, args.stream)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
