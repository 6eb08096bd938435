"""Faults of the multiprocess executor: a killed worker, a stopped one, one that never joins.

Each must end in a DistributedError naming the rank within seconds, with every worker process gone
and the rendezvous port released (counted with psutil).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import struct
import time

import psutil
import pytest

from engine import SamplingParams
from engine.config import CacheConfig
from engine.distributed import DistributedError
from engine.distributed.executor import MultiprocExecutor, bound_send_time, driver_model_info
from engine.distributed.worker import worker_main
from engine.engine_config import EngineConfig, ParallelConfig
from engine.llm_engine import LLMEngine
from hal.capabilities import Capabilities

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def _config(model: str, **parallel) -> EngineConfig:
    return EngineConfig(
        model=model,
        dtype="float32",
        device="cpu",
        cache=CacheConfig(kv_cache_memory_bytes=2 << 20),
        parallel=ParallelConfig(tensor_parallel_size=2, **parallel),
    )


def _children() -> set[int]:
    """Child processes, less multiprocessing's resource tracker (it lives as long as this one)."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def _listening(port: int) -> list:
    return [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
    ]


def _assert_released(executor, before: set[int]) -> None:
    assert all(not psutil.pid_exists(pid) for pid in executor.worker_pids)
    assert _children() <= before
    assert _listening(executor.master_port) == []


def _started(model: str, **parallel) -> tuple[LLMEngine, set[int]]:
    before = _children()
    engine = LLMEngine(_config(model, **parallel))
    executor = engine.executor
    assert _children() - before == set(executor.worker_pids)
    assert _listening(executor.master_port)  # rank 0 hosts the rendezvous store on loopback
    # Every connection between the ranks (store, gloo pairs) is on loopback. (torch's TCPStore
    # server itself listens on the wildcard address; nothing connects to it from outside.)
    conns = [c for pid in executor.worker_pids for c in psutil.Process(pid).net_connections("tcp")]
    peers = {c.raddr.ip for c in conns if c.status == psutil.CONN_ESTABLISHED}
    assert peers and peers <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, peers
    engine.add_request(None, LONG, prompt_token_ids=list(range(3, 20)))
    engine.step()
    engine.step()
    return engine, before


def test_killed_worker_names_rank_and_releases_everything(dist_model):
    engine, before = _started(dist_model)
    executor = engine.executor
    os.kill(executor.worker_pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        for _ in range(50):
            engine.step()
    assert time.monotonic() - start < 10
    _assert_released(executor, before)
    with pytest.raises(DistributedError, match="workers are gone after: worker rank 1"):
        engine.step()


def test_stopped_worker_fails_the_step_after_the_deadline(dist_model):
    engine, before = _started(dist_model, step_timeout_s=3.0)
    executor = engine.executor
    os.kill(executor.worker_pids[1], signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(
        DistributedError, match=r"rank 1 \(pid \d+, no heartbeat .*stopped answering"
    ) as e:
        for _ in range(50):
            engine.step()
    elapsed = time.monotonic() - start
    assert "rank 0" not in str(e.value)  # rank 0 waits in a collective but still beats
    assert 3.0 <= elapsed < 10
    _assert_released(executor, before)


def never_join(spec, conn, heartbeats, parent_pid) -> None:
    """Rank 1 starts but never joins the world; the other ranks run the real worker."""
    if spec.rank == 1:
        time.sleep(600)
    worker_main(spec, conn, heartbeats, parent_pid)


class NeverJoins(MultiprocExecutor):
    worker_target = staticmethod(never_join)


def test_world_that_cannot_form_fails_within_the_deadline(dist_model, cpu_caps: Capabilities):
    config = _config(dist_model, init_timeout_s=3.0)
    model_config, _, path = driver_model_info(dist_model)
    before = _children()
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"forming the world.*ranks \[1\] had not answered"):
        NeverJoins(config, cpu_caps, model_config, path)
    assert time.monotonic() - start < 3.0 + 30
    assert _children() <= before


def test_send_to_a_worker_that_stopped_reading_fails_after_the_deadline():
    """With several steps in flight the driver may send to a stopped rank whose socket buffer is
    full; the send gives up after step_timeout_s (the executor then names the rank)."""
    parent, child = mp.Pipe()
    bound_send_time(parent, 0.5)
    sock = socket.socket(fileno=os.dup(parent.fileno()))
    timeval = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
    sock.close()
    assert struct.unpack("ll", timeval) == (0, 500000)  # else the sends below would block forever
    start = time.monotonic()
    with pytest.raises(BlockingIOError):
        for _ in range(64):  # nobody reads child: the buffer fills, then the send times out
            parent.send_bytes(bytes(1 << 20))
    assert 0.5 <= time.monotonic() - start < 5
    parent.close()
    child.close()
