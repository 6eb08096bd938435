"""The GPU memory plan (`engine.memory.plan_gpu`) with the mixed-step graphs' reserve: kept when
the KV cache still holds min_kv_tokens, dropped (and said so) when it would not, or when nothing
would be left; the distributed executor drops them on every rank when one rank's plan did. The
device's memory is faked, so this runs on any machine."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import memory

MiB = 1 << 20
BLOCK_BYTES = 1 * MiB  # 16 tokens a block


@pytest.fixture
def device_with(monkeypatch):
    """A fake device of `total` bytes with `free` bytes free, holding `weights` bytes."""

    def make(total: int, free: int, weights: int) -> None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
        monkeypatch.setattr(memory, "weight_bytes", lambda model: weights)

    return make


def _plan(peak, graphs, mixed, min_tokens):
    return memory.plan_gpu(
        None, torch.device("cpu"), BLOCK_BYTES, 16, 1.0, peak, graph_pool_bytes=graphs,
        mixed_graph_bytes=mixed, min_kv_tokens=min_tokens,
    )  # fmt: skip


def test_mixed_graphs_kept_when_the_kv_cache_still_fits(device_with):
    device_with(total=10_000 * MiB, free=8_000 * MiB, weights=2_000 * MiB)
    plan = _plan(500 * MiB, 1_500 * MiB, 1_000 * MiB, min_tokens=4096)
    # free 8000 - headroom 512 - peak 500 - graphs 1500 = 5488 MiB of KV
    assert plan.num_blocks == 5488 and plan.kv_tokens == 5487 * 16
    assert plan.mixed_graph_bytes == 1_000 * MiB and not plan.mixed_graphs_dropped
    assert plan.graph_pool_bytes == 1_500 * MiB


def test_mixed_graphs_dropped_when_they_would_starve_the_kv_cache(device_with, caplog):
    device_with(total=10_000 * MiB, free=3_000 * MiB, weights=7_000 * MiB)
    with caplog.at_level(logging.WARNING, logger="engine.memory"):
        # with them: 3000 - 512 - 500 - 1500 = 488 blocks = 7,792 tokens < 16,384
        plan = _plan(500 * MiB, 1_500 * MiB, 1_000 * MiB, min_tokens=16384)
    assert plan.mixed_graphs_dropped and plan.mixed_graph_bytes == 0
    assert plan.graph_pool_bytes == 500 * MiB and plan.num_blocks == 1488
    assert "mixed-step graphs off" in caplog.text and "16384" in caplog.text


def test_mixed_graphs_dropped_instead_of_no_room_at_all(device_with):
    device_with(total=10_000 * MiB, free=2_500 * MiB, weights=7_000 * MiB)
    plan = _plan(500 * MiB, 1_500 * MiB, 1_000 * MiB, min_tokens=0)  # with them: < 0 left
    assert plan.mixed_graphs_dropped and plan.num_blocks == 988
    with pytest.raises(MemoryError, match="no room for the KV cache"):  # the decode pool alone
        _plan(500 * MiB, 2_500 * MiB, 1_000 * MiB, min_tokens=0)


def test_no_mixed_reserve_means_nothing_to_drop(device_with):
    device_with(total=10_000 * MiB, free=3_000 * MiB, weights=7_000 * MiB)
    plan = _plan(500 * MiB, 500 * MiB, 0, min_tokens=10**9)
    assert not plan.mixed_graphs_dropped and plan.num_blocks == 1488


def test_executor_drops_mixed_graphs_on_every_rank_when_one_plan_did():
    from engine.distributed.executor import DistributedExecutor

    class Probe(DistributedExecutor):  # only the plan / allocate logic, no workers
        def __init__(self, plans):
            self.plans, self.calls = [], []
            self.parallel = type("P", (), {"step_timeout_s": 1.0})()
            self._plans = plans

        def _call_all(self, method, args, timeout_s, what):
            self.calls.append((method, args))
            return self._plans if method == "plan_memory" else [0] * len(self._plans)

        _start_workers = _stop_workers = _submit_all = _wait_all = worker_pids = None

    def plan(blocks, dropped):
        return memory.MemoryPlan("cuda:0", 0, 0, 0, 0, blocks * BLOCK_BYTES, blocks, 16,
                                 mixed_graphs_dropped=dropped)  # fmt: skip

    cache = type("C", (), {"kv_cache_memory_bytes": None, "num_gpu_blocks": None})()
    for plans, keep in (([plan(100, False), plan(90, False)], True),
                        ([plan(100, False), plan(120, True)], False)):  # fmt: skip
        ex = Probe(plans)
        assert ex.plan_memory(cache, 64, 0.9).num_blocks == min(p.num_blocks for p in plans)
        ex.allocate(90)
        assert ex.calls[-1] == ("allocate", (90, 0, keep))
