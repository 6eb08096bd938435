"""Cache and scheduler configuration: dataclasses validated on construction, plus KV sizing helpers.

Every bad value raises ValueError naming the field, the value and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
_FLOAT_CACHE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority")
MAX_BLOCK_SIZE = 512


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < low:  # type: ignore[operator]
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{none}, got {value!r}")


@dataclass
class CacheConfig:
    """The paged KV cache: block size, pool sizes (GPU and CPU swap), prefix caching, dtype.

    num_gpu_blocks: None until the engine's memory plan sizes it (from the device's free memory, or
    from kv_cache_memory_bytes on CPU). num_cpu_blocks: the swap pool, None to derive it from
    swap_space_gib; only used with preemption_mode="swap". Block 0 of each pool is the reserved
    null block, so a pool of N blocks hands out N - 1.
    """

    block_size: int = 16
    num_gpu_blocks: int | None = None
    num_cpu_blocks: int | None = None
    swap_space_gib: float = 4.0
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        bs = self.block_size
        if not _is_int(bs) or not 1 <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
            raise ValueError(
                f"block_size must be a power of two in [1, {MAX_BLOCK_SIZE}], got {bs!r}"
            )
        _check_int("num_gpu_blocks", self.num_gpu_blocks, 2, allow_none=True)
        _check_int("num_cpu_blocks", self.num_cpu_blocks, 0, allow_none=True)
        swap = self.swap_space_gib
        if isinstance(swap, bool) or not isinstance(swap, int | float) or not 0 <= swap <= 1024:
            raise ValueError(f"swap_space_gib must be a number in [0, 1024], got {swap!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}"
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )
        _check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, allow_none=True)

    def resolve_num_cpu_blocks(self, block_bytes: int) -> int:
        """The swap pool's size in blocks: num_cpu_blocks, else swap_space_gib / block_bytes."""
        _check_int("block_bytes", block_bytes, 1)
        if self.num_cpu_blocks is not None:
            return self.num_cpu_blocks
        return int(self.swap_space_gib * 2**30) // block_bytes


@dataclass
class SchedulerConfig:
    """Per-step limits and policies of the scheduler.

    max_num_batched_tokens: tokens computed per step, all sequences together (the token budget).
    max_num_seqs: sequences running at once. max_model_len: the longest sequence (prompt + output);
    None until the engine fills it from the model config (the scheduler then uses the pool's
    capacity). Without chunked prefill a whole prompt must fit the token budget.
    policy: "fcfs" (arrival order) or "priority" (vLLM's scheduling_policy: each request's
    priority, lower first, then arrival; a waiting request that cannot start preempts running
    ones of lower priority).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                f"got {self.policy!r}"
            )
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_model_len", self.max_model_len, 2, allow_none=True)
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(
                f"enable_chunked_prefill must be True or False, got {self.enable_chunked_prefill!r}"
            )
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                f"got {self.preemption_mode!r}"
            )
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len={self.max_model_len} when "
                f"enable_chunked_prefill is False (a whole prompt is computed in one step), got "
                f"{self.max_num_batched_tokens}"
            )


def kv_block_bytes(
    block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """Bytes of one KV block over all layers: K and V, [block_size, num_kv_heads, head_dim] each."""
    for name, value in (
        ("block_size", block_size),
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("dtype_bytes", dtype_bytes),
    ):
        _check_int(name, value, 1)
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    """How many KV blocks a memory budget holds; at least 2 (the null block and one usable)."""
    _check_int("block_bytes", block_bytes, 1)
    _check_int("budget_bytes", budget_bytes, 0)
    num_blocks = budget_bytes // block_bytes
    if num_blocks < 2:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes holds {num_blocks} blocks of {block_bytes} "
            f"bytes; at least 2 are needed (block 0 is reserved): raise the budget "
            f"(kv_cache_memory_bytes or gpu memory utilization) or lower block_size"
        )
    return num_blocks


def resolve_cache_dtype(
    cache_dtype: str, model_dtype: torch.dtype, platform_fp8: torch.dtype | None
) -> torch.dtype:
    """The KV cache's torch dtype for CacheConfig.cache_dtype (vLLM's kv_cache_dtype): "auto" is
    the model's dtype; "fp8" / "fp8_e4m3" the platform's e4m3 format (`platform_fp8`, e4m3fnuz
    on MI300; e4m3fn where the device has no FP8 hardware: the attention kernels decode any
    format); "fp8_e5m2" e5m2. A float name must be the model's dtype (the attention kernels
    read the cache in the query's dtype or an FP8 format)."""
    if cache_dtype == "auto":
        return model_dtype
    if cache_dtype in ("fp8", "fp8_e4m3"):
        return platform_fp8 if platform_fp8 is not None else torch.float8_e4m3fn
    if cache_dtype == "fp8_e5m2":
        return torch.float8_e5m2
    if cache_dtype in _FLOAT_CACHE:
        if _FLOAT_CACHE[cache_dtype] != model_dtype:
            raise ValueError(
                f"kv_cache_dtype {cache_dtype!r} differs from the model's dtype "
                f"{str(model_dtype).removeprefix('torch.')}; use 'auto' or an FP8 format "
                "(fp8, fp8_e4m3, fp8_e5m2)"
            )
        return model_dtype
    valid = ", ".join(CACHE_DTYPES)
    raise ValueError(f"kv_cache_dtype must be one of {valid}, got {cache_dtype!r}")
