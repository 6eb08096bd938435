"""The op-level conformance checks shared by pytest and `python -m ci.conformance`.

Each check runs one drawn case on the backend under test (in the cell's dtype, on its device) and
compares with the CPU reference run in float64 on the same upcast inputs, within the dtype's
tolerance; deterministic ops (KV write, copy, quantize) must match bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

from backends.cpu import activation, attention, gguf, kv_cache, linear, norm, quant, rotary
from hal.backend import Backend, GGUFDecoderLayer, GGUFDecoderStack
from hal.capabilities import Capabilities
from tests.conformance import strategies as S
from tests.conformance.targets import DispatchPlan, DispatchSpy
from tests.conformance.tolerances import (
    SUBNORMAL_MIN,
    UNIT_ROUNDOFF,
    Tolerance,
    quantization_tolerance,
    tolerance,
)

F64 = torch.float64


@dataclass
class CaseResult:
    """One case: the worst absolute error, the worst error / allowed ratio (<= 1 passes; 0 for a
    bitwise check that matched), and what went wrong if anything."""

    ok: bool
    max_abs_err: float = 0.0
    ratio: float = 0.0
    detail: str = ""

    def merge(self, other: CaseResult) -> CaseResult:
        return CaseResult(
            self.ok and other.ok,
            max(self.max_abs_err, other.max_abs_err),
            max(self.ratio, other.ratio),
            "; ".join(d for d in (self.detail, other.detail) if d),
        )


class Dispatch:
    """Calls the backend's ops while watching that the chosen implementation's module ran, and
    naming which of the family's candidate functions actually ran."""

    def __init__(self, backend: Backend, plan: DispatchPlan) -> None:
        self.backend, self.plan = backend, plan
        self.device = backend.device
        self.missed: list[str] = []
        self.ran: set[str] = set()

    def __call__(self, op: str, *args, **kwargs):
        with DispatchSpy(self.plan.module, self.plan.functions) as spy:
            out = getattr(self.backend, op)(*args, **kwargs)
        if not spy.hit:
            self.missed.append(op)
        self.ran |= spy.ran
        return out

    def to(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)


# -- comparisons ---------------------------------------------------------------------------------
def close(name: str, out: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor) -> CaseResult:
    """|out - ref| <= allowed elementwise; NaN or a shape/dtype surprise fails."""
    if tuple(out.shape) != tuple(ref.shape):
        shapes = f"{tuple(out.shape)} != {tuple(ref.shape)}"
        return CaseResult(False, math.inf, math.inf, f"{name}: shape {shapes}")
    if out.numel() == 0:
        return CaseResult(True)
    err = (out.detach().cpu().to(F64) - ref.to(F64)).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    ratio = torch.where(err == 0, 0.0, err / allowed.to(F64).expand_as(err))
    worst = int(torch.argmax(ratio))
    r, e = float(ratio.flatten()[worst]), float(err.max())
    if r <= 1.0:
        return CaseResult(True, e, r)
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    o, f = float(out.flatten()[worst]), float(ref.flatten()[worst])
    a = float(allowed.expand_as(err).flatten()[worst])
    detail = (
        f"{name}: |out - ref| = {float(err.flatten()[worst]):.3g} at {idx} exceeds allowed "
        f"{a:.3g} (out {o:.6g}, ref {f:.6g})"
    )
    return CaseResult(False, e, r, detail)


def within(
    name: str, out, ref, dtype, magnitude=1.0, k=1, tf32=False, fp8_gemm=False
) -> CaseResult:
    tol = tolerance(dtype, tf32=tf32, fp8_gemm=fp8_gemm)
    return close(name, out, ref, tol.allowed(ref.to(F64), magnitude, k))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise(name: str, out: torch.Tensor, expected: torch.Tensor) -> CaseResult:
    """Same shape, dtype and bits (NaN patterns included)."""
    out = out.detach().cpu()
    if out.dtype != expected.dtype or tuple(out.shape) != tuple(expected.shape):
        return CaseResult(
            False, math.inf, math.inf,
            f"{name}: {out.dtype} {tuple(out.shape)} != expected {expected.dtype} "
            f"{tuple(expected.shape)}",
        )  # fmt: skip
    a = out.contiguous().view(_BITS[out.element_size()])
    b = expected.contiguous().view(_BITS[expected.element_size()])
    diff = a != b
    delta = (out.to(F64) - expected.to(F64)).abs().nan_to_num(math.inf)
    err = float(delta.max()) if out.numel() else 0.0
    if not bool(diff.any()):
        return CaseResult(True, 0.0, 0.0)
    first = tuple(int(i) for i in diff.nonzero()[0])
    detail = (
        f"{name}: {int(diff.sum())} of {diff.numel()} elements differ bitwise, first at {first} "
        f"(out {out[first].item()}, expected {expected[first].item()})"
    )
    return CaseResult(False, err, math.inf, detail)


def amax(t: torch.Tensor | None) -> float:
    return float(t.abs().max()) if t is not None and t.numel() else 0.0


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


# -- KV cache ------------------------------------------------------------------------------------
def check_kv_write(d: Dispatch, case: S.AttentionBatch) -> CaseResult:
    t = case.build()
    gen = S.generator(case.seed + 1)
    key, value, slots = t["key"], t["value"], t["slot_mapping"]
    for _ in range(case.num_padding):  # padding tokens (slot -1) anywhere in the batch
        at = int(torch.randint(0, slots.shape[0] + 1, (1,), generator=gen))
        pad = S.randn((1, *key.shape[1:]), gen).to(key.dtype) * 100
        key, value = torch.cat((key[:at], pad, key[at:])), torch.cat((value[:at], pad, value[at:]))
        slots = torch.cat((slots[:at], torch.tensor([-1]), slots[at:]))
    kc, vc = t["key_cache"], t["value_cache"]
    out_k, out_v = d.to(kc.clone()), d.to(vc.clone())
    d("write_kv", d.to(key), d.to(value), out_k, out_v, d.to(slots), case.kv_scale)
    # Independent expectation: a plain scatter of the encoded tokens.
    exp_k, exp_v = kc.clone(), vc.clone()
    live = slots >= 0
    blocks, offsets = slots[live] // case.block_size, slots[live] % case.block_size
    exp_k[blocks, offsets] = S.encode(key[live].float(), case.cache_dtype, case.kv_scale)
    exp_v[blocks, offsets] = S.encode(value[live].float(), case.cache_dtype, case.kv_scale)
    ref_k, ref_v = kc.clone(), vc.clone()
    kv_cache.write_kv(key, value, ref_k, ref_v, slots, case.kv_scale)
    return (
        bitwise("key_cache", out_k, exp_k)
        .merge(bitwise("value_cache", out_v, exp_v))
        .merge(bitwise("key_cache vs reference", out_k, ref_k))
        .merge(bitwise("value_cache vs reference", out_v, ref_v))
    )


