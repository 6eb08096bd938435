"""The engine's top-level configuration: model, device, dtype, the cache/scheduler configs and the
parallel layout (tensor x pipeline parallel, executor)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import CacheConfig, SchedulerConfig
from engine.generation_config import check_generation_config, check_overrides
from engine.pooling import RUNNERS, PoolerConfig
from engine.spec_config import SpeculativeConfig

# CPU default for the KV cache when kv_cache_memory_bytes is not given.
DEFAULT_CPU_KV_BYTES = 1 << 30


EXECUTOR_BACKENDS = ("mp", "ray")
QUANTIZATION_CHOICES = ("fp8",)  # online methods; engine.quantization.ONLINE_METHODS


@dataclass
class ParallelConfig:
    """How the model is split across devices and which executor runs the ranks.

    world = tensor_parallel_size x pipeline_parallel_size ranks, one per device. At 1 x 1 the model
    runs in the engine's own process (no workers, no collectives). distributed_executor_backend:
    "mp" (one process per device on this host; the default) or "ray" (a placement group on an
    existing Ray cluster at ray_address, default "auto"). init_timeout_s bounds forming the world;
    step_timeout_s bounds one step (a worker that stops answering fails the step).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    ray_address: str | None = None
    init_timeout_s: float = 300.0
    step_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        b = self.distributed_executor_backend
        if b is not None and b not in EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)} or "
                f"None, got {b!r}"
            )
        for name in ("init_timeout_s", "step_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """The executor that runs the ranks: "uni" (in-process) at world size 1, else mp/ray."""
        if self.world_size == 1 and self.distributed_executor_backend is None:
            return "uni"
        return self.distributed_executor_backend or "mp"


@dataclass
class EngineConfig:
    """Everything `LLMEngine` needs. `model` None means the embedded default (SmolLM2 GGUF).

    device: "auto" picks the selected backend's device; "cpu" forces the CPU backend.
    gpu_memory_utilization: fraction of device memory the engine may use (weights, activations,
    KV cache) on GPUs. max_model_len: None takes the model's max_position_embeddings.
    quantization: "fp8" quantizes a float checkpoint's linear layers to FP8 at load (per output
    channel, activations per token); None runs the checkpoint as it is (quantized or not).
    async_scheduling: launch the next decode step before the current one's tokens reach the host
    (its input tokens come from the device), so the host's per-step work overlaps the GPU's.
    None: on for an in-process engine on a GPU, off on the CPU (nothing to overlap there).
    mixed_graph_sizes: token-count buckets captured for steps holding prefill tokens (decode-only
    steps take the cuda_graph_sizes buckets); None: powers of two from 128 up to
    max_num_batched_tokens (at most 8192); (): such steps run eagerly.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    backend: str | None = None  # prefer/require a backend, e.g. "cuda" or "prefer:cuda"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    quantization: str | None = None  # "fp8": quantize a float checkpoint at load (online FP8)
    load_format: str = "auto"  # "dummy": random weights from config.json (benchmarks)
    enforce_eager: bool = False  # True: never capture decode graphs
    cuda_graph_sizes: tuple[int, ...] | None = None  # decode batch buckets; None: 1, 2, 4, 8k
    # Token-count buckets for steps with prefill tokens (None: powers of two from 128 up to
    # max_num_batched_tokens, at most 8192; (): such steps run eagerly).
    mixed_graph_sizes: tuple[int, ...] | None = None
    async_scheduling: bool | None = None  # None: on for an in-process GPU engine
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, ...} or a
    # SpeculativeConfig (engine.spec_config); None: off.
    speculative_config: SpeculativeConfig | dict | None = None
    # "generate" (text) or "pooling" (embeddings: prompts only, `engine.pooling`), vLLM's runner.
    runner: str = "generate"
    # vLLM's pooler_config for a pooling engine: {"pooling_type": "LAST" | "MEAN", "normalize":
    # bool} or an engine.pooling.PoolerConfig; None: the model's sentence-transformers setting.
    pooler_config: PoolerConfig | dict | None = None
    # vLLM's generation_config: "auto" (default sampling parameters from the model's
    # generation_config.json), "vllm" (none) or a folder; override_generation_config goes on
    # top ({"temperature": 0.5, ...}; `engine.generation_config`).
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # vLLM's LoRA serving (engine.lora): requests may name adapters (LoRARequest) with rank up to
    # max_lora_rank, at most max_loras of them resident at once.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        g = self.gpu_memory_utilization
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 < g <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {g!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        m = self.max_model_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
            raise ValueError(f"max_model_len must be an integer >= 2 or None, got {m!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.quantization not in (None, *QUANTIZATION_CHOICES):
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)} or None, got "
                f"{self.quantization!r} (pre-quantized checkpoints are detected from config.json)"
            )
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.runner == "pooling" and self.speculative_config is not None:
            raise ValueError("a pooling engine generates nothing: leave speculative_config out")
        self.pooler_config = PoolerConfig.parse(self.pooler_config)
        self.generation_config = check_generation_config(self.generation_config)
        self.override_generation_config = check_overrides(self.override_generation_config)
        if self.pooler_config is not None and self.runner != "pooling":
            raise ValueError("pooler_config applies to a pooling engine (runner='pooling')")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(
                "async_scheduling must be True, False or None (auto), got "
                f"{self.async_scheduling!r}"
            )
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.enable_lora not in (True, False):
            raise ValueError(f"enable_lora must be True or False, got {self.enable_lora!r}")
        _check_sizes("cuda_graph_sizes", self.cuda_graph_sizes, "batch sizes")
        mixed = self.mixed_graph_sizes
        _check_sizes("mixed_graph_sizes", mixed, "token counts", allow_empty=True)  # (): off
        if mixed and max(mixed) > self.scheduler.max_num_batched_tokens:
            raise ValueError(
                f"mixed_graph_sizes: {max(mixed)} tokens exceeds max_num_batched_tokens="
                f"{self.scheduler.max_num_batched_tokens} (no step holds more); lower the size "
                "or raise max_num_batched_tokens"
            )


def _check_sizes(name: str, sizes, what: str, allow_empty: bool = False) -> None:
    """A list of graph bucket sizes: None, or a list of integers >= 1 (non-empty unless
    allow_empty)."""
    if sizes is not None and (
        isinstance(sizes, str | int)
        or (not sizes and not allow_empty)
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes)
    ):
        kind = "list" if allow_empty else "non-empty list"
        raise ValueError(f"{name} must be a {kind} of {what} >= 1 or None, got {sizes!r}")
