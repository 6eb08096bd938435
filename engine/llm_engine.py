"""The synchronous engine: requests in, one scheduled model step per `step()`, outputs out.

It wires the pieces together and knows no hardware: capabilities come from `platforms`, ops from
the HAL backend, memory from the plan, scheduling from `Scheduler`. With pipeline parallelism
(P stages) it keeps up to P batches in flight, so every stage has work.
"""

from __future__ import annotations

import atexit
import copy
import gc
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

import hal
import platforms
from engine.config import resolve_cache_dtype
from engine.detokenizer import IncrementalDetokenizer, TokenText
from engine.distributed.executor import Executor, StepHandle, UniprocExecutor
from engine.distributed.worker import StepSampling
from engine.engine_config import DEFAULT_CPU_KV_BYTES, EngineConfig
from engine.generation_config import sampling_defaults
from engine.graphs import configured_mixed_sizes, configured_sizes
from engine.loader import load_model
from engine.lora import LoRAManager, LoRARequest, LoRAWeights
from engine.memory import MemoryPlan, plan_cpu, plan_gpu
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.pooling import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingParams,
    engine_pooling,
    finish_embedding,
)
from engine.runner import ModelRunner, TokenFeed
from engine.sampler import (
    PendingSamples,
    PromptRows,
    Sampler,
    SamplerOutput,
    SamplingRow,
    ScoredStep,
)
from engine.sampling_params import RequestOutputKind, SamplingParams, truncate_prompt
from engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from engine.sequence import Request, Sequence, SequenceStatus
from engine.stop import check_last_token_stop
from engine.structured_output import StructuredOutputs

logger = logging.getLogger(__name__)


@dataclass
class _SeqState:
    """Per-sequence output bookkeeping the scheduler does not keep."""

    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # per token sampled and not yet stop-checked (a speculative step gives several): its
    # logprob, the top-k alternatives and its rank
    pending_logprob: list[tuple[float | None, dict[int, float] | None, int | None]] | None = None
    # structured outputs: the grammar matcher this sequence's tokens advance (xgrammar's)
    matcher: Any = None
    # RequestOutputKind.DELTA: how much of the text, token ids and logprobs streamed outputs
    # have carried, and whether one carried the finish
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    sent_finish: bool = False

    def clone(self) -> _SeqState:
        detok = copy.copy(self.detok)
        detok.token_ids = list(self.detok.token_ids)
        logprobs = None if self.logprobs is None else list(self.logprobs)
        matcher = None if self.matcher is None else self.matcher.fork()
        return _SeqState(detok, logprobs, self.cumulative_logprob, matcher=matcher)


@dataclass
class _HeldStep:
    """A step the workers hold (asynchronous scheduling): its samples stay on their devices
    for the next step; `executor.collect` returns them once a step or release follows."""

    handle: StepHandle


@dataclass
class _RequestState:
    request: Request
    prompt: str | None
    metrics: RequestMetrics
    seqs: dict[int, _SeqState] = field(default_factory=dict)  # by sequence index
    order: int = 0  # arrival order: outputs of one step come in this order
    # SamplingParams.prompt_logprobs: the entries so far, position by position (None first)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False  # RequestOutputKind.DELTA: a streamed output carried them
    # a pooling engine's request: its parameters and, once its prompt ran, its embedding
    pooling: PoolingParams | None = None
    embedding: list[float] | None = None
    # MEAN pooling: the fp32 sum of the prompt's final hidden rows so far, and how many
    pool_sum: torch.Tensor | None = None
    pool_count: int = 0


# What the scheduler runs a pooling request as: its prompt, then one (never reported) token.
_POOLING_SAMPLING = SamplingParams(temperature=0, max_tokens=1)


DELTA, FINAL_ONLY = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


def _no_text(token_id: int) -> None:
    """A logprob entry's decoded_token for a request with detokenize off."""
    return None


def _always(seq) -> bool:
    return True


def _rows(prompt: tuple | None) -> PromptRows | None:
    """The PromptRows of `LLMEngine._prompt_rows`' answer (None: none)."""
    return None if prompt is None else prompt[0]


_atexit_thaw = False


def _freezes_heap(config: EngineConfig, caps) -> bool:
    """Whether an engine freezes its start-up heap (`_freeze_heap`): on GPUs, whose steps are
    short enough for the collector's share of the host time to matter. Each freeze and thaw
    costs a full collection (~0.5 s with torch loaded), which CPU engines, and test runs that
    build hundreds of them, skip."""
    return config.device != "cpu" and caps.torch_device_type != "cpu"


def _freeze_heap() -> None:
    """Collect, then move every object alive after start-up (model, tokenizer, engine state) out
    of the collector's reach (`gc.freeze`, as vLLM does): full collections then walk only what
    the steps allocate. Without it the collector took 30-45% of the host time per decode step at
    512-1024 sequences (`bench/engine_overhead.py --breakdown`: 13.2 -> 9.3 ms at 1024 sequences
    on a 2-core CPU)."""
    global _atexit_thaw
    gc.collect()
    gc.freeze()
    if not _atexit_thaw:  # let the interpreter's last collection see them again
        atexit.register(gc.unfreeze)
        _atexit_thaw = True


def _thaw_heap() -> None:
    """Undo `_freeze_heap` and collect: frozen objects of engines dropped since, reference cycles
    included, are freed with the device memory they hold (the next engine freezes again)."""
    gc.unfreeze()
    gc.collect()