def check_copy_blocks(d: Dispatch, case: S.CopyBlocksCase) -> CaseResult:
    t = case.build()
    caches = [d.to(c.clone()) for c in t["caches"]]
    d("copy_blocks", caches, d.to(t["src"]), d.to(t["dst"]))
    result = CaseResult(True)
    for i, (out, orig) in enumerate(zip(caches, t["caches"], strict=True)):
        expected = orig.clone()
        expected[t["dst"]] = orig[t["src"]]
        result = result.merge(bitwise(f"caches[{i}]", out, expected))
    return result


# -- attention -----------------------------------------------------------------------------------
def check_attention(d: Dispatch, case: S.AttentionBatch) -> CaseResult:
    t = case.build()
    fp8 = case.cache_dtype.startswith("fp8")
    args = (t["block_tables"], t["seq_lens"], t["query_start_loc"], t["scale"])
    extra = dict(sliding_window=case.sliding_window, soft_cap=case.soft_cap, kv_scale=case.kv_scale)
    out = d(
        "attention", d.to(t["query"]), d.to(t["key_cache"]), d.to(t["value_cache"]),
        *(d.to(a) for a in args[:3]), args[3], **extra,
    )  # fmt: skip
    # float64 oracle on the same values: FP8 caches are decoded exactly by the reference.
    kc, vc = t["key_cache"], t["value_cache"]
    if not fp8:
        kc, vc = f64(kc), f64(vc)
    ref = attention.paged_attention(f64(t["query"]), kc, vc, *args, **extra)
    v_max = max(
        amax(kv_cache.gather_kv(t["value_cache"], row, n, case.kv_scale, F64))
        for row, n in zip(t["block_tables"], case.seq_lens, strict=True)
    )
    # In bf16/fp16 the error is the dtype's rounding of the probabilities (u * sum p|v| <= u *
    # max|v|) and of the output (rtol); in fp32 the score error (u * sqrt(head_dim) * |q||k|,
    # carried through softmax onto |v|) and exp's few ulps are of the same order, so they count.
    if case.dtype == "fp32":
        return within("attention", out, ref, "fp32", v_max * case.score_scale, case.head_dim)
    return within("attention", out, ref, case.dtype, v_max)


def tf32(d: Dispatch) -> bool:
    """Whether the backend reports TF32 on for fp32 GEMMs (its policy, in info.settings)."""
    return d.backend.info.settings.get("tf32") == "on"


# -- linear --------------------------------------------------------------------------------------
def check_linear(d: Dispatch, case: S.LinearCase) -> CaseResult:
    t = case.build()
    out = d("linear", d.to(t["x"]), d.to(t["weight"]), d.to(t["bias"]))
    ref = linear.linear(f64(t["x"]), f64(t["weight"]), f64(t["bias"]))
    mag = amax(t["x"]) * amax(t["weight"])
    return within("y", out, ref, case.dtype, mag, case.shape.k, tf32=tf32(d))


