"""Executors: run the model for the engine. In-process at world size 1 (today's ModelRunner), else
one worker per device, in spawned processes ("mp", one host) or Ray actors ("ray", many hosts).

The scheduler and KV-cache manager stay on the driver; each step goes to every rank. In-process the
logits come back and the driver samples them; with workers the output rank (last stage, tp rank 0)
samples on its device and only the tokens come back (`samples_remotely`). Steps can be submitted
without waiting (`submit`) and collected later in submission order (`collect`), so with pipeline
parallelism several batches are in flight at once. A dead, stopped or never-joining worker fails
the call with a DistributedError naming the rank, after which every worker is gone.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import socket
import struct
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

import torch

from engine.distributed import DistributedError
from engine.distributed.collectives import WorldLayout, collective_backend
from engine.distributed.worker import (
    HEARTBEAT_INTERVAL_S,
    StepInput,
    StepSampling,
    WorkerInfo,
    WorkerSpec,
    worker_main,
)
from engine.engine_config import DEFAULT_CPU_KV_BYTES, EngineConfig, ParallelConfig
from engine.graphs import configured_mixed_sizes, configured_sizes
from engine.memory import MemoryPlan
from engine.model_config import ModelConfig
from engine.pooling import engine_pooling
from engine.profiling import ProfileSummary, RankProfiler
from engine.runner import ModelRunner
from engine.sampler import PromptRows, SamplerOutput, ScoredStep
from hal.capabilities import Capabilities

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
HEARTBEAT_STALE_S = 10 * HEARTBEAT_INTERVAL_S
# How long a rank's error waits for a peer's exit to show (the likelier root cause).
PEER_DEATH_GRACE_S = 0.5
# Held steps whose rows are all plain greedy take their tokens from the LM head's sharded argmax
# on every rank at TP > 1 (`ParallelLMHead.greedy`: one all_gather of (value, id) pairs instead of
# gathering the logits to rank 0 and broadcasting its tokens) with HAL_TP_GREEDY_ARGMAX=1. Off by
# default: 2 x H200, TP=2 batch-1 decode alternated over two calls (twenty-third session), 2.58-2.66
# ms on, 2.57-2.60 off; its greedy tokens matched TP=1's (bench/multi_gpu.py correctness).
GREEDY_ARGMAX = os.environ.get("HAL_TP_GREEDY_ARGMAX", "0") == "1"


class PickledOnce:
    """A call argument pickled once for every rank: each send copies these bytes instead of
    pickling the object again, and the receiving rank unpickles the object itself (not this
    wrapper), so the worker's code never sees it. A 256-sequence step is ~46 KB and ~0.6 ms to
    pickle on a 2-core CPU; the driver used to pay that once per rank."""

    __slots__ = ("data",)

    def __init__(self, obj: Any) -> None:
        self.data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self):
        return pickle.loads, (self.data,)


@dataclass
class StepHandle:
    """A submitted step: its number, the executor's receipt for it and (in-process) its result."""

    step: int
    token: Any = None  # Ray object refs; None where replies come back in order on pipes
    logits: torch.Tensor | None = None  # UniprocExecutor: computed at submit


