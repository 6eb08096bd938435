"""Profiling the engine's steps where they run: `LLM.start_profile()` / `LLM.stop_profile()` start
and stop torch.profiler in the engine's process (world size 1) or on every worker rank, and give
back one `ProfileSummary` per rank: device time per kernel over the profiled span, its wall time,
and the path of a Chrome trace when a trace directory was given (Perfetto or chrome://tracing).

Kernels replayed from CUDA graphs are counted too (CUPTI sees them). A collective's kernel time
includes the time it waits for its peers, so on a rank that runs ahead "busy" overstates its work.

On a GPU rank the summary also counts what the caching allocator did over the span (`allocator`):
device mallocs and frees, and retries (a request that found no free cached block, so the
allocator freed its cache and tried again: that synchronizes the device and stalls the host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# torch.cuda.memory_stats counters reported as deltas over a profile (name in the summary: key).
_ALLOCATOR_COUNTERS = {
    "device_mallocs": "num_device_alloc",
    "device_frees": "num_device_free",
    "retries": "num_alloc_retries",
    "sync_all_streams": "num_sync_all_streams",
}


def _allocator_counters(device: torch.device | None) -> dict[str, int]:
    if device is None or device.type == "cpu":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(key, 0)) for name, key in _ALLOCATOR_COUNTERS.items()}


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
    device kernels' times; on a CPU rank, the aten / mkldnn ops' own CPU times."""

    rank: int
    device: str
    wall_ms: float
    kernels: list[KernelTime] = field(default_factory=list)  # longest first
    trace: str | None = None  # the Chrome trace's path, when a trace directory was given
    allocator: dict[str, int] = field(default_factory=dict)  # GPU ranks: counter deltas

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
        if self.allocator:
            lines.insert(1, "caching allocator: " + ", ".join(
                f"{v} {k.replace('_', ' ')}" for k, v in self.allocator.items()))  # fmt: skip
        for k in self.kernels[:top]:
            lines.append(f"{k.total_ms / steps:9.3f} {k.count / steps:10.1f}  {k.name[:100]}")
        return lines


class RankProfiler:
    """torch.profiler around whatever this process runs between start() and stop()."""

    def __init__(self) -> None:
        self._prof = None
        self._t0 = 0.0
        self._trace_dir: str | None = None
        self._device: torch.device | None = None
        self._counters: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, trace_dir: str | None = None, device: torch.device | str = "cpu") -> None:
        """Start profiling. `device` is the rank's device: device activity and the allocator's
        counters are recorded only for a GPU rank."""
        if self._prof is not None:
            raise RuntimeError("a profile is already running: call stop_profile() first")
        from torch.profiler import ProfilerActivity, profile

        device = torch.device(device)
        self._device = None if device.type == "cpu" else device
        activities = [ProfilerActivity.CPU]
        if self._device is not None:
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(self._device)
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        self._trace_dir = trace_dir
        self._counters = _allocator_counters(self._device)
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def stop(self, rank: int, device: str) -> ProfileSummary:
        if self._prof is None:
            raise RuntimeError("no profile is running: call start_profile() first")
        if self._device is not None:
            torch.cuda.synchronize(self._device)
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        kernels = []
        on_gpu = self._device is not None
        for e in prof.key_averages():
            if on_gpu:  # the kernels' device time
                us = getattr(e, "self_device_time_total", 0) or 0
                keep = not e.key.startswith(_HOST_PREFIXES)
            else:  # a CPU rank's "kernels" are the ops it runs (oneDNN's linear is mkldnn::)
                us = e.self_cpu_time_total
                keep = e.key.startswith(("aten::", "mkldnn::"))
            if us > 0 and keep:
                kernels.append(KernelTime(e.key, us / 1e3, e.count))
        kernels.sort(key=lambda k: -k.total_ms)
        trace = None
        if self._trace_dir is not None:
            trace = str(Path(self._trace_dir) / f"rank{rank}-{int(time.time())}.json")
            prof.export_chrome_trace(trace)
        after = _allocator_counters(self._device)
        allocator = {k: v - self._counters.get(k, 0) for k, v in after.items()}
        return ProfileSummary(rank, device, wall_ms, kernels, trace, allocator)
