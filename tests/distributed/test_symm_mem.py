"""The opt-in symmetric-memory all-reduce (ENGINE_SYMM_MEM_ALLREDUCE=1): off unless asked, refused
with a logged reason off NCCL/CUDA, and TorchCollectives falls back to torch.distributed for the
tensors it declines. Its GPU timing and numerics: `python bench/multi_gpu.py --parts allreduce`."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from engine.distributed import collectives as c
from engine.distributed.executor import free_port


@pytest.fixture
def world_of_one():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv(c.SYMM_MEM_ENV, raising=False)
    assert c._symm_mem(None, "nccl") is None


def test_refused_off_nccl(monkeypatch, caplog):
    monkeypatch.setenv(c.SYMM_MEM_ENV, "1")
    with caplog.at_level(logging.WARNING):
        assert c._symm_mem(None, "gloo") is None
    assert "symmetric memory needs NCCL on CUDA devices" in caplog.text


class Declines:
    """A stand-in one-shot path that takes tensors of at most `limit` elements (doubling them,
    so the test sees which path ran)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        return x * 2 if x.numel() <= self.limit else None


def test_collectives_use_it_and_fall_back(world_of_one):
    symm = Declines(limit=8)
    coll = c.TorchCollectives(None, [0], symm)
    small, big = torch.ones(2, 4), torch.ones(3, 4)
    assert torch.equal(coll.all_reduce(small), small * 2)  # taken by the one-shot path
    assert torch.equal(coll.all_reduce(big), big)  # declined: torch.distributed (world of 1)
    assert symm.calls == 2
