"""Pipeline parallelism with two batches in flight (PP=2, worker processes, gloo): tokens equal the
in-process run, an in-flight abort frees its blocks once its batch returns (no KV block leaks),
and a worker that stops answering still fails the step within the deadline."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from engine import SamplingParams
from engine.config import CacheConfig, SchedulerConfig
from engine.distributed import DistributedError
from engine.engine_config import EngineConfig, ParallelConfig
from engine.llm_engine import LLMEngine
from tests.distributed.test_faults import _assert_released, _children

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def _engine(model: str, pp: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=model,
            dtype="float32",
            device="cpu",
            cache=CacheConfig(kv_cache_memory_bytes=2 << 20),
            scheduler=SchedulerConfig(max_num_batched_tokens=32),
            # Bounded deadlines: a world that cannot form (or a stuck step) fails, never stalls CI.
            parallel=ParallelConfig(
                pipeline_parallel_size=pp, step_timeout_s=3.0, init_timeout_s=60.0
            ),
        )
    )


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(3, 20))] for _ in range(6)]


def _run(engine: LLMEngine, abort_in_flight: bool = False) -> tuple[dict, str, dict]:
    """Generate _prompts(); optionally abort, after the first step, a request whose batch is
    still in flight. Returns tokens and outputs by request id, and the aborted id."""
    ids = [engine.add_request(None, PARAMS, prompt_token_ids=p) for p in _prompts()]
    done: dict = {}  # request id -> CompletionOutput
    aborted = ""
    for _ in range(500):  # a livelocked scheduler fails here instead of hanging
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        if abort_in_flight and not aborted:
            ((flying, *_),) = engine._in_flight  # the second batch: submitted, not back yet
            seq = flying.scheduled[0].seq
            aborted = seq.request.request_id
            assert engine.abort_request(aborted)
            assert seq.seq_id in engine.scheduler.kv.block_tables  # held until the batch is back
    assert sorted(done) == sorted(ids)
    return {rid: out.token_ids for rid, out in done.items()}, aborted, done


@pytest.fixture(scope="module")
def reference(dist_model):
    engine = _engine(dist_model, 1)
    assert engine.runner is not None and engine.pipeline_depth == 1
    tokens, _, _ = _run(engine)
    assert engine.executor.max_in_flight == 0  # the in-process path calls execute(), not submit()
    return tokens


def test_two_batches_in_flight_same_tokens_no_leak_and_stopped_worker(reference, dist_model):
    before = _children()
    engine = _engine(dist_model, 2)
    executor = engine.executor
    try:
        assert engine.pipeline_depth == 2 and engine.scheduler.max_batches_in_flight == 2
        tokens, aborted, outputs = _run(engine, abort_in_flight=True)
        # Stage 0 ran batch k+1 while stage 1 ran batch k: the driver had two outstanding.
        assert executor.max_in_flight == 2 and executor.num_in_flight == 0
        assert outputs[aborted].finish_reason == "abort"
        for rid, want in reference.items():
            if rid != aborted:
                assert tokens[rid] == want, rid
        # Every block is back in the pool; nothing is left in flight.
        assert engine.kv_stats().num_used_blocks == 0
        assert not engine.scheduler.in_flight and not engine.scheduler.kv.block_tables

        # A stopped stage-1 worker (the output rank) fails the step after the deadline.
        for i in range(4):
            engine.add_request(None, LONG, prompt_token_ids=list(range(3 + i, 20)))
        engine.step()
        engine.step()
        assert len(engine._in_flight) == 1  # the next step submits one more, then waits
        os.kill(executor.worker_pids[1], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(
            DistributedError, match=r"rank 1 \(pid \d+, no heartbeat .*stopped answering"
        ) as e:
            for _ in range(50):
                engine.step()
        elapsed = time.monotonic() - start
        assert "rank 0" not in str(e.value)  # stage 0 waits on stage 1 but still beats
        assert 3.0 <= elapsed < 10
        _assert_released(executor, before)
    finally:
        engine.shutdown()