def _dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # q [N, K] times its scale: [1], [N, 1], or block-scaled [N / R, G] (G blocks of K / G
    # columns, R consecutive rows sharing a scale)
    s = scale.to(F64)
    if s.dim() == 2 and s.shape[1] > 1:
        s = s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)
        s = s.repeat_interleave(q.shape[0] // s.shape[0], dim=0)
    return q.to(F64) * s


def check_scaled_linear(d: Dispatch, case: S.ScaledGemmCase) -> CaseResult:
    t = case.build()
    op = "int8_linear" if case.qdtype == "int8" else "fp8_linear"
    out = d(
        op, d.to(t["x_q"]), d.to(t["x_scale"]), d.to(t["w_q"]), d.to(t["w_scale"]),
        d.to(t["bias"]), t["out_dtype"],
    )  # fmt: skip
    if out.dtype != t["out_dtype"]:
        detail = f"y: dtype {out.dtype}, asked for {t['out_dtype']}"
        return CaseResult(False, math.inf, math.inf, detail)
    x = _dequantized(t["x_q"], t["x_scale"])  # the dequantized operands, exactly
    w = _dequantized(t["w_q"], t["w_scale"])
    ref = linear.linear(x, w, f64(t["bias"]))
    # A backend whose FP8 GEMM runs on tensor cores says so (settings["fp8_accumulate"]).
    fp8_tc = (
        case.qdtype != "int8" and d.backend.info.settings.get("fp8_accumulate") == "tensor-core"
    )
    return within("y", out, ref, case.out_dtype, amax(x) * amax(w), case.shape.k, fp8_gemm=fp8_tc)


def check_int4_linear(d: Dispatch, case: S.Int4Case) -> CaseResult:
    t = case.build()
    q = (t["qweight"], t["scales"], t["zeros"])
    out = d(
        "int4_linear", d.to(t["x"]), *(d.to(a) for a in q), case.group_size, d.to(t["g_idx"]),
        d.to(t["bias"]),
    )  # fmt: skip
    args = (t["qweight"], f64(t["scales"]), t["zeros"], case.group_size, t["g_idx"])
    ref = linear.int4_linear(f64(t["x"]), *args, f64(t["bias"]))
    w = quant.dequantize_int4(*args)
    return within("y", out, ref, case.dtype, amax(t["x"]) * amax(w), case.k, tf32=tf32(d))


def check_int4_linear_prepared(d: Dispatch, case: S.Int4Case) -> CaseResult:
    # The load-time form: prepare_int4 (runs once at load, called directly) may repack (the CUDA
    # backend: its packed layout, the tensor-core "pairs" order where K and the group size are
    # multiples of 128), then int4_linear_prepared.
    t = case.build()
    q = (t["qweight"], t["scales"], t["zeros"])
    weight = d.backend.prepare_int4(*(d.to(a) for a in q), case.group_size, d.to(t["g_idx"]))
    out = d("int4_linear_prepared", d.to(t["x"]), weight, d.to(t["bias"]))
    args = (t["qweight"], f64(t["scales"]), t["zeros"], case.group_size, t["g_idx"])
    ref = linear.int4_linear(f64(t["x"]), *args, f64(t["bias"]))
    w = quant.dequantize_int4(*args)
    return within("y", out, ref, case.dtype, amax(t["x"]) * amax(w), case.k, tf32=tf32(d))


# An opt-in GGUF path that rounds x, the block scales and offsets and y to bf16 (the CPU's
# int4pack, for Q4_0 / Q4_1 / Q4_K) declares it in settings["gguf_int4"]. Its weight error is at
# most u * (8|s| + |z|) <= ~3u * max|w| and x's u * |x|, so ~4 bf16 roundings per product.
GGUF_INT4PACK_TYPES = ("Q4_0", "Q4_1", "Q4_K")
GGUF_BF16_TOLERANCE = Tolerance(
    atol=4 * UNIT_ROUNDOFF["bf16"], rtol=4 * UNIT_ROUNDOFF["bf16"], floor=SUBNORMAL_MIN["bf16"]
)


def check_gguf_linear(d: Dispatch, case: S.GGUFCase) -> CaseResult:
    t = case.build()
    n, k = case.n, case.k
    # prepare_gguf runs once at load and may not touch the GEMM's module: called directly.
    weight = d.backend.prepare_gguf(d.to(t["blocks"]), case.qtype, n, k)
    out = d("gguf_linear", d.to(t["x"]), weight, d.to(t["bias"]))
    ref = gguf.gguf_linear(f64(t["x"]), t["blocks"], case.qtype, n, k, f64(t["bias"]))
    mag = amax(t["x"]) * amax(gguf.dequantize_gguf(t["blocks"], case.qtype, (n, k)))
    settings = d.backend.info.settings
    if case.qtype in GGUF_INT4PACK_TYPES and settings.get("gguf_int4", "").startswith("int4pack"):
        return close("y", out, ref, GGUF_BF16_TOLERANCE.allowed(ref, mag, k))
    # TF32 only where a dense GEMM ran (the Triton kernel's fp32 dots are IEEE).
    dense = getattr(d.backend, "ran", {}).get("gguf_gemm", "") != "triton"
    return within("y", out, ref, case.dtype, mag, k, tf32=tf32(d) and dense)


def check_gguf_decoder_layers(d: Dispatch, case: S.GGUFDecoderCase) -> CaseResult:
    # Fused or not, the bits of Backend.gguf_decoder_layers' composition of this backend's own
    # ops (each op's accuracy is its own row's): hidden, residual and every layer's caches.
    t, b, be = case.build(), case.batch, d.backend
    layers, shapes = [], case.shapes()
    for w in t["layers"]:
        prepared = {name: be.prepare_gguf(d.to(w[name]), case.qtype, n, k)
                    for name, (n, k) in shapes.items()}  # fmt: skip
        layers.append(GGUFDecoderLayer(
            d.to(w["input_norm"]), d.to(w["post_norm"]), 1e-5, prepared["qkv"], prepared["o"],
            prepared["gate_up"], prepared["down"], b.num_heads, b.num_kv_heads, t["scale"],
            b.sliding_window,
        ))  # fmt: skip
    stack = GGUFDecoderStack(tuple(layers), d.to(t["cos_sin_cache"]), case.is_neox)
    args = [d.to(t[name]) for name in ("positions", "slot_mapping", "block_tables", "seq_lens",
                                       "query_start_loc")]  # fmt: skip
    pos, slots, tables, lens, qsl = args
    lengths = (max(b.query_lens), max(b.seq_lens))

    def caches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(d.to(t["key_cache"].clone()), d.to(t["value_cache"].clone()))
                for _ in case.num_layers * (0,)]  # fmt: skip

    def inputs() -> tuple[torch.Tensor, torch.Tensor | None]:
        r = t["residual"]
        return d.to(t["hidden"].clone()), None if r is None else d.to(r.clone())

    out_caches, own_caches = caches(), caches()
    out = d("gguf_decoder_layers", *inputs(), stack, pos, out_caches, slots, tables, lens, qsl,
            *lengths)  # fmt: skip
    own = Backend.gguf_decoder_layers(be, *inputs(), stack, pos, own_caches, slots, tables, lens,
                                      qsl, *lengths)  # fmt: skip
    result = CaseResult(True)
    for name, o, e in (("hidden", out[0], own[0]), ("residual", out[1], own[1])):
        result = result.merge(bitwise(f"{name} vs the composition", o, e.cpu()))
    for i, (o, e) in enumerate(zip(out_caches, own_caches, strict=True)):
        for name, oc, ec in (("key_cache", o[0], e[0]), ("value_cache", o[1], e[1])):
            result = result.merge(bitwise(f"layer {i} {name} vs the composition", oc, ec.cpu()))
    if not bool(torch.isfinite(own[0].cpu()).all()):  # a case that says nothing
        result = result.merge(CaseResult(False, detail="the composition's hidden is not finite"))
    return result


def _fused_gguf_decoder(backend: Backend) -> str:
    if backend.fused_gguf_decoder:
        return ""
    return (f"{backend.name} runs GGUF decoder stacks op by op (fused_gguf_decoder is off); "
            "those ops' own rows cover it")  # fmt: skip


# -- quantize / dequantize -----------------------------------------------------------------------
def _dynamic_scale_64(x: torch.Tensor, qmax: float, per_token: bool) -> torch.Tensor:
    xa = x.to(F64).abs()
    absmax = xa.amax(dim=1, keepdim=True) if per_token else xa.amax().reshape(1)
    return absmax.clamp(min=quant.SCALE_EPS) / qmax


def _check_scale(s: torch.Tensor, case: S.QuantCase, t: dict, qmax: float) -> CaseResult:
    if case.static:
        expected = t["scale"].to(F64)
    else:
        expected = _dynamic_scale_64(t["x"], qmax, case.per_token)
    # One fp32 rounding of absmax / qmax (absmax itself is exact).
    return close("scale", s, expected, 2 * UNIT_ROUNDOFF["fp32"] * expected.abs())


