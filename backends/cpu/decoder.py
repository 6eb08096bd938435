"""The CPU backend's `gguf_decoder_layers` for decode batches: the C kernels called straight from
one loop over the layers, with the checks made once per call instead of once per op.

A decode step of the default model (30 layers, ~135M parameters) makes ~270 backend calls; on
two cores each costs ~10-15 us of Python (module dispatch, the ops' checks, dtype and layout
tests) beside its C work, ~4 ms of a ~13 ms token. Here the stack is checked once
(`prepare`: every linear has the codes kernel's handle, the C rms_norm / rotary / attention
kernels are the backend's choices) and each call once (`run`: fp32 rows, a decode batch of at
most the codes kernel's rows, fp32 caches), then each layer is the same kernel calls, on the
same inputs, in the same order as the backend's ops make them (`Backend.gguf_decoder_layers`'
composition), so the same bits. Anything else (prefill, chunked or mixed batches, other dtypes or
caches, no kernels) is the composition. `HAL_CPU_FUSED_DECODER=0` keeps the engine on its
modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cpu import activation, ckernels, gguf_fast
from hal.backend import GGUFDecoderLayer, GGUFDecoderStack


@dataclass(frozen=True)
class Plan:
    """What `prepare` checked for a stack: the kernels and the most rows a call may have."""

    rms: ckernels.RmsNormKernel
    rotary: ckernels.RotaryKernel
    attention: ckernels.AttentionKernel
    max_rows: int


def _rows(weight) -> int | None:
    """The most rows the backend's gguf_linear sends to this weight's codes kernel, or None when
    it has no codes handle."""
    data = weight.data
    if not isinstance(data, ckernels.CodesWeight):
        return None
    return min(data.kernel.max_m, gguf_fast.chunked_rows(weight.layout))


def prepare(backend, stack: GGUFDecoderStack) -> Plan | None:
    """The plan for a stack on this backend, or None when some op would not be the C kernel the
    lean loop calls (then every call takes the composition)."""
    kernels = (backend.rms_norm_kernel, backend.rotary_kernel, backend.attention_kernel)
    if any(k is None for k in kernels) or not stack.is_neox:
        return None
    chosen = {f: backend.chosen(f) for f in ("rms_norm", "rotary", "kv_write", "attention")}
    if chosen != {"rms_norm": "c", "rotary": "c", "kv_write": "native", "attention": "c"}:
        return None
    cs = stack.cos_sin_cache
    if cs.dtype != torch.float32 or not cs.is_contiguous() or cs.device.type != "cpu":
        return None
    rows = []
    for layer in stack.layers:
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            r = _rows(w)
            if r is None:
                return None
            rows.append(r)
        for n in (layer.input_norm, layer.post_norm):
            if n.dtype != torch.float32 or not n.is_contiguous():
                return None
    return Plan(*kernels, max_rows=min(rows)) if rows else None


def _int(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def run(
    plan: Plan,
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    stack: GGUFDecoderStack,
    positions: torch.Tensor,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layers as `Backend.gguf_decoder_layers` composes them, or None (nothing written) when
    this call is not a decode batch the plan takes."""
    t = hidden.shape[0]
    if not (
        hidden.dim() == 2
        and hidden.dtype == torch.float32
        and hidden.is_contiguous()
        and 1 <= t <= plan.max_rows
        and ckernels.RMS_NORM_MIN <= hidden.shape[1] <= ckernels.RMS_NORM_MAX
        and seq_lens.shape[0] == t
        and len(kv_caches) == len(stack.layers)
        and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()))
    ):
        return None
    qsl = _int(query_start_loc, torch.int32)
    if max_query_len != 1 and not torch.equal(qsl, torch.arange(t + 1, dtype=torch.int32)):
        return None  # not one query token per sequence
    for kc, vc in kv_caches:
        if not all(
            c.dtype == torch.float32 and c.is_contiguous() and c.dim() == 4 for c in (kc, vc)
        ):
            return None
    pos, slots = _int(positions, torch.int64), _int(slot_mapping, torch.int64)
    if block_tables.stride(-1) != 1:  # the attention op would take its SDPA path
        return None
    tables = block_tables if block_tables.dtype == torch.int32 else _int(block_tables, torch.int32)
    lens = _int(seq_lens, torch.int32)
    cs = stack.cos_sin_cache
    layer: GGUFDecoderLayer
    for layer, (kc, vc) in zip(stack.layers, kv_caches, strict=True):
        if residual is None:
            x, residual = plan.rms.run(hidden, layer.input_norm, layer.eps), hidden
        else:
            x, residual = plan.rms.run(hidden, layer.input_norm, layer.eps, residual)
        d = kc.shape[-1]
        qkv = layer.qkv.data(x).view(t, -1, d)
        q, k, v = qkv.split([layer.num_heads, layer.num_kv_heads, layer.num_kv_heads], dim=1)
        q, _ = plan.rotary.run(pos, q, k, cs, v, kc, vc, slots)
        a = plan.attention.run(q, kc, vc, tables, lens, qsl, layer.scale, layer.sliding_window)
        if a is None:  # the kernel saw a batch that is not decode: checked above, so a bug
            raise RuntimeError("decode_attention_f32 refused a batch the lean loop checked")
        x, residual = plan.rms.run(
            layer.o.data(a.view(t, layer.num_heads * d)), layer.post_norm, layer.eps, residual
        )
        hidden = layer.down.data(activation.silu_and_mul(layer.gate_up.data(x)))
    return hidden, residual