class Executor(ABC):
    """Runs the model: per-block KV bytes, KV allocation, one step -> its result on the driver.

    `execute(out, sampling)` runs a step and waits for it; `submit(out, sampling)` starts one and
    returns a handle that `collect(handle)` later turns into its result. Handles are collected in
    submission order and every rank runs steps in that order, so step k+1 may start on stage 0
    while stage 1 still runs step k. num_in_flight / max_in_flight count submitted, uncollected
    steps.

    The result is logits [num_sampling_seqs, vocab] in schedule order (in-process: the model's
    dtype; from workers: fp32) where samples_remotely is False (the driver samples; `sampling`
    is ignored), and the SamplerOutput of `sampling`'s rows where it is True (the engine must
    pass `sampling` for every step that samples); None when nothing samples. A step submitted
    with `prompt` rows (prompt logprobs) comes back as a ScoredStep holding that result.
    """

    num_in_flight: int = 0
    max_in_flight: int = 0
    samples_remotely: bool = False
    # Whether submit takes hold / feed_rows (asynchronous scheduling across processes).
    supports_hold: bool = False
    # The engine's engine.lora.LoRAManager when it serves LoRA adapters: a distributed step
    # carries its slots and loads (an in-process runner asks the manager itself).
    lora_manager = None

    @abstractmethod
    def block_bytes(self) -> int:
        """Bytes of one KV block on the rank that needs the most (all layers it holds, K and V)."""

    @abstractmethod
    def allocate(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        """Allocate num_blocks KV blocks (and swap blocks) on every rank."""

    @abstractmethod
    def submit(
        self, out, sampling: StepSampling | None = None, prompt: PromptRows | None = None
    ) -> StepHandle:
        """Start running a SchedulerOutput (and sampling its logits) without waiting for it."""

    @abstractmethod
    def collect(self, handle: StepHandle) -> torch.Tensor | SamplerOutput | None:
        """Wait for a submitted step (the oldest one not yet collected): logits or a
        SamplerOutput (see the class docstring), or None when nothing samples."""

    def execute(
        self, out, sampling: StepSampling | None = None, prompt: PromptRows | None = None
    ) -> torch.Tensor | SamplerOutput | ScoredStep | None:
        """Run a SchedulerOutput and wait: logits or a SamplerOutput, None when nothing samples
        (a ScoredStep around it with `prompt`)."""
        return self.collect(self.submit(out, sampling, prompt=prompt))

    def _count_submitted(self) -> None:
        self.num_in_flight += 1
        if self.num_in_flight > self.max_in_flight:
            self.max_in_flight = self.num_in_flight
            logger.debug("%d steps in flight (the most so far)", self.num_in_flight)

    def _count_collected(self) -> None:
        self.num_in_flight -= 1

    @abstractmethod
    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch.profiler where the steps run (every rank); no step may be in flight."""

    @abstractmethod
    def stop_profile(self) -> list[ProfileSummary]:
        """Stop it: one ProfileSummary per rank, in rank order."""

    def shutdown(self) -> None:  # noqa: B027 (nothing to release in-process)
        """Release workers and their ports; idempotent."""

    def describe(self) -> list[str]:
        """Start-up report lines: the parallel layout."""
        return []


class UniprocExecutor(Executor):
    """World size 1: today's ModelRunner in the engine's process, no collectives, no copies."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.profiler = RankProfiler()

    def start_profile(self, trace_dir: str | None = None) -> None:
        self.profiler.start(trace_dir, self.runner.device)

    def stop_profile(self) -> list[ProfileSummary]:
        return [self.profiler.stop(0, str(self.runner.device))]

    def block_bytes(self) -> int:
        return self.runner.block_bytes()

    def allocate(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.runner.allocate(num_blocks, num_cpu_blocks)

    def execute(self, out, sampling: StepSampling | None = None, prompt: PromptRows | None = None):
        if prompt is None:
            return self.runner.execute(out)
        return ScoredStep(*self.runner.execute(out, None, prompt))

    def submit(
        self, out, sampling: StepSampling | None = None, prompt: PromptRows | None = None
    ) -> StepHandle:
        """Runs the step at once (in-process there is nothing to overlap with); the logits come
        back and the driver samples them, so `sampling` is not read."""
        handle = StepHandle(0, logits=self.execute(out, sampling, prompt))
        self._count_submitted()
        return handle

    def collect(self, handle: StepHandle) -> torch.Tensor | None:
        self._count_collected()
        return handle.logits


def _as_result(result):
    """The output rank's answer as the engine takes it: numpy logits become a tensor."""
    if result is None or isinstance(result, SamplerOutput):
        return result
    return torch.as_tensor(result)


# -- checks before any worker starts ---------------------------------------------------------------
def check_parallel_config(
    parallel: ParallelConfig,
    model_config: ModelConfig,
    caps: Capabilities,
    model_name: str,
    device: str = "auto",
) -> None:
    """Every layout constraint: a one-line ValueError naming the value, the rule and the way out.
    device "cpu": the ranks run on this host's CPUs whatever GPUs it has."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    m = model_config

    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    if m.num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide num_attention_heads={m.num_heads} of "
            f"{model_name}; use one of {divisors(m.num_heads)}"
        )
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} and num_key_value_heads={m.num_kv_heads} of {model_name} "
            f"must divide one another (split or replicate KV heads); use one of "
            f"{divisors(m.num_heads)} that does"
        )
    if m.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide intermediate_size={m.intermediate_size} "
            f"of {model_name}; use one of {divisors(m.intermediate_size)}"
        )
    if pp > m.num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp} exceeds the {m.num_layers} layers of {model_name} "
            f"(each stage needs at least one); use at most {m.num_layers}"
        )
    world = parallel.world_size
    on_gpus = caps.torch_device_type != "cpu" and device != "cpu"
    if parallel.executor_backend == "mp" and on_gpus:
        if world > caps.device_count:
            raise ValueError(
                f"tensor_parallel_size x pipeline_parallel_size = {world} ranks, but this host "
                f"has {caps.device_count} GPU(s) and distributed_executor_backend='mp' runs one "
                f"rank per GPU on one host; use at most {caps.device_count} ranks, or "
                f"distributed_executor_backend='ray' on a cluster"
            )


def driver_model_info(model: str | None) -> tuple[ModelConfig, Any, str]:
    """The model's config and tokenizer for the driver, without reading any weights."""
    from engine.loader.default_model import default_model_path
    from engine.loader.gguf import GGUFSource
    from engine.loader.hf import read_hf_config
    from engine.parallel import WeightLoadError
    from engine.tokenizer import load_tokenizer

    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise WeightLoadError(f"{path}: no such model folder or GGUF file")
    chat_template = None
    if path.is_file():
        gguf = GGUFSource(path)
        config, chat_template = gguf.config(), gguf.chat_template
    else:
        config = read_hf_config(path)
    return config, load_tokenizer(path, chat_template), str(path)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackendSummary:
    """The workers' backend as the driver reports it (the driver loads no backend itself)."""

    def __init__(self, info: WorkerInfo) -> None:
        self.name = info.backend_name
        self.device = torch.device(info.device)
        self._lines = info.backend_lines

    def describe(self) -> list[str]:
        return list(self._lines)


# -- the distributed executors ---------------------------------------------------------------------
class DistributedExecutor(Executor):
    """A world of tp x pp ranks; subclasses start them and carry calls to them."""

    kind = ""
    samples_remotely = True

    def __init__(
        self, config: EngineConfig, caps: Capabilities, model_config: ModelConfig, model_path: str
    ) -> None:
        par = config.parallel
        self.parallel = par
        self.layout = WorldLayout(par.tensor_parallel_size, par.pipeline_parallel_size)
        self.model_config = model_config
        self.collective_backend = collective_backend(caps, config.device)
        self.device_type = "cpu" if config.device == "cpu" else caps.torch_device_type
        self.failure: str | None = None
        self.infos: list[WorkerInfo] = []
        self.plans: list[MemoryPlan] = []
        self.mixed_graphs = True  # False once a rank's memory plan had no room for them
        self.num_steps = 0
        self.num_greedy_steps = 0  # steps whose tokens came from the sharded argmax (GREEDY_ARGMAX)
        self._pending: deque[StepHandle] = deque()  # submitted steps, oldest first
        world = self.layout.world_size
        threads = max(1, (os.cpu_count() or 1) // world)
        self.specs = [
            WorkerSpec(
                rank=r,
                layout=self.layout,
                model=model_path,
                dtype=config.dtype,
                device=self._device_of(r),
                backend=config.backend,
                max_model_len=config.max_model_len,
                block_size=config.cache.block_size,
                collective_backend=self.collective_backend,
                init_timeout_s=par.init_timeout_s,
                num_threads=threads if self.device_type == "cpu" else None,
                log_level=logging.getLogger().getEffectiveLevel(),
                load_format=config.load_format,
                seed=config.seed,
                quantization=config.quantization,
                graph_sizes=configured_sizes(config),
                mixed_graph_sizes=configured_mixed_sizes(config),
                max_num_seqs=config.scheduler.max_num_seqs,
                eos_token_ids=tuple(model_config.eos_token_ids),
                kv_cache_dtype=config.cache.cache_dtype,
                pooling=pooling.pooling_type if (pooling := engine_pooling(config)) else None,
                lora=(config.max_loras, config.max_lora_rank) if config.enable_lora else None,
            )
            for r in range(world)
        ]
        logger.info(
            "starting %d workers (%s executor, %s collectives): tp %d x pp %d",
            world,
            self.kind,
            self.collective_backend,
            self.layout.tp_size,
            self.layout.pp_size,
        )
        start = time.perf_counter()
        try:
            addr, port = self._start_workers()
            self.master_addr, self.master_port = addr, port
            # Forming the world is bounded by init_timeout_s inside each rank; the driver's
            # deadline adds a margin for process start-up (importing torch).
            self._call_all(
                "init_world", (addr, port), par.init_timeout_s + 30.0, "forming the world"
            )
            self.infos = self._call_all("load", (), par.init_timeout_s, "loading the model")
        except BaseException:
            self.shutdown()
            raise
        self.backend = BackendSummary(self.infos[self.layout.output_rank])
        self.dtype = self.infos[0].dtype
        self.kv_dtype = self.infos[0].kv_dtype
        logger.info("%d workers ready in %.1fs", world, time.perf_counter() - start)

    def _device_of(self, rank: int) -> str:
        return "cpu" if self.device_type == "cpu" else f"cuda:{rank}"

    # -- subclass hooks ----------------------------------------------------------------------
    @abstractmethod
    def _start_workers(self) -> tuple[str, int]:
        """Start one worker per rank; return the rendezvous (address, port) of rank 0."""

    @abstractmethod
    def _submit_all(self, method: str, args: list[tuple], what: str) -> Any:
        """Send Worker.method(*args[rank]) to every rank without waiting; returns a receipt."""

    @abstractmethod
    def _wait_all(self, receipt: Any, timeout_s: float, what: str) -> list:
        """Wait for the call of `receipt` (the oldest not yet waited for) on every rank; results
        in rank order."""

    def _call_all(self, method: str, args: tuple, timeout_s: float, what: str) -> list:
        """Call Worker.method(*args) on every rank at once and wait; results in rank order."""
        if self._pending:
            raise RuntimeError(
                f"{what}: {len(self._pending)} steps are still in flight; collect them first"
            )
        per_rank = [args] * self.layout.world_size
        return self._wait_all(self._submit_all(method, per_rank, what), timeout_s, what)

    @abstractmethod
    def _stop_workers(self) -> None:
        """Stop every worker (gracefully, then by force) and release its resources."""

    @property
    @abstractmethod
    def worker_pids(self) -> list[int]:
        """Worker process ids in rank order (for diagnostics and tests)."""

    # -- failure handling ----------------------------------------------------------------------
    def _fail(self, message: str) -> DistributedError:
        """Record the first failure, stop every worker, and return the error to raise."""
        if self.failure is None:
            self.failure = message
        logger.error("%s", message)
        self.shutdown()
        return DistributedError(message)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise DistributedError(f"the engine's workers are gone after: {self.failure}")

    # -- Executor ------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        return max(info.block_bytes for info in self.infos)

    def plan_memory(self, cache, profile_tokens: int, gpu_memory_utilization: float) -> MemoryPlan:
        """Each rank plans from its own memory; the pool takes the smallest rank's block count."""
        kv_bytes = cache.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
        args = (kv_bytes, cache.num_gpu_blocks, gpu_memory_utilization, profile_tokens)
        self.plans = self._call_all(
            "plan_memory", args, self.parallel.step_timeout_s, "planning memory"
        )
        rank = min(range(len(self.plans)), key=lambda r: self.plans[r].num_blocks)
        plan = self.plans[rank]
        plan.device = f"rank {rank} of {len(self.plans)}, {plan.device}"
        # A rank whose plan dropped the mixed-step graphs drops them for all: every rank must
        # replay the same graphs (their collectives pair up).
        self.mixed_graphs = not any(p.mixed_graphs_dropped for p in self.plans)
        return plan

    def allocate(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        used = self._call_all(
            "allocate", (num_blocks, num_cpu_blocks, self.mixed_graphs),
            self.parallel.step_timeout_s, "allocating KV and capturing graphs",
        )  # fmt: skip
        self.graph_pool_bytes = max((u or 0) for u in used) if used else 0

    def submit(
        self,
        out,
        sampling: StepSampling | None = None,
        hold: bool = False,
        feed_rows: list[int] | None = None,
        prompt: PromptRows | None = None,
    ) -> StepHandle:
        """Send the step to every rank, and its sampling rows to the output rank only.

        hold (asynchronous scheduling, where supports_hold): the ranks keep the step's samples
        on their devices and answer only once the next message arrives, which must be a step
        with feed_rows (its input ids: those samples at these rows) or `release()`. prompt:
        prompt positions to score (never with hold)."""
        if (hold or feed_rows is not None) and not self.supports_hold:
            raise ValueError(f"the {self.kind} executor cannot hold steps on its ranks")
        if hold and prompt is not None:
            raise ValueError("a step that scores prompt positions cannot be held")
        greedy = (
            GREEDY_ARGMAX
            and hold
            and self.layout.tp_size > 1
            and sampling is not None
            and sampling.plain_greedy
        )
        lora = None
        if self.lora_manager is not None and out.scheduled:  # slots, and adapters to load
            lora = self.lora_manager.step_lora(out.scheduled)
        step = PickledOnce(
            StepInput.from_scheduler_output(out, hold, feed_rows, greedy, prompt, lora)
        )
        self.num_steps += 1
        self.num_greedy_steps += greedy
        args = [(step,)] * self.layout.world_size
        if sampling is not None:
            args[self.layout.output_rank] = (step, sampling)
        receipt = self._submit_all("execute", args, f"step {self.num_steps}")
        handle = StepHandle(self.num_steps, receipt)
        self._pending.append(handle)
        self._count_submitted()
        return handle

    def start_profile(self, trace_dir: str | None = None) -> None:
        self._call_all(
            "start_profile", (trace_dir,), self.parallel.step_timeout_s, "starting a profile"
        )

    def stop_profile(self) -> list[ProfileSummary]:
        return self._call_all(
            "stop_profile", (), self.parallel.step_timeout_s, "stopping a profile"
        )

    def release(self) -> None:
        """No step follows the held one in flight: its ranks answer it now."""
        self._submit_all("flush", [()] * self.layout.world_size, "releasing a held step")

    def collect(self, handle: StepHandle) -> torch.Tensor | SamplerOutput | None:
        if not self._pending or self._pending[0] is not handle:
            oldest = self._pending[0].step if self._pending else None
            raise RuntimeError(
                f"step {handle.step} collected out of order: steps come back in submission "
                f"order (the oldest in flight is {oldest})"
            )
        results = self._wait_all(handle.token, self.parallel.step_timeout_s, f"step {handle.step}")
        self._pending.popleft()
        self._count_collected()
        # A SamplerOutput when the step carried sampling rows, else numpy fp32 logits (plain
        # bytes) from the output rank.
        result = results[self.layout.output_rank]
        if isinstance(result, ScoredStep):
            return ScoredStep(_as_result(result.result), result.scored)
        return _as_result(result)

    def describe(self) -> list[str]:
        lines = [f"executor {self.kind}: {self.layout.world_size} workers"]
        lines += self.layout.describe(self.model_config.num_layers, self.collective_backend)
        for info in self.infos:
            lines.append(
                f"  rank {info.rank}: pid {info.pid}, {info.device}, layers "
                f"{info.layers[0]}..{info.layers[1] - 1}, weights "
                f"{info.weight_bytes / (1 << 20):.1f} MiB, KV block {info.block_bytes} bytes"
            )
        if self.plans:
            blocks = ", ".join(f"{p.num_blocks}" for p in self.plans)
            lines.append(f"  KV blocks per rank: {blocks} (the pool uses the minimum)")
        return lines


class MultiprocExecutor(DistributedExecutor):
    """One spawned process per rank on this host; pipes carry calls, shared memory heartbeats."""

    kind = "mp"
    supports_hold = True  # each rank answers its pipe in order; a held answer waits there
    worker_target = staticmethod(
        worker_main
    )  # the process entry point: (spec, conn, heartbeats, ppid)

    def _start_workers(self) -> tuple[str, int]:
        ctx = mp.get_context("spawn")
        world = self.layout.world_size
        self.heartbeats = ctx.Array("d", [time.time()] * world, lock=False)
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        port = free_port(LOOPBACK)
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=self.worker_target,
                args=(spec, child, self.heartbeats, os.getpid()),
                name=f"hal-worker-{spec.rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            bound_send_time(parent, self.parallel.step_timeout_s)
            self.procs.append(proc)
            self.conns.append(parent)
        # Stop the workers when the executor is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_processes, self.procs, self.conns)
        return LOOPBACK, port

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _submit_all(self, method: str, args: list[tuple], what: str) -> None:
        # Never blocks for long: each worker's reader thread drains its pipe while it computes.
        self._check_alive()
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((method, args[rank]))
            except BlockingIOError:  # the pipe stayed full for step_timeout_s: rank stopped
                raise self._timed_out({rank}, what, self.parallel.step_timeout_s) from None
            except (BrokenPipeError, OSError):
                raise self._died(rank, what) from None

    def _wait_all(self, receipt: None, timeout_s: float, what: str) -> list:
        # Each rank answers its calls in order, so the next reply on each pipe is this call's.
        self._check_alive()
        results: list[Any] = [None] * len(self.conns)
        pending = set(range(len(self.conns)))
        deadline = time.monotonic() + timeout_s
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(pending, what, timeout_s)
            waitables = [self.conns[r] for r in pending] + list(sentinels)
            for obj in wait_connections(waitables, timeout=min(left, 1.0)):
                if obj in sentinels:
                    raise self._died(sentinels[obj], what)
                rank = self.conns.index(obj)
                try:
                    status, value = obj.recv()
                except (EOFError, OSError):
                    raise self._died(rank, what) from None
                if status == "error":
                    # A peer's death shows up on the live ranks as collective errors
                    # (connection reset) that can arrive before its own exit is seen: name
                    # the dead rank, the cause, when one dies within a moment.
                    others_dead = [s for s, r in sentinels.items() if r != rank]
                    for dead in wait_connections(others_dead, timeout=PEER_DEATH_GRACE_S):
                        raise self._died(sentinels[dead], what)
                    others = sorted(pending - {rank})
                    waiting = f" (ranks {others} had not answered)" if others else ""
                    raise self._fail(f"worker rank {rank} failed while {what}: {value}{waiting}")
                results[rank] = value
                pending.discard(rank)
        return results

    def _died(self, rank: int, what: str) -> DistributedError:
        proc = self.procs[rank]
        proc.join(timeout=1.0)
        code = proc.exitcode
        how = "is gone" if code is None else f"exited with code {code}"
        if code is not None and code < 0:
            import signal

            how = f"was killed by {signal.Signals(-code).name}"
        return self._fail(f"worker rank {rank} (pid {proc.pid}) {how} while {what}")

    def _timed_out(self, pending: set[int], what: str, timeout_s: float) -> DistributedError:
        now = time.time()
        stale = [r for r in sorted(pending) if now - self.heartbeats[r] > HEARTBEAT_STALE_S]
        if stale:
            who = ", ".join(
                f"rank {r} (pid {self.procs[r].pid}, no heartbeat for "
                f"{now - self.heartbeats[r]:.1f} s)"
                for r in stale
            )
            return self._fail(
                f"{who} stopped answering: {what} did not finish within {timeout_s:g} s "
                f"(step_timeout_s / init_timeout_s); all workers were stopped"
            )
        ranks = ", ".join(str(r) for r in sorted(pending))
        return self._fail(
            f"ranks {ranks} did not finish {what} within {timeout_s:g} s (alive but busy or "
            "waiting on a peer); all workers were stopped"
        )

    def _stop_workers(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def shutdown(self) -> None:
        self._stop_workers()


def bound_send_time(conn, timeout_s: float) -> None:
    """Make a send on conn (one end of a socket-pair Pipe) raise BlockingIOError once it has waited
    timeout_s for room, instead of blocking forever when the peer stops reading (a stopped worker
    whose socket buffer is full)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # the option belongs to the socket
    try:
        sec = int(timeout_s)
        timeval = struct.pack("ll", sec, int((timeout_s - sec) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    finally:
        sock.close()  # closes the duplicate only


def _stop_processes(procs: list, conns: list, grace_s: float = 2.0) -> None:
    """Ask each live worker to exit, then terminate, then kill; close every pipe."""
    for proc, conn in zip(procs, conns, strict=True):
        if proc.is_alive():
            try:
                bound_send_time(conn, grace_s)  # a stopped worker may not read it
                conn.send(("shutdown", ()))
            except (BrokenPipeError, OSError):
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=0.5)
        if proc.is_alive():
            proc.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
            proc.join(timeout=2.0)
    for conn in conns:
        conn.close()


class _RayWorker:
    """The Ray actor around a Worker (one per placement-group bundle)."""

    def __init__(self, spec: WorkerSpec) -> None:
        from engine.distributed.worker import Worker

        logging.basicConfig(
            level=spec.log_level, format=f"(rank {spec.rank}) %(levelname)s %(name)s: %(message)s"
        )
        self.worker = Worker(spec)

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port(self.node_ip())

    def pid(self) -> int:
        return os.getpid()

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


def connect_ray(address: str | None) -> Any:
    """Import Ray and connect to the cluster, or raise a one-line error saying how to get one."""
    try:
        import ray
    except ImportError:
        raise ValueError(
            "distributed_executor_backend='ray' but Ray is not installed; pip install "
            "'ray>=2.9', or use distributed_executor_backend='mp' on one host"
        ) from None
    if not ray.is_initialized():
        target = address or "auto"
        try:
            _probe_gcs(target)  # Ray itself retries an unreachable address for minutes
            ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"distributed_executor_backend='ray': no Ray cluster reachable at "
                f"ray_address={target!r} ({first}); start one with `ray start --head` (and `ray "
                f"start --address=HEAD_IP:6379` on the other hosts), or set ray_address"
            ) from None
    return ray


def _probe_gcs(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast (ConnectionError) when an explicit host:port has nothing listening."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port}: {e}") from None


class RayExecutor(DistributedExecutor):
    """One Ray actor per rank, placed by a placement group (one bundle per device) on an existing
    cluster, so a world can span hosts."""

    kind = "ray"

    def __init__(self, config, caps, model_config, model_path) -> None:
        self.ray = connect_ray(config.parallel.ray_address)
        self.actors: list[Any] = []
        self.pg = None
        self._pids: list[int] = []
        super().__init__(config, caps, model_config, model_path)

    def _device_of(self, rank: int) -> str:
        return "cpu" if self.device_type == "cpu" else "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES

    def _start_workers(self) -> tuple[str, int]:
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world, gpu = self.layout.world_size, self.device_type != "cpu"
        bundle = {"GPU": 1.0, "CPU": 1.0} if gpu else {"CPU": 1.0}
        have = ray.cluster_resources()
        for key, need in bundle.items():
            if have.get(key, 0) < need * world:
                raise ValueError(
                    f"tensor_parallel_size x pipeline_parallel_size = {world} ranks need {world} "
                    f"x {bundle}, but the Ray cluster has {key}={have.get(key, 0):g}; add nodes "
                    "or use fewer ranks"
                )
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        if not self.pg.wait(timeout_seconds=self.parallel.init_timeout_s):
            raise DistributedError(
                f"the Ray placement group of {world} x {bundle} was not placed within "
                f"init_timeout_s={self.parallel.init_timeout_s:g} s (resources held elsewhere?)"
            )
        table = ray.util.placement_group_table(self.pg)
        self.bundle_nodes = [table["bundles_to_node_id"][i] for i in range(world)]
        actor_cls = ray.remote(_RayWorker)
        for rank, spec in enumerate(self.specs):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            self.actors.append(
                actor_cls.options(
                    num_cpus=1, num_gpus=1 if gpu else 0, scheduling_strategy=strategy
                ).remote(spec)
            )
        timeout = self.parallel.init_timeout_s
        self._pids = self._gather([a.pid.remote() for a in self.actors], timeout, "starting")
        addr = self._gather([self.actors[0].node_ip.remote()], timeout, "starting")[0]
        port = self._gather([self.actors[0].free_port.remote()], timeout, "starting")[0]
        return addr, port

    @property
    def worker_pids(self) -> list[int]:
        return list(self._pids)

    def _submit_all(self, method: str, args: list[tuple], what: str) -> list:
        # A (synchronous, single-threaded) actor runs one caller's calls in submission order.
        self._check_alive()
        return [a.call.remote(method, *a_args) for a, a_args in zip(self.actors, args, strict=True)]

    def _wait_all(self, receipt: list, timeout_s: float, what: str) -> list:
        self._check_alive()
        return self._gather(receipt, timeout_s, what)

    def _gather(self, refs: list, timeout_s: float, what: str) -> list:
        ray = self.ray
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = ", ".join(str(rank_of[r]) for r in pending)
                raise self._fail(
                    f"ranks {ranks} did not finish {what} within {timeout_s:g} s; all workers "
                    "were stopped"
                )
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise self._fail(f"worker rank {rank} died while {what} ({e})") from None
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise self._fail(f"worker rank {rank} failed while {what}: {cause}") from None
        return results

    def _stop_workers(self) -> None:
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already dead
                logger.debug("ray.kill: %s", e)
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None

    def shutdown(self) -> None:
        self._stop_workers()


def make_executor(
    config: EngineConfig, caps: Capabilities, model_config: ModelConfig, model_path: str
) -> DistributedExecutor:
    """Validate the layout (before anything starts), then start the configured executor."""
    par = config.parallel
    check_parallel_config(par, model_config, caps, model_path, str(config.device))
    if str(config.device).startswith("cuda:"):
        raise ValueError(
            f"device={config.device!r} names one GPU, but {par.world_size} ranks need one each; "
            "use device='cuda' or 'auto' (rank r uses GPU r)"
        )
    if par.executor_backend == "ray":
        return RayExecutor(config, caps, model_config, model_path)
    return MultiprocExecutor(config, caps, model_config, model_path)
