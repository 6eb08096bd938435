"""One OpenMP master per process (engine/openmp.py): the async engine gives back the building
thread's libgomp workers before its loop thread takes the steps, and a released thread still
runs parallel regions (it makes a new pool)."""

from __future__ import annotations

import threading

import torch

from engine import async_engine, openmp
from tests.server.conftest import make_engine


def _parallel_sum() -> torch.Tensor:
    # big enough that torch splits it over its OpenMP threads
    x = torch.arange(1 << 22, dtype=torch.float64)
    return x.sum()


def test_release_then_parallel_regions_still_run() -> None:
    want = _parallel_sum()
    released = openmp.release_thread_pool()
    assert released == (openmp._libgomp() is not None)
    assert torch.equal(_parallel_sum(), want)
    assert openmp.release_thread_pool() == released  # twice in a row: nothing left, still fine
    seen = []
    t = threading.Thread(target=lambda: seen.append(bool(torch.equal(_parallel_sum(), want))))
    t.start()
    t.join()
    assert seen == [True]


def test_the_async_engine_gives_back_the_building_threads_pool(tiny_model, monkeypatch) -> None:
    calls = []
    original = async_engine.release_thread_pool
    monkeypatch.setattr(
        async_engine, "release_thread_pool",
        lambda: calls.append(threading.current_thread().name) or original(),
    )  # fmt: skip
    engine = make_engine(tiny_model)
    try:
        # on the thread that built it, before the loop thread starts
        assert calls == [threading.current_thread().name]
        assert engine._thread.name == "hal-engine-loop"
    finally:
        engine.shutdown(timeout=10)
