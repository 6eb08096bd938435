"""Programmatic dependent launch (PDL, NVIDIA sm_90 and newer) for the kernels of a decode step.

A kernel launched with PDL may start while the kernel before it on the stream is still running
(once every program of that one has started): its programs take the SM slots the earlier kernel
frees and sit at `griddepcontrol.wait` until it has finished and its writes are visible. That
hides the launch, the scheduling of programs and their set-up behind the earlier kernel's tail.
H200, Llama-3-8B shape, batch-1 decode with CUDA graphs: 4.66 -> 4.50 ms per step; with the
GEMMs left out of PDL (HAL_PDL_SKIP=gemm) 4.69, so the gain is the weight-streaming kernels'
(docs/benchmarks.md, tenth session). Tried and dropped: a bulk L2 prefetch of each program's
first weights before the wait (4.88 ms with 4 KiB per GEMV row; the 4-bit kernel 2-20% slower).

The rule that keeps it correct: every kernel launched with PDL runs `grid_wait` in every program
before it touches any tensor another kernel writes (its inputs, outputs and scratch), and before
it ends. Then no PDL kernel ends before the one before it, so "finished" stays transitive along
the stream, and a kernel launched the usual way after a PDL kernel waits for it as always.
Weights that no kernel writes after loading are the one exception: the decode GEMMs read their
first weight tile before the wait (`gemv.EARLY` for nn.Parameter weights, `int4_gluon.EARLY` for
repacked 4-bit words), so that load overlaps the previous kernel's tail (H200, batch-1 8B decode
4.50 -> 4.44 ms, GPTQ 4-bit 2.41 -> 2.35 ms; eighteenth session).
`HAL_PDL=0` launches every kernel the usual way; HAL_PDL_SKIP names families (gemm, attention,
norm, rotary, kv, activation) to leave out. Same results either way: PDL changes only when a
program starts.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("HAL_PDL", "1") != "0"


@functools.cache
def _sm90_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: an NVIDIA GPU of compute capability 9.0 or
    newer, not under the interpreter, and HAL_PDL not 0."""
    if not ENABLED or device.type != "cuda" or torch.version.hip is not None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return _sm90_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(pdl: bool) -> dict:
    """The launch keyword for a kernel whose PDL constexpr is `pdl` (none without it, so
    backends whose Triton has no such option never see it)."""
    return {"launch_pdl": True} if pdl else {}


# Kernel families launched the usual way even where PDL is on (comma-separated: HAL_PDL_SKIP).
SKIP = frozenset(filter(None, os.environ.get("HAL_PDL_SKIP", "").split(",")))


def pdl_args(device: torch.device, family: str = "") -> dict:
    """Keywords for launching a kernel of `family` that takes a PDL constexpr on `device`."""
    pdl = use_pdl(device) and family not in SKIP
    return {"PDL": pdl, **launch_kwargs(pdl)}


@triton.jit
def let_next_start(PDL: tl.constexpr):
    # Under PDL: let the next kernel start as soon as every program of this one has run this,
    # before this one waits ("early trigger"; `grid_wait` signals again after its wait, which
    # changes nothing). Then "started" no longer implies that this kernel's predecessor has
    # finished: only for kernels whose successors read nothing before their own wait but what no
    # running kernel writes (weights, host-copied step metadata); "finished" stays transitive.
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def grid_wait(PDL: tl.constexpr):
    # Under PDL: wait for the kernel before this one to finish (its writes visible), then let the
    # next kernel start as soon as every program of this one runs. Without PDL: nothing.
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


try:  # the same wait for Gluon kernels (Triton >= 3.5; without Gluon no kernel needs it)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def gluon_grid_wait(PDL: gl.constexpr):
        # `grid_wait` for Gluon kernels: under PDL wait for the previous kernel (its writes
        # visible), then let the next one launch.
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)  # fmt: skip
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip

except Exception:  # pragma: no cover - depends on the installed Triton
    gluon_grid_wait = None
