"""The CPU backend's `gguf_decoder_layers` for decode batches: each layer one C call
(`csrc/decoder_layer.c`) that runs the C kernels the backend's ops run, through their loaded
libraries' function pointers, plus torch's SiLU-and-mul between two calls.

A decode step of the default model (30 layers, ~135M parameters) made ~270 backend calls; on
two cores each cost ~10-15 us of Python (module dispatch, the ops' checks, dtype and layout
tests, output allocation) beside its C work, ~4 ms of a ~13 ms token. Here the stack is checked
once (`prepare`: every linear has the codes kernel's handle, the C rms_norm / rotary / attention
kernels are the backend's choices, the driver loads) and each call once (`run`: fp32 rows, a
decode batch of at most the codes kernel's rows, fp32 caches); each layer is then the same
kernels on the same inputs in the same order as `Backend.gguf_decoder_layers` composes the ops,
so the same bits. Anything else (prefill, chunked or mixed batches, other dtypes or caches, no
kernels) is the composition. `HAL_CPU_FUSED_DECODER=0` keeps the engine on its modules.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from backends.cpu import activation, ckernels, gguf_fast
from backends.cpu.cattention import _int32
from backends.cpu.native import _int64
from hal.backend import GGUFDecoderStack


class _Kernels(ctypes.Structure):
    _fields_ = [(f, ctypes.c_void_p) for f in ("codes", "codes4", "rms", "rotary", "attention")]


class _Weight(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p)]
    _fields_ += [(f, ctypes.c_int64) for f in ("n", "k", "group", "nibbles", "bias")]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)]
    _fields_ += [(f, _Weight) for f in ("qkv", "o", "gate_up", "down")]
    _fields_ += [("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p)]
    _fields_ += [(f, ctypes.c_int64) for f in ("hq", "hk", "window")] + [("scale", ctypes.c_float)]


_STEP_SIZES = (
    "T", "hidden", "D", "rot", "max_pos", "num_slots", "ld_table", "max_blocks", "BS", "S",
    "max_m",
)  # fmt: skip
_STEP_PTRS = ("pos", "slots", "cs", "tables", "seq_lens", "qsl")
_STEP_BUFFERS = ("x", "qkv", "q", "k", "attn", "o", "gu")


class _Step(ctypes.Structure):
    _fields_ = [("kern", ctypes.c_void_p)] + [(f, ctypes.c_int64) for f in _STEP_SIZES]
    _fields_ += [("NB", ctypes.c_int64), ("eps", ctypes.c_float)]
    _fields_ += [("lanes", ctypes.c_int64), ("threads", ctypes.c_int64)]
    _fields_ += [(f, ctypes.c_void_p) for f in _STEP_PTRS + _STEP_BUFFERS]


def _weight(w) -> _Weight:
    data = w.data
    offset = data.offset.data_ptr() if data.offset is not None else None
    nibbles = data.bias is not None
    return _Weight(data.codes.data_ptr(), data.scale.data_ptr(), offset, data.n, data.k,
                   data.group, int(nibbles), data.bias or 0)  # fmt: skip


def _fn(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


@dataclass(eq=False)
class Plan:
    """What `prepare` checked for a stack: the kernels, the driver and its per-layer records
    (the caches' addresses filled per call), the most rows a call may have."""

    rms: ckernels.RmsNormKernel
    driver: ckernels.DecoderLayerKernel
    kernels: _Kernels
    layers: ctypes.Array
    max_rows: int
    widths: tuple[int, int, int, int]  # every layer's qkv and gate_up outputs, q and kv heads
    max_m: int  # rows a codes-kernel call takes (more go in calls of this many, in order)
    # the addresses of the kv caches the records hold (checked when they change; no reference
    # kept, so a released cache is freed)
    caches: tuple[int, ...] = ()


def _rows(weight) -> int | None:
    """The most rows the backend's gguf_linear sends to this weight's codes kernel (the kernel's
    max_m at a time), or None when it has no codes handle."""
    data = weight.data
    if not isinstance(data, ckernels.CodesWeight):
        return None
    return gguf_fast.chunked_rows(weight.layout)


def prepare(backend, stack: GGUFDecoderStack) -> Plan | None:
    """The plan for a stack on this backend, or None when some op would not be the C kernel the
    driver calls (then every call takes the composition)."""
    kernels = (backend.rms_norm_kernel, backend.rotary_kernel, backend.attention_kernel)
    driver, _ = ckernels.load_decoder_layer_kernel()
    if any(k is None for k in kernels) or driver is None or not stack.is_neox:
        return None
    chosen = {f: backend.chosen(f) for f in ("rms_norm", "rotary", "kv_write", "attention")}
    if chosen != {"rms_norm": "c", "rotary": "c", "kv_write": "native", "attention": "c"}:
        return None
    cs = stack.cos_sin_cache
    if cs.dtype != torch.float32 or not cs.is_contiguous() or cs.device.type != "cpu":
        return None
    if not stack.layers:
        return None
    first = stack.layers[0]
    widths = (first.qkv.out_features, first.gate_up.out_features, first.num_heads,
              first.num_kv_heads)  # fmt: skip
    rows, codes_libs, codes_max_m = [], set(), set()
    for layer in stack.layers:
        shape = (layer.qkv.out_features, layer.gate_up.out_features, layer.num_heads,
                 layer.num_kv_heads)  # fmt: skip
        if shape != widths or layer.eps != first.eps:
            return None  # one set of scratch rows and one eps for every layer
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            r = _rows(w)
            if r is None:
                return None
            rows.append(r)
            codes_libs.add(w.data.kernel.lib)
            codes_max_m.add(w.data.kernel.max_m)
        for n in (layer.input_norm, layer.post_norm):
            if n.dtype != torch.float32 or not n.is_contiguous():
                return None
    if len(codes_libs) != 1:
        return None
    codes = codes_libs.pop()
    fns = _Kernels(
        _fn(codes, "codes_gemm"), _fn(codes, "codes4_gemm"), _fn(kernels[0].lib, "rms_norm_f32"),
        _fn(kernels[1].lib, "rotary_kv_f32"), _fn(kernels[2].lib, "decode_attention_f32"),
    )  # fmt: skip
    records = (_Layer * len(stack.layers))()
    for rec, layer in zip(records, stack.layers, strict=True):
        rec.in_norm, rec.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
        rec.qkv, rec.o = _weight(layer.qkv), _weight(layer.o)
        rec.gate_up, rec.down = _weight(layer.gate_up), _weight(layer.down)
        rec.hq, rec.hk = layer.num_heads, layer.num_kv_heads
        rec.window, rec.scale = layer.sliding_window or 0, layer.scale
    max_m = codes_max_m.pop() if len(codes_max_m) == 1 else None
    if max_m is None:
        return None
    return Plan(kernels[0], driver, fns, records, min(rows), widths, max_m)


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
    this call is not a decode-like batch the plan takes (each sequence's last 1 to
    ATTENTION_MAX_QUERY tokens: decode steps, speculative steps)."""
    t, s = hidden.shape[0], seq_lens.shape[0]
    if not (
        hidden.dim() == 2
        and hidden.dtype == torch.float32
        and hidden.is_contiguous()
        and 1 <= t <= plan.max_rows
        and ckernels.RMS_NORM_MIN <= hidden.shape[1] <= ckernels.RMS_NORM_MAX
        and 1 <= s <= t
        and len(kv_caches) == len(stack.layers)
        and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()))
    ):
        return None
    qsl = _int32(query_start_loc)
    if s != t:  # several tokens of some sequence: each its last ones, few enough for the kernel
        counts = qsl[1:] - qsl[:-1]
        if int(qsl[0]) != 0 or int(qsl[-1]) != t or not bool(((counts >= 1) & (counts <= (
            ckernels.ATTENTION_MAX_QUERY)) & (counts <= seq_lens)).all()):  # fmt: skip
            return None
    elif max_query_len != 1 and not torch.equal(qsl, torch.arange(t + 1, dtype=torch.int32)):
        return None  # not one query token per sequence
    if block_tables.stride(-1) != 1:  # the attention op would take its SDPA path
        return None
    addresses = tuple(c.data_ptr() for pair in kv_caches for c in pair)
    if addresses != plan.caches and not _take_caches(plan, kv_caches, addresses):
        return None
    pos, slots = _int64(positions), _int64(slot_mapping)
    tables = block_tables if block_tables.dtype == torch.int32 else _int32(block_tables)
    lens = _int32(seq_lens)
    kc = kv_caches[0][0]
    d, h = kc.shape[-1], hidden.shape[1]
    cs = stack.cos_sin_cache
    qkv_n, gu_n, hq, hk = plan.widths
    widths = {"x": h, "qkv": qkv_n, "q": hq * d, "k": hk * d, "attn": hq * d, "o": h, "gu": gu_n}
    buffers = {name: torch.empty(t, w, dtype=torch.float32) for name, w in widths.items()}
    step = _Step(
        ctypes.addressof(plan.kernels), t, h, d, cs.shape[1], cs.shape[0],
        kc.shape[0] * kc.shape[1], tables.stride(0), tables.shape[1], kc.shape[1], s,
        plan.max_m, kc.shape[0],
        stack.layers[0].eps, plan.rms.lanes, max(1, torch.get_num_threads()), pos.data_ptr(),
        slots.data_ptr(), cs.data_ptr(), tables.data_ptr(), lens.data_ptr(), qsl.data_ptr(),
        *(buffers[name].data_ptr() for name in _STEP_BUFFERS),
    )  # fmt: skip
    residual_out = torch.empty(t, h, dtype=torch.float32)
    if residual is not None:
        residual_out.copy_(residual)
    work = torch.empty(t, h, dtype=torch.float32)  # each layer's down output: the next input
    fn, step_p, res_p = (
        plan.driver.lib.decoder_layer_f32,
        ctypes.addressof(step),
        residual_out.data_ptr(),
    )
    base, size = ctypes.addressof(plan.layers), ctypes.sizeof(_Layer)
    act = None
    for i in range(len(stack.layers)):
        rec = base + i * size
        if i == 0:
            rc = fn(rec, None, step_p, None, hidden.data_ptr(), res_p, int(residual is None))
        else:
            rc = fn(rec, rec - size, step_p, act.data_ptr(), work.data_ptr(), res_p, 0)
        if rc:
            _raise(rc, tables, lens, step)
        act = activation.silu_and_mul(buffers["gu"])
    last = gguf_fast.codes_linear(act, stack.layers[-1].down.data, None, plan.max_rows)
    return last, residual_out


def _take_caches(plan: Plan, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 addresses: tuple[int, ...]) -> bool:  # fmt: skip
    """Check a new set of kv caches (fp32, contiguous, all one shape) once and write their
    addresses into the layer records; False (records untouched) when the driver does not take
    them."""
    shape = kv_caches[0][0].shape
    for kc, vc in kv_caches:
        for c in (kc, vc):
            if (
                c.dtype != torch.float32
                or not c.is_contiguous()
                or c.dim() != 4
                or c.shape != shape
            ):
                return False
    for rec, (kc, vc) in zip(plan.layers, kv_caches, strict=True):
        rec.kc, rec.vc = kc.data_ptr(), vc.data_ptr()
    plan.caches = addresses
    return True


def _raise(rc: int, tables: torch.Tensor, lens: torch.Tensor, step: _Step) -> None:
    """The error the op that failed in the driver raises (the `ckernels` wrappers' own)."""
    if rc in (301, 302):
        raise ckernels.rotary_input_error(300 - rc, step.max_pos, step.num_slots)
    if rc in (402, 403):
        raise ckernels.attention_input_error(400 - rc, tables.shape[1], step.BS, step.NB, lens)
    raise RuntimeError(f"decoder_layer_f32: stage {rc // 100} refused its call (code {rc})")
