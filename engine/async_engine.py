"""The asynchronous engine: one background thread steps an `LLMEngine`; asyncio callers add, stream
and abort requests. The thread owns the engine (it is not thread-safe): adds and aborts are queued
and applied between steps, outputs go back to each caller's event loop through its own queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.openmp import release_thread_pool
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed (or was shut down); no request can run any more."""


@dataclass
class StepStats:
    """What one round of the engine loop did, for metrics (times in seconds)."""

    num_running: int  # requests with a sequence running
    num_waiting: int  # requests queued or preempted, none running
    kv_usage: float  # used blocks / usable blocks
    num_used_blocks: int
    num_usable_blocks: int
    prefix_cache_hit_rate: float
    # speculative decoding, since start: drafts scheduled, and of those, accepted
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of the requests added this round
    num_generation_tokens: int = 0  # tokens generated this step, all requests together
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)  # one per request per step
    e2e_latency: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # one per finished sequence


class RequestStream:
    """The outputs of one request, in order; iterate with `async for`. Closing it (or cancelling
    the task that iterates it) before the request finished aborts the request."""

    def __init__(self, request_id: str, engine: AsyncLLMEngine) -> None:
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.accepted: asyncio.Future[None] = self.loop.create_future()
        self.abort_reason: str | None = None  # why the server aborted it (shutdown, disconnect)
        self.finished = False
        self.arrival = time.perf_counter()
        self.num_tokens = 0  # tokens seen so far (engine thread's bookkeeping)
        self.last_token_time: float | None = None
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._engine = engine

    # -- called on the stream's loop ----------------------------------------------------------
    def _accept(self) -> None:
        if not self.accepted.done():
            self.accepted.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """Raise exc from add_request (not yet accepted) or from the iteration (accepted)."""
        if not self.accepted.done():
            self.accepted.set_exception(exc)
            self.accepted.exception()  # mark retrieved: the caller may have gone already
        else:
            self._queue.put_nowait(exc)

    def _put(self, item: RequestOutput) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.abort("client went away")
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self, reason: str = "aborted") -> None:
        """Abort the request if it is still running (no-op once finished)."""
        if not self.finished:
            self.abort_reason = self.abort_reason or reason
            self._engine.abort(self.request_id, reason)


