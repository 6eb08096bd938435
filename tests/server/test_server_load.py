"""Load: 64 concurrent streaming clients on the real server; every request completes with exactly
its max_tokens, the server stays up, and the KV pool is whole again afterwards (no leaked block).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.server.conftest import MODEL_NAME, make_engine, start_server

NUM_CLIENTS = 64


async def _one(client, i: int, rng: random.Random) -> tuple[int, int, int, str | None]:
    """Stream one request; returns (wanted tokens, tokens seen, usage tokens, finish reason)."""
    max_tokens = rng.randint(4, 24)
    common = dict(
        model=MODEL_NAME,
        max_tokens=max_tokens,
        temperature=1.0,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    seen, used, finish = 0, -1, None
    if i % 2:
        prompt = " ".join(rng.choice(["the", "quick", "fox", "lazy", "dog"]) for _ in range(i % 9))
        stream = await client.completions.create(prompt=prompt + " jumps", logprobs=0, **common)
        async for chunk in stream:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            for c in chunk.choices:
                seen += len(c.logprobs.tokens)
                finish = c.finish_reason or finish
    else:
        messages = [{"role": "user", "content": f"Question {i}: what is the capital of France?"}]
        stream = await client.chat.completions.create(
            messages=messages, logprobs=True, top_logprobs=1, **common
        )
        async for chunk in stream:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            for c in chunk.choices:
                seen += len(c.logprobs.content) if c.logprobs else 0
                finish = c.finish_reason or finish
    return max_tokens, seen, used, finish


async def _run_clients(server, n: int) -> list[tuple[int, int, int, str | None]]:
    rng = random.Random(1234)
    async with server.async_client() as client:
        return await asyncio.wait_for(
            asyncio.gather(*(_one(client, i, rng) for i in range(n))), timeout=60
        )


def test_64_concurrent_streaming_clients(server):
    server.wait_idle()
    before = server.engine.stats()
    results = asyncio.run(_run_clients(server, NUM_CLIENTS))
    assert len(results) == NUM_CLIENTS
    for i, (wanted, seen, used, finish) in enumerate(results):
        assert (seen, used, finish) == (wanted, wanted, "length"), f"client {i}"
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/v1/models").status_code == 200
    server.wait_idle()
    after = server.engine.stats()
    assert after.num_used_blocks == 0, "KV blocks leaked"
    assert after.num_usable_blocks == before.num_usable_blocks
    pool = server.engine.engine.scheduler.kv.gpu_pool  # the engine is idle: safe to inspect
    pool.check()
    assert pool.num_free_blocks == pool.num_usable_blocks


async def _abandon(client, i: int) -> None:
    """Read two chunks of a long stream, then go away."""
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=f"abandon {i}", max_tokens=60, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    got = 0
    async for _ in stream:
        got += 1
        if got == 2:
            break
    await stream.close()


def test_concurrent_clients_with_half_leaving_early(server):
    server.wait_idle()

    async def run():
        rng = random.Random(7)
        async with server.async_client() as client:
            return await asyncio.wait_for(
                asyncio.gather(
                    *(_one(client, i, rng) for i in range(16)),
                    *(_abandon(client, i) for i in range(16)),
                ),
                timeout=60,
            )

    results = asyncio.run(run())
    for wanted, seen, used, finish in results[:16]:
        assert (seen, used, finish) == (wanted, wanted, "length")
    server.wait_idle()
    assert server.engine.stats().num_used_blocks == 0, "KV blocks leaked"


@pytest.fixture(scope="module")
def async_server(tiny_model):
    """A server whose engine schedules each decode step ahead (the GPU default) on the CPU."""
    handle = start_server(make_engine(tiny_model, async_scheduling=True))
    yield handle
    handle.stop()


def test_async_scheduling_server_streams_and_aborts(async_server):
    """Steps launched ahead of the previous step's tokens: every stream gets all its tokens, the
    clients that leave early are aborted (some while a step runs ahead), nothing leaks."""
    test_concurrent_clients_with_half_leaving_early(async_server)
    engine = async_server.engine.engine  # idle: safe to inspect
    assert engine.async_scheduling and engine.num_steps_ahead > 0
    assert not engine.scheduler.in_flight and engine._ahead is None
    engine.scheduler.kv.gpu_pool.check()
