"""The shared Triton kernels (`backends.triton`) against the CPU reference, kernel by kernel: under
TRITON_INTERPRET=1 on CPU tensors without a GPU, natively on CUDA tensors with one. Deterministic
kernels (KV write, block copy, quantize) must match bit for bit; the others stay within the
dtype's float64-referenced tolerance (tests/conformance/tolerances.py). Odd shapes on purpose:
head_dim 80, hidden sizes that are not powers of two, block tables in random order."""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined, so it must be set before the kernels import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")
# Masked-off lanes compute on filler values (0 / 0 and the like), as on a GPU; numpy says so.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

from backends.cpu import activation as ref_activation  # noqa: E402
from backends.cpu import attention as ref_attention  # noqa: E402
from backends.cpu import kv_cache as ref_kv  # noqa: E402
from backends.cpu import norm as ref_norm  # noqa: E402
from backends.cpu import quant as ref_quant  # noqa: E402
from backends.cpu import rotary as ref_rotary  # noqa: E402
from tests.conformance import strategies as S  # noqa: E402
from tests.conformance.tolerances import tolerance  # noqa: E402

_KERNELS = ("quant", "norm", "rotary", "activation", "kv_cache", "attention")
for _name in _KERNELS:
    _full = f"backends.triton.{_name}"
    if _full in sys.modules and INTERPRET:
        # Imported earlier in this process without the interpreter: define the kernels again.
        importlib.reload(sys.modules[_full])
tq, tnorm, trot, tact, tkv, tattn = (
    importlib.import_module(f"backends.triton.{name}") for name in _KERNELS
)

F64 = torch.float64
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def assert_bitwise(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    out = out.cpu()
    assert out.dtype == expected.dtype and out.shape == expected.shape, (what, out.dtype, out.shape)
    a = out.contiguous().view(_BITS[out.element_size()])
    b = expected.contiguous().view(_BITS[expected.element_size()])
    diff = a != b
    if bool(diff.any()):
        first = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at {first}: "
            f"{out[first].item()} vs {expected[first].item()}"
        )


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: str, what: str, magnitude=1.0, k=1
) -> None:
    """|out - ref| <= the dtype's tolerance around the float64 reference, elementwise."""
    allowed = tolerance(dtype).allowed(ref.to(F64), magnitude, k)
    err = (out.cpu().to(F64) - ref.to(F64)).abs().nan_to_num(math.inf)
    bad = err > allowed
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{what} ({dtype}): |out - ref| {err[i].item():.3g} > {allowed.expand_as(err)[i]:.3g} "
            f"at {i} (out {out.cpu()[i].item()}, ref {ref[i].item()})"
        )


def test_kernels_run_where_expected() -> None:
    # Under the interpreter every kernel is an InterpretedFunction (CPU tensors work); natively
    # a JITFunction compiled for the GPU.
    from triton.runtime.interpreter import InterpretedFunction

    kernel = tattn._attention_kernel
    assert isinstance(kernel, InterpretedFunction) == INTERPRET, type(kernel)


# -- RMSNorm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    ("shape", "residual"),
    [((1, 1), False), ((7, 100), True), ((2, 3, 257), False), ((3, 4100), True)],
)
def test_rms_norm(dtype: str, shape: tuple[int, ...], residual: bool) -> None:
    g, td = gen(sum(shape)), FLOATS[dtype]
    x = (torch.randn(shape, generator=g) * 3).to(td)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(td)
    r = (torch.randn(shape, generator=g) * 3).to(td) if residual else None
    out = tnorm.rms_norm(dev(x), dev(w), 1e-6, dev(r))
    ref = ref_norm.rms_norm(x.to(F64), w.to(F64), 1e-6, None if r is None else r.to(F64))
    if residual:
        assert_close(out[0], ref[0], dtype, "y", float(w.abs().max()))
        # h is the rounded sum, exactly as torch rounds it
        assert_bitwise(out[1], (x.float() + r.float()).to(td), "h")
    else:
        assert_close(out, ref, dtype, "y", float(w.abs().max()))