class AsyncLLMEngine:
    """Runs `engine.step()` in a background thread while work exists; safe to call from any
    number of asyncio event loops. `generate()` streams `RequestOutput`s (cumulative text)."""

    def __init__(
        self,
        engine: LLMEngine,
        stats_listener: Callable[[StepStats], None] | None = None,
    ) -> None:
        if engine._driver is not None:
            raise RuntimeError(
                f"this LLMEngine is already driven by an AsyncLLMEngine (loop thread "
                f"{engine._driver.name!r}); share that AsyncLLMEngine, or shut it down first"
            )
        self.engine = engine
        self.stats_listener = stats_listener
        self._cv = threading.Condition()
        # ("add", stream, prompt, params, ids, priority, lora) | ("abort", id, why)
        # | ("abort_all", None, why) | ("call", future, fn, args)
        self._commands: list[tuple] = []
        self._streams: dict[str, RequestStream] = {}  # owned by the engine thread
        self._dead: BaseException | None = None
        self._stopping = False
        self._ids = 0
        self._last_stats: StepStats = self._snapshot()
        # The engine was built (and warmed up) on this thread; its steps run on the loop thread.
        # This thread's OpenMP workers go, so the process keeps one pool (engine/openmp.py).
        release_thread_pool()
        self._thread = threading.Thread(target=self._run, name="hal-engine-loop", daemon=True)
        engine._driver = self._thread  # requests, aborts and steps now only come from the loop
        self._thread.start()

    @classmethod
    def from_config(
        cls, config: EngineConfig, stats_listener: Callable[[StepStats], None] | None = None
    ) -> AsyncLLMEngine:
        return cls(LLMEngine(config), stats_listener)

    # -- read-only views ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def default_sampling(self) -> dict:
        """SamplingParams keywords from the model's generation_config.json (requests' defaults)."""
        return self.engine.default_sampling

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def stats(self) -> StepStats:
        """The state after the latest step (taken by the engine thread, so never torn)."""
        return self._last_stats

    # -- requests -------------------------------------------------------------------------------
    async def add_request(
        self,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Bad input raises the engine's
        ValueError/TypeError here; a dead engine raises EngineDeadError. priority: lower runs
        first (an engine with scheduling policy "priority"). lora_request: a LoRA adapter (an
        engine built with enable_lora)."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError(self._dead_message())
        if request_id is None:
            with self._cv:
                self._ids += 1
                request_id = f"req-{self._ids}"
        stream = RequestStream(request_id, self)
        self._submit(("add", stream, prompt, params, prompt_token_ids, priority, lora_request))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            stream.abort("client went away")
            raise
        return stream

    async def run_on_engine(self, fn: Callable, *args):
        """fn(*args) on the engine's loop thread, between steps (the engine is not
        thread-safe); returns its result or raises its exception here."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError(self._dead_message())
        future = asyncio.get_running_loop().create_future()
        self._submit(("call", future, fn, args))
        return await future

    async def generate(
        self,
        prompt: str | None,
        params: SamplingParams,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (break, cancel) aborts it."""
        stream = await self.add_request(
            prompt, params, prompt_token_ids, request_id, lora_request=lora_request
        )
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort("client went away")

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """Abort a request (thread-safe, returns at once); its stream ends with finish "abort"."""
        self._submit(("abort", request_id, reason))

    def abort_all(self, reason: str) -> None:
        """Abort every request in the engine; each stream's abort_reason says why."""
        self._submit(("abort_all", None, reason))

    def num_unfinished(self) -> int:
        with self._cv:
            return len(self._streams) + sum(1 for c in self._commands if c[0] == "add")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything, stop the loop, join the thread, then stop the engine's workers."""
        self.abort_all("engine shut down")
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine loop did not stop within %.1f s", timeout)
            return
        self.engine._driver = None
        self.engine.shutdown()

    def _submit(self, command: tuple) -> None:
        with self._cv:
            if self._dead is not None and command[0] == "add":
                _call_soon(command[1].loop, command[1]._fail, EngineDeadError(self._dead_message()))
                return
            self._commands.append(command)
            self._cv.notify()

    def _dead_message(self) -> str:
        if self._dead is None:
            return "the engine is shutting down"
        return f"the engine loop failed: {type(self._dead).__name__}: {self._dead}"

    # -- the engine thread ----------------------------------------------------------------------
    def _has_work(self) -> bool:
        # engine.requests still holds aborted requests until a step reports them finished.
        return self.engine.has_unfinished_requests() or bool(self.engine.requests)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._commands and not self._has_work() and not self._stopping:
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                stats = self._snapshot()
                self._apply(commands, stats)
                if self._has_work():
                    outputs = self.engine.step()
                    self._deliver(outputs, stats)
                elif stopping:
                    return
                else:
                    self._deliver([], stats)
        except BaseException as exc:  # noqa: BLE001 - any failure kills the loop; report it
            logger.exception("engine loop failed; failing every pending request")
            self._die(exc)

    def _apply(self, commands: list[tuple], stats: StepStats) -> None:
        for command in commands:
            kind = command[0]
            if kind == "add":
                _, stream, prompt, params, ids, priority, lora = command
                try:
                    self.engine.add_request(
                        prompt, params, ids, stream.request_id, priority, lora_request=lora
                    )
                except Exception as exc:  # noqa: BLE001 - bad input goes back to the caller
                    _call_soon(stream.loop, stream._fail, exc)
                    continue
                self._streams[stream.request_id] = stream
                request = self.engine.requests[stream.request_id].request
                stats.num_prompt_tokens += len(request.prompt_token_ids)
                _call_soon(stream.loop, stream._accept)
            elif kind == "abort":
                _, request_id, reason = command
                stream = self._streams.get(request_id)
                if stream is not None and self.engine.abort_request(request_id):
                    stream.abort_reason = stream.abort_reason or reason
            elif kind == "abort_all":
                for request_id, stream in list(self._streams.items()):
                    if self.engine.abort_request(request_id):
                        stream.abort_reason = stream.abort_reason or command[2]
            elif kind == "call":
                _, future, fn, args = command
                try:
                    result = fn(*args)
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    _call_soon(future.get_loop(), _settle, future, None, exc)
                else:
                    _call_soon(future.get_loop(), _settle, future, result, None)

    def _deliver(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            choices = out.outputs if isinstance(out.outputs, list) else ()  # embeddings: none
            num_tokens = sum(len(c.token_ids) for c in choices)
            new = num_tokens - stream.num_tokens
            if new > 0:
                stats.num_generation_tokens += new
                if stream.last_token_time is None:
                    stats.time_to_first_token.append(now - stream.arrival)
                else:
                    stats.inter_token_latency.append(now - stream.last_token_time)
                stream.num_tokens, stream.last_token_time = num_tokens, now
            if out.finished:
                del self._streams[out.request_id]
                stats.e2e_latency.append(now - stream.arrival)
                if choices:
                    stats.finish_reasons += [c.finish_reason or "abort" for c in choices]
                else:  # an embedding: done, or aborted before its prompt ran
                    stats.finish_reasons.append("stop" if out.outputs.embedding else "abort")
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _dispatch, items)
        after = self._snapshot()
        stats.num_running, stats.num_waiting = after.num_running, after.num_waiting
        stats.kv_usage, stats.prefix_cache_hit_rate = after.kv_usage, after.prefix_cache_hit_rate
        stats.num_used_blocks = after.num_used_blocks
        stats.spec_draft_tokens = after.spec_draft_tokens
        stats.spec_accepted_tokens = after.spec_accepted_tokens
        self._last_stats = stats
        if self.stats_listener is not None:
            try:
                self.stats_listener(stats)
            except Exception:  # a metrics bug must not kill the engine
                logger.exception("stats listener failed")

    def _snapshot(self) -> StepStats:
        sched = self.engine.scheduler
        running = {s.request.request_id for s in sched.running}
        queued = {s.request.request_id for s in sched.waiting + sched.swapped}
        kv = self.engine.kv_stats()
        return StepStats(
            num_running=len(running),
            num_waiting=len(queued - running) + self.engine.num_lora_waiting,
            kv_usage=kv.usage,
            num_used_blocks=kv.num_used_blocks,
            num_usable_blocks=kv.num_usable_blocks,
            prefix_cache_hit_rate=float(kv.prefix_cache_hit_rate),
            spec_draft_tokens=sched.num_draft_tokens,
            spec_accepted_tokens=sched.num_accepted_tokens,
        )

    def _die(self, exc: BaseException) -> None:
        with self._cv:
            self._dead = exc
            commands, self._commands = self._commands, []
        error = EngineDeadError(self._dead_message())
        error.__cause__ = exc
        streams = list(self._streams.values()) + [c[1] for c in commands if c[0] == "add"]
        self._streams.clear()
        for stream in streams:
            _call_soon(stream.loop, stream._fail, error)
        for c in commands:
            if c[0] == "call":
                _call_soon(c[1].get_loop(), _settle, c[1], None, error)


def _dispatch(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream._put(out)


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass
