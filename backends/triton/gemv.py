"""Decode-sized (M <= 16) dense and FP8 GEMMs in Triton: bandwidth-bound kernels that stream each
weight byte once with wide loads, fp32 accumulation and an atomic-free, deterministic split-K.

Math: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); FP8 (`backends.cpu.linear.fp8_linear`):
y = (sum_k x_q[m, k] * w_q[n, k]) * x_scale * w_scale + bias, scales applied in that order in
fp32, then one rounding to the output dtype (round to nearest even).

Two kernels, chosen per shape by a table keyed on (weight bytes, M bucket, N, K):
- "fma" (one row of x per program): a [BLOCK_N, BLOCK_K] fp32 accumulator of products, reduced
  over K once at the end (no cross-thread reduction inside the loop), so the loop is loads,
  converts and FMAs only.
- "dot" (all M <= 16 rows in one program): the swapped product w_tile [BLOCK_N, BLOCK_K] @
  x_tile.T [BLOCK_K, 16] on tensor cores ("swap AB": the weight fills the MMA's M side, the few
  tokens its N side), pipelined through shared memory by num_stages. FP8 operands enter the dot
  as fp16 (every e4m3 / e5m2 value is exact in fp16, so products are exact, accumulation fp32).
Split-K writes fp32 partials [S, M, N]; a second kernel sums them in split order, then scales,
adds the bias and rounds, so results are bit-reproducible run to run. By default (`fused_reduce`;
HAL_GEMV_FUSED_REDUCE=0 turns it off) the last split of each tile to finish, counted by an atomic
per tile, sums the partials itself in the same order (same bits, one launch fewer); the per-tile
counters (`backends.triton.counters`) return to zero before the kernel ends, so launches and
graph replays reuse them (one stream per device at a time). TP=2 batch-1 decode on 2 x H100
(ninth session): 4.58 -> 4.47 ms per step (128 reduce launches a step gone); single GEMVs that
split: 1.01-1.04x (H200).
FP8 codes load as uint8 and decode exactly through `backends.triton.quant.fp8_decode` under the
interpreter and for formats without a native conversion; on sm_89+ the weight's e4m3fn / e5m2
bytes convert in hardware (cvt to fp16, also exact). Under TRITON_INTERPRET=1 bf16 dots run in fp32
(the interpreter's bf16 tl.dot is wrong). Everything is CUDA-graph safe: no host sync.
With `ll_push` (a row-parallel projection at tensor-parallel size > 1) the epilogue also writes
the rounded output as the next one-shot all-reduce's low-latency words into every rank's LL area
(`backends.triton.allreduce`), which then only polls: 2 x H200, batch-1 TP=2 decode 2.68 -> 2.61
ms a step (twenty-first session).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backends.cpu.linear import _check_bias, _check_quantized
from backends.cpu.quant import is_fp8
from backends.triton.allreduce import ll_word
from backends.triton.counters import tile_counters
from backends.triton.kv_cache import kv_cache_value
from backends.triton.pdl import grid_wait, pdl_args
from backends.triton.quant import (
    FLOAT_DTYPES,
    FP8_CODECS,
    cast_rtne,
    fp8_codec,
    fp8_decode,
    interpreting,
    native_fp8,
    raw,
)

MAX_M = 16  # the largest M the backends send here; beyond it cuBLAS / _scaled_mm win
K_ALIGN = 16  # dense dispatch wants K % 16 == 0 (16-byte vector loads of every row)
KERNELS = ("fma", "dot")
DOT_BLOCK_M = 16  # tl.dot's smallest tile side
_TL_FLOAT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# FP8 load modes: 0 not FP8, 1 e4m3fn native, 2 e5m2 native, 3 decode from the bits (any format).
_NOT_FP8, _E4M3_NATIVE, _E5M2_NATIVE, _CODEC = 0, 1, 2, 3
_NATIVE_MODE = {torch.float8_e4m3fn: _E4M3_NATIVE, torch.float8_e5m2: _E5M2_NATIVE}
_NO_CODEC = dict(MAN_BITS=3, EXP_BIAS=7, FP8_MAX=448.0, NAN_CODE=0x7F, FNUZ=False, HAS_INF=False)
_REDUCE_BLOCK = 1024
# The split-K reduce folded into the GEMV (see the module docstring).
FUSED_REDUCE = os.environ.get("HAL_GEMV_FUSED_REDUCE", "1") != "0"
# Each program's first weight tile loaded before the PDL wait (_small_m_kernel's EARLY) when the
# weight is an nn.Parameter: the engine's weights, which no kernel writes after loading, so no
# kernel still running can be producing them. H200, Llama-3-8B shape, batch-1 decode with graphs:
# 4.48-4.49 -> 4.42 ms a step; TP=2 3.04 either way (docs/benchmarks.md, eighteenth session).
# HAL_GEMV_EARLY=0 turns it off.
EARLY = os.environ.get("HAL_GEMV_EARLY", "1") != "0"
_MAX_GRID = 65535  # CUDA's limit on grid axes 1 and 2


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape. kernel "fma": one x row per program, CUDA-core FMAs; "dot": 16 rows per
    program on tensor cores. block_n / block_k: output columns and k per tile (powers of two;
    "dot" needs both >= 16). split_k: K splits (0: enough to give every SM ~4 programs)."""

    kernel: str
    block_n: int
    block_k: int
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel: {self.kernel!r} is not one of {', '.join(KERNELS)}")
        least = 16 if self.kernel == "dot" else 1
        for name, value in (("block_n", self.block_n), ("block_k", self.block_k)):
            if value < least or value & (value - 1):
                raise ValueError(
                    f"{name}: {value} must be a power of two >= {least} for kernel {self.kernel!r}"
                )
        if self.split_k < 0:
            raise ValueError(f"split_k: {self.split_k} must be >= 0 (0 picks one per device)")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps: {self.num_warps} must be a power of two >= 1")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")

    @property
    def block_m(self) -> int:
        return 1 if self.kernel == "fma" else DOT_BLOCK_M