# -- rotary ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(80, 80), (80, 32), (128, 64), (64, 64)])
def test_rotary(dtype: str, is_neox: bool, head_dim: int, rotary_dim: int) -> None:
    g, td = gen(head_dim + rotary_dim), FLOATS[dtype]
    num_tokens, num_kv_heads, num_heads = 37, 2, 6
    cache = ref_rotary.build_cos_sin_cache(rotary_dim, 4096, 10000.0)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(td)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(td)
    q_out, k_out = trot.rotary(dev(positions), dev(q), dev(k), dev(cache), is_neox)
    q_ref, k_ref = ref_rotary.rotary(positions, q.to(F64), k.to(F64), cache.to(F64), is_neox)
    mag = max(float(q.abs().max()), float(k.abs().max()))
    assert_close(q_out, q_ref, dtype, "query", mag)
    assert_close(k_out, k_ref, dtype, "key", mag)
    # dims past rotary_dim are copied untouched
    assert_bitwise(q_out[..., rotary_dim:], q[..., rotary_dim:].contiguous(), "query tail")


# -- SiLU-and-mul ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 2), (3, 154), (2, 5, 600)])
def test_silu_and_mul(dtype: str, shape: tuple[int, ...]) -> None:
    x = (torch.randn(shape, generator=gen(shape[-1])) * 8).to(FLOATS[dtype])
    out = tact.silu_and_mul(dev(x))
    assert_close(out, ref_activation.silu_and_mul(x.to(F64)), dtype, "y", 0.0)


# -- KV cache --------------------------------------------------------------------------------
def _paged_batch(seed: int, dtype: str, cache_dtype: str, head_dim: int = 80,
                 **kw: object) -> S.AttentionBatch:  # fmt: skip
    """5 sequences of 1-97 tokens (decode, prefill and chunked prefill) on blocks handed out in
    a random order, spare slots poisoned."""
    g = gen(seed)
    seq_lens = tuple(int(v) for v in torch.randint(1, 98, (5,), generator=g))
    query_lens = (1, seq_lens[1], max(1, seq_lens[2] // 3), 1, seq_lens[4])
    block_size = 16
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    order = tuple(int(v) for v in torch.randperm(num_blocks, generator=g))
    fields = dict(
        dtype=dtype, cache_dtype=cache_dtype, num_kv_heads=2, gqa_ratio=4, head_dim=head_dim,
        block_size=block_size, seq_lens=seq_lens, query_lens=query_lens, num_blocks=num_blocks,
        block_order=order, sliding_window=None, soft_cap=None,
        kv_scale=0.5 if cache_dtype.startswith("fp8") else None, score_scale=1.0,
        num_padding=0, seed=seed,
    )  # fmt: skip
    fields.update(kw)
    return S.AttentionBatch(**fields)


@pytest.mark.parametrize(
    ("dtype", "cache_dtype", "kv_scale"),
    [("bf16", "bf16", None), ("fp32", "fp32", None), ("fp16", "fp8_e4m3fn", 0.05),
     ("bf16", "fp8_e4m3fnuz", 2.0), ("fp32", "fp8_e4m3fn", None), ("fp32", "bf16", None)],
)  # fmt: skip
def test_write_kv_bitwise(dtype: str, cache_dtype: str, kv_scale: float | None) -> None:
    case = _paged_batch(3, dtype, cache_dtype if cache_dtype.startswith("fp8") else dtype)
    t = case.build()
    key, value, slots = t["key"] * 30, t["value"] * 30, t["slot_mapping"].clone()
    slots[::7] = -1  # padding tokens are skipped
    cdt = S.torch_dtype(cache_dtype)
    kc, vc = t["key_cache"].to(cdt), t["value_cache"].to(cdt)
    out_k, out_v = dev(kc.clone()), dev(vc.clone())
    tkv.write_kv(dev(key), dev(value), out_k, out_v, dev(slots), kv_scale)
    ref_k, ref_v = kc.clone(), vc.clone()
    ref_kv.write_kv(key, value, ref_k, ref_v, slots, kv_scale)
    assert_bitwise(out_k, ref_k, "key_cache")
    assert_bitwise(out_v, ref_v, "value_cache")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_copy_blocks_reads_all_sources_first(dtype: torch.dtype) -> None:
    g = gen(5)
    caches = [torch.randn(9, 8, 2, 80, generator=g).to(dtype) for _ in range(3)]
    # A chain (block 1 -> 2 while 2 -> 3): the reference gathers every source before writing.
    src, dst = torch.tensor([1, 2, 6]), torch.tensor([2, 3, 0])
    out = [dev(c.clone()) for c in caches]
    tkv.copy_blocks(out, dev(src), dev(dst))
    for i, c in enumerate(caches):
        expected = c.clone()
        ref_kv.copy_blocks([expected], src, dst)
        assert_bitwise(out[i], expected, f"caches[{i}]")
    with pytest.raises(ValueError, match="src: block ids must lie in 0..8"):
        tkv.copy_blocks([dev(caches[0].clone())], torch.tensor([9]), torch.tensor([0]))


# -- quantize --------------------------------------------------------------------------------
def _fp8_edges(fp8: torch.dtype) -> torch.Tensor:
    """Every finite FP8 value, the midpoints between neighbours (ties) and one fp32 ulp either
    side of each midpoint: the values that expose a rounding mistake."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float()
    vals = vals[torch.isfinite(vals)].unique()  # sorted
    mids = (vals[1:] + vals[:-1]) / 2
    up, down = torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)
    return torch.cat((vals, mids, up, down, torch.tensor([1e30, -1e30, 0.0, -0.0])))


@pytest.mark.parametrize("fp8", FP8, ids=lambda d: str(d).split(".")[-1])
def test_fp8_encode_rounds_to_nearest_even(fp8: torch.dtype) -> None:
    x = _fp8_edges(fp8)[None, :]
    q, _ = tq.quantize_fp8(dev(x), fp8, dev(torch.ones(1)))
    assert_bitwise(q, ref_quant.quantize_fp8(x, fp8, torch.ones(1))[0], "q")


@pytest.mark.parametrize("fp8", FP8, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("out_dtype", FLOATS.values(), ids=FLOATS)
def test_dequantize_fp8_every_code(fp8: torch.dtype, out_dtype: torch.dtype) -> None:
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).reshape(4, 64)
    scale = torch.tensor([[0.5], [3.0], [1e-3], [7.25]])
    out = tq.dequantize_fp8(dev(q), dev(scale), out_dtype).cpu()
    ref = ref_quant.dequantize_fp8(q, scale, out_dtype)
    # NaN codes decode to NaN; payload bits are no contract (a GPU's multiply canonicalizes them)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert_bitwise(torch.where(nan, 0.0, out), torch.where(nan, 0.0, ref), "x")


@pytest.mark.parametrize("fp8", FP8, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", ["tensor", "token", "static_tensor", "static_token"])
def test_quantize_fp8_bitwise(fp8: torch.dtype, dtype: str, mode: str) -> None:
    g = gen(11)
    x = torch.randn(37, 301, generator=g) * torch.exp(torch.randn(37, 301, generator=g) * 3)
    x[5] = 0.0  # an all-zero row: the SCALE_EPS floor
    x = x.to(FLOATS[dtype])
    per_token = mode.endswith("token")
    scale = None
    if mode.startswith("static"):  # a small static scale clips: the clamp is part of the math
        scale = torch.rand((37, 1) if per_token else (1,), generator=g) * 0.01 + 1e-6
    q, s = tq.quantize_fp8(dev(x), fp8, dev(scale), per_token)
    q_ref, s_ref = ref_quant.quantize_fp8(x, fp8, scale, per_token)
    assert_bitwise(s, s_ref, "scale")
    assert_bitwise(q, q_ref, "q")


@pytest.mark.parametrize("cols", [20000, 5000])
@pytest.mark.parametrize("mode", ["tensor", "token"])
def test_quantize_fp8_long_rows_bitwise(cols: int, mode: str) -> None:
    # Rows longer than a tile (20000 > 16384 on a GPU; 5000 > 4096 under the interpreter) take
    # the two-pass loop; shorter ones the one-pass path: both match the reference bit for bit.
    g = gen(12)
    x = (torch.randn(3, cols, generator=g) * 4).to(torch.bfloat16)
    per_token = mode == "token"
    q, s = tq.quantize_fp8(dev(x), torch.float8_e4m3fn, None, per_token)
    q_ref, s_ref = ref_quant.quantize_fp8(x, torch.float8_e4m3fn, None, per_token)
    assert_bitwise(s, s_ref, "scale")
    assert_bitwise(q, q_ref, "q")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", ["tensor", "token", "static_token"])
def test_quantize_int8_bitwise(dtype: str, mode: str) -> None:
    g = gen(13)
    x = torch.randn(29, 130, generator=g) * 10
    x[0, :64] = torch.arange(64) - 31.5  # exact ties x / 1.0 = k + 0.5 round to even
    x[3] = 0.0
    x = x.to(FLOATS[dtype])
    per_token = mode.endswith("token")
    scale = torch.rand(29, 1, generator=g) * 0.1 + 0.01 if mode.startswith("static") else None
    if scale is not None:
        scale[0] = 1.0
    q, s = tq.quantize_int8(dev(x), dev(scale), per_token)
    q_ref, s_ref = ref_quant.quantize_int8(x, scale, per_token)
    assert_bitwise(s, s_ref, "scale")
    assert_bitwise(q, q_ref, "q")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 128, 40])
def test_quantize_int4_bitwise(dtype: str, symmetric: bool, group_size: int) -> None:
    w = (torch.randn(37, 4 * group_size, generator=gen(group_size)) * 0.05).to(FLOATS[dtype])
    w[3, :group_size] = 0.0  # an all-zero group
    out = tq.quantize_int4(dev(w), group_size, symmetric)
    ref = ref_quant.quantize_int4(w, group_size, symmetric)
    for name, a, b in zip(("qweight", "scales", "zeros"), out, ref, strict=True):
        assert_bitwise(a, b, name)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "g_idx"])
def test_dequantize_int4_bitwise(dtype: str, act_order: bool) -> None:
    g, k, n, group_size = gen(17), 256, 45, 64
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    qweight = ref_quant.pack_int4(codes)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.001).to(FLOATS[dtype])
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g, dtype=torch.uint8)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=g) // group_size).to(torch.int32)
    out = tq.dequantize_int4(dev(qweight), dev(scales), dev(zeros), group_size, dev(g_idx))
    ref = ref_quant.dequantize_int4(qweight, scales, zeros, group_size, g_idx)
    assert_bitwise(out, ref, "w")


# -- attention -------------------------------------------------------------------------------
ATTENTION_CASES = [
    ("fp32", "fp32", 80, {}),
    ("bf16", "bf16", 80, {"sliding_window": 20}),
    ("fp16", "fp16", 128, {"soft_cap": 30.0, "score_scale": 4.0}),
    ("bf16", "bf16", 64, {"gqa_ratio": 1, "soft_cap": 5.0, "sliding_window": 7}),
    ("fp32", "fp32", 96, {"gqa_ratio": 3, "soft_cap": 50.0}),
    ("bf16", "fp8_e4m3fn", 80, {"kv_scale": 0.05}),
    ("fp16", "fp8_e4m3fnuz", 256, {"kv_scale": 2.0, "sliding_window": 33}),
    ("fp32", "fp8_e4m3fn", 64, {"gqa_ratio": 8, "num_kv_heads": 1, "soft_cap": 30.0}),
]


@pytest.mark.parametrize(("dtype", "cache_dtype", "head_dim", "extra"), ATTENTION_CASES)
def test_attention(dtype: str, cache_dtype: str, head_dim: int, extra: dict) -> None:
    case = _paged_batch(head_dim + len(extra), dtype, cache_dtype, head_dim, **extra)
    t = case.build()
    num_tokens = case.num_tokens
    # Two padding rows past query_start_loc[-1] (a captured batch size): they come back zero.
    query = torch.cat((t["query"], torch.ones(2, *t["query"].shape[1:]).to(t["query"].dtype)))
    args = (t["block_tables"], t["seq_lens"], t["query_start_loc"])
    kw = dict(sliding_window=case.sliding_window, soft_cap=case.soft_cap, kv_scale=case.kv_scale)
    out = tattn.attention(dev(query), dev(t["key_cache"]), dev(t["value_cache"]),
                          *(dev(a) for a in args), t["scale"], **kw)  # fmt: skip
    kc, vc = t["key_cache"], t["value_cache"]
    if not cache_dtype.startswith("fp8"):
        kc, vc = kc.to(F64), vc.to(F64)
    ref = ref_attention.paged_attention(query.to(F64), kc, vc, *args, t["scale"], **kw)
    v_max = float(ref_kv.decode_kv(t["value_cache"], case.kv_scale, F64).abs().max())
    v_max = min(v_max, 8.0)  # POISON slots are never read
    if dtype == "fp32":
        assert_close(out, ref, dtype, "out", v_max * case.score_scale, head_dim)
    else:
        assert_close(out, ref, dtype, "out", v_max)
    assert not bool(out[num_tokens:].cpu().any()), "padding rows must be zero"


def test_attention_input_reasons_and_errors() -> None:
    q = torch.zeros(4, 8, 512)
    cache = torch.zeros(3, 16, 2, 512)
    assert tattn.input_reasons(q, cache) == ["head_dim 512 > 256"]
    assert tattn.input_reasons(q[..., :64].double(), cache[..., :64]) == [
        "query dtype torch.float64 is not float32, bfloat16 or float16",
        "cache dtype torch.float32 is neither the query's torch.float64 nor an FP8 format",
    ]
    ok = dict(block_tables=torch.zeros(1, 1, dtype=torch.int32),
              seq_lens=torch.tensor([4], dtype=torch.int32),
              query_start_loc=torch.tensor([0, 4], dtype=torch.int32), scale=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="num_heads: 5 query heads is not a multiple of"):
        tattn.attention(dev(torch.zeros(4, 5, 64)), dev(cache[..., :64].contiguous()),
                        dev(cache[..., :64].contiguous()), **ok)  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window: 0 must be >= 1"):
        c = dev(cache[..., :64].contiguous())
        tattn.attention(dev(q[..., :64].contiguous()), c, c, sliding_window=0, **ok)


# -- argument checks -------------------------------------------------------------------------
def test_bad_inputs_name_the_value() -> None:
    x = dev(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"x: expected a 2-D \[M, K\] tensor"):
        tq.quantize_fp8(x[None], torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8 dtype: torch.int8 is not one of"):
        tq.quantize_fp8(x, torch.int8)
    with pytest.raises(ValueError, match="group_size: 5 must be positive and divide K=8"):
        tq.quantize_int4(dev(torch.zeros(2, 8)), 5)
    with pytest.raises(ValueError, match="weight: shape"):
        tnorm.rms_norm(x, dev(torch.ones(5)), 1e-6)
    with pytest.raises(ValueError, match="x: last dim must be even"):
        tact.silu_and_mul(dev(torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="rotary_dim 6 must be even and <= head_dim 4"):
        trot.rotary(dev(torch.zeros(2, dtype=torch.long)), dev(torch.zeros(2, 1, 4)),
                    dev(torch.zeros(2, 1, 4)), dev(torch.zeros(8, 6)))  # fmt: skip
    with pytest.raises(ValueError, match="key: shape"):
        cache = dev(torch.zeros(2, 4, 1, 8))
        tkv.write_kv(dev(torch.zeros(3, 1, 4)), dev(torch.zeros(3, 1, 4)), cache, cache,
                     dev(torch.zeros(3, dtype=torch.long)))  # fmt: skip


# -- the CUDA backend's Triton candidates ----------------------------------------------------
def test_cuda_backend_dispatches_to_triton_and_falls_back_by_input() -> None:
    import backends.cuda as cuda_pkg
    from hal.select import load_backend

    caps = cuda_pkg.interpreter_capabilities()
    assert caps is not None and caps.has_library("triton")
    if not INTERPRET:
        pytest.skip("interpreter capabilities build a CPU backend; this run is native")
    backend = load_backend(caps, device="cpu", configured="require:cuda")
    families = ("kv_write", "attention", "quantize", "rms_norm", "rotary", "activation")
    assert all(backend.chosen(f) == "triton" for f in families), backend.describe()
    # CPU tensors need CPU-capable choices for every other family.
    assert backend.chosen("graph") == "eager"
    assert backend.chosen("fp8_gemm") == "triton_small_m"
    assert backend.large_m_impl("fp8_gemm") == "dequant_gemm"  # no _scaled_mm without a GPU
    assert backend.chosen("int8_gemm") == "triton_small_m"
    assert backend.large_m_impl("int8_gemm") == "dequant_gemm"
    x = torch.randn(3, 40)
    y = backend.rms_norm(x, torch.ones(40), 1e-6)
    assert backend.ran["rms_norm"] == "triton"
    assert_close(y, ref_norm.rms_norm(x.to(F64), torch.ones(40, dtype=F64), 1e-6), "fp32", "y")
    backend.rms_norm(x.double(), torch.ones(40, dtype=F64), 1e-6)  # fp64: no Triton kernel
    assert backend.ran["rms_norm"] == "torch"
    case = _paged_batch(1, "fp32", "fp32", head_dim=64)
    t = case.build()
    big_q = t["query"].repeat(1, 1, 5)  # head_dim 320 > 256: sdpa takes it
    big_c = t["key_cache"].repeat(1, 1, 1, 5)
    backend.attention(big_q, big_c, big_c, t["block_tables"], t["seq_lens"],
                      t["query_start_loc"], 0.1)  # fmt: skip
    assert backend.ran["attention"] == "sdpa"