class LLMEngine:
    """Owns the backend, model, KV cache, scheduler and sampler. Not thread-safe: an
    `AsyncLLMEngine` that drives it claims it for its loop thread (`_driver`), and requests,
    aborts and steps from any other thread are refused with an error that says so."""

    # The thread an AsyncLLMEngine steps this engine on (None: whoever calls, one at a time).
    _driver: threading.Thread | None = None

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # SamplingParams keywords from the model's generation_config.json (vLLM's "auto"),
        # checked before anything loads
        self.default_sampling = sampling_defaults(
            config.model, config.generation_config, config.override_generation_config
        )
        # A pooling engine (embeddings): the model's pooling, read before anything loads.
        self.pooling = engine_pooling(config)
        caps = platforms.detect()
        self._freezes_heap = _freezes_heap(config, caps)
        if self._freezes_heap:  # earlier engines' frozen garbage goes before memory is measured
            _thaw_heap()
        backend_choice = config.backend
        if config.device == "cpu":
            backend_choice = "cpu"
        device = None if config.device in ("auto", "cpu") else config.device
        if device is not None and caps.torch_device_type != torch.device(device).type:
            why = hal.select_backend(caps, backend_choice).summary()
            raise hal.HalError(
                f"device={config.device!r} requested, but this machine has no usable GPU "
                f"({why}); use device='cpu' or 'auto'"
            )
        self.runner: ModelRunner | None = None
        self.lora: LoRAManager | None = None
        # Adapter requests waiting for a slot (FCFS; not yet in the scheduler), and the ids of
        # those admitted with their adapter resident (each releases it when it finishes).
        self._lora_waiting: deque[Request] = deque()
        self._lora_admitted: set[str] = set()
        self._profiling = False  # between start_profile and stop_profile
        self.executor: Executor
        if config.parallel.executor_backend == "uni":
            self.backend = hal.load_backend(caps, device=device, configured=backend_choice)
            self.model, self.model_config, self.tokenizer = load_model(
                config.model,
                self.backend,
                config.dtype,
                max_model_len=config.max_model_len,
                load_format=config.load_format,
                seed=config.seed,
                quantization=config.quantization,
            )
            self.dtype = self.model.dtype
        else:  # workers load the shards; the driver reads only the config and tokenizer
            from engine.distributed.executor import driver_model_info, make_executor

            self.model_config, self.tokenizer, path = driver_model_info(config.model)
            self.model = None
            self.executor = make_executor(config, caps, self.model_config, path)
            self.backend, self.dtype = self.executor.backend, self.executor.dtype
        if config.enable_lora:  # which adapters are resident where; the runs hold the weights
            self.lora = LoRAManager(self.model_config, config.max_loras, config.max_lora_rank)
            if self.model is None:  # the workers' steps carry their slots and loads
                self.executor.lora_manager = self.lora
        self.token_text = TokenText(self.tokenizer)  # logprob entries' decoded_token
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if max_model_len > self.model_config.max_position_embeddings:
            self.shutdown()
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                f"{self.model_config.max_position_embeddings}"
            )
        self.max_model_len = max_model_len
        cache = copy.copy(config.cache)
        if self.pooling is not None and self.pooling.pooling_type == "MEAN":
            if cache.enable_prefix_caching:  # a cache hit would skip rows of the mean
                logger.info("mean pooling: prefix caching off (every prompt token is pooled)")
            cache.enable_prefix_caching = False
        sched = copy.copy(config.scheduler)
        sched.max_model_len = max_model_len
        try:
            if self.model is not None:
                kv_dtype = resolve_cache_dtype(
                    cache.cache_dtype, self.dtype, self.backend.caps.fp8_dtype
                )
                self.runner = ModelRunner(
                    self.model, self.backend, cache.block_size, kv_dtype,
                    graph_sizes=configured_sizes(self.config), max_model_len=max_model_len,
                    mixed_graph_sizes=configured_mixed_sizes(self.config),
                    max_num_seqs=sched.max_num_seqs,
                    pooling=self.pooling.pooling_type if self.pooling else None,
                )  # fmt: skip
                if self.lora is not None:  # the slot buffers, counted with the weights
                    sizes = (config.max_loras, config.max_lora_rank)
                    self.runner.lora = LoRAWeights(self.model, *sizes, self.lora.register)
                    self.runner.lora_manager = self.lora
                self.executor = UniprocExecutor(self.runner)
            self.memory_plan = self._plan_memory(cache)
            cache.num_gpu_blocks = self.memory_plan.num_blocks
            if sched.preemption_mode == "swap":
                cache.num_cpu_blocks = cache.resolve_num_cpu_blocks(self.executor.block_bytes())
                self.memory_plan.num_cpu_blocks = cache.num_cpu_blocks
            self.executor.allocate(cache.num_gpu_blocks, cache.num_cpu_blocks or 0)
            if self.runner is not None:
                self._capture_graphs()
            else:  # the workers captured theirs in allocate
                self.memory_plan.graph_pool_bytes = getattr(self.executor, "graph_pool_bytes", 0)
            self.cache_config = cache
            self.scheduler_config = sched
            # Pipeline depth: batches in flight at once (one per stage; in-process: 1).
            self.pipeline_depth = 1
            if self.model is None:
                self.pipeline_depth = config.parallel.pipeline_parallel_size
            self.speculative = config.speculative_config  # EngineConfig: world size 1 only
            self.scheduler = Scheduler(
                sched, cache, max_batches_in_flight=self.pipeline_depth,
                speculative=self.speculative,
            )  # fmt: skip
        except BaseException:
            self.shutdown()
            raise
        self.eos_token_ids = tuple(self.model_config.eos_token_ids)
        self._eos_set = frozenset(self.eos_token_ids)
        # Structured outputs: constraints compiled against the model's vocabulary (on first use).
        self.structured = StructuredOutputs(
            self.tokenizer, self.model_config.vocab_size, self.eos_token_ids
        )
        # In-process the driver samples; distributed, the output rank does (with these eos ids
        # and seed, sent in its WorkerSpec) and the steps return tokens.
        self.sampler = Sampler(eos_token_ids=self.eos_token_ids, seed=config.seed)
        self.requests: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self._order = itertools.count()
        self._aborted: set[str] = set()  # aborted since the last outputs were collected
        self._prompt_pending: set[str] = set()  # requests still owed prompt logprobs
        self.num_steps = 0
        # Submitted steps, oldest first, with the prompt rows each scores (None: none).
        self._in_flight: deque[tuple[SchedulerOutput, StepHandle, tuple | None]] = deque()
        # Asynchronous scheduling: the step launched ahead, its tokens still on the device.
        self.async_scheduling = self._resolve_async(config)
        self._ahead: tuple[SchedulerOutput, object] | None = None
        self._last_tokens: torch.Tensor | None = None  # in-process: the last launched samples
        self.num_steps_ahead = 0  # steps launched before the previous one's tokens came back
        self.peak_kv_stats = None  # KVCacheStats at the step with the most blocks in use
        for line in self.startup_report():
            logger.info("%s", line)
        if self._freezes_heap:
            _freeze_heap()

    # -- setup --------------------------------------------------------------------------------
    def _resolve_async(self, config: EngineConfig) -> bool:
        wanted = config.async_scheduling
        why_not = None
        if self.pooling is not None:
            why_not = "a pooling engine runs prompts only (no decode steps to overlap)"
        elif self.pipeline_depth > 1:
            why_not = "pipeline parallelism overlaps its stages instead"
        elif self.speculative is not None:
            why_not = "speculative decoding verifies each step's drafts before the next step"
        elif self.runner is None and not self.executor.supports_hold:
            why_not = f"the {self.executor.kind} executor cannot hold a step on its ranks"
        if why_not is not None:
            if wanted:
                self.shutdown()
                raise ValueError(
                    f"async_scheduling=True is not available here: {why_not}; leave it None or "
                    "False (or use pipeline_parallel_size=1 with the mp executor)"
                )
            return False
        if wanted is None:
            return self.backend.device.type != "cpu"
        return wanted

    def _capture_graphs(self) -> None:
        """Capture decode graphs after the KV cache exists; the plan shows what they took."""
        reserved = self.memory_plan.graph_pool_bytes
        try:
            used = self.runner.capture_graphs()
        except torch.OutOfMemoryError as e:
            raise hal.HalError(
                f"out of memory capturing decode graphs ({e}); lower gpu_memory_utilization, "
                "max_num_seqs or cuda_graph_sizes, or pass enforce_eager=True"
            ) from e
        self.memory_plan.graph_pool_bytes = used
        if used > reserved:
            logger.warning(
                "decode graphs took %.1f MiB, %.1f MiB more than the plan reserved",
                used / (1 << 20), (used - reserved) / (1 << 20),
            )  # fmt: skip

    def _plan_memory(self, cache) -> MemoryPlan:
        if self.runner is None:  # distributed: each rank plans its own memory; the minimum wins
            tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
            return self.executor.plan_memory(cache, tokens, self.config.gpu_memory_utilization)
        block_bytes = self.runner.block_bytes()
        if cache.num_gpu_blocks is not None:  # an explicit pool size wins over any budget
            plan = plan_cpu(
                self.model, block_bytes, cache.block_size, cache.num_gpu_blocks * block_bytes
            )
            plan.device = str(self.backend.device)
            return plan
        if self.backend.device.type == "cpu":
            budget = cache.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
            return plan_cpu(self.model, block_bytes, cache.block_size, budget)
        peak = self._profile_activation_peak(cache.block_size)
        graphs = mixed = 0
        if not self.runner.graph_reasons():
            tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
            graphs, mixed = self.runner.graph_pool_estimate(peak, tokens)
        plan = plan_gpu(
            self.model,
            self.backend.device,
            block_bytes,
            cache.block_size,
            self.config.gpu_memory_utilization,
            peak,
            graph_pool_bytes=graphs,
            mixed_graph_bytes=mixed,
            min_kv_tokens=self.max_model_len,
        )
        if plan.mixed_graphs_dropped:
            self.runner.drop_mixed_graphs()
        return plan

    def _profile_activation_peak(self, block_size: int) -> int:
        """Run one forward of max_num_batched_tokens tokens and measure the activation peak."""
        device = self.backend.device
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        num_blocks = math.ceil(num_tokens / block_size) + 1
        self.runner.allocate(num_blocks)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        from engine.scheduler import ScheduledSeq

        dummy = Sequence(
            -1, Request("profile", [0] * num_tokens, SamplingParams()), [0] * num_tokens
        )
        blocks = list(range(1, num_blocks))
        slots = [blocks[p // block_size] * block_size + p % block_size for p in range(num_tokens)]
        step = SchedulerOutput(
            scheduled=[ScheduledSeq(dummy, num_tokens, 0, [0] * num_tokens, blocks, slots, 1)]
        )
        self.runner.execute(step)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        self.runner.kv_caches = []
        torch.cuda.empty_cache()
        return int(peak)

    def _kv_dtype_name(self) -> str:
        dtype = self.runner.kv_dtype if self.runner is not None else self.executor.kv_dtype
        return str(dtype).removeprefix("torch.")

    def startup_report(self) -> list[str]:
        """The resolved choices: backend per op, dtype, block size, memory plan."""
        lines = [f"backend {self.backend.name} on {self.backend.device}"]
        lines += self.backend.describe()
        info = getattr(self.backend, "info", None)  # a distributed driver has the ranks' summary
        lines += [f"  {key}: {value}" for key, value in (info.settings if info else {}).items()]
        lines.append(
            f"model {self.model_config.architecture}, "
            f"dtype {str(self.dtype).removeprefix('torch.')}, max_model_len {self.max_model_len}, "
            f"block_size {self.cache_config.block_size}, kv cache {self._kv_dtype_name()}, "
            f"prefix caching {'on' if self.cache_config.enable_prefix_caching else 'off'}, "
            f"chunked prefill {'on' if self.scheduler_config.enable_chunked_prefill else 'off'}, "
            f"preemption {self.scheduler_config.preemption_mode}"
        )
        lines += self.executor.describe()
        if self.speculative is not None:
            lines.append(self.speculative.describe())
        if self.lora is not None:
            size = (
                "" if self.runner is None else f" ({self.runner.lora.nbytes / (1 << 20):.1f} MiB)"
            )
            lines.append(
                f"LoRA: {self.lora.max_loras} adapter slots of rank <= {self.lora.max_rank}{size}"
            )
        if self.runner is not None:
            graphs = self.runner.graphs
            lines.append(
                f"decode graphs: {len(graphs.sizes)} batch sizes up to {graphs.max_size}"
                if graphs is not None
                else f"decode graphs: off ({'; '.join(self.runner.graph_skip_reasons)})"
            )
            mixed = self.runner.mixed_graphs
            if mixed is not None:
                lines.append(
                    f"mixed-step graphs: {len(mixed.sizes)} token counts up to {max(mixed.sizes)}"
                )
        lines += self.memory_plan.table().splitlines()
        return lines

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch.profiler wherever the steps run (this process, or every worker rank);
        with trace_dir each rank also writes a Chrome trace there at stop_profile."""
        if self._profiling:
            raise RuntimeError("a profile is already running: call stop_profile() first")
        if self.has_unfinished_requests():
            raise RuntimeError("start_profile: requests are still running; finish them first")
        self.executor.start_profile(trace_dir)
        self._profiling = True

    def stop_profile(self):
        """Stop the profile: one engine.profiling.ProfileSummary per rank, in rank order."""
        if not self._profiling:
            raise RuntimeError("no profile is running: call start_profile() first")
        if self.has_unfinished_requests():
            raise RuntimeError("stop_profile: requests are still running; finish them first")
        self._profiling = False
        return self.executor.stop_profile()

    def shutdown(self) -> None:
        """Stop the workers of a distributed engine and release their ports (idempotent)."""
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown()

    def release_memory(self) -> None:
        """Give an in-process model's device memory (weights, KV cache, graphs) back; the engine
        cannot run afterwards. Workers free theirs when `shutdown` stops them."""
        if self.runner is not None:
            self.runner.release()
        self.model = None
        _thaw_heap()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def validate_request(
        self, prompt: str | None, params: SamplingParams, prompt_token_ids: list[int] | None = None
    ) -> list[int]:
        """Check a request without queuing it; returns its prompt token ids (the last
        truncate_prompt_tokens of them when set). A pooling engine takes PoolingParams, any
        other SamplingParams."""
        truncation = getattr(params, "truncate_prompt_tokens", None)
        if self.pooling is not None:
            if not isinstance(params, PoolingParams):
                raise TypeError(
                    "this engine computes embeddings (runner='pooling'): give PoolingParams "
                    f"(LLM.embed), got {type(params).__name__}"
                )
            hidden = self.model_config.hidden_size
            if params.dimensions is not None and params.dimensions > hidden:
                raise ValueError(
                    f"dimensions={params.dimensions} exceeds the model's hidden size {hidden}"
                )
            params = _POOLING_SAMPLING  # the rest checks the prompt alone
        elif isinstance(params, PoolingParams):
            raise TypeError(
                "PoolingParams need a pooling engine: LLM(model, runner='pooling') (this one "
                "generates text)"
            )
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token id")
            prompt_token_ids = self.tokenize(prompt)
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it encodes to zero tokens")
        prompt_token_ids = truncate_prompt(list(prompt_token_ids), truncation, self.max_model_len)
        vocab = self.model_config.vocab_size
        named = [t for t in params.token_ids_used() if t >= vocab]
        if named:
            raise ValueError(
                f"logit_bias / allowed_token_ids name token ids outside the vocabulary "
                f"[0, {vocab}): {named[:5]}"
            )
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; max_model_len={self.max_model_len} "
                f"allows at most {self.max_model_len - 1} (one token must be generated)"
            )
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # a bad constraint raises here
        if params.bad_words:
            params.bad_words_token_ids = self._bad_word_ids(params.bad_words)
        return list(prompt_token_ids)

    def _bad_word_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        """Each bad word's token ids as written (leading spaces dropped) and, when a space
        before it makes other tokens of the same count, those too (a word inside the text)."""
        if self.tokenizer is None:
            raise ValueError("bad_words need the model's tokenizer; this engine has none")
        out: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            for ids in (bare, spaced):
                if ids and ids not in out and (ids is bare or len(ids) == len(bare)):
                    out.append(ids)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for ids in out for t in ids):
            raise ValueError(f"bad_words: a word encodes to token ids outside [0, {vocab})")
        return out

    def _check_driver(self, what: str) -> None:
        """Refuse `what` from any thread but the AsyncLLMEngine loop that owns this engine."""
        driver = self._driver
        if driver is not None and driver is not threading.current_thread():
            raise RuntimeError(
                f"{what} from thread {threading.current_thread().name!r}: this engine is driven "
                f"by an AsyncLLMEngine (its loop thread {driver.name!r} owns it, and the engine "
                "is not thread-safe); submit and abort requests through that AsyncLLMEngine, or "
                "build another LLM for synchronous use"
            )

    def add_request(
        self,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Queue a request; bad input raises ValueError and leaves the engine untouched.
        priority: lower runs first (needs scheduling_policy "priority"). lora_request: run it
        through that LoRA adapter (needs enable_lora)."""
        self._check_driver("add_request")
        prompt_token_ids = self.validate_request(prompt, params, prompt_token_ids)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        lora_id = self.check_lora_request(lora_request)
        now = time.time()
        pooling = None
        if self.pooling is not None:  # the scheduler runs the prompt as a one-token request
            pooling, params = params, _POOLING_SAMPLING
        request = Request(
            request_id, list(prompt_token_ids), params, arrival_time=now, priority=priority,
            lora_request=lora_request,
        )  # fmt: skip
        if lora_id is None:
            self.scheduler.add_request(request)
        elif not self._lora_waiting and self.lora.can_admit(lora_id):
            self._admit_lora(request)
        else:  # every slot holds an adapter still in use: wait, in arrival order
            self._lora_waiting.append(request)
        state = _RequestState(
            request, prompt, RequestMetrics(arrival_time=now), order=next(self._order),
            pooling=pooling,
        )  # fmt: skip
        state.seqs[0] = self._new_seq_state(params, prompt_token_ids)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
            if len(prompt_token_ids) > 1:
                self._prompt_pending.add(request_id)
        self.requests[request_id] = state
        return request_id

    def check_lora_request(self, lora_request) -> int | None:
        """The adapter id of a request's lora_request (its adapter read and checked on first
        use; bad input raises ValueError), None for none."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(
                f"lora_request: expected an engine.LoRARequest, got {type(lora_request).__name__}"
            )
        if self.lora is None:
            raise ValueError(
                f"lora_request {lora_request.lora_name!r}: this engine serves no LoRA adapters; "
                "build it with enable_lora=True (hal serve --enable-lora)"
            )
        self.lora.register(lora_request)
        return lora_request.lora_int_id

    def _admit_lora(self, request: Request) -> None:
        self.lora.acquire(request.lora_int_id)
        self._lora_admitted.add(request.request_id)
        self.scheduler.add_request(request)

    def _admit_lora_waiting(self) -> None:
        """Admit waiting adapter requests, oldest first, while their adapter can be resident.
        An adapter dropped while its request waited (a server unloaded it) is read again; if
        that fails the request ends as aborted, with the reason logged."""
        waiting = self._lora_waiting
        while waiting and self.lora.can_admit(waiting[0].lora_int_id):
            request = waiting.popleft()
            try:
                self.lora.register(request.lora_request)
            except ValueError as e:
                logger.error("request %s: LoRA adapter %r: %s", request.request_id,
                             request.lora_request.lora_name, e)  # fmt: skip
                waiting.appendleft(request)
                self.abort_request(request.request_id)
                continue
            self._admit_lora(request)

    def _new_seq_state(self, params: SamplingParams, prompt_ids: list[int]) -> _SeqState:
        detok = IncrementalDetokenizer(self.tokenizer, params, prompt_ids)
        matcher = None
        if params.structured_outputs is not None:
            matcher = self.structured.matcher(params.structured_outputs)
        return _SeqState(detok, [] if params.logprobs is not None else None, matcher=matcher)

    def abort_request(self, request_id: str) -> bool:
        """Abort a request and free its blocks; its output is reported finished with "abort"."""
        self._check_driver("abort_request")
        waiting = next((r for r in self._lora_waiting if r.request_id == request_id), None)
        if waiting is not None:  # never admitted: through the scheduler to its aborted state
            self._lora_waiting.remove(waiting)
            self.scheduler.add_request(waiting)
        found = self.scheduler.abort_request(request_id)
        state = self.requests.get(request_id)
        if state is not None:
            for s in state.seqs.values():
                s.finish_reason = s.finish_reason or "abort"
            self._aborted.add(request_id)
        return found

    @property
    def num_lora_waiting(self) -> int:
        """Adapter requests waiting for a slot (not yet in the scheduler's queues)."""
        return len(self._lora_waiting)

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or batches (of aborted ones, perhaps) still in flight."""
        return (
            self.scheduler.has_unfinished()
            or bool(self._in_flight)
            or self._ahead is not None
            or bool(self._lora_waiting)
        )

    # -- one step -------------------------------------------------------------------------------
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Schedule, run the model, sample, stop-check. Returns outputs of requests that got new
        tokens or finished this step (finished ones are removed from the engine); with stream
        False only the finished ones (no partial outputs built, so no text decoded mid-way).

        With pipeline_depth P > 1 a step first tops the batches in flight up to P (each
        schedule() skips the sequences already in flight), then waits for the oldest one only.
        """
        self._check_driver("step")
        if self._lora_waiting:
            self._admit_lora_waiting()
        if self.pipeline_depth > 1:
            return self._step_pipelined(stream)
        if self.async_scheduling:
            return self._step_async(stream)
        out = self.scheduler.schedule()
        self._mark_scheduled(out)
        prompt = self._prompt_rows(out) if self._prompt_pending else None
        result = self.executor.execute(out, self._remote_sampling(out), prompt=_rows(prompt))
        return self._process_output(out, self._scored(result, prompt), stream)

    def _step_pipelined(self, stream: bool) -> list[RequestOutput]:
        while len(self._in_flight) < self.pipeline_depth:
            out = self.scheduler.schedule()
            moves = out.blocks_to_swap_out or out.blocks_to_swap_in or out.blocks_to_copy
            if out.is_empty and not moves:
                break  # all schedulable work is in flight (or waits for its blocks)
            self._mark_scheduled(out)
            prompt = self._prompt_rows(out) if self._prompt_pending else None
            handle = self.executor.submit(out, self._remote_sampling(out), prompt=_rows(prompt))
            self._in_flight.append((out, handle, prompt))
        if not self._in_flight:  # nothing to run: report aborted requests
            return self._collect_outputs([], stream)
        out, handle, prompt = self._in_flight.popleft()
        result = self._scored(self.executor.collect(handle), prompt)
        return self._process_output(out, result, stream)

    def _step_async(self, stream: bool) -> list[RequestOutput]:
        """One step, overlapping the host with the device: with step N running, step N + 1 is
        scheduled and launched (its input tokens are N's samples, still on the device) before
        N's tokens are read back and processed. A sequence that stops at N (a stop token or
        string) wastes its N + 1 row; everything else matches the synchronous step."""
        if self._ahead is not None:
            out, pending = self._ahead
            self._ahead = None
        else:
            out = self.scheduler.schedule()
            self._mark_scheduled(out)
            pending = self._launch(out)
        nxt = None
        if isinstance(pending, PendingSamples | _HeldStep):
            plan = self.scheduler.schedule_ahead(out)
            if plan is not None:
                nxt, rows = plan
                nxt_pending = self._launch(nxt, rows)
                self.num_steps_ahead += 1
            elif isinstance(pending, _HeldStep):
                self.executor.release()  # the ranks answer the held step without a follower
        if isinstance(pending, PendingSamples):
            result = pending.result()
        elif isinstance(pending, _HeldStep):
            result = self.executor.collect(pending.handle)
        else:
            result = pending
        outputs = self._process_output(out, result, stream)
        if nxt is not None:
            self.scheduler.resume_in_flight(nxt)
            self._ahead = (nxt, nxt_pending)
        return outputs

    def _launch(
        self, out: SchedulerOutput, feed_rows: list[int] | None = None
    ) -> PendingSamples | _HeldStep | torch.Tensor | SamplerOutput | None:
        """Start `out`; where every row can sample on the device, without waiting for its
        tokens (a PendingSamples in-process, a _HeldStep on workers). feed_rows: a step from
        `schedule_ahead`, fed from the previous step's samples at these rows. Otherwise the
        step's logits (in-process) or samples (workers) come back as the synchronous step's."""
        sampling = [ss for ss in out.scheduled if ss.num_samples]
        offset = 0 if feed_rows is None else 1  # ahead: one sampled token not yet appended
        device = bool(sampling) and all(self._device_samplable(ss, offset) for ss in sampling)
        if feed_rows is not None and not device:
            raise RuntimeError("a step scheduled ahead must sample on the device")
        if self.runner is None:
            rows = self._sampling_rows(sampling, offset) if sampling else None
            prompt = self._prompt_rows(out) if self._prompt_pending else None
            if prompt is not None:  # scored steps are never held: run and wait
                return self._scored(self.executor.execute(out, rows, prompt=prompt[0]), prompt)
            if not device:
                return self.executor.execute(out, rows)
            return _HeldStep(self.executor.submit(out, rows, hold=True, feed_rows=feed_rows))
        feed = None if feed_rows is None else TokenFeed(self._last_tokens, feed_rows)
        logits = self._run_in_process(out, feed)
        if logits is None or not device:
            return logits
        samples = self.sampler.sample_tokens(logits, self._sampling_rows(sampling, offset).rows)
        self._last_tokens = samples.token_ids
        return PendingSamples(samples)

    def _run_in_process(self, out: SchedulerOutput, feed: TokenFeed | None = None):
        """The in-process runner's logits for `out`, scoring (and recording) the prompt
        positions whose logprobs requests still want."""
        prompt = self._prompt_rows(out) if self._prompt_pending else None
        if prompt is None:
            return self.runner.execute(out, feed)
        return self._scored(ScoredStep(*self.runner.execute(out, feed, prompt[0])), prompt)

    def _scored(self, result, prompt: tuple | None):
        """A step's result without its prompt scores, which are recorded (prompt: the step's
        `_prompt_rows`, None when it scored none)."""
        if prompt is None:
            return result
        if not isinstance(result, ScoredStep):
            raise RuntimeError(f"a step with prompt rows returned {type(result).__name__}")
        self._record_prompt_logprobs(prompt[1], result.scored)
        return result.result

    def _prompt_rows(
        self, out: SchedulerOutput
    ) -> tuple[PromptRows, list[tuple[_RequestState, int]]] | None:
        """The prompt positions `out` computes whose logprobs a request wants and does not have
        yet (a recompute after preemption scores nothing twice), with (state, prompt index) of
        each; None when there are none."""
        rows, targets, num_top, where = [], [], [], []
        base = 0
        for ss in out.scheduled:
            request = ss.seq.request
            k = request.sampling_params.prompt_logprobs
            state = self.requests.get(request.request_id) if k is not None else None
            if state is not None and request.request_id in self._prompt_pending:
                prompt = request.prompt_token_ids
                # Position p's hidden state predicts prompt token p + 1.
                first = max(ss.start_pos, len(state.prompt_logprobs) - 1)
                stop = min(ss.start_pos + ss.num_new_tokens, len(prompt) - 1)
                for p in range(first, stop):
                    rows.append(base + p - ss.start_pos)
                    targets.append(prompt[p + 1])
                    num_top.append(k)
                    where.append((state, p + 1))
            base += ss.num_new_tokens
        return (PromptRows(rows, targets, num_top), where) if rows else None

    def _record_prompt_logprobs(self, where, scored) -> None:
        for (state, index), lp, top, rank in zip(where, *scored, strict=True):
            if len(state.prompt_logprobs) == index:  # positions arrive in order, once each
                prompt = state.request.prompt_token_ids
                detok = state.request.sampling_params.detokenize
                state.prompt_logprobs.append(
                    self._logprob_entry(top, prompt[index], lp, rank, detok)
                )
                if len(state.prompt_logprobs) == len(prompt):
                    self._prompt_pending.discard(state.request.request_id)

    def _logprob_entry(
        self,
        top: dict[int, float] | None,
        token: int,
        lp: float,
        rank: int | None,
        detokenize: bool = True,
    ) -> dict[int, Logprob]:
        """A step's logprobs: the k alternatives (most likely first, ranked 1..k) and the
        token itself, each with its text (None with detokenize off)."""
        text = self.token_text if detokenize else _no_text
        entry = {t: Logprob(v, r, text(t)) for r, (t, v) in enumerate((top or {}).items(), 1)}
        entry[token] = Logprob(lp, rank, text(token))
        return entry

    @staticmethod
    def _device_samplable(ss: ScheduledSeq, offset: int) -> bool:
        """Whether ss's sample needs nothing the host holds: no penalties (token histories), no
        min_tokens still to enforce, no fork."""
        params = ss.seq.request.sampling_params
        return (
            ss.num_samples == 1
            and not params.needs_penalties
            and not params.bad_words_need_history
            and (params.min_tokens == 0 or ss.seq.num_output_tokens + offset >= params.min_tokens)
        )

    def _mark_scheduled(self, out: SchedulerOutput) -> None:
        now = time.time()
        requests = self.requests
        for ss in out.scheduled:
            m = requests[ss.seq.request.request_id].metrics
            if not m.first_scheduled_time:
                m.first_scheduled_time = now

    def _remote_sampling(self, out: SchedulerOutput) -> StepSampling | None:
        """The sampling rows a remote executor's output rank needs for `out`, built at submit.

        The histories read here cannot change before the step is collected: the scheduler never
        schedules a sequence whose batch is still in flight."""
        if not self.executor.samples_remotely or self.pooling is not None:
            return None
        sampling = [ss for ss in out.scheduled if ss.num_samples]
        return self._sampling_rows(sampling) if sampling else None

    def _process_output(
        self,
        out: SchedulerOutput,
        result: torch.Tensor | SamplerOutput | None,
        stream: bool = True,
    ) -> list[RequestOutput]:
        """Sample a returned batch's logits (or take the output rank's samples), advance its
        sequences, collect outputs."""
        self.num_steps += 1
        if self.pooling is not None:
            return self._process_pooled(out, result, stream)
        sampled: dict[int, list[int]] = {}
        if result is not None:
            # One logits row (or group of samples) per sampling sequence, in schedule order.
            sampling = [ss for ss in out.scheduled if ss.num_samples]
            if isinstance(result, SamplerOutput):
                sampled = self._apply_samples(sampling, result)
            else:
                logits = result
                # Drop the rows of sequences aborted while their batch was in flight (never
                # the case at depth 1).
                if any(ss.seq.is_finished for ss in sampling):
                    live = [i for i, ss in enumerate(sampling) if not ss.seq.is_finished]
                    logits, sampling = logits[live], [sampling[i] for i in live]
                if sampling:
                    batch = self._sampling_rows(sampling)
                    sampled = self._apply_samples(sampling, batch.sample(self.sampler, logits))
        new_seqs = self.scheduler.update_from_output(out, sampled, is_stopped=self._check_stop)
        self._record_kv_peak()
        return self._collect_outputs(new_seqs, stream)

    def _sampling_rows(self, sampling: list[ScheduledSeq], offset: int = 0) -> StepSampling:
        """The sampler's rows for the sampling ScheduledSeqs (pure data, picklable): one per
        sample, a fork's n samples repeating its sequence's row with sample_index 0..n-1.
        offset: output tokens sampled but not yet appended (a step scheduled ahead: 1); such
        rows carry no histories (`_device_samplable`)."""
        rows: list[SamplingRow] = []
        reads: dict[int, tuple[bool, bool]] = {}  # id(params) -> (penalties, output history)
        forks = False
        constrained: list[tuple[int, int, Sequence, list[int]]] = []  # first row, rows, seq, draft
        for ss in sampling:
            seq = ss.seq
            request = seq.request
            params = request.sampling_params
            read = reads.get(id(params))
            if read is None:
                read = reads[id(params)] = (
                    params.needs_penalties,
                    params.min_tokens > 0 or params.bad_words_need_history,
                )
            # The sampler reads the prompt only for penalties and the output tokens for
            # penalties, min_tokens or bad words: skip copying (and shipping) them otherwise.
            prompt = request.prompt_token_ids if read[0] else ()
            history = seq.output_token_ids if read[0] or read[1] else ()
            num_output = len(seq.token_ids) - seq.num_prompt_tokens + offset
            k = ss.num_samples
            if params.structured_outputs is not None:
                constrained.append((len(rows), k, seq, ss.draft))
            if k == 1:
                rows.append(SamplingRow(params, prompt, history, num_output, seq.index))
            else:
                forks = True
                for index in range(k):
                    rows.append(SamplingRow(params, prompt, history, num_output, index))
        if constrained:
            self._fill_bitmasks(rows, constrained)
        num_samples = [ss.num_samples for ss in sampling] if forks else None
        drafts = None
        if any(ss.draft for ss in sampling):  # speculative: verified, not sampled, on their rows
            drafts = [tuple(ss.draft) for ss in sampling]
        return StepSampling(rows, num_samples, drafts)

    def _fill_bitmasks(self, rows: list[SamplingRow], constrained: list[tuple]) -> None:
        """Each constrained sequence's allowed next tokens onto its rows (a fork's n rows share
        the parent's), from its matcher's state: every token it sampled is accepted by now
        (steps with such sequences are never scheduled ahead)."""
        matchers = []
        for _, _, seq, _ in constrained:
            st = self.requests[seq.request.request_id].seqs[seq.index]
            matchers.append(st.matcher)
        masks = self.structured.fill(matchers)
        for (first, k, _, draft), mask, matcher in zip(constrained, masks, matchers, strict=True):
            for r in range(first, first + k):
                rows[r].token_bitmask = mask
            if draft:
                rows[first].draft_bitmasks = self.structured.draft_masks(matcher, draft)

    def _apply_samples(
        self, sampling: list[ScheduledSeq], result: SamplerOutput
    ) -> dict[int, list[int]]:
        """Tokens for each live sampling ScheduledSeq (seq_id -> its num_samples tokens) from the
        SamplerOutput of `_sampling_rows(sampling)`; records pending logprobs of rows that want
        them and starts a fork's children's state. Sequences aborted since the step was
        submitted are skipped: their samples are dropped."""
        token_ids = result.token_ids
        sampled: dict[int, list[int]] = {}
        drafted = result.drafted
        j = 0
        for ss in sampling:
            k = ss.num_samples
            seq = ss.seq
            if drafted and j in drafted and not seq.is_finished:
                tokens, triples = drafted[j]  # a speculative row: its verified tokens
                sampled[seq.seq_id] = tokens
                if triples is not None:
                    state = self.requests[seq.request.request_id]
                    state.seqs[seq.index].pending_logprob = list(triples)
                j += k
                continue
            if not seq.is_finished:
                sampled[seq.seq_id] = token_ids[j : j + k]
                if k > 1 or seq.request.sampling_params.logprobs is not None:
                    # A fork's children or requested logprobs: state beyond the token.
                    state = self.requests[seq.request.request_id]
                    for i in range(k):
                        index = seq.index if k == 1 else i
                        if index not in state.seqs:  # a fork's child: a copy of the parent
                            state.seqs[index] = state.seqs[seq.index].clone()
                        state.seqs[index].pending_logprob = [
                            (
                                result.logprobs[j + i],
                                result.top_logprobs[j + i],
                                result.ranks[j + i] if result.ranks else None,
                            )
                        ]
            j += k
        if j != len(token_ids):
            raise RuntimeError(f"the sampler returned {len(token_ids)} tokens for {j} rows")
        return sampled

    def _check_stop(self, seq: Sequence) -> bool:
        """Called by the scheduler once per new token: detokenize, record logprobs, stop-check."""
        request = seq.request
        state = self.requests[request.request_id]
        params: SamplingParams = request.sampling_params
        st = state.seqs[seq.index]
        token = seq.token_ids[-1]
        if st.pending_logprob:
            lp, top, rank = st.pending_logprob.pop(0)
            if lp is not None:
                st.cumulative_logprob += lp
            if st.logprobs is not None and lp is not None:
                st.logprobs.append(self._logprob_entry(top, token, lp, rank, params.detokenize))
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.time()
        num_prompt = seq.num_prompt_tokens
        decision = check_last_token_stop(
            params,
            token,
            len(seq.token_ids) - num_prompt,
            self._eos_set,
            self.max_model_len - num_prompt,
        )
        if decision is None:
            st.detok.add_token(token)
        else:
            token_stop = decision.finish_reason == "stop"
            st.detok.add_token(token, finished=True, stop_terminated=token_stop)
        if st.detok.stop_reason is not None:
            st.finish_reason, st.stop_reason = "stop", st.detok.stop_reason
            return True
        if st.matcher is not None and decision is None and self._grammar_ends(st, token, request):
            return True
        if decision is not None:
            st.finish_reason, st.stop_reason = decision.finish_reason, decision.stop_reason
            return token_stop
        return False

    @staticmethod
    def _grammar_ends(st: _SeqState, token: int, request) -> bool:
        """Advance a constrained sequence's matcher by its new token; True when the sequence
        must stop: its grammar took a stop token (finish "stop"), or the token was not one the
        grammar allows (only when every token was masked, e.g. min_tokens banning the only
        allowed end: finish "abort", logged)."""
        if not st.matcher.accept_token(token):
            logger.error(
                "request %s: token %d is not allowed by its structured-output constraint; "
                "the sequence ends (finish_reason abort)", request.request_id, token,
            )  # fmt: skip
            st.finish_reason = "abort"
            return True
        if st.matcher.is_terminated():
            st.finish_reason = "stop"
            return True
        return False

    def _collect_outputs(self, new_seqs: list[Sequence], stream: bool) -> list[RequestOutput]:
        """Outputs of the requests that got tokens this step (with stream) or finished, in
        arrival order; finished ones leave the engine. Only requests that got a token or were
        aborted can have finished, so no scan of all requests."""
        requests = self.requests
        chosen: dict[str, _RequestState] = {}
        for seq in new_seqs:
            request = seq.request
            rid = request.request_id
            if rid not in chosen and (stream or request.is_finished):
                if not request.is_finished and request.sampling_params.output_kind == FINAL_ONLY:
                    continue
                state = requests.get(rid)
                if state is not None:
                    chosen[rid] = state
        if self._aborted:
            for rid in self._aborted:
                state = requests.get(rid)
                if state is not None and rid not in chosen and state.request.is_finished:
                    chosen[rid] = state
            self._aborted.clear()
        outputs = []
        for state in sorted(chosen.values(), key=lambda st: st.order):
            done = state.request.is_finished
            delta = stream and state.request.sampling_params.output_kind == DELTA
            outputs.append(self._make_output(state, delta))
            if done:
                state.metrics.finished_time = time.time()
                del requests[state.request.request_id]
                if state.request.request_id in self._lora_admitted:
                    self._lora_admitted.discard(state.request.request_id)
                    self.lora.release(state.request.lora_int_id)
                self._prompt_pending.discard(state.request.request_id)
        return outputs

    def _process_pooled(self, out: SchedulerOutput, result, stream: bool) -> list:
        """A pooling engine's step: each sequence whose prompt finished gets its embedding from
        its hidden row and finishes (its one placeholder token is never reported)."""
        sampled: dict[int, list[int]] = {}
        if result is not None:
            rows = torch.as_tensor(result)
            mean = self.pooling.pooling_type == "MEAN"  # a row per scheduled sequence
            scheduled = out.scheduled if mean else [ss for ss in out.scheduled if ss.num_samples]
            if rows.shape[0] != len(scheduled):
                raise RuntimeError(f"{rows.shape[0]} hidden rows for {len(scheduled)} sequences")
            for row, ss in zip(rows, scheduled, strict=True):
                seq = ss.seq
                state = self.requests.get(seq.request.request_id)
                if seq.is_finished or state is None:  # aborted while in flight
                    continue
                if mean:
                    row = self._pool_mean(state, ss, row)
                    if row is None:  # the prompt goes on in a later chunk
                        continue
                state.embedding = finish_embedding(row, state.pooling, self.pooling)
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = time.time()
                sampled[seq.seq_id] = [0]
        new_seqs = self.scheduler.update_from_output(out, sampled, is_stopped=_always)
        self._record_kv_peak()
        return self._collect_outputs(new_seqs, stream)

    @staticmethod
    def _pool_mean(state: _RequestState, ss, row: torch.Tensor) -> torch.Tensor | None:
        """Add a chunk's row sum to the request's; its mean once the prompt is done (None
        before). A chunk from position 0 starts the sum again (a preempted prompt recomputes)."""
        if ss.start_pos == 0 or state.pool_sum is None:
            state.pool_sum, state.pool_count = row.clone(), 0
        else:
            state.pool_sum += row
        state.pool_count += ss.num_new_tokens
        if not ss.num_samples:
            return None
        if state.pool_count != ss.seq.num_prompt_tokens:
            raise RuntimeError(
                f"request {state.request.request_id}: mean pooling saw {state.pool_count} of "
                f"its {ss.seq.num_prompt_tokens} prompt tokens"
            )
        return state.pool_sum / state.pool_count

    def _make_output(
        self, state: _RequestState, delta: bool = False
    ) -> RequestOutput | EmbeddingRequestOutput:
        """The request's output: everything so far, or with delta (RequestOutputKind.DELTA,
        streaming) what its last output did not carry: new text, token ids and logprobs per
        sequence (sequences with nothing new left out), the prompt's logprobs only in the
        first."""
        if state.pooling is not None:
            return EmbeddingRequestOutput(
                request_id=state.request.request_id,
                prompt_token_ids=list(state.request.prompt_token_ids),
                outputs=EmbeddingOutput(state.embedding or []),
                finished=state.request.is_finished,
                prompt=state.prompt,
                metrics=state.metrics,
            )
        request = state.request
        completions = []
        seqs = request.seqs
        if len(seqs) > 1:
            seqs = sorted(seqs, key=lambda s: s.index)
        for seq in seqs:
            st = state.seqs.get(seq.index)
            if st is None:
                continue
            reason = st.finish_reason
            if seq.is_finished and reason is None:
                reason = {
                    SequenceStatus.FINISHED_LENGTH: "length",
                    SequenceStatus.FINISHED_ABORTED: "abort",
                }.get(seq.status, "stop")
            elif seq.status == SequenceStatus.FINISHED_ABORTED:
                reason = "abort"
            token_ids = seq.output_token_ids  # a fresh list
            text, logprobs = st.detok.output_text, st.logprobs
            if delta:
                if (
                    len(token_ids) == st.sent_tokens
                    and len(text) == st.sent_chars
                    and (st.sent_finish or not seq.is_finished)
                ):
                    continue
                text, st.sent_chars = text[st.sent_chars :], len(text)
                token_ids, st.sent_tokens = token_ids[st.sent_tokens :], len(token_ids)
                if logprobs is not None:
                    logprobs, st.sent_logprobs = logprobs[st.sent_logprobs :], len(logprobs)
                st.sent_finish = seq.is_finished
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=reason if seq.is_finished else None,
                    stop_reason=st.stop_reason if seq.is_finished else None,
                )
            )
        prompt_logprobs = state.prompt_logprobs
        if delta:
            if state.prompt_logprobs_sent:
                prompt_logprobs = None
            state.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=request.request_id,
            prompt=state.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=completions,
            finished=request.is_finished,
            metrics=state.metrics,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=request.num_cached_tokens or 0,
        )

    # -- stats --------------------------------------------------------------------------------
    def _record_kv_peak(self) -> None:
        peak = self.peak_kv_stats  # the full snapshot only when usage beats the peak
        if peak is None or self.scheduler.kv.num_used_blocks > peak.num_used_blocks:
            self.peak_kv_stats = self.scheduler.kv_stats()

    def kv_report(self) -> str:
        """KV memory used vs allocated for the tokens held, at peak usage: the waste number."""
        s = self.peak_kv_stats
        if s is None or s.num_allocated_slots == 0:
            return "kv cache: unused"
        return (
            f"kv cache at peak: {s.num_used_blocks}/{s.num_usable_blocks} blocks, "
            f"{s.num_held_tokens} tokens in {s.num_allocated_slots} slots, "
            f"waste {s.waste:.1%}, prefix-cache hit rate {s.prefix_cache_hit_rate:.1%}"
        )

    def kv_stats(self):
        """KV usage now: used/allocated blocks, waste (allocated slots holding no token)."""
        return self.scheduler.kv_stats()
