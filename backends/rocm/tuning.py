"""Launch tuning of the shared Triton attention kernels for AMD GPUs (64-wide wavefronts, MFMA).

Tile sizes are numerics-neutral (every choice computes the same online softmax), so they also
run under the interpreter and on NVIDIA. The AMD-only compile options (`waves_per_eu`,
`matrix_instr_nonkdim`) exist only in Triton's HIP backend, whose option parser is the only one
that accepts them: they are passed when the kernel compiles for HIP, never otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton

from backends.triton.attention import DECODE_CONFIGS, DecodeConfig
from backends.triton.quant import interpreting


@dataclass(frozen=True)
class AttentionTuning:
    """One launch of the general attention kernel: tile rows/keys, wavefronts per program,
    pipelining, and the AMD compiler hints (0 lets the compiler choose)."""

    block_m: int  # rows: query tokens x query heads of one KV head
    block_n: int  # KV positions per step
    num_warps: int  # wavefronts per program (64 lanes each on CDNA)
    num_stages: int
    waves_per_eu: int = 0  # occupancy hint (amdgpu-waves-per-eu)
    matrix_instr_nonkdim: int = 0  # MFMA shape: 16 (16x16xK) or 32 (32x32xK); 0: compiler's pick


def attention_tuning(warp_size: int, fp32: bool, head_dim_p2: int, group: int) -> AttentionTuning:
    """The general (prefill) kernel's tile on an AMD GPU with `warp_size`-lane wavefronts.

    CDNA (64 lanes): 64 x 64 tiles, 4 wavefronts (one per SIMD of a CU), 2 waves per SIMD and
    16x16 MFMA, one stage (AMD's Triton FlashAttention on MI300 uses BLOCK_M 64-128, BLOCK_N 64,
    waves_per_eu 2, num_stages 1: a second stage doubles LDS use, 64 KiB per CU on gfx942, for
    no gain on this loop). fp32 operands or head_dim > 128 double each tile's registers: 32 keys
    and one wave per SIMD. RDNA (32 lanes) takes the NVIDIA-sized tiles without hints.
    """
    big = fp32 or head_dim_p2 > 128
    if warp_size == 64:
        tune = AttentionTuning(64, 32 if big else 64, 4, 1, 1 if big else 2, 16)
    else:
        tune = AttentionTuning(32 if big else 64, 32 if big else 64, 4, 1)
    # Every program holds all `group` query heads of its KV head.
    return dataclasses.replace(tune, block_m=max(tune.block_m, triton.next_power_of_2(group)))


def amd_decode_config(warp_size: int, head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """The split-KV decode kernel's launch on AMD: 64 keys per step (32 for fp32 operands or
    head_dim > 128), 4 wavefronts, one stage (LDS, as above); splits chosen from shapes by the
    shared kernel. RDNA (32 lanes) keeps the shared table's entry."""
    wide = dtype == torch.float32 or triton.next_power_of_2(max(head_dim, 1)) > 128
    if warp_size != 64:  # the NVIDIA table's entry for GPUs without sm_90's shared memory
        return DECODE_CONFIGS[("wide" if wide else "narrow", "small_smem")]
    return DecodeConfig(block_n=32 if wide else 64, num_warps=4, num_stages=1)


@functools.cache
def _active_backend() -> str:
    # Triton's active driver names its target: "hip" on ROCm, "cuda" on NVIDIA. Only asked when a
    # kernel is about to compile for a GPU (the driver needs one).
    return triton.runtime.driver.active.get_current_target().backend


def compile_options(tune: AttentionTuning, target_backend: str | None) -> dict[str, int]:
    """Launch kwargs for the compiler: num_warps and num_stages everywhere, plus the AMD hints
    when `target_backend` is "hip" (None: the interpreter, which takes no options)."""
    if target_backend is None:
        return {}
    opts = {"num_warps": tune.num_warps, "num_stages": tune.num_stages}
    if target_backend == "hip":
        if tune.waves_per_eu:
            opts["waves_per_eu"] = tune.waves_per_eu
        if tune.matrix_instr_nonkdim:
            opts["matrix_instr_nonkdim"] = tune.matrix_instr_nonkdim
    return opts


def target_backend(device_type: str) -> str | None:
    """The compiler a launch on `device_type` tensors uses: "hip", "cuda", or None (the
    interpreter, or CPU tensors)."""
    if interpreting() or device_type != "cuda":
        return None
    return _active_backend()
