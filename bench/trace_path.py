"""Where a decode step's time goes on the GPU when its kernels overlap: a kernel's own duration
over-counts once programmatic dependent launch (PDL) starts it early and it waits inside for its
predecessor, so this reads a Chrome trace (torch.profiler's, e.g. from `LLM.start_profile(
trace_dir)` or `python bench/multi_gpu.py --parts scaling --profile-decode N --trace-dir DIR`) and
charges each kernel only the time by which it moved the stream's last finish forward:

    exposed = end - max(start, end of the kernels before it on the stream)
    idle    = max(0, start - end of the kernels before it)   (nothing running on the stream)

so exposed + idle over a stream sum to its span. Grouped by kernel name:

    python bench/trace_path.py TRACE.json [--top 30] [--stream S]

With the traces of every rank of a tensor-parallel group (same host, so one clock) and the name
of the collective kernel, it also splits each collective's time into waiting for the slowest rank
and its own latency: for the i-th call on every rank, the spread of the kernels' ends just before
it, and its end minus the latest of those ends:

    python bench/trace_path.py rank0.json rank1.json --collective _one_shot_kernel
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _before(events: list[dict], name: str) -> list[tuple[float, float]]:
    """(end of the stream's work before it, its end) for every kernel called `name`."""
    out, last = [], None
    for e in events:
        end = float(e["ts"]) + float(e["dur"])
        if e["name"] == name and last is not None:
            out.append((last, end))
        last = end if last is None else max(last, end)
    return out


def collective_wait(per_rank: list[list[dict]], name: str) -> dict:
    """Medians over the i-th calls of `name` on every rank (ms -> us): spread (latest minus
    earliest end of the work before the call) and latency (the call's end on the first rank
    minus the latest of those ends)."""
    calls = [_before(events, name) for events in per_rank]
    n = min(len(c) for c in calls)
    if n == 0:
        raise ValueError(f"{name}: not on every rank's stream")
    spread, latency = [], []
    for i in range(n):
        ready = [c[i][0] for c in calls]
        spread.append(max(ready) - min(ready))
        latency.append(calls[0][i][1] - max(ready))
    return dict(calls=n, spread_us=statistics.median(spread),
                latency_us=statistics.median(latency))  # fmt: skip


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
    p.add_argument("--collective", default=None,
                   help="kernel name of the collective: its wait and latency across the traces "
                        "(one per rank)")  # fmt: skip
    args = p.parse_args()
    for t in args.traces:
        print("\n".join(report(t, args.top, args.stream)))
    if args.collective:
        per_rank = []
        for t in args.traces:
            with open(t) as f:
                per_rank.append(kernel_events(json.load(f), args.stream))
        r = collective_wait(per_rank, args.collective)
        print(f"{args.collective}: {r['calls']} calls on {len(per_rank)} ranks; median spread "
              f"of the ranks' preceding work {r['spread_us']:.2f} us, median latency after the "
              f"last rank is ready {r['latency_us']:.2f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
