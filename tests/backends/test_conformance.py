"""Every available backend against the float64 CPU reference, op by op and dtype by dtype, on
Hypothesis-drawn cases (tests/conformance); a cell passes only if cases ran and the dispatch hit
the implementation the backend reports. HYPOTHESIS_PROFILE=thorough explores further."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from backends.cpu.backend import CpuBackend
from hal.backend import Backend
from hal.select import select_ops
from tests.conformance.cases import OPS, OPS_BY_NAME, OpSpec
from tests.conformance.runner import run_cell
from tests.conformance.targets import BackendTarget, available_backends

TARGETS = available_backends()
CELLS = [
    pytest.param(target, op, dtype, id=f"{target.name}-{op.name}-{dtype}")
    for target in TARGETS
    for op in OPS
    for dtype in op.dtypes
]
_LOADED: dict[str, Backend] = {}


def _backend(target: BackendTarget) -> Backend:
    if target.mode == "unavailable":
        pytest.skip(f"backend {target.name} cannot run here: {target.reason}")
    if target.name not in _LOADED:
        _LOADED[target.name] = target.load()
    return _LOADED[target.name]


def test_registry_offers_cpu() -> None:
    # The reference runs everywhere, so a conformance run can never be empty.
    assert any(t.name == "cpu" and t.mode == "native" for t in TARGETS), TARGETS


def test_registry_offers_rocm_with_the_mi300x_profile() -> None:
    # Without an AMD GPU the rocm column still runs: its Triton kernels, interpreted, on MI300X's
    # capabilities (gfx942: e4m3fnuz, 64-wide wavefronts).
    rocm = next(t for t in TARGETS if t.name == "rocm")
    assert rocm.mode in ("native", "interpreter"), rocm
    if rocm.mode == "interpreter":
        assert rocm.caps.arch == "gfx942" and rocm.caps.fp8_format == "e4m3fnuz"


@pytest.mark.parametrize(("target", "op", "dtype"), CELLS)
def test_conformance(target: BackendTarget, op: OpSpec, dtype: str, hypothesis_profile: str):
    cell = run_cell(_backend(target), op, dtype, hypothesis_profile, label=target.label)
    if cell.status == "skip":
        pytest.skip(cell.reason)
    assert cell.status == "pass", cell.report()
    assert cell.cases > 0


# -- the harness itself can fail: one planted bug per backend, each must turn its cell red ------
class _LowPrecisionAttention(CpuBackend):
    def attention(self, query, key_cache, value_cache, *args, **kwargs):
        # Computes in bf16 whatever the query dtype: fine for bf16 cells, wrong for fp32.
        out = super().attention(query.bfloat16(), key_cache.bfloat16(), value_cache.bfloat16(),
                                *args, **kwargs)  # fmt: skip
        return out.to(query.dtype)


class _NoSlidingWindow(CpuBackend):
    def attention(self, *args, sliding_window=None, **kwargs):
        return super().attention(*args, sliding_window=None, **kwargs)


class _DropsLastToken(CpuBackend):
    def write_kv(self, key, value, key_cache, value_cache, slot_mapping, kv_scale=None):
        slots = slot_mapping.clone()
        slots[-1] = -1
        super().write_kv(key, value, key_cache, value_cache, slots, kv_scale)


class _FloorInt8(CpuBackend):
    def quantize_int8(self, x, scale=None, per_token=True):
        _, s = super().quantize_int8(x, scale, per_token)
        return torch.floor(x.float() / s).clamp(-128, 127).to(torch.int8), s


class _SwappedRotary(CpuBackend):
    def rotary(self, positions, query, key, cos_sin_cache, is_neox=True):
        return super().rotary(positions, query, key, cos_sin_cache, not is_neox)


class _StaleGraph(CpuBackend):
    def capture_graph(self, fn, pool=None):
        runner = super().capture_graph(fn, pool)
        first = runner.replay()
        runner.replay = lambda: first  # replays the capture-time result
        return runner


class _BypassesDispatch(CpuBackend):
    def silu_and_mul(self, x):
        # Right numbers, but not through the implementation the backend reports.
        d = x.shape[-1] // 2
        return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


class _OneCacheForAllLayers(CpuBackend):
    def gguf_decoder_layers(self, hidden, residual, stack, positions, kv_caches, *args, **kw):
        # Every layer writes and reads the first layer's caches.
        one = [kv_caches[0]] * len(kv_caches)
        return super().gguf_decoder_layers(hidden, residual, stack, positions, one, *args, **kw)


PLANTED = [
    (_LowPrecisionAttention, "attention", "fp32"),
    (_NoSlidingWindow, "attention", "fp16"),
    (_DropsLastToken, "kv_write", "bf16"),
    (_FloorInt8, "quantize_int8", "int8"),
    (_SwappedRotary, "rotary/gptj", "fp32"),
    (_StaleGraph, "graph", "fp32"),
    (_BypassesDispatch, "silu_and_mul", "bf16"),
    (_OneCacheForAllLayers, "gguf_decoder_layers/Q4_1", "fp32"),
]


@pytest.mark.parametrize(("cls", "op", "dtype"), PLANTED, ids=[p[0].__name__ for p in PLANTED])
def test_planted_bug_fails_its_cell(cls, op: str, dtype: str, cpu_caps) -> None:
    backend = cls(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    cell = run_cell(backend, OPS_BY_NAME[op], dtype, "ci", max_examples=15, shrink=False)
    assert cell.status == "fail", cell.report()
    assert cell.failing_case, "a failure must print the drawn case"


def test_empty_run_fails(cpu_caps) -> None:
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    never = dataclasses.replace(
        OPS_BY_NAME["silu_and_mul"], strategy=lambda dt, c, lim: st.nothing()
    )
    cell = run_cell(backend, never, "fp32", "ci", max_examples=5)
    assert cell.status == "fail" and cell.cases == 0, cell.report()


def test_unsupported_dtype_skips_with_reason(cpu_caps) -> None:
    caps = dataclasses.replace(cpu_caps, dtypes={**cpu_caps.dtypes, "fp16": "none"})
    backend = CpuBackend(caps, "cpu", select_ops("cpu", caps))
    cell = run_cell(backend, OPS_BY_NAME["linear"], "fp16", "ci")
    assert cell.status == "skip" and "fp16 not supported" in cell.reason, cell.report()


def test_a_row_the_backend_composes_skips_with_reason(cpu_caps, monkeypatch) -> None:
    monkeypatch.setenv("HAL_CPU_FUSED_DECODER", "0")  # read when the backend is built
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps))
    cell = run_cell(backend, OPS_BY_NAME["gguf_decoder_layers/Q4_0"], "fp32", "ci")
    assert cell.status == "skip" and "op by op" in cell.reason, cell.report()