# (weight bytes per element, M bucket, N, K) -> config; M bucket = next power of two of M.
# Measured by `python bench/gemv.py --autotune` (its output is pasted here); shapes not listed
# take `heuristic_config`.
ConfigKey = tuple[int, int, int, int]
ConfigTable = Mapping[ConfigKey, GemvConfig]
DEFAULT_CONFIGS: dict[ConfigKey, GemvConfig] = {
    # NVIDIA H200, 2026-11-28, python bench/gemv.py --autotune --kinds bf16 --shapes qkv o gate_up
    # down qkv_tp2 o_tp2 gate_up_tp2 down_tp2 (--ms 1 2, then 4 8 16), --kinds bf16 fp8 --shapes
    # lm_head, --kinds fp8 --shapes qkv o gate_up down: the 8B shapes (bf16 and FP8) and one rank's
    # slices at tensor-parallel size 2 (bf16). Replaces the first session's H100 table; against it
    # in the same sweep the winners took 0-30% less time (o, down and the TP=2 slices at M = 1 with
    # the 1024-2048-wide K steps the most).
    (2, 1, 3072, 4096): GemvConfig("fma", 4, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 3072, 4096): GemvConfig("fma", 8, 512, split_k=1, num_warps=4, num_stages=1),
    (2, 4, 3072, 4096): GemvConfig("dot", 32, 128, split_k=4, num_warps=4, num_stages=4),
    (2, 8, 3072, 4096): GemvConfig("dot", 32, 128, split_k=4, num_warps=4, num_stages=4),
    (2, 16, 3072, 4096): GemvConfig("dot", 32, 128, split_k=8, num_warps=4, num_stages=4),
    (2, 1, 4096, 2048): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 4096, 2048): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 4, 4096, 2048): GemvConfig("dot", 64, 256, split_k=1, num_warps=4, num_stages=4),
    (2, 8, 4096, 2048): GemvConfig("dot", 64, 256, split_k=1, num_warps=4, num_stages=4),
    (2, 16, 4096, 2048): GemvConfig("dot", 64, 256, split_k=1, num_warps=4, num_stages=4),
    (2, 1, 4096, 4096): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 4096, 4096): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 4, 4096, 4096): GemvConfig("dot", 64, 256, split_k=2, num_warps=4, num_stages=3),
    (2, 8, 4096, 4096): GemvConfig("dot", 64, 128, split_k=4, num_warps=4, num_stages=3),
    (2, 16, 4096, 4096): GemvConfig("dot", 64, 128, split_k=4, num_warps=4, num_stages=3),
    (2, 1, 4096, 7168): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 4096, 7168): GemvConfig("dot", 64, 128, split_k=4, num_warps=4, num_stages=3),
    (2, 4, 4096, 7168): GemvConfig("dot", 64, 256, split_k=2, num_warps=4, num_stages=4),
    (2, 8, 4096, 7168): GemvConfig("dot", 64, 128, split_k=4, num_warps=4, num_stages=3),
    (2, 16, 4096, 7168): GemvConfig("dot", 64, 128, split_k=4, num_warps=4, num_stages=3),
    (2, 1, 4096, 14336): GemvConfig("fma", 4, 2048, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 4096, 14336): GemvConfig("dot", 32, 128, split_k=8, num_warps=4, num_stages=3),
    (2, 4, 4096, 14336): GemvConfig("dot", 32, 128, split_k=2, num_warps=4, num_stages=5),
    (2, 8, 4096, 14336): GemvConfig("dot", 32, 256, split_k=4, num_warps=4, num_stages=3),
    (2, 16, 4096, 14336): GemvConfig("dot", 32, 128, split_k=2, num_warps=4, num_stages=5),
    (2, 1, 6144, 4096): GemvConfig("fma", 8, 512, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 6144, 4096): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 4, 6144, 4096): GemvConfig("dot", 64, 256, split_k=1, num_warps=4, num_stages=3),
    (2, 8, 6144, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (2, 16, 6144, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (2, 1, 14336, 4096): GemvConfig("fma", 4, 2048, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 14336, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 4, 14336, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 8, 14336, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 16, 14336, 4096): GemvConfig("dot", 32, 128, split_k=1, num_warps=4, num_stages=3),
    (2, 1, 28672, 4096): GemvConfig("fma", 4, 2048, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 28672, 4096): GemvConfig("dot", 128, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 4, 28672, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 8, 28672, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 16, 28672, 4096): GemvConfig("dot", 32, 128, split_k=1, num_warps=4, num_stages=5),
    (2, 1, 128256, 4096): GemvConfig("fma", 16, 256, split_k=1, num_warps=4, num_stages=1),
    (2, 2, 128256, 4096): GemvConfig("dot", 128, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 4, 128256, 4096): GemvConfig("dot", 128, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 8, 128256, 4096): GemvConfig("dot", 128, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 16, 128256, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (1, 1, 4096, 4096): GemvConfig("fma", 8, 1024, split_k=1, num_warps=4, num_stages=1),
    (1, 2, 4096, 4096): GemvConfig("fma", 8, 512, split_k=1, num_warps=4, num_stages=1),
    (1, 4, 4096, 4096): GemvConfig("dot", 32, 512, split_k=4, num_warps=4, num_stages=3),
    (1, 8, 4096, 4096): GemvConfig("dot", 32, 512, split_k=4, num_warps=4, num_stages=3),
    (1, 16, 4096, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=5),
    (1, 1, 4096, 14336): GemvConfig("fma", 4, 2048, split_k=1, num_warps=4, num_stages=1),
    (1, 2, 4096, 14336): GemvConfig("dot", 32, 512, split_k=4, num_warps=4, num_stages=3),
    (1, 4, 4096, 14336): GemvConfig("dot", 32, 256, split_k=4, num_warps=4, num_stages=5),
    (1, 8, 4096, 14336): GemvConfig("dot", 32, 256, split_k=2, num_warps=4, num_stages=5),
    (1, 16, 4096, 14336): GemvConfig("dot", 32, 256, split_k=2, num_warps=4, num_stages=5),
    (1, 1, 6144, 4096): GemvConfig("fma", 4, 2048, split_k=1, num_warps=4, num_stages=1),
    (1, 2, 6144, 4096): GemvConfig("dot", 64, 256, split_k=4, num_warps=4, num_stages=3),
    (1, 4, 6144, 4096): GemvConfig("dot", 32, 256, split_k=2, num_warps=4, num_stages=4),
    (1, 8, 6144, 4096): GemvConfig("dot", 32, 256, split_k=2, num_warps=4, num_stages=4),
    (1, 16, 6144, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (1, 1, 28672, 4096): GemvConfig("fma", 16, 256, split_k=1, num_warps=4, num_stages=1),
    (1, 2, 28672, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (1, 4, 28672, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (1, 8, 28672, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=3),
    (1, 16, 28672, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=3),
    (1, 1, 128256, 4096): GemvConfig("fma", 8, 512, split_k=1, num_warps=4, num_stages=1),
    (1, 2, 128256, 4096): GemvConfig("dot", 64, 256, split_k=1, num_warps=4, num_stages=3),
    (1, 4, 128256, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (1, 8, 128256, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
    (1, 16, 128256, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=4),
}


# The gate_up GEMM with the SiLU-and-mul epilogue (`linear_silu_and_mul_small_m`), keyed like
# DEFAULT_CONFIGS (N: the weight's 2 D rows); shapes not listed take DEFAULT_CONFIGS' entry.
# `python bench/gemv.py --kinds silu --shapes gate_up gate_up_tp2 --autotune` prints it; only the
# shapes where the fused launch beat the two kernels (our GEMM, then the activation) in that run
# are kept, and `silu_fusion_measured_faster` tells the backends which those are.
SILU_CONFIGS: dict[ConfigKey, GemvConfig] = {
    # NVIDIA H200, 2026-11-28, python bench/gemv.py --kinds silu --shapes gate_up gate_up_tp2
    # --autotune, after DEFAULT_CONFIGS' H200 table (fused / two kernels: 1.02, 0.97, 1.02, 1.02,
    # 1.03 at M = 1, 2, 4, 8, 16 for the 8B shape; 1.05, 0.96, 0.96, 0.99, 1.03 for its TP=2
    # slice; the shapes below 1 are left out)
    (2, 1, 28672, 4096): GemvConfig("fma", 16, 256, split_k=1, num_warps=4, num_stages=1),
    (2, 4, 28672, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 8, 28672, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
    (2, 16, 28672, 4096): GemvConfig("dot", 32, 256, split_k=1, num_warps=4, num_stages=3),
    (2, 1, 14336, 4096): GemvConfig("fma", 4, 1024, split_k=1, num_warps=4, num_stages=1),
    (2, 16, 14336, 4096): GemvConfig("dot", 64, 128, split_k=1, num_warps=4, num_stages=4),
}


def silu_fusion_measured_faster(w_bytes: int, m: int, n: int, k: int) -> bool:
    """Whether SILU_CONFIGS holds this shape: the fused gate_up + SiLU launch was measured faster
    than the GEMM and the activation kernel there."""
    return (w_bytes, m_bucket(m), n, k) in SILU_CONFIGS


def m_bucket(m: int) -> int:
    """The table's M key: the next power of two >= M (1, 2, 4, 8, 16, ...)."""
    return 1 << max(m - 1, 0).bit_length()


def heuristic_config(w_bytes: int, m: int, k: int | None = None) -> GemvConfig:
    """The launch shape for shapes the table lacks (other tensor-parallel sizes, other models).
    One row: the FMA kernel on 4 output columns x 2048 k per tile (16 KiB of bf16 weight per
    program per step: the loop is not software-pipelined, so a step's loads are all a program has
    in flight), 4 x 1024 where K is not a multiple of 2048 (a partly empty last step costs a
    whole one) and 8 x 512 where it is not a multiple of 1024 either. H200 autotune of 8 bf16 and
    6 FP8 shapes at M = 1 (8B and its TP=2 slices, twentieth session): 4 x 2048 at 1.03x each
    shape's best time on average, against 1.17x for 8 x 512, the first session's H100 choice;
    Llama-3.2-3B's shapes (K = 3072 and 8192) and two TP=2 slices (twenty-first session): this
    rule 1.04x, 4 x 2048 everywhere 1.17x (K = 3072 up to 1.43x). More rows: tensor cores (M
    FMAs per weight element would be compute-bound at M >= 4 on H100 class GPUs), 64 columns x
    256 bytes of each row per tile, 4 stages (64 x 256 bf16 tiles were 6% slower over TP=2's
    slices at M = 4). K splits as `split_plan` picks them."""
    if m == 1:
        if k is None or k % 2048 == 0:
            return GemvConfig("fma", 4, 2048, num_warps=4, num_stages=1)
        if k % 1024 == 0:
            return GemvConfig("fma", 4, 1024, num_warps=4, num_stages=1)
        return GemvConfig("fma", 8, 512, num_warps=4, num_stages=1)
    return GemvConfig("dot", 64, max(256 // w_bytes, 16), num_warps=4, num_stages=4)


def pick_config(
    w_bytes: int, m: int, n: int, k: int, configs: ConfigTable | None = None, silu: bool = False
) -> GemvConfig:
    """The table's config for this shape (DEFAULT_CONFIGS unless a backend passes its own; silu:
    the fused activation's launch, SILU_CONFIGS first)."""
    key = (w_bytes, m_bucket(m), n, k)
    if silu and configs is None and key in SILU_CONFIGS:
        return SILU_CONFIGS[key]
    table = DEFAULT_CONFIGS if configs is None else configs
    cfg = table.get(key)
    return cfg if cfg is not None else heuristic_config(w_bytes, m, k)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one at a time: no device to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(cfg: GemvConfig, m: int, n: int, k: int, sm_count: int) -> tuple[int, int]:
    """(splits, k_per_split): k_per_split a multiple of block_k. split_k 0 doubles the splits
    while the grid has fewer than 4 programs per SM and each split keeps >= 4 tiles of K."""
    tiles = max(triton.cdiv(k, cfg.block_k), 1)
    if cfg.split_k:
        want = cfg.split_k
    else:
        programs = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        want = 1
        while programs * want < 4 * sm_count and tiles >= 8 * want:
            want *= 2
    per_split = triton.cdiv(tiles, min(want, tiles)) * cfg.block_k
    return triton.cdiv(max(k, 1), per_split), per_split


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _to_float(
    v,
    DTYPE: tl.constexpr,
    FP8: tl.constexpr,
    MAN_BITS: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    NAN_CODE: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
):
    """A loaded tile as DTYPE: floats convert; FP8 bytes (uint8) convert in hardware or decode
    exactly from their bits (fp32, then DTYPE; exact for fp32 and fp16, which hold every FP8)."""
    if FP8 == 1:
        out = v.to(tl.float8e4nv, bitcast=True).to(DTYPE)
    elif FP8 == 2:
        out = v.to(tl.float8e5, bitcast=True).to(DTYPE)
    elif FP8 == 3:
        out = fp8_decode(v, MAN_BITS, EXP_BIAS, FP8_MAX, NAN_CODE, FNUZ, HAS_INF).to(DTYPE)
    else:
        out = v.to(DTYPE)
    return out


@triton.jit
def _epilogue(
    acc,
    offs_n,
    offs_m,
    out_ptr,
    bias_ptr,
    x_scale_ptr,
    w_scale_ptr,
    n_rows,
    n_cols,
    stride_out_row,
    HAS_BIAS: tl.constexpr,
    X_SCALE: tl.constexpr,
    W_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # acc: [BLOCK_N, BLOCK_M] fp32 -> out[m, n] = rtne(acc * x_scale[m] * w_scale[n] + bias[n]),
    # the reference's order; scale modes: 0 none, 1 one value, 2 one per row / column.
    n_ok = offs_n < n_cols
    m_ok = offs_m < n_rows
    y = acc
    if X_SCALE == 1:
        y = y * tl.load(x_scale_ptr).to(tl.float32)
    elif X_SCALE == 2:
        y = y * tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    if W_SCALE == 1:
        y = y * tl.load(w_scale_ptr).to(tl.float32)
    elif W_SCALE == 2:
        y = y * tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_out_row + offs_n[:, None]
    yr = cast_rtne(y, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out, yr, mask=n_ok[:, None] & m_ok[None, :])
    return yr


@triton.jit
def _ll_push(y, offs_n, offs_m, n_rows, n_cols, ll_table, ll_rank, epoch, ll_half_words,
             ll_row_words, LL_WORLD: tl.constexpr):  # fmt: skip
    # The output tile y ([BLOCK_N, BLOCK_M], as `_epilogue` stored it) as the one-shot
    # all-reduce's low-latency words (`allreduce._ll_send`): (epoch << 32 | fp32 bits), into
    # slot ll_rank of every rank's LL area, half epoch & 1, rows ll_row_words apart.
    word = ll_word(y, epoch)
    at = (
        (epoch & 1).to(tl.int64) * ll_half_words
        + (ll_rank * n_rows + offs_m.to(tl.int64))[None, :] * ll_row_words
        + offs_n[:, None]
    )
    mask = (offs_n < n_cols)[:, None] & (offs_m < n_rows)[None, :]
    for p in tl.static_range(LL_WORLD):
        area = tl.load(ll_table + p).to(tl.pointer_type(tl.int64))
        tl.store(area + at, word, mask=mask)


@triton.jit
def _silu_mul(gate, up, INTERPRET: tl.constexpr):
    # silu(gate) * up in fp32, rounded once to their dtype: `activation._silu_and_mul_kernel`'s
    # math, so the fused GEMM writes the bits the separate kernel would have written.
    g = gate.to(tl.float32)
    return cast_rtne(g / (1.0 + tl.exp(-g)) * up.to(tl.float32), gate.dtype, INTERPRET)


@triton.jit
def _silu_epilogue(acc, w_idx, offs_m, pid_n, out_ptr, bias_ptr, n_rows, n_out, stride_out_row,
                   HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    # acc [BLOCK_N, BM]: gate rows, then the up rows of the same columns (SILU_OUT). Rounded to
    # the output dtype as the GEMM would store them (bias first), then silu(gate) * up as the
    # activation kernel computes it: the two kernels' bits.
    y = acc
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + w_idx).to(tl.float32)[:, None]
    h = cast_rtne(y, out_ptr.dtype.element_ty, INTERPRET)
    h = tl.permute(tl.reshape(h, (2, BLOCK_N // 2, acc.shape[1])), (1, 2, 0))
    gate, up = tl.split(h)  # [BLOCK_N / 2, BM] each
    col = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_out_row + col[:, None]
    mask = (col < n_out)[:, None] & (offs_m < n_rows)[None, :]
    tl.store(out, _silu_mul(gate, up, INTERPRET), mask=mask)


@triton.jit
def _mul_rn(a, b, RN_ASM: tl.constexpr):
    # a * b in fp32, rounded on its own: never contracted with an add into an FMA (PTX mul with
    # an explicit rounding mode), as the rotary kernel computes it (compiled without fusion).
    # Under the interpreter numpy rounds every operation anyway.
    if RN_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        return a * b


@triton.jit
def _add_rn(a, b, RN_ASM: tl.constexpr):
    if RN_ASM:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        return a + b


@triton.jit
def _rotary_epilogue(acc, w_idx, offs_m, pid_n, out_ptr, bias_ptr, n_rows, n_pairs,
                     stride_out_row, positions_ptr, cos_sin_ptr, stride_cs_row, slot_ptr,
                     key_cache_ptr, value_cache_ptr, n_heads, n_kv_heads, n_slots, kv_scale,
                     HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, HEAD_DIM: tl.constexpr,
                     KV_FP8: tl.constexpr, KV_MAN_BITS: tl.constexpr, KV_EXP_BIAS: tl.constexpr,
                     KV_FP8_MAX: tl.constexpr, KV_NAN_CODE: tl.constexpr, KV_FNUZ: tl.constexpr,
                     KV_HAS_INF: tl.constexpr, RN_ASM: tl.constexpr,
                     BLOCK_N: tl.constexpr):  # fmt: skip
    # acc [BLOCK_N, BM]: the rows d and d + HEAD_DIM / 2 of BLOCK_N / 2 (head, d) pairs
    # (ROTARY_OUT). Rounded to the output dtype as the GEMM would store them (bias first), then
    # what `rotary.rotary_write_kv` does with them: q and k pairs rotated by their token's
    # position (NeoX, the whole head), k and v stored at the token's cache slot (slot -1 and
    # slots past the cache skipped), and q, k (rotated) and v stored in out [M, N].
    y = acc
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + w_idx).to(tl.float32)[:, None]
    dtype = out_ptr.dtype.element_ty
    h = cast_rtne(y, dtype, INTERPRET)
    h = tl.permute(tl.reshape(h, (2, BLOCK_N // 2, acc.shape[1])), (1, 2, 0))
    x1, x2 = tl.split(h)  # [BLOCK_N / 2, BM]: dims d and d + HEAD_DIM / 2
    pair = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    head = pair // (HEAD_DIM // 2)
    d = pair % (HEAD_DIM // 2)
    m_ok = offs_m < n_rows
    rot = head < n_heads + n_kv_heads  # q and k heads; v heads pass through
    pos = tl.load(positions_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    cs = cos_sin_ptr + pos[None, :] * stride_cs_row + d[:, None]  # [BLOCK_N / 2, BM]
    cs_ok = rot[:, None] & m_ok[None, :]
    cos = tl.load(cs, mask=cs_ok, other=1.0)
    sin = tl.load(cs + HEAD_DIM // 2, mask=cs_ok, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    y1 = _add_rn(_mul_rn(f1, cos, RN_ASM), _mul_rn(f2, -sin, RN_ASM), RN_ASM)
    y2 = _add_rn(_mul_rn(f2, cos, RN_ASM), _mul_rn(f1, sin, RN_ASM), RN_ASM)
    y1 = tl.where(rot[:, None], cast_rtne(y1, dtype, INTERPRET), x1)
    y2 = tl.where(rot[:, None], cast_rtne(y2, dtype, INTERPRET), x2)
    mask = (pair < n_pairs)[:, None] & m_ok[None, :]
    col = head * HEAD_DIM + d  # [BLOCK_N / 2]: dim d's column of out
    out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_out_row + col[:, None]
    tl.store(out, y1, mask=mask)
    tl.store(out + HEAD_DIM // 2, y2, mask=mask)
    slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
    live = mask & ((slot >= 0) & (slot < n_slots))[None, :]
    is_k = rot & (head >= n_heads)
    kv_head = tl.where(is_k, head - n_heads, head - n_heads - n_kv_heads)
    dst = slot[None, :] * (n_kv_heads * HEAD_DIM) + (kv_head * HEAD_DIM + d)[:, None]
    c1 = kv_cache_value(y1, dtype, key_cache_ptr.dtype.element_ty, kv_scale, KV_FP8, KV_MAN_BITS,
                        KV_EXP_BIAS, KV_FP8_MAX, KV_NAN_CODE, KV_FNUZ, KV_HAS_INF,
                        INTERPRET)  # fmt: skip
    c2 = kv_cache_value(y2, dtype, key_cache_ptr.dtype.element_ty, kv_scale, KV_FP8, KV_MAN_BITS,
                        KV_EXP_BIAS, KV_FP8_MAX, KV_NAN_CODE, KV_FNUZ, KV_HAS_INF,
                        INTERPRET)  # fmt: skip
    k_live = live & is_k[:, None]
    v_live = live & (head >= n_heads + n_kv_heads)[:, None]
    tl.store(key_cache_ptr + dst, c1, mask=k_live)
    tl.store(key_cache_ptr + dst + HEAD_DIM // 2, c2, mask=k_live)
    tl.store(value_cache_ptr + dst, c1, mask=v_live)
    tl.store(value_cache_ptr + dst + HEAD_DIM // 2, c2, mask=v_live)


@triton.jit
def _mac(acc, w, x, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, X_FP8: tl.constexpr,
         W_FP8: tl.constexpr, X_MAN_BITS: tl.constexpr, X_EXP_BIAS: tl.constexpr,
         X_FP8_MAX: tl.constexpr, X_NAN_CODE: tl.constexpr, X_FNUZ: tl.constexpr,
         X_HAS_INF: tl.constexpr, W_MAN_BITS: tl.constexpr, W_EXP_BIAS: tl.constexpr,
         W_FP8_MAX: tl.constexpr, W_NAN_CODE: tl.constexpr, W_FNUZ: tl.constexpr,
         W_HAS_INF: tl.constexpr):  # fmt: skip
    # One K tile into the accumulator: "dot" acc [BN, BM] += w @ x on tensor cores; "fma" acc
    # [BN, BK] += w * x elementwise in fp32 (summed over K once, after the loop).
    if USE_DOT:
        wd = _to_float(w, DOT_DTYPE, W_FP8, W_MAN_BITS, W_EXP_BIAS, W_FP8_MAX, W_NAN_CODE, W_FNUZ,
                       W_HAS_INF)  # fmt: skip
        xd = _to_float(x, DOT_DTYPE, X_FP8, X_MAN_BITS, X_EXP_BIAS, X_FP8_MAX, X_NAN_CODE, X_FNUZ,
                       X_HAS_INF)  # fmt: skip
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(wd, xd, acc, input_precision="ieee")  # fp32 math, never TF32
        else:
            acc = tl.dot(wd, xd, acc)
    else:
        wf = _to_float(w, tl.float32, W_FP8, W_MAN_BITS, W_EXP_BIAS, W_FP8_MAX, W_NAN_CODE, W_FNUZ,
                       W_HAS_INF)  # fmt: skip
        xf = _to_float(x, tl.float32, X_FP8, X_MAN_BITS, X_EXP_BIAS, X_FP8_MAX, X_NAN_CODE, X_FNUZ,
                       X_HAS_INF)  # fmt: skip
        acc += wf * xf
    return acc


@triton.jit(do_not_specialize=["n_rows", "num_splits"])
def _small_m_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    x_scale_ptr,
    w_scale_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,  # FUSED_REDUCE: int32 per (row block, column block), zero between launches
    n_rows,
    n_cols,
    n_k,
    stride_x_row,
    stride_x_col,
    stride_w_row,
    stride_w_col,
    stride_out_row,
    k_per_split,
    num_splits,
    n_out,  # SILU_OUT: the activation's columns; ROTARY_OUT: the (head, d) pairs (N / 2)
    positions_ptr,  # ROTARY_OUT (else stand-ins, never read): int [M]
    cos_sin_ptr,  # fp32 [max_position, HEAD_DIM]
    stride_cs_row,
    slot_ptr,  # int [M]
    key_cache_ptr,  # [num_blocks, block_size, n_kv_heads, HEAD_DIM] (FP8: its uint8 bits)
    value_cache_ptr,
    n_heads,
    n_kv_heads,
    n_slots,
    kv_scale,
    ll_table,  # LL_PUSH (else stand-ins, never read): int64 [LL_WORLD] LL area addresses
    ll_rank,
    ll_epoch_ptr,  # int32: the one-shot workspace's epoch counters (this call's is [0] + 1)
    ll_half_words,
    ll_row_words,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_SCALE: tl.constexpr,
    W_SCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    X_FP8: tl.constexpr,
    W_FP8: tl.constexpr,
    X_MAN_BITS: tl.constexpr,
    X_EXP_BIAS: tl.constexpr,
    X_FP8_MAX: tl.constexpr,
    X_NAN_CODE: tl.constexpr,
    X_FNUZ: tl.constexpr,
    X_HAS_INF: tl.constexpr,
    W_MAN_BITS: tl.constexpr,
    W_EXP_BIAS: tl.constexpr,
    W_FP8_MAX: tl.constexpr,
    W_NAN_CODE: tl.constexpr,
    W_FNUZ: tl.constexpr,
    W_HAS_INF: tl.constexpr,
    INTERPRET: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    SILU_OUT: tl.constexpr,  # w holds [gate; up] (2 n_out rows); out = silu(gate) * up [M, n_out]
    ROTARY_OUT: tl.constexpr,  # w holds [q; k; v] heads: out rotated, k and v to the KV cache
    HEAD_DIM: tl.constexpr,
    KV_FP8: tl.constexpr,
    KV_MAN_BITS: tl.constexpr,
    KV_EXP_BIAS: tl.constexpr,
    KV_FP8_MAX: tl.constexpr,
    KV_NAN_CODE: tl.constexpr,
    KV_FNUZ: tl.constexpr,
    KV_HAS_INF: tl.constexpr,
    RN_ASM: tl.constexpr,  # unfused fp32 multiplies and adds through PTX (NVIDIA, compiled)
    LL_PUSH: tl.constexpr,  # also push the output as the next one-shot all-reduce's LL words
    LL_WORLD: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,  # even K: the first weight tile loads before the PDL wait
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_M rows of x against BLOCK_N weight rows over one K split. Programs of
    # the same weight block and different row blocks are neighbours (axis 0), so a weight tile
    # read from DRAM for one is an L2 hit for the others. SILU_OUT: a program's rows are gate
    # rows j .. j + BLOCK_N / 2 - 1 and the up rows of the same j, so its epilogue writes
    # silu(gate) * up for those columns (a SwiGLU gate_up projection and its activation).
    # ROTARY_OUT: a program's rows are dims d .. d + BLOCK_N / 2 - 1 of the [q; k; v] heads'
    # (head, d < HEAD_DIM / 2) pairs and their partners d + HEAD_DIM / 2, so its epilogue
    # applies the rotary embedding and writes the KV cache (a qkv projection, then
    # `rotary.rotary_write_kv`).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if not EARLY:
        grid_wait(PDL)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the end read row N-1 / M-1 (in bounds, never stored): loads need no row mask, so
    # the only mask is K's tail, and with EVEN_K none at all (full-width vector loads).
    if SILU_OUT:
        half = tl.arange(0, BLOCK_N) // (BLOCK_N // 2)  # 0: gate row, 1: up row
        col = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) % (BLOCK_N // 2)
        w_idx = tl.minimum(col, n_out - 1) + half * n_out
    elif ROTARY_OUT:
        half = tl.arange(0, BLOCK_N) // (BLOCK_N // 2)  # 0: dim d, 1: its partner
        pair = tl.minimum(pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) % (BLOCK_N // 2),
                          n_out - 1)  # fmt: skip
        hd2 = HEAD_DIM // 2
        w_idx = (pair // hd2) * HEAD_DIM + pair % hd2 + half * hd2
    else:
        w_idx = tl.minimum(offs_n, n_cols - 1)
    w_rows = w_idx.to(tl.int64)
    x_rows = tl.minimum(offs_m, n_rows - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_w_row + offs_k[None, :] * stride_w_col  # [BN, BK]
    if USE_DOT:
        x_ptrs = x_ptr + x_rows[None, :] * stride_x_row + offs_k[:, None] * stride_x_col  # [BK, BM]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + x_rows[:, None] * stride_x_row + offs_k[None, :] * stride_x_col  # [1, BK]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # products, summed over K at the end
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, n_k)
    k_loop = k_start
    if EARLY:
        # The first step peeled: its weight tile loads before the wait for the kernel before
        # (weights are written by no kernel), so that load overlaps the other kernel's tail.
        w = tl.load(w_ptrs + k_start * stride_w_col, eviction_policy="evict_first")
        grid_wait(PDL)
        x = tl.load(x_ptrs + k_start * stride_x_col)
        acc = _mac(acc, w, x, USE_DOT, DOT_DTYPE, X_FP8, W_FP8, X_MAN_BITS, X_EXP_BIAS,
                   X_FP8_MAX, X_NAN_CODE, X_FNUZ, X_HAS_INF, W_MAN_BITS, W_EXP_BIAS, W_FP8_MAX,
                   W_NAN_CODE, W_FNUZ, W_HAS_INF)  # fmt: skip
        k_loop = k_start + BLOCK_K
    if LL_PUSH:  # after the wait: the last all-reduce has counted its call; in flight meanwhile
        ll_epoch = tl.load(ll_epoch_ptr) + 1
    for k0 in range(k_loop, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0 * stride_w_col, eviction_policy="evict_first")
            x = tl.load(x_ptrs + k0 * stride_x_col)
        else:
            k_ok = (k0 + offs_k) < k_end
            w = tl.load(w_ptrs + k0 * stride_w_col, mask=k_ok[None, :], other=0,
                        eviction_policy="evict_first")  # fmt: skip
            x_ok = k_ok[:, None] if USE_DOT else k_ok[None, :]
            x = tl.load(x_ptrs + k0 * stride_x_col, mask=x_ok, other=0)
        acc = _mac(acc, w, x, USE_DOT, DOT_DTYPE, X_FP8, W_FP8, X_MAN_BITS, X_EXP_BIAS,
                   X_FP8_MAX, X_NAN_CODE, X_FNUZ, X_HAS_INF, W_MAN_BITS, W_EXP_BIAS, W_FP8_MAX,
                   W_NAN_CODE, W_FNUZ, W_HAS_INF)  # fmt: skip
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[:, None]  # [BN, 1]
    if num_splits == 1:
        if SILU_OUT:
            _silu_epilogue(acc, w_idx, offs_m, pid_n, out_ptr, bias_ptr, n_rows, n_out,
                           stride_out_row, HAS_BIAS, INTERPRET, BLOCK_N)  # fmt: skip
        elif ROTARY_OUT:
            _rotary_epilogue(acc, w_idx, offs_m, pid_n, out_ptr, bias_ptr, n_rows, n_out,
                             stride_out_row, positions_ptr, cos_sin_ptr, stride_cs_row, slot_ptr,
                             key_cache_ptr, value_cache_ptr, n_heads, n_kv_heads, n_slots,
                             kv_scale, HAS_BIAS, INTERPRET, HEAD_DIM, KV_FP8, KV_MAN_BITS,
                             KV_EXP_BIAS, KV_FP8_MAX, KV_NAN_CODE, KV_FNUZ, KV_HAS_INF, RN_ASM,
                             BLOCK_N)  # fmt: skip
        else:
            y = _epilogue(acc, offs_n, offs_m, out_ptr, bias_ptr, x_scale_ptr, w_scale_ptr,
                          n_rows, n_cols, stride_out_row, HAS_BIAS, X_SCALE, W_SCALE,
                          INTERPRET)  # fmt: skip
            if LL_PUSH:
                _ll_push(y, offs_n, offs_m, n_rows, n_cols, ll_table, ll_rank, ll_epoch,
                         ll_half_words, ll_row_words, LL_WORLD)  # fmt: skip
    else:
        # partial: fp32 [S, M, N], contiguous
        part = partial_ptr + (pid_k * n_rows + offs_m.to(tl.int64))[None, :] * n_cols
        mask = (offs_n < n_cols)[:, None] & (offs_m < n_rows)[None, :]
        tl.store(part + offs_n[:, None], acc, mask=mask)
        if FUSED_REDUCE:
            # Every thread's partial stored, then one release-acquire increment: the split that
            # brings the count to num_splits sees all partials and sums them in split order
            # (the reduce kernel's order: the same bits), then zeroes the counter again.
            tile = pid_m * tl.num_programs(1) + pid_n
            tl.debug_barrier()
            count = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if count == num_splits - 1:
                first = partial_ptr + offs_m.to(tl.int64)[None, :] * n_cols + offs_n[:, None]
                step = n_rows.to(tl.int64) * n_cols
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for s in range(num_splits):
                    total += tl.load(first + s * step, mask=mask, other=0.0, cache_modifier=".cg")
                if SILU_OUT:
                    _silu_epilogue(total, w_idx, offs_m, pid_n, out_ptr, bias_ptr, n_rows, n_out,
                                   stride_out_row, HAS_BIAS, INTERPRET, BLOCK_N)  # fmt: skip
                elif ROTARY_OUT:
                    _rotary_epilogue(total, w_idx, offs_m, pid_n, out_ptr, bias_ptr, n_rows,
                                     n_out, stride_out_row, positions_ptr, cos_sin_ptr,
                                     stride_cs_row, slot_ptr, key_cache_ptr, value_cache_ptr,
                                     n_heads, n_kv_heads, n_slots, kv_scale, HAS_BIAS, INTERPRET,
                                     HEAD_DIM, KV_FP8, KV_MAN_BITS, KV_EXP_BIAS, KV_FP8_MAX,
                                     KV_NAN_CODE, KV_FNUZ, KV_HAS_INF, RN_ASM,
                                     BLOCK_N)  # fmt: skip
                else:
                    y = _epilogue(total, offs_n, offs_m, out_ptr, bias_ptr, x_scale_ptr,
                                  w_scale_ptr, n_rows, n_cols, stride_out_row, HAS_BIAS, X_SCALE,
                                  W_SCALE, INTERPRET)  # fmt: skip
                    if LL_PUSH:
                        _ll_push(y, offs_n, offs_m, n_rows, n_cols, ll_table, ll_rank, ll_epoch,
                                 ll_half_words, ll_row_words, LL_WORLD)  # fmt: skip
                tl.atomic_xchg(counter_ptr + tile, 0)


@triton.jit(do_not_specialize=["n_rows", "num_splits", "split_step"])
def _split_k_reduce_kernel(
    partial_ptr,
    out_ptr,
    bias_ptr,
    x_scale_ptr,
    w_scale_ptr,
    n_rows,
    n_cols,
    num_splits,
    split_step,
    stride_out_row,
    HAS_BIAS: tl.constexpr,
    X_SCALE: tl.constexpr,
    W_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[m, n] = epilogue(sum over s = 0, 1, ... of partial[s, m, n]): a fixed order, no atomics.
    grid_wait(PDL)
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    n_ok = offs_n < n_cols
    ptr = partial_ptr + row.to(tl.int64) * n_cols + offs_n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(num_splits):
        acc += tl.load(ptr, mask=n_ok, other=0.0)
        ptr += split_step  # M * N
    offs_m = row + tl.arange(0, 1)
    _epilogue(acc[:, None], offs_n, offs_m, out_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, n_rows,
              n_cols, stride_out_row, HAS_BIAS, X_SCALE, W_SCALE, INTERPRET)  # fmt: skip


# -- launchers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RotaryOut:
    """What the qkv GEMM's rotary epilogue needs (`linear_rotary_write_kv_small_m`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    positions: torch.Tensor  # int [M]
    cos_sin: torch.Tensor  # fp32 [max_position, head_dim], unit column stride
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor  # int [M]
    kv_scale: float

    @property
    def kv_fp8(self) -> bool:
        return self.key_cache.dtype in FP8_CODECS

    @property
    def kv_codec(self) -> dict:
        return fp8_codec(self.key_cache.dtype if self.kv_fp8 else torch.float8_e4m3fn)

    def kernel_args(self) -> tuple:
        n_slots = self.key_cache.shape[0] * self.key_cache.shape[1]
        return (self.positions, self.cos_sin, self.cos_sin.stride(0), self.slot_mapping,
                raw(self.key_cache), raw(self.value_cache), self.num_heads, self.num_kv_heads,
                n_slots, self.kv_scale)  # fmt: skip

    def apply(self, qkv: torch.Tensor) -> torch.Tensor:
        """The two-kernel path on a GEMM's output [M, N]: `rotary.rotary_write_kv`, then q and k
        rotated in place of qkv's."""
        from backends.triton import rotary

        m, d = qkv.shape[0], self.head_dim
        heads = [self.num_heads, self.num_kv_heads, self.num_kv_heads]
        q, k, v = qkv.view(m, -1, d).split(heads, dim=1)
        q_rot, k_rot = rotary.rotary_write_kv(self.positions, q, k, v, self.cos_sin, True,
                                              self.key_cache, self.value_cache,
                                              self.slot_mapping, self.kv_scale)  # fmt: skip
        q.copy_(q_rot)
        k.copy_(k_rot)
        return qkv


def _scale_mode(scale: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    if scale is None:
        return 0, None
    # [1]: one value; [rows, 1] (rows = 1 included): per row, so M = 1 reuses the M > 1 kernel
    return (1 if scale.dim() == 1 else 2), scale.reshape(-1)


def _launch(
    x: torch.Tensor,  # [M, K] float, or FP8 as its uint8 bits
    w: torch.Tensor,  # [N, K] likewise
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    w_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    x_fp8: torch.dtype | None,
    w_fp8: torch.dtype | None,
    cfg: GemvConfig,
    fused_reduce: bool | None = None,
    silu_out: bool = False,
    early: bool = False,
    rotary: RotaryOut | None = None,
    ll_push=None,
) -> torch.Tensor:
    m, k = x.shape[0], w.shape[1]
    n_w = w.shape[0]
    # silu_out: w is [gate; up] (2 n_out rows), out the activation [M, n_out]; rotary: w is the
    # [q; k; v] heads, out [M, N] rotated and n_out the (head, d) pairs. Each column block holds
    # block_n / 2 rows and their partners, and n counts its columns (partials' width).
    paired = silu_out or rotary is not None
    n_out = n_w // 2 if paired else n_w
    out = torch.empty(m, n_out if silu_out else n_w, dtype=out_dtype, device=x.device)
    if m == 0 or n_out == 0:
        return out
    interpret = interpreting()
    splits, k_per_split = split_plan(cfg, m, n_w, k, _sm_count(x.device))
    fused = FUSED_REDUCE if fused_reduce is None else fused_reduce
    col_blocks = triton.cdiv(n_out, cfg.block_n // 2) if paired else triton.cdiv(n_w, cfg.block_n)
    tiles = triton.cdiv(m, cfg.block_m) * col_blocks
    counters = tile_counters(x.device, tiles) if fused and splits > 1 else None
    fused = counters is not None
    if paired and splits > 1 and not fused:  # the split-K sum needs the epilogue: two kernels
        h = _launch(x, w, bias, x_scale, w_scale, out_dtype, x_fp8, w_fp8, cfg, fused_reduce,
                    early=early)  # fmt: skip
        if silu_out:
            from backends.triton import activation

            return activation.silu_and_mul(h)
        return rotary.apply(h)
    n = col_blocks * cfg.block_n if paired else n_w
    # fp32 partials [S, M, N] (a 1-element stand-in without split-K keeps one compiled kernel)
    partial_shape = (splits, m, n) if splits > 1 else (1,)
    partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device)
    native = native_fp8(x.device)
    x_mode, w_mode = (
        _NOT_FP8 if fmt is None else _NATIVE_MODE.get(fmt, _CODEC) if native else _CODEC
        for fmt in (x_fp8, w_fp8)
    )
    if x_fp8 is not None or w_fp8 is not None:
        dot_dtype = tl.float16  # holds every FP8 value exactly
    elif x.dtype == torch.bfloat16 and interpret:
        dot_dtype = tl.float32  # the interpreter's bf16 tl.dot is wrong (Triton issue #11584)
    else:
        dot_dtype = _TL_FLOAT[x.dtype]
    x_codec = fp8_codec(x_fp8) if x_fp8 is not None else _NO_CODEC
    w_codec = fp8_codec(w_fp8) if w_fp8 is not None else _NO_CODEC
    x_s_mode, x_s = _scale_mode(x_scale)
    w_s_mode, w_s = _scale_mode(w_scale)
    flags = dict(HAS_BIAS=bias is not None, X_SCALE=x_s_mode, W_SCALE=w_s_mode, INTERPRET=interpret)
    dummy = out  # stands in for absent optional pointers (never read)
    grid = (triton.cdiv(m, cfg.block_m), col_blocks, splits)
    if max(grid[1:]) > _MAX_GRID:
        raise ValueError(
            f"config: block_n={cfg.block_n} gives {grid[1]} column blocks and split_k {splits} "
            f"splits; each must be <= {_MAX_GRID} (use a larger block_n / block_k)"
        )
    pdl = pdl_args(x.device, "gemm")
    # ll_push (`allreduce.LLPush`): the output also goes out as the next one-shot all-reduce's
    # low-latency words, from the epilogue; not for the paired epilogues or a split-K sum in a
    # second kernel. ll_push.done says whether this launch pushed.
    push = ll_push is not None and not paired and (splits == 1 or fused)
    if push:
        if (m, n_w) != (ll_push.rows, ll_push.cols):
            raise ValueError(
                f"ll_push: made for a [{ll_push.rows}, {ll_push.cols}] output, got [{m}, {n_w}]"
            )
        ll_args = (ll_push.table, ll_push.rank, ll_push.epochs, ll_push.half_words,
                   ll_push.row_words)  # fmt: skip
    else:
        ll_args = (dummy, 0, dummy, 0, 0)
    if ll_push is not None:
        ll_push.done = push
    if rotary is None:  # stand-ins for the rotary arguments (never read)
        rot_args = (dummy, dummy, 0, dummy, dummy, dummy, 0, 0, 0, 1.0)
        kv_fp8, kv_codec, head_dim = False, fp8_codec(torch.float8_e4m3fn), 0
    else:
        rot_args = rotary.kernel_args()
        kv_fp8, kv_codec, head_dim = rotary.kv_fp8, rotary.kv_codec, rotary.head_dim
    _small_m_kernel[grid](
        x, w, dummy if bias is None else bias, dummy if x_s is None else x_s,
        dummy if w_s is None else w_s, out, partial, counters if fused else partial,
        m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0),
        k_per_split, splits, n_out, *rot_args, *ll_args,
        LL_PUSH=push, LL_WORLD=ll_push.world if push else 1,
        ROTARY_OUT=rotary is not None, HEAD_DIM=head_dim, KV_FP8=kv_fp8,
        **{f"KV_{key}": value for key, value in kv_codec.items()},
        RN_ASM=rotary is not None and not interpret,
        USE_DOT=cfg.kernel == "dot", EVEN_K=k % cfg.block_k == 0, DOT_DTYPE=dot_dtype,
        X_FP8=x_mode, W_FP8=w_mode,
        **{f"X_{key}": value for key, value in x_codec.items()},
        **{f"W_{key}": value for key, value in w_codec.items()},
        FUSED_REDUCE=fused, SILU_OUT=silu_out, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EARLY=early and k > 0 and k % cfg.block_k == 0,  # the peeled step needs a whole tile
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags, **pdl,
    )  # fmt: skip
    if splits > 1 and not fused:
        _split_k_reduce_kernel[(triton.cdiv(n, _REDUCE_BLOCK), m)](
            partial, out, dummy if bias is None else bias, dummy if x_s is None else x_s,
            dummy if w_s is None else w_s, m, n, splits, m * n, out.stride(0),
            BLOCK=_REDUCE_BLOCK, num_warps=4, **flags, **pdl,
        )  # fmt: skip
    return out


def _check_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"tensors must share one device, got {where}")


def linear_small_m(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    configs: ConfigTable | None = None,
    fused_reduce: bool | None = None,
    early: bool | None = None,
    ll_push=None,
) -> torch.Tensor:
    """y = x @ weight.T + bias with fp32 accumulation, one rounding to x's dtype.

    x: [M, K] fp32 / bf16 / fp16; weight: [N, K] in x's dtype (any strides; contiguous rows
    stream fastest); bias: [N] (any float dtype, added in fp32). Returns [M, N] in x's dtype.
    Tuned for M <= 16; any M is computed correctly. `config` forces a launch shape, else the
    table (`configs`, default DEFAULT_CONFIGS) or the heuristic picks one. fused_reduce: the
    split-K sum inside the kernel (None: FUSED_REDUCE). early: read the first weight tile before
    waiting for the kernel before this one under PDL, which is only right when no kernel that
    may still run writes the weight (None: EARLY and the weight is an nn.Parameter). ll_push
    (`allreduce.LLPush`): y also goes out as the next one-shot all-reduce's low-latency words
    (ll_push.done: whether it did; a split-K sum in a second kernel does not push).
    """
    return _dense(x, weight, bias, config, configs, fused_reduce, False, early, ll_push=ll_push)


def linear_silu_and_mul_small_m(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    configs: ConfigTable | None = None,
    fused_reduce: bool | None = None,
    early: bool | None = None,
) -> torch.Tensor:
    """silu_and_mul(linear_small_m(x, weight, bias)) in one launch where it can, bit for bit the
    two Triton kernels (a SwiGLU MLP's gate_up projection and its activation): each program
    takes block_n / 2 gate rows and the up rows of the same columns, and its epilogue rounds the
    products as the GEMM would store them and writes silu(gate) * up instead.

    x: [M, K] bf16 / fp16 / fp32; weight: [2 D, K] in x's dtype, the D gate rows then the D up
    rows; bias: [2 D]. Returns [M, D] in x's dtype. The launch shape is the one `linear_small_m`
    picks for [M, K] x [2 D, K] (block_n >= 2); a split-K launch without the in-kernel sum
    (HAL_GEMV_FUSED_REDUCE=0, or counters that would grow during a graph capture) runs the GEMM
    and then the activation kernel. early as in `linear_small_m`."""
    return _dense(x, weight, bias, config, configs, fused_reduce, True, early)


def _early(weight: torch.Tensor, early: bool | None) -> bool:
    # See linear_small_m: engine weights are nn.Parameters, written by no kernel after loading.
    return EARLY and isinstance(weight, torch.nn.Parameter) if early is None else early


def linear_rotary_write_kv_small_m(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
    config: GemvConfig | None = None,
    configs: ConfigTable | None = None,
    fused_reduce: bool | None = None,
    early: bool | None = None,
) -> torch.Tensor:
    """A qkv projection and `rotary.rotary_write_kv` (NeoX, rotary_dim = head_dim) in one launch
    where it can, bit for bit the two Triton kernels: each program takes block_n / 2 dims d <
    head_dim / 2 of a head and their partners d + head_dim / 2, and its epilogue rounds the
    products as the GEMM would store them, rotates the q and k pairs by the token's position and
    stores the rotated k and v at the token's cache slot (slot -1 skips it).

    x: [M, K] bf16 / fp16 / fp32; weight: [(num_heads + 2 num_kv_heads) head_dim, K] in x's
    dtype, the q heads, then k, then v; bias: [N]; positions, slot_mapping: int [M];
    cos_sin_cache: fp32 [max_position, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim], contiguous (FP8 stores fp8(x / kv_scale)). Returns [M, N]: q and k
    rotated, v as projected. NVIDIA GPUs (the epilogue's unfused multiplies are PTX) and the
    interpreter. A split-K launch without the in-kernel sum runs the GEMM, then the rotary
    kernel. config, configs, fused_reduce, early as in `linear_small_m`."""
    from backends.triton.kv_cache import _check_caches

    _check_caches(key_cache, value_cache)
    head_dim = key_cache.shape[3]
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if num_heads < 1 or num_kv_heads < 1 or key_cache.shape[2] != num_kv_heads:
        raise ValueError(
            f"num_heads / num_kv_heads: {num_heads} / {num_kv_heads}; both must be >= 1 and the "
            f"caches hold {key_cache.shape[2]} KV heads"
        )
    if weight.dim() != 2 or weight.shape[0] != rows:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)}; expected [{rows}, K] = (num_heads {num_heads} "
            f"+ 2 x num_kv_heads {num_kv_heads}) x head_dim {head_dim} rows"
        )
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache: shape {tuple(cos_sin_cache.shape)}; the fused epilogue rotates whole "
            f"heads: expected [max_position, head_dim {head_dim}] with head_dim even (use "
            "rotary_write_kv after the GEMM for a partial rotary_dim)"
        )
    m = x.shape[0] if x.dim() == 2 else -1
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.dim() != 1 or t.dtype.is_floating_point or t.shape[0] != m:
            raise ValueError(
                f"{name}: expected an integer [M={m}] tensor, got {t.dtype} {tuple(t.shape)}"
            )
    scale = 1.0 if kv_scale is None else float(kv_scale)
    if key_cache.dtype in FP8_CODECS and not scale > 0:
        raise ValueError(f"kv_scale: {kv_scale} must be > 0")
    if torch.version.hip is not None and not interpreting():
        raise ValueError("the fused qkv + rotary epilogue runs on NVIDIA GPUs (PTX) only")
    _check_device(x=x, positions=positions, slot_mapping=slot_mapping, key_cache=key_cache,
                  value_cache=value_cache, cos_sin_cache=cos_sin_cache)  # fmt: skip
    cache = cos_sin_cache.to(torch.float32)
    rotary = RotaryOut(num_heads, num_kv_heads, head_dim, positions,
                       cache if cache.stride(1) == 1 else cache.contiguous(), key_cache,
                       value_cache, slot_mapping, scale)  # fmt: skip
    return _dense(x, weight, bias, config, configs, fused_reduce, False, early, rotary)


def _dense(x, weight, bias, config, configs, fused_reduce, silu_out: bool, early,
           rotary: RotaryOut | None = None, ll_push=None) -> torch.Tensor:  # fmt: skip
    # The float GEMMs' checks, then the launch; silu_out: weight is [gate; up], out the activation;
    # rotary: weight is [q; k; v], out rotated and the KV cache written.
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"x/weight: expected [M, K] and [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not one of float32, bfloat16, float16")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    k = weight.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"x: K={x.shape[1]} differs from weight's K={k}")
    if silu_out and weight.shape[0] % 2:
        raise ValueError(
            f"weight: {weight.shape[0]} rows; expected an even count (the gate rows, then as many "
            "up rows)"
        )
    _check_bias(bias, weight.shape[0])
    if bias is not None and bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"bias: dtype {bias.dtype} is not one of float32, bfloat16, float16")
    _check_device(x=x, weight=weight, bias=bias)
    cfg = config or pick_config(weight.element_size(), x.shape[0], weight.shape[0], k, configs,
                                silu_out)  # fmt: skip
    if (silu_out or rotary is not None) and cfg.block_n < 2:
        raise ValueError(
            f"config: block_n={cfg.block_n}; the fused epilogue needs block_n >= 2 (a row and its "
            "partner per column)"
        )
    return _launch(x, weight, bias, None, None, x.dtype, None, None, cfg, fused_reduce,
                   silu_out=silu_out, early=_early(weight, early), rotary=rotary,
                   ll_push=ll_push)  # fmt: skip


def fp8_linear_small_m(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemvConfig | None = None,
    configs: ConfigTable | None = None,
    fused_reduce: bool | None = None,
    early: bool | None = None,
) -> torch.Tensor:
    """y = (x_q @ w_q.T, exact products, fp32 accumulation) * x_scale * w_scale.T + bias.

    The contract of hal Backend.fp8_linear: x_q: fp8 [M, K]; x_scale: [1] or [M, 1]; w_q: fp8
    [N, K] (any FP8 format, may differ from x_q's); w_scale: [1] or [N, 1]; bias: [N]. Returns
    [M, N] in out_dtype (fp32, bf16 or fp16). Tuned for M <= 16; any M is computed correctly.
    early: as in `linear_small_m` (about w_q).
    """
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, is_fp8, "an FP8 format")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: {out_dtype} is not one of float32, bfloat16, float16")
    _check_device(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    (m, k), n = x_q.shape, w_q.shape[0]
    cfg = config or pick_config(1, m, n, k, configs)
    return _launch(raw(x_q), raw(w_q), bias, x_scale, w_scale, out_dtype, x_q.dtype, w_q.dtype, cfg,
                   fused_reduce, early=_early(w_q, early))  # fmt: skip


# -- dispatch rules (the backends' M switch) -----------------------------------------------------
def _leading_rows(x: torch.Tensor) -> int:
    m = 1
    for size in x.shape[:-1]:
        m *= size
    return m


def small_m_reasons(x: torch.Tensor, weight: torch.Tensor, max_m: int = MAX_M) -> list[str]:
    """Why `linear` should not take these inputs (empty: it should). M = the product of x's
    leading dims; the kernel is for bf16 / fp16 at M <= max_m with K % 16 == 0 and weight rows
    contiguous (16-byte loads); anything else is cuBLAS's."""
    if x.dim() == 0 or weight.dim() != 2:
        shapes = f"{tuple(x.shape)} / {tuple(weight.shape)}"
        return [f"x / weight have shapes {shapes}, not [..., K] / [N, K]"]
    reasons = []
    m = _leading_rows(x)
    if m > max_m:
        reasons.append(f"M={m} > {max_m}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"dtype {x.dtype} is not bfloat16 or float16")
    if weight.stride(1) != 1:
        reasons.append("weight rows are not contiguous")
    elif weight.shape[1] % K_ALIGN:
        reasons.append(f"K={weight.shape[1]} is not a multiple of {K_ALIGN}")
    return reasons


def fp8_small_m_reasons(x_q: torch.Tensor, max_m: int = MAX_M) -> list[str]:
    """Why `fp8_linear` should not take these inputs (empty: it should): M > max_m."""
    m = x_q.shape[0] if x_q.dim() == 2 else 0  # other shapes: fp8_linear_small_m says why
    return [f"M={m} > {max_m}"] if m > max_m else []