def check_quantize_fp8(d: Dispatch, case: S.QuantCase) -> CaseResult:
    t = case.build()
    fp8 = S.torch_dtype(case.target)
    scale = t["scale"] if case.static else None
    q, s = d("quantize_fp8", d.to(t["x"]), fp8, d.to(scale), case.per_token)
    q_ref, s_ref = quant.quantize_fp8(t["x"], fp8, scale, case.per_token)
    result = bitwise("q vs reference", q, q_ref).merge(bitwise("scale vs reference", s, s_ref))
    fmax = quant.fp8_max(fp8)
    result = result.merge(_check_scale(s.cpu(), case, t, fmax))
    # Formula: q * scale is x clamped to the range, within half an FP8 step (in units of scale).
    s64 = s.cpu().to(F64)
    x = t["x"].to(F64)
    target = torch.maximum(torch.minimum(x, fmax * s64), -fmax * s64)
    tol = quantization_tolerance(case.target)
    allowed = (tol.rtol + 2 * UNIT_ROUNDOFF["fp32"]) * target.abs() + tol.atol * s64
    return result.merge(close("q * scale", q.cpu().to(F64) * s64, target, allowed))


def check_dequantize_fp8(d: Dispatch, case: S.DequantFp8Case) -> CaseResult:
    t = case.build()
    out_dtype = S.torch_dtype(case.out_dtype)
    out = d("dequantize_fp8", d.to(t["q"]), d.to(t["scale"]), out_dtype)
    ref = quant.dequantize_fp8(t["q"], t["scale"], out_dtype)
    exact = t["q"].to(F64) * t["scale"].to(F64)
    return bitwise("x vs reference", out, ref).merge(within("x", out, exact, case.out_dtype, 0.0))


def check_quantize_int8(d: Dispatch, case: S.QuantCase) -> CaseResult:
    t = case.build()
    scale = t["scale"] if case.static else None
    q, s = d("quantize_int8", d.to(t["x"]), d.to(scale), case.per_token)
    q_ref, s_ref = quant.quantize_int8(t["x"], scale, case.per_token)
    result = bitwise("q vs reference", q, q_ref).merge(bitwise("scale vs reference", s, s_ref))
    result = result.merge(_check_scale(s.cpu(), case, t, quant.INT8_MAX))
    s64, x = s.cpu().to(F64), t["x"].to(F64)
    target = torch.maximum(torch.minimum(x, 127 * s64), -128 * s64)
    # Round to nearest: half a step, plus the fp32 division's rounding.
    allowed = 0.5 * s64 + 2 * UNIT_ROUNDOFF["fp32"] * target.abs()
    return result.merge(close("q * scale", q.cpu().to(F64) * s64, target, allowed))


def unpack_int4_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> int64 codes [K, N] (independent of the reference's unpacker)."""
    words = qweight.cpu().to(torch.int64) & 0xFFFFFFFF
    rows = [(words >> (4 * i)) & 0xF for i in range(8)]
    return torch.stack(rows, dim=1).reshape(-1, qweight.shape[1])


def check_quantize_int4(d: Dispatch, case: S.QuantCase) -> CaseResult:
    w = case.build()["x"]  # [N, K]
    qw, sc, z = d("quantize_int4", d.to(w), case.group_size, case.symmetric)
    qw_ref, sc_ref, z_ref = quant.quantize_int4(w, case.group_size, case.symmetric)
    result = (
        bitwise("qweight vs reference", qw, qw_ref)
        .merge(bitwise("scales vs reference", sc, sc_ref))
        .merge(bitwise("zeros vs reference", z, z_ref))
    )
    if not result.ok:
        return result
    # Formula: every weight comes back within half a step of its group's scale (a whole step in
    # the asymmetric case, where the rounded zero point can push the top code into the clamp),
    # widened by the scale's own rounding to weight's dtype (up to 8 steps from the zero).
    g = torch.arange(case.k) // case.group_size
    sc64, z64 = sc.cpu().to(F64)[g], z.cpu().to(F64)[g]  # [K, N]
    w_hat = (unpack_int4_codes(qw).to(F64) - z64) * sc64
    u = UNIT_ROUNDOFF[case.dtype]
    step = (0.5 if case.symmetric else 1.0) + 16 * u
    allowed = step * sc64 + 2 * UNIT_ROUNDOFF["fp32"] * w.t().to(F64).abs()
    return result.merge(close("dequant(quant(w))", w_hat.t(), w.to(F64), allowed.t()))


def check_dequantize_int4(d: Dispatch, case: S.Int4Case) -> CaseResult:
    t = case.build()
    args = (t["qweight"], t["scales"], t["zeros"], case.group_size, t["g_idx"])
    out = d("dequantize_int4", *(d.to(a) if isinstance(a, torch.Tensor) else a for a in args))
    ref = quant.dequantize_int4(*args)
    g = t["g_idx"].long() if t["g_idx"] is not None else torch.arange(case.k) // case.group_size
    codes = t["codes"].to(F64) - t["zeros"].to(F64)[g]
    exact = (codes * t["scales"].to(F64)[g]).t()  # [N, K]
    return bitwise("w vs reference", out, ref).merge(within("w", out, exact, case.dtype, 0.0))


# -- fused small ops -----------------------------------------------------------------------------
def check_rms_norm(d: Dispatch, case: S.RmsNormCase) -> CaseResult:
    t = case.build()
    out = d("rms_norm", d.to(t["x"]), d.to(t["weight"]), case.eps, d.to(t["residual"]))
    ref = norm.rms_norm(f64(t["x"]), f64(t["weight"]), case.eps, f64(t["residual"]))
    mag = amax(t["weight"])
    if t["residual"] is None:
        return within("y", out, ref, case.dtype, mag)
    if not isinstance(out, tuple) or len(out) != 2:
        return CaseResult(False, math.inf, math.inf, "with residual, expected (y, h)")
    return within("y", out[0], ref[0], case.dtype, mag).merge(
        within("h", out[1], ref[1], case.dtype, amax(t["x"]) + amax(t["residual"]))
    )


def check_rotary(d: Dispatch, case: S.RotaryCase) -> CaseResult:
    t = case.build()
    pos, cache = t["positions"], t["cos_sin_cache"]
    q, k = d("rotary", d.to(pos), d.to(t["query"]), d.to(t["key"]), d.to(cache), case.is_neox)
    q_ref, k_ref = rotary.rotary(pos, f64(t["query"]), f64(t["key"]), f64(cache), case.is_neox)
    mag = max(amax(t["query"]), amax(t["key"]))
    result = within("query", q, q_ref, case.dtype, mag)
    return result.merge(within("key", k, k_ref, case.dtype, mag))


@dataclass(frozen=True)
class RotaryWriteKvCase:
    """A paged batch's new tokens (query, key, value, slots, `batch.num_padding` slot -1 tokens)
    rotated by a RoPE table of `rotary` (its num_tokens and head_dim are the batch's)."""

    batch: S.AttentionBatch
    rotary: S.RotaryCase


def _with_padding(case: RotaryWriteKvCase) -> dict[str, torch.Tensor]:
    """The batch's new tokens with padding tokens (slot -1) inserted anywhere, and positions."""
    t, gen = case.batch.build(), S.generator(case.batch.seed + 1)
    rows = {name: t[name] for name in ("query", "key", "value")}  # [T, heads, head_dim] each
    slots = t["slot_mapping"]
    for _ in range(case.batch.num_padding):
        at = int(torch.randint(0, slots.shape[0] + 1, (1,), generator=gen))
        for name, x in rows.items():
            pad = (S.randn((1, *x.shape[1:]), gen) * 100).to(x.dtype)
            rows[name] = torch.cat((x[:at], pad, x[at:]))
        slots = torch.cat((slots[:at], torch.tensor([-1]), slots[at:]))
    r = case.rotary.build()
    return {**t, **rows, "slot_mapping": slots, "positions": r["positions"],
            "cos_sin_cache": r["cos_sin_cache"]}  # fmt: skip


def check_rotary_write_kv(d: Dispatch, case: RotaryWriteKvCase) -> CaseResult:
    t, b, neox = _with_padding(case), case.batch, case.rotary.is_neox
    pos, cache, slots = t["positions"], t["cos_sin_cache"], t["slot_mapping"]
    kc, vc = t["key_cache"], t["value_cache"]
    out_k, out_v = d.to(kc.clone()), d.to(vc.clone())
    q, k = d(
        "rotary_write_kv", d.to(pos), d.to(t["query"]), d.to(t["key"]), d.to(t["value"]),
        d.to(cache), neox, out_k, out_v, d.to(slots), b.kv_scale,
    )  # fmt: skip
    # q, k: the rotary contract, within the dtype's tolerance of the float64 rotation.
    q_ref, k_ref = rotary.rotary(pos, f64(t["query"]), f64(t["key"]), f64(cache), neox)
    mag = max(amax(t["query"]), amax(t["key"]))
    result = within("query", q, q_ref, b.dtype, mag).merge(within("key", k, k_ref, b.dtype, mag))
    # The caches: the KV-write contract (bit for bit) applied to the key it returned.
    ref_k, ref_v = kc.clone(), vc.clone()
    kv_cache.write_kv(k.cpu(), t["value"], ref_k, ref_v, slots, b.kv_scale)
    result = result.merge(bitwise("key_cache", out_k, ref_k))
    result = result.merge(bitwise("value_cache", out_v, ref_v))
    # Fused or not, the same bits as this backend's own rotary then write_kv.
    be = d.backend
    q2, k2 = be.rotary(d.to(pos), d.to(t["query"]), d.to(t["key"]), d.to(cache), neox)
    own_k, own_v = d.to(kc.clone()), d.to(vc.clone())
    be.write_kv(k2, d.to(t["value"]), own_k, own_v, d.to(slots), b.kv_scale)
    for name, out, own in (("query", q, q2), ("key", k, k2), ("key_cache", out_k, own_k),
                           ("value_cache", out_v, own_v)):  # fmt: skip
        result = result.merge(bitwise(f"{name} vs rotary then write_kv", out, own.cpu()))
    return result


@dataclass(frozen=True)
class LinearRotaryCase:
    """A qkv projection (x [T, k] against [q; k; v] rows of the batch's heads, bias or not) whose
    output feeds `rotary_write_kv` (the inner case's tokens, table, slots and caches)."""

    inner: RotaryWriteKvCase
    k: int
    has_bias: bool


def check_linear_rotary_write_kv(d: Dispatch, case: LinearRotaryCase) -> CaseResult:
    # Fused or not, the bits of this backend's own linear, split by heads, then
    # rotary_write_kv (whose own contract is its row's); that linear within its bound of the
    # float64 product.
    t, b, neox = _with_padding(case.inner), case.inner.batch, case.inner.rotary.is_neox
    n_tok, heads, dim = t["query"].shape
    kv_heads, dtype = t["key"].shape[1], t["query"].dtype
    gen = S.generator(b.seed + 2)
    x = S.randn((n_tok, case.k), gen).to(dtype)
    w = S.randn(((heads + 2 * kv_heads) * dim, case.k), gen, case.k**-0.5).to(dtype)
    bias = S.randn((w.shape[0],), gen).to(dtype) if case.has_bias else None
    pos, cache, slots = d.to(t["positions"]), d.to(t["cos_sin_cache"]), d.to(t["slot_mapping"])
    kc, vc = t["key_cache"], t["value_cache"]
    out_k, out_v = d.to(kc.clone()), d.to(vc.clone())
    q, k = d("linear_rotary_write_kv", d.to(x), d.to(w), d.to(bias), heads, kv_heads, pos, cache,
             neox, out_k, out_v, slots, b.kv_scale)  # fmt: skip
    be = d.backend
    h = be.linear(d.to(x), d.to(w), d.to(bias))
    q0, k0, v0 = h.view(n_tok, -1, dim).split([heads, kv_heads, kv_heads], dim=1)
    own_k, own_v = d.to(kc.clone()), d.to(vc.clone())
    q2, k2 = be.rotary_write_kv(pos, q0, k0, v0, cache, neox, own_k, own_v, slots, b.kv_scale)
    result = CaseResult(True)
    for name, out, own in (("query", q, q2), ("key", k, k2), ("key_cache", out_k, own_k),
                           ("value_cache", out_v, own_v)):  # fmt: skip
        result = result.merge(bitwise(f"{name} vs linear then rotary_write_kv", out, own.cpu()))
    ref = linear.linear(f64(x), f64(w), f64(bias))
    mag = amax(x) * amax(w)
    return result.merge(within("h", h.cpu(), ref, b.dtype, mag, case.k, tf32=tf32(d)))


@dataclass(frozen=True)
class FusedQuantCase:
    """A norm or SiLU-and-mul case whose output is quantized per token to `target` (FP8)."""

    inner: S.RmsNormCase | S.SiluCase
    target: str


def _quantized_close(name: str, q, s, ref: torch.Tensor, dtype: str, mag: float) -> CaseResult:
    """q * scale against the float64 value it encodes: the float op's tolerance plus FP8
    rounding (a relative step of the format, or below its normals an absolute scale x
    smallest normal)."""
    fi = torch.finfo(q.dtype)
    s64 = s.detach().cpu().to(F64)
    deq = q.detach().cpu().to(F64) * s64
    allowed = tolerance(dtype).allowed(ref, mag, 1) + ref.abs() * fi.eps + s64 * fi.smallest_normal
    return close(name, deq, ref, allowed)


def check_rms_norm_quant_fp8(d: Dispatch, case: FusedQuantCase) -> CaseResult:
    c, fp8 = case.inner, S.torch_dtype(case.target)
    t = c.build()
    x, w, r = d.to(t["x"]), d.to(t["weight"]), d.to(t["residual"])
    out = d("rms_norm_quant_fp8", x, w, c.eps, fp8, r)
    if not isinstance(out, tuple) or len(out) != (2 if r is None else 3):
        return CaseResult(False, math.inf, math.inf, "expected (q, scale) or (q, scale, h)")
    # Fused or not, the bits of this backend's own rms_norm then per-token quantize_fp8.
    be = d.backend
    own = be.rms_norm(x, w, c.eps, r)
    y, h = own if r is not None else (own, None)
    q, scale = be.quantize_fp8(y, fp8, per_token=True)
    result = bitwise("q vs rms_norm then quantize_fp8", out[0], q.cpu())
    result = result.merge(bitwise("scale vs the same", out[1], scale.cpu()))
    if h is not None:
        result = result.merge(bitwise("h vs rms_norm's", out[2], h.cpu()))
    ref = norm.rms_norm(f64(t["x"]), f64(t["weight"]), c.eps, f64(t["residual"]))
    ref = ref if t["residual"] is None else ref[0]
    return result.merge(
        _quantized_close("q * scale", out[0], out[1], ref, c.dtype, amax(t["weight"]))
    )


def check_silu_and_mul_quant_fp8(d: Dispatch, case: FusedQuantCase) -> CaseResult:
    c, fp8 = case.inner, S.torch_dtype(case.target)
    x = d.to(c.build()["x"])
    out = d("silu_and_mul_quant_fp8", x, fp8)
    if not isinstance(out, tuple) or len(out) != 2:
        return CaseResult(False, math.inf, math.inf, "expected (q, scale)")
    be = d.backend
    q, scale = be.quantize_fp8(be.silu_and_mul(x), fp8, per_token=True)
    result = bitwise("q vs silu_and_mul then quantize_fp8", out[0], q.cpu())
    result = result.merge(bitwise("scale vs the same", out[1], scale.cpu()))
    xf = f64(x.cpu())
    ref = activation.silu_and_mul(xf)
    # silu_and_mul's own bound inside the quantized comparison
    fi = torch.finfo(fp8)
    s64 = out[1].detach().cpu().to(F64)
    allowed = _silu_allowed(xf, ref, c.dtype) + ref.abs() * fi.eps + s64 * fi.smallest_normal
    deq = out[0].detach().cpu().to(F64) * s64
    return result.merge(close("q * scale", deq, ref, allowed))


def _silu_allowed(x64: torch.Tensor, ref: torch.Tensor, dtype: str) -> torch.Tensor:
    """silu_and_mul's bound: exp has condition number |x|, so an fp32 exp (GPU ex2.approx after
    x * log2(e)) is off by up to |x| * u relative even with a correctly rounded argument, on top
    of the output rounding."""
    gate = x64[..., : x64.shape[-1] // 2].abs()
    return tolerance(dtype).allowed(ref, 0.0, 1) + ref.abs() * gate * 4 * UNIT_ROUNDOFF["fp32"]


def check_silu_and_mul(d: Dispatch, case: S.SiluCase) -> CaseResult:
    x = case.build()["x"]
    out = d("silu_and_mul", d.to(x))
    ref = activation.silu_and_mul(f64(x))
    return close("y", out, ref, _silu_allowed(f64(x), ref, case.dtype))


def check_linear_silu_and_mul(d: Dispatch, case: S.LinearCase) -> CaseResult:
    # weight = [W; W shifted by one row] (gate rows, then up rows), bias likewise. Fused or not,
    # the bits of this backend's own linear then silu_and_mul; that linear within its bound of
    # the float64 product (silu_and_mul's own bound is its own row's).
    t = case.build()
    w2 = torch.cat([t["weight"], t["weight"].roll(1, dims=0)])
    b2 = None if t["bias"] is None else torch.cat([t["bias"], t["bias"].roll(1)])
    x, w, b = d.to(t["x"]), d.to(w2), d.to(b2)
    out = d("linear_silu_and_mul", x, w, b)
    be = d.backend
    h = be.linear(x, w, b)
    result = bitwise("y vs linear then silu_and_mul", out, be.silu_and_mul(h).cpu())
    ref = linear.linear(f64(t["x"]), f64(w2), f64(b2))
    mag = amax(t["x"]) * amax(w2)
    return result.merge(within("h", h.cpu(), ref, case.dtype, mag, case.shape.k, tf32=tf32(d)))


def check_lora_add(d: Dispatch, case: S.LoRACase) -> CaseResult:
    # y += each token's B_s (A_s x) in place against the float64 formula; rows of slot -1 keep
    # their bits. Bound: y's rounding (the dtype's), the fp32 sums over K and the rank (their
    # terms' magnitudes times (K + R) u_fp32), and two roundings to the dtype of h B^T's terms
    # (a backend may keep h, and h B^T before the add into y, in the model's dtype: cuBLAS's
    # addmm_ on the H200 needed both, thorough profile).
    from hal.backend import LoRABatch

    t = case.build()
    slots = t["token_slots"]
    batch = LoRABatch(d.to(slots), case.slots, case.rank)
    y0 = t["y"]
    out = d("lora_add", d.to(t["x"]), d.to(y0.clone()), d.to(t["a"]), d.to(t["b"]), batch,
            case.parts)  # fmt: skip
    out = out.detach().cpu()
    keep = slots.long()[:, None] == torch.arange(t["a"].shape[0]) // case.rank % case.slots
    x, a, bt = f64(t["x"]), f64(t["a"]), f64(t["b"]).t()
    h = (x @ a.t()) * keep
    ref = f64(y0) + h @ bt
    mag = ((x.abs() @ a.abs().t()) * keep) @ bt.abs()
    u = UNIT_ROUNDOFF[case.dtype]
    allowed = (
        tolerance(case.dtype).allowed(ref, 0.0, 1)
        + (case.k + case.rank) * UNIT_ROUNDOFF["fp32"] * mag
        + 2 * u * (h.abs() @ bt.abs())
    )
    result = close("y", out, ref, allowed)
    for i in torch.nonzero(slots < 0).flatten().tolist():
        result = result.merge(bitwise(f"row {i} (no adapter)", out[i], y0[i]))
    return result


def check_graph(d: Dispatch, case: S.GraphCase) -> CaseResult:
    t = case.build()
    b = d.backend
    x, nw, w = d.to(t["x"]), d.to(t["norm_weight"]), d.to(t["weight"])

    def step() -> torch.Tensor:
        return b.silu_and_mul(b.linear(b.rms_norm(x, nw, 1e-6), w))

    runner = d("capture_graph", step)
    result = CaseResult(True)
    for i, new in enumerate(t["new_inputs"]):
        x.copy_(d.to(new))  # mutate the static input, then replay
        replayed = runner.replay().clone()
        eager = step().clone()
        result = result.merge(bitwise(f"replay {i} vs eager", replayed, eager.cpu()))
    return result


# -- the op table --------------------------------------------------------------------------------
Check = Callable[[Dispatch, object], CaseResult]
Strategy = Callable[[str, Capabilities, S.Limits], st.SearchStrategy]


def float_dtypes(caps: Capabilities) -> tuple[str, ...]:
    return tuple(x for x in S.FLOAT_DTYPES if caps.supports(x))


@dataclass(frozen=True)
class OpSpec:
    """One matrix row: the op family it dispatches through, its dtype columns, its cases."""

    name: str
    family: str
    dtypes: tuple[str, ...]
    strategy: Strategy
    check: Check
    needs_float: bool = False  # also needs some float dtype (activations, outputs, KV source)
    # The share of the profile's examples this row draws (rows whose cases are costly under the
    # interpreter and whose kernels have their own targeted tests draw fewer).
    examples_scale: float = 1.0
    # Why a backend has nothing for this row to check ("" when it has), e.g. an op it composes.
    unchecked: Callable[[Backend], str] | None = None

    def missing(self, dtype: str, caps: Capabilities) -> str:
        """Why this cell cannot run on `caps` ("" if it can)."""
        if not caps.supports(dtype):
            state = caps.dtypes.get(dtype, "none")
            return f"{dtype} not supported by {caps.device_name} (capabilities: {state})"
        if self.needs_float and not float_dtypes(caps):
            return f"no float dtype supported by {caps.device_name}"
        return ""


def _attn(cache_fp8: bool) -> Strategy:
    def strategy(dtype: str, caps: Capabilities, lim: S.Limits) -> st.SearchStrategy:
        if not cache_fp8:
            return S.attention_batches(dtype, dtype, lim)
        return st.sampled_from(float_dtypes(caps)).flatmap(
            lambda q: S.attention_batches(q, dtype, lim)
        )

    return strategy


FP8_OR_FLOAT = (*S.FLOAT_DTYPES, *S.FP8_DTYPES)
FLOAT, FP8 = S.FLOAT_DTYPES, S.FP8_DTYPES


def _kv_write(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    return _attn(dt in FP8)(dt, c, lim)


def _rotary_write_kv(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    """A kv_write batch (FP8 columns: the cache's format) with a NeoX or GPT-J table over a
    full, half or quarter rotary_dim."""

    def attach(batch: S.AttentionBatch) -> st.SearchStrategy:
        def case(is_neox: bool, fraction: float, rot: S.RotaryCase) -> RotaryWriteKvCase:
            rot = replace(
                rot,
                num_tokens=batch.num_tokens + batch.num_padding,
                num_kv_heads=batch.num_kv_heads,
                gqa_ratio=batch.gqa_ratio,
                head_dim=batch.head_dim,
                rotary_dim=2 * int(batch.head_dim * fraction // 2),
                is_neox=is_neox,
            )
            return RotaryWriteKvCase(batch, rot)

        flags = st.booleans(), st.sampled_from((1.0, 0.5, 0.25))
        return st.builds(case, *flags, S.rotary_cases(batch.dtype, True, lim))

    return _kv_write(dt, c, lim).flatmap(attach)


def _linear_rotary_write_kv(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    """A rotary_write_kv case behind a qkv projection of K 16-96 (multiples of 16, where the
    decode-sized GEMM serves, and 40, where it does not), bias or not."""
    ks = st.sampled_from((16, 32, 40, 64, 96))
    return st.builds(LinearRotaryCase, _rotary_write_kv(dt, c, lim), ks, st.booleans())


def _scaled(per_token: bool | None) -> Strategy:
    def strategy(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
        flags = st.booleans() if per_token is None else st.just(per_token)
        return flags.flatmap(lambda pt: S.scaled_gemm_cases(dt, pt, float_dtypes(c), lim))

    return strategy


def _fp8_block(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    return S.fp8_block_cases(dt, float_dtypes(c), lim)


def _int4(act_order: bool | None) -> Strategy:
    def strategy(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
        flags = st.booleans() if act_order is None else st.just(act_order)
        return flags.flatmap(lambda ao: S.int4_cases(float_dtypes(c), ao, lim))

    return strategy


def _int4_prepared(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    # Group sizes the CUDA backend's tensor-core order takes (multiples of 128), K <= 768.
    return st.booleans().flatmap(
        lambda ao: S.int4_cases(float_dtypes(c), ao, lim, group_sizes=(128, 256), max_groups=3)
    )


def _gguf(qtype: str) -> Strategy:
    return lambda dt, c, lim: S.gguf_cases(dt, qtype, lim)


def _quant(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    return S.quant_cases(dt, float_dtypes(c), lim)


def _norm_quant(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    flags = st.tuples(st.sampled_from(float_dtypes(c)), st.booleans())
    cases = flags.flatmap(lambda fr: S.rms_norm_cases(fr[0], fr[1], lim))
    return cases.map(lambda case: FusedQuantCase(case, dt))


def _silu_quant(dt: str, c: Capabilities, lim: S.Limits) -> st.SearchStrategy:
    cases = st.sampled_from(float_dtypes(c)).flatmap(lambda f: S.silu_cases(f, lim))
    return cases.map(lambda case: FusedQuantCase(replace(case, lead=(math.prod(case.lead),)), dt))


def _flag(make: Callable, flag: bool) -> Strategy:
    return lambda dt, c, lim: make(dt, flag, lim)


def _plain(make: Callable) -> Strategy:
    return lambda dt, c, lim: make(dt, lim)


OPS: tuple[OpSpec, ...] = (
    OpSpec("kv_write", "kv_write", FP8_OR_FLOAT, _kv_write, check_kv_write, True),
    OpSpec(
        "copy_blocks",
        "kv_write",
        (*FLOAT, "fp8_e4m3fn"),
        lambda dt, c, lim: S.copy_blocks_cases(dt),
        check_copy_blocks,
    ),
    # The interpreted attention cells are CI's slowest (15-30 s each for the cuda and rocm
    # columns at 25 examples); the kernels' own tests (test_triton_kernels.py,
    # test_attention_splitkv.py) cover their paths case by case, so these rows draw 60%.
    OpSpec("attention", "attention", FLOAT, _attn(False), check_attention, examples_scale=0.6),
    OpSpec(
        "attention/fp8_kv", "attention", FP8, _attn(True), check_attention, True, examples_scale=0.6
    ),  # fmt: skip
    OpSpec("linear", "gemm", FLOAT, _plain(S.linear_cases), check_linear),
    OpSpec("fp8_linear/per_tensor", "fp8_gemm", FP8, _scaled(False), check_scaled_linear, True),
    OpSpec("fp8_linear/per_token", "fp8_gemm", FP8, _scaled(True), check_scaled_linear, True),
    OpSpec("fp8_linear/block", "fp8_block_gemm", FP8, _fp8_block, check_scaled_linear, True),
    OpSpec("int8_linear", "int8_gemm", ("int8",), _scaled(None), check_scaled_linear, True),
    OpSpec("int4_linear", "int4_gemm", ("int4",), _int4(False), check_int4_linear, True),
    OpSpec("int4_linear/g_idx", "int4_gemm", ("int4",), _int4(True), check_int4_linear, True),
    OpSpec(
        "int4_linear/prepared",
        "int4_gemm",
        ("int4",),
        _int4_prepared,
        check_int4_linear_prepared,
        True,
        examples_scale=0.4,
    ),
    *(
        OpSpec(f"gguf_linear/{q}", "gguf_gemm", FLOAT, _gguf(q), check_gguf_linear)
        for q in S.GGUF_QTYPES
    ),
    # fp32 only: the one column a backend fuses (the CPU backend's C decode loop); others skip.
    *(
        OpSpec(
            f"gguf_decoder_layers/{q}",
            "gguf_gemm",
            ("fp32",),
            lambda dt, c, lim, q=q: S.gguf_decoder_cases(q, lim),
            check_gguf_decoder_layers,
            examples_scale=0.4,
            unchecked=_fused_gguf_decoder,
        )  # fmt: skip
        for q in S.GGUF_QTYPES
    ),
    OpSpec("quantize_fp8", "quantize", FP8, _quant, check_quantize_fp8, True),
    OpSpec(
        "dequantize_fp8",
        "quantize",
        FP8,
        lambda dt, c, lim: S.dequant_fp8_cases(dt, float_dtypes(c), lim),
        check_dequantize_fp8,
        True,
    ),
    OpSpec("quantize_int8", "quantize", ("int8",), _quant, check_quantize_int8, True),
    OpSpec("quantize_int4", "quantize", ("int4",), _quant, check_quantize_int4, True),
    OpSpec("dequantize_int4", "quantize", ("int4",), _int4(None), check_dequantize_int4, True),
    OpSpec("rms_norm", "rms_norm", FLOAT, _flag(S.rms_norm_cases, False), check_rms_norm),
    OpSpec("rms_norm/residual", "rms_norm", FLOAT, _flag(S.rms_norm_cases, True), check_rms_norm),
    OpSpec("rms_norm_quant_fp8", "rms_norm", FP8, _norm_quant, check_rms_norm_quant_fp8, True),
    OpSpec("rotary/neox", "rotary", FLOAT, _flag(S.rotary_cases, True), check_rotary),
    OpSpec("rotary/gptj", "rotary", FLOAT, _flag(S.rotary_cases, False), check_rotary),
    # 10 of the ci profile's 25 examples: 4 kernel launches per case under the interpreter, and
    # tests/backends/triton/test_rotary_write_kv.py checks the fused kernel case by case.
    OpSpec(
        "rotary_write_kv",
        "rotary",
        FP8_OR_FLOAT,
        _rotary_write_kv,
        check_rotary_write_kv,
        True,
        examples_scale=0.4,
    ),
    OpSpec("silu_and_mul", "activation", FLOAT, _plain(S.silu_cases), check_silu_and_mul),
    OpSpec(
        "silu_and_mul_quant_fp8",
        "activation",
        FP8,
        _silu_quant,
        check_silu_and_mul_quant_fp8,
        True,
    ),
    OpSpec(
        "linear_silu_and_mul",
        "gemm",
        FLOAT,
        _plain(S.linear_cases),
        check_linear_silu_and_mul,
    ),
    # The rotary_write_kv row's cost (examples_scale) and test_gemv.py's fused-kernel tests.
    OpSpec(
        "linear_rotary_write_kv",
        "gemm",
        FP8_OR_FLOAT,
        _linear_rotary_write_kv,
        check_linear_rotary_write_kv,
        True,
        examples_scale=0.4,
    ),
    OpSpec("lora_add", "lora", FLOAT, _plain(S.lora_cases), check_lora_add),
    OpSpec("graph", "graph", FLOAT, _plain(S.graph_cases), check_graph),
)
OPS_BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPS}
DTYPE_COLUMNS: tuple[str, ...] = (*FP8_OR_FLOAT, "int8", "int4")
