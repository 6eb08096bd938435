"""Profiling the engine's steps where they run: `LLM.start_profile()` / `LLM.stop_profile()` start
and stop torch.profiler in the engine's process (world size 1) or on every worker rank, and give
back one `ProfileSummary` per rank: device time per kernel over the profiled span, its wall time,
and the path of a Chrome trace when a trace directory was given (Perfetto or chrome://tracing).

Kernels replayed from CUDA graphs are counted too (CUPTI sees them). A collective's kernel time
includes the time it waits for its peers, so on a rank that runs ahead "busy" overstates its work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Rows of torch.profiler's table that are host-side calls, not device work.
_HOST_PREFIXES = ("aten::", "cuLaunch", "cudaGraph", "cudaLaunch", "cudaMemcpy", "cudaStream")


@dataclass
class KernelTime:
    """One kernel name's device time over the profiled span."""

    name: str
    total_ms: float
    count: int


@dataclass
class ProfileSummary:
    """What one rank ran between start_profile and stop_profile. On a GPU rank `kernels` holds
    device kernels' times; on a CPU rank, the aten ops' own CPU times."""

    rank: int
    device: str
    wall_ms: float
    kernels: list[KernelTime] = field(default_factory=list)  # longest first
    trace: str | None = None  # the Chrome trace's path, when a trace directory was given

    @property
    def busy_ms(self) -> float:
        """Device time of every kernel together (kernels on several streams may overlap)."""
        return sum(k.total_ms for k in self.kernels)

    def table(self, steps: int = 1, top: int = 25) -> list[str]:
        """Printable lines: per-step wall and device time, then the top kernels per step."""
        steps = max(1, steps)
        lines = [
            f"rank {self.rank} ({self.device}): wall {self.wall_ms / steps:.3f} ms, kernels "
            f"{self.busy_ms / steps:.3f} ms per step over {steps} steps",
            f"{'ms/step':>9s} {'calls/step':>10s}  kernel",
        ]
        for k in self.kernels[:top]:
            lines.append(f"{k.total_ms / steps:9.3f} {k.count / steps:10.1f}  {k.name[:100]}")
        return lines


class RankProfiler:
    """torch.profiler around whatever this process runs between start() and stop()."""

    def __init__(self) -> None:
        self._prof = None
        self._t0 = 0.0
        self._trace_dir: str | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, trace_dir: str | None = None) -> None:
        if self._prof is not None:
            raise RuntimeError("a profile is already running: call stop_profile() first")
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        self._trace_dir = trace_dir
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def stop(self, rank: int, device: str) -> ProfileSummary:
        if self._prof is None:
            raise RuntimeError("no profile is running: call start_profile() first")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        kernels = []
        on_gpu = device.startswith("cuda")
        for e in prof.key_averages():
            if on_gpu:  # the kernels' device time
                us = getattr(e, "self_device_time_total", 0) or 0
                keep = not e.key.startswith(_HOST_PREFIXES)
            else:  # a CPU rank's "kernels" are the aten ops it runs
                us = e.self_cpu_time_total
                keep = e.key.startswith("aten::")
            if us > 0 and keep:
                kernels.append(KernelTime(e.key, us / 1e3, e.count))
        kernels.sort(key=lambda k: -k.total_ms)
        trace = None
        if self._trace_dir is not None:
            trace = str(Path(self._trace_dir) / f"rank{rank}-{int(time.time())}.json")
            prof.export_chrome_trace(trace)
        return ProfileSummary(rank, device, wall_ms, kernels, trace)
