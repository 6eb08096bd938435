"""The engine's top-level configuration: model, device, dtype and the cache/scheduler configs."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import CacheConfig, SchedulerConfig

# CPU default for the KV cache when kv_cache_memory_bytes is not given.
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class EngineConfig:
    """Everything `LLMEngine` needs. `model` None means the embedded default (SmolLM2 GGUF).

    device: "auto" picks the selected backend's device; "cpu" forces the CPU backend.
    gpu_memory_utilization: fraction of device memory the engine may use (weights, activations,
    KV cache) on GPUs. max_model_len: None takes the model's max_position_embeddings.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    backend: str | None = None  # prefer/require a backend, e.g. "cuda" or "prefer:cuda"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

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
