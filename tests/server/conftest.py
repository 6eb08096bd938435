"""Fixtures for the server tests: a tiny random Llama folder, and the real uvicorn server on
127.0.0.1 (a free port) in a background thread, with bounded timeouts everywhere.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from engine.async_engine import AsyncLLMEngine  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.engine_config import EngineConfig  # noqa: E402
from engine.server.app import build_app  # noqa: E402
from engine.server.cli import make_server  # noqa: E402
from tests.engine.models_fixtures import build_model  # noqa: E402

API_KEY = "test-key-123"
MODEL_NAME = "tiny-llama"
TIMEOUT_S = 30.0  # any single HTTP call in the tests
MAX_TOKENS_LIMIT = 64


@dataclass
class ServerHandle:
    base_url: str  # http://127.0.0.1:PORT
    app: object
    engine: AsyncLLMEngine
    server: uvicorn.Server
    thread: threading.Thread
    api_key: str | None

    def client(self, api_key: str | None = None, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url + "/v1",
            api_key=api_key or self.api_key or "unused",
            timeout=TIMEOUT_S,
            max_retries=0,
            **kw,
        )

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url + "/v1",
            api_key=self.api_key or "unused",
            timeout=TIMEOUT_S,
            max_retries=0,
            **kw,
        )

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=TIMEOUT_S)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has no request left (aborts are applied between steps)."""
        deadline = time.monotonic() + timeout
        while self.engine.num_unfinished() or self.engine.stats().num_used_blocks:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"engine still busy after {timeout} s: {self.engine.num_unfinished()} "
                    f"requests, {self.engine.stats().num_used_blocks} blocks in use"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.engine.shutdown(timeout=10)


def make_engine(folder: Path, **kw) -> AsyncLLMEngine:
    cache = CacheConfig(kv_cache_memory_bytes=kw.pop("kv_cache_memory_bytes", 4 << 20))
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu", cache=cache, **kw)
    return AsyncLLMEngine.from_config(config)


def start_server(
    engine: AsyncLLMEngine, api_key: str | None = API_KEY, drain_timeout: float = 1.0, **app_kw
) -> ServerHandle:
    """`hal serve`'s uvicorn server on 127.0.0.1 with a port the OS picked, in a daemon thread.
    `handle.server.handle_exit(signal.SIGTERM, None)` starts the same drain a SIGTERM does."""
    app_kw.setdefault("max_tokens_limit", MAX_TOKENS_LIMIT)
    app = build_app(engine, MODEL_NAME, api_key=api_key, **app_kw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off", access_log=False
    )
    server = make_server(config, app.state.server, drain_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start within 20 s")
        time.sleep(0.02)
    return ServerHandle(f"http://127.0.0.1:{port}", app, engine, server, thread, api_key)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama_server")
    build_model("llama", folder)
    return folder


@pytest.fixture(scope="session")
def server(tiny_model):
    handle = start_server(make_engine(tiny_model))
    yield handle
    handle.stop()
