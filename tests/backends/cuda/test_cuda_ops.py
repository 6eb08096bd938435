"""The CUDA backend against the CPU reference, op by op, on an NVIDIA GPU (skipped without one).

Each test forces or reads the implementation it exercises and asserts that it ran. Float results
are compared with the reference run in float64 on the CPU, as max error / max |reference| within
a per-dtype bound; deterministic ops (KV write, quantize) must match bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from backends.cpu import activation as ref_act
from backends.cpu import attention as ref_attn
from backends.cpu import kv_cache as ref_kv
from backends.cpu import linear as ref_lin
from backends.cpu import norm as ref_norm
from backends.cpu import quant as ref_quant
from backends.cpu import rotary as ref_rot
from hal.backend import OP_FAMILIES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.version.cuda is None,
        reason="needs an NVIDIA GPU with a CUDA build of torch (torch.cuda.is_available() is "
        "False or torch.version.cuda is None)",
    ),
]

DEV = "cuda"
# max |got - ref| / max |ref| against the float64 reference
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TF32_TOL = 5e-3  # fp32 GEMMs with TF32 on (10-bit mantissa inputs)
# FP8 tensor cores accumulate with fewer bits than fp32 (about 14 on Hopper: DeepSeek-V3 technical
# report, "Increasing Accumulation Precision"), which shows in an fp32 output.
FP8_ACC_TOL = 1e-3
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def caps():
    import platforms

    detected = platforms.detect()
    # A CUDA torch on a GPU that detection does not call NVIDIA is a detection bug, not a skip.
    assert detected.vendor == "nvidia", detected
    return detected


@pytest.fixture
def make_backend(caps, monkeypatch: pytest.MonkeyPatch):
    """CudaBackend for the detected GPU, with optional forced choices {family: name}."""
    from backends.cuda.backend import CudaBackend

    for family in OP_FAMILIES:
        monkeypatch.delenv(f"HAL_{family.upper()}_BACKEND", raising=False)

    def make(**forced: str) -> CudaBackend:
        for family, name in forced.items():
            monkeypatch.setenv(f"HAL_{family.upper()}_BACKEND", f"require:{name}")
        return CudaBackend(caps, DEV)

    return make


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double() if t.is_floating_point() else t.detach().cpu()


# -- KV cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32, "fp8"])
def test_write_kv_matches_reference_bitwise(make_backend, caps, cache_dtype) -> None:
    backend = make_backend(kv_write="torch")
    dtype = (caps.fp8_dtype or torch.float8_e4m3fn) if cache_dtype == "fp8" else cache_dtype
    kv_scale = 0.05 if cache_dtype == "fp8" else None
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(9, 16, 2, 80, generator=gen).to(dtype)
    v_cache = torch.randn(9, 16, 2, 80, generator=gen).to(dtype)
    key = torch.randn(7, 2, 80, generator=gen).to(torch.bfloat16)
    value = torch.randn(7, 2, 80, generator=gen).to(torch.bfloat16)
    for slots in ([3, -1, 17, 140, -1, 0, 63], [-1] * 7, [-1, 5, -1, -1, -1, -1, -1]):
        slot_mapping = torch.tensor(slots)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        ref_kv.write_kv(key, value, ref_k, ref_v, slot_mapping, kv_scale)
        gk, gv = k_cache.to(DEV), v_cache.to(DEV)
        backend.write_kv(key.to(DEV), value.to(DEV), gk, gv, slot_mapping.to(DEV), kv_scale)
        assert backend.ran["kv_write"] == "torch"
        assert torch.equal(bits(gk), bits(ref_k)) and torch.equal(bits(gv), bits(ref_v)), slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_copy_blocks_matches_reference(make_backend, dtype) -> None:
    backend = make_backend()
    caches = [torch.randn(6, 4, 2, 8).to(dtype) for _ in range(2)]
    src, dst = torch.tensor([0, 1, 4]), torch.tensor([1, 2, 5])  # block 1 is read, then written
    gpu = [c.to(DEV) for c in caches]
    ref_kv.copy_blocks(caches, src, dst)
    backend.copy_blocks(gpu, src, dst)
    for g, r in zip(gpu, caches, strict=True):
        assert torch.equal(bits(g), bits(r))
    with pytest.raises(ValueError, match="block ids must lie in 0..5"):
        backend.copy_blocks(gpu, torch.tensor([6]), torch.tensor([0]))


# -- attention ------------------------------------------------------------------------------------
def paged_case(
    seqs: list[tuple[int, int]],  # (query_len, seq_len) per sequence
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    cache_dtype: torch.dtype | None = None,
    kv_scale: float | None = None,
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for _, s in seqs) + 1
    num_blocks = len(seqs) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    if cache_dtype is not None and cache_dtype.itemsize == 1:
        k_cache = ref_quant.to_fp8(k_cache / kv_scale, cache_dtype)
        v_cache = ref_quant.to_fp8(v_cache / kv_scale, cache_dtype)
    else:
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    # Block tables in random order, so a wrong gather cannot pass by accident.
    perm = torch.randperm(num_blocks, generator=gen)[: len(seqs) * max_blocks]
    block_tables = perm.reshape(len(seqs), max_blocks).to(torch.int32)
    q_lens = torch.tensor([q for q, _ in seqs])
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32)
    query = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=gen).to(dtype)
    return dict(
        query=query, key_cache=k_cache, value_cache=v_cache, block_tables=block_tables,
        seq_lens=seq_lens, query_start_loc=query_start_loc, scale=head_dim**-0.5,
        kv_scale=kv_scale,
    )  # fmt: skip


def reference_attention(case: dict, **kw) -> torch.Tensor:
    # float64 everywhere except an FP8 cache, which the reference decodes itself.
    args = dict(case, **kw)
    for name in ("query", "key_cache", "value_cache"):
        if args[name].element_size() > 1:
            args[name] = cpu64(args[name])
    return ref_attn.paged_attention(**args)


def gpu_attention(backend, case: dict, **kw) -> torch.Tensor:
    args = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    return backend.attention(**args, **kw)


PREFILL = [(17, 17), (5, 40), (1, 1), (30, 33), (3, 9)]  # fresh, chunked prefill, decode mixed
DECODE = [(1, 17), (1, 1), (1, 64), (1, 35), (1, 90)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("seqs", [PREFILL, DECODE], ids=["prefill", "decode"])
@pytest.mark.parametrize(
    "extra", [{}, {"sliding_window": 7}, {"soft_cap": 5.0}], ids=["plain", "window", "softcap"]
)
def test_sdpa_attention(make_backend, dtype, seqs, extra) -> None:
    backend = make_backend(attention="sdpa")
    case = paged_case(seqs, dtype=dtype)
    got = gpu_attention(backend, case, **extra)
    assert backend.ran["attention"] == "sdpa"
    assert got.dtype == dtype
    assert rel_err(got, reference_attention(case, **extra)) < TOL[dtype]


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(80, 5, 5), (128, 8, 1), (64, 6, 3)])
def test_sdpa_attention_odd_shapes(make_backend, head_dim, num_heads, num_kv_heads) -> None:
    backend = make_backend(attention="sdpa")
    for seqs in (PREFILL, DECODE):
        case = paged_case(seqs, num_heads, num_kv_heads, head_dim, block_size=8)
        got = gpu_attention(backend, case)
        assert rel_err(got, reference_attention(case)) < TOL[torch.bfloat16]


def test_sdpa_attention_fp8_cache(make_backend, caps) -> None:
    backend = make_backend(attention="sdpa")
    fp8 = caps.fp8_dtype or torch.float8_e4m3fn
    for seqs in (PREFILL, DECODE):
        case = paged_case(seqs, cache_dtype=fp8, kv_scale=0.02)
        got = gpu_attention(backend, case)
        assert rel_err(got, reference_attention(case)) < TOL[torch.bfloat16]


def test_sdpa_decode_padding_rows_are_zero(make_backend) -> None:
    backend = make_backend(attention="sdpa")
    case = paged_case(DECODE)
    case["query_start_loc"] = torch.tensor([0, 1, 2, 3, 3, 3], dtype=torch.int32)
    got = gpu_attention(backend, case)
    assert torch.equal(got[3:].cpu(), torch.zeros_like(got[3:].cpu()))
    assert rel_err(got, reference_attention(case)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("block_size", [16, 256])
def test_flash_attn_attention(make_backend, caps, block_size) -> None:
    if not caps.has_library("flash_attn") or not caps.cc_at_least(8, 0):
        pytest.skip(f"flash_attn cannot run here: {caps.library_reason('flash_attn') or 'sm < 80'}")
    backend = make_backend(attention="flash_attn")
    for seqs in (PREFILL, DECODE):
        for extra in ({}, {"sliding_window": 7}, {"soft_cap": 5.0}):
            case = paged_case(seqs, block_size=block_size)
            got = gpu_attention(backend, case, **extra)
            assert backend.ran["attention"] == "flash_attn"
            assert rel_err(got, reference_attention(case, **extra)) < TOL[torch.bfloat16]


# -- linear ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_linear(make_backend, dtype) -> None:
    backend = make_backend()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 72, generator=gen).to(dtype)
    w = torch.randn(40, 72, generator=gen).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    got = backend.linear(x.to(DEV), w.to(DEV), b.to(DEV))
    assert backend.ran["gemm"] == "cublas" and got.dtype == dtype
    tol = TF32_TOL if dtype == torch.float32 and backend.allow_tf32 else TOL[dtype]
    assert rel_err(got, ref_lin.linear(cpu64(x), cpu64(w), cpu64(b))) < tol


def test_linear_fp32_without_tf32_is_ieee(caps) -> None:
    from backends.cuda.backend import CudaBackend

    backend = CudaBackend(caps, DEV, allow_tf32=False)
    x, w = torch.randn(33, 128), torch.randn(64, 128)
    got = backend.linear(x.to(DEV), w.to(DEV))
    assert rel_err(got, ref_lin.linear(cpu64(x), cpu64(w))) < 1e-5


def _fp8_operands(fp8: torch.dtype, m: int, n: int, k: int, per_row: bool):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=gen) * 3
    w = torch.randn(n, k, generator=gen)
    x_q, x_s = ref_quant.quantize_fp8(x, fp8, per_token=per_row)
    w_q, w_s = ref_quant.quantize_fp8(w, fp8, per_token=per_row)
    return x_q, x_s, w_q, w_s, torch.randn(n, generator=gen)


@pytest.mark.parametrize("impl", ["scaled_mm", "dequant_gemm"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per_tensor", "per_row"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_fp8_linear(make_backend, caps, impl, per_row, with_bias, out_dtype) -> None:
    if impl == "scaled_mm" and not caps.cc_at_least(8, 9):
        pytest.skip(f"scaled_mm needs compute capability >= 8.9, this is {caps.cc_str}")
    backend = make_backend(fp8_gemm=impl)
    fp8 = caps.fp8_dtype or torch.float8_e4m3fn
    for m, n, k in ((5, 24, 40), (64, 48, 128)):  # the first needs K and N padded to 16
        x_q, x_s, w_q, w_s, b = _fp8_operands(fp8, m, n, k, per_row)
        b = b if with_bias else None
        args = [t.to(DEV) if t is not None else None for t in (x_q, x_s, w_q, w_s, b)]
        got = backend.fp8_linear(*args, out_dtype=out_dtype)
        assert backend.ran["fp8_gemm"] == impl and got.dtype == out_dtype
        ref = ref_lin.fp8_linear(x_q, x_s, w_q, w_s, b, torch.float64)
        bound = FP8_ACC_TOL if impl == "scaled_mm" else 1e-5
        assert rel_err(got, ref) < max(TOL[out_dtype], bound), (m, n, k)


@pytest.mark.parametrize("impl", ["int_mm", "dequant_gemm"])
def test_int8_linear_matches_reference(make_backend, caps, impl) -> None:
    if impl == "int_mm" and not caps.cc_at_least(7, 5):
        pytest.skip(f"int_mm needs compute capability >= 7.5, this is {caps.cc_str}")
    backend = make_backend(int8_gemm=impl)
    gen = torch.Generator().manual_seed(4)
    for m, n, k in ((5, 20, 36), (33, 64, 256)):  # M <= 16 and K, N off 8 need padding
        x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        x_s, w_s = torch.rand(m, 1, generator=gen) + 0.01, torch.rand(n, 1, generator=gen) + 0.01
        b = torch.randn(n, generator=gen)
        args = [t.to(DEV) for t in (x_q, x_s, w_q, w_s, b)]
        got = backend.int8_linear(*args, out_dtype=torch.float32)
        assert backend.ran["int8_gemm"] == impl
        # Exact integer products (K * 128 * 128 < 2^24 here), then the reference's fp32 ops.
        ref = ref_lin.int8_linear(x_q, x_s, w_q, w_s, b, torch.float32)
        assert torch.equal(got.cpu(), ref), (m, n, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_g_idx", [False, True])
@pytest.mark.parametrize("impl", ["triton", "dequant_gemm"])
def test_int4_linear(make_backend, dtype, use_g_idx, impl) -> None:
    backend = make_backend(int4_gemm=impl)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 128, generator=gen).to(dtype)
    qweight, scales, zeros = ref_quant.quantize_int4(w, 32)
    g_idx = torch.randint(0, 4, (128,), generator=gen) if use_g_idx else None
    x = torch.randn(7, 128, generator=gen).to(dtype)
    b = torch.randn(48, generator=gen).to(dtype)
    dev = [t.to(DEV) if t is not None else None for t in (x, qweight, scales, zeros)]
    got = backend.int4_linear(*dev, 32, g_idx.to(DEV) if use_g_idx else None, b.to(DEV))
    assert backend.ran["int4_gemm"] == impl and got.dtype == dtype
    ref = ref_lin.int4_linear(cpu64(x), qweight, scales, zeros, 32, g_idx, cpu64(b))
    assert rel_err(got, ref) < TOL[dtype]
    w_gpu = backend.dequantize_int4(qweight.to(DEV), scales.to(DEV), zeros.to(DEV), 32)
    assert torch.equal(w_gpu.cpu(), ref_quant.dequantize_int4(qweight, scales, zeros, 32))


# -- quantize (bit for bit) ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_matches_reference_bitwise(make_backend, caps, dtype) -> None:
    backend = make_backend(quantize="torch")
    fp8 = caps.fp8_dtype or torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(9, 64, generator=gen) * 10).to(dtype)
    x[2] = 0  # an all-zero row takes the eps floor
    xd = x.to(DEV)
    for per_token in (False, True):
        q, s = backend.quantize_fp8(xd, fp8, per_token=per_token)
        rq, rs = ref_quant.quantize_fp8(x, fp8, per_token=per_token)
        assert torch.equal(bits(q), bits(rq)) and torch.equal(s.cpu(), rs)
        assert torch.equal(
            backend.dequantize_fp8(q, s, dtype).cpu(), ref_quant.dequantize_fp8(rq, rs, dtype)
        )
        q8, s8 = backend.quantize_int8(xd, per_token=per_token)
        rq8, rs8 = ref_quant.quantize_int8(x, per_token=per_token)
        assert torch.equal(q8.cpu(), rq8) and torch.equal(s8.cpu(), rs8)
    static = torch.tensor([0.05])
    q, _ = backend.quantize_fp8(xd, fp8, scale=static.to(DEV))
    assert torch.equal(bits(q), bits(ref_quant.quantize_fp8(x, fp8, scale=static)[0]))
    assert backend.ran["quantize"] == "torch"
    w = torch.randn(16, 64, generator=gen).to(dtype)
    for symmetric in (False, True):
        got = backend.quantize_int4(w.to(DEV), 16, symmetric)
        ref = ref_quant.quantize_int4(w, 16, symmetric)
        for g, r in zip(got, ref, strict=True):
            assert torch.equal(g.cpu(), r)


# -- fused small ops ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_rotary_activation(make_backend, dtype) -> None:
    backend = make_backend(rms_norm="torch", rotary="torch", activation="torch")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 96, generator=gen).to(dtype)
    res = torch.randn(6, 96, generator=gen).to(dtype)
    w = torch.rand(96, generator=gen).to(dtype)
    y = backend.rms_norm(x.to(DEV), w.to(DEV), 1e-6)
    assert backend.ran["rms_norm"] == "torch"
    assert rel_err(y, ref_norm.rms_norm(cpu64(x), cpu64(w), 1e-6)) < TOL[dtype]
    y, h = backend.rms_norm(x.to(DEV), w.to(DEV), 1e-6, res.to(DEV))
    ry, rh = ref_norm.rms_norm(x, w, 1e-6, res)  # h is rounded to x's dtype: compare like for like
    assert torch.equal(h.cpu(), rh) and rel_err(y, ry) < TOL[dtype]

    positions = torch.tensor([0, 5, 99, 3, 3, 64])
    cache = ref_rot.build_cos_sin_cache(32, 100, 10000.0)  # rotary_dim 32 < head_dim 48
    q = torch.randn(6, 4, 48, generator=gen).to(dtype)
    k = torch.randn(6, 2, 48, generator=gen).to(dtype)
    for is_neox in (True, False):
        gq, gk = backend.rotary(positions.to(DEV), q.to(DEV), k.to(DEV), cache.to(DEV), is_neox)
        rq, rk = ref_rot.rotary(positions, cpu64(q), cpu64(k), cache.double(), is_neox)
        assert backend.ran["rotary"] == "torch"
        assert rel_err(gq, rq) < TOL[dtype] and rel_err(gk, rk) < TOL[dtype]

    a = torch.randn(5, 2 * 40, generator=gen).to(dtype)
    got = backend.silu_and_mul(a.to(DEV))
    assert backend.ran["activation"] == "torch"
    assert rel_err(got, ref_act.silu_and_mul(cpu64(a))) < TOL[dtype]


# -- graphs ---------------------------------------------------------------------------------------
def test_graph_replay_equals_eager_for_a_decode_step(make_backend, caps) -> None:
    if not caps.graph_capture:
        pytest.skip(f"graph capture is not supported on {caps.device_name}")
    backend = make_backend(attention="sdpa")
    assert backend.chosen("graph") == "cuda_graph"
    num_seqs, heads, kv_heads, head_dim, block_size = 4, 8, 2, 64, 16
    case = paged_case([(1, 20), (1, 7), (1, 33), (1, 16)], heads, kv_heads, head_dim, block_size)
    static = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    hidden = 96
    w_qkv = (torch.randn((heads + 2 * kv_heads) * head_dim, hidden) * 0.05).to(DEV, torch.bfloat16)
    norm_w = torch.rand(hidden).to(DEV, torch.bfloat16)
    cos_sin = ref_rot.build_cos_sin_cache(head_dim, 128, 10000.0).to(DEV)
    x = torch.zeros(num_seqs, hidden, dtype=torch.bfloat16, device=DEV)
    positions = torch.zeros(num_seqs, dtype=torch.int64, device=DEV)
    slots = torch.zeros(num_seqs, dtype=torch.int64, device=DEV)

    def step() -> torch.Tensor:
        h = backend.rms_norm(x, norm_w, 1e-6)
        qkv = backend.linear(h, w_qkv)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q = q.reshape(num_seqs, heads, head_dim)
        k = k.reshape(num_seqs, kv_heads, head_dim)
        q, k = backend.rotary(positions, q, k, cos_sin)
        v = v.reshape(num_seqs, kv_heads, head_dim)
        backend.write_kv(k, v, static["key_cache"], static["value_cache"], slots)
        out = backend.attention(
            q, static["key_cache"], static["value_cache"], static["block_tables"],
            static["seq_lens"], static["query_start_loc"], static["scale"],
        )  # fmt: skip
        return backend.silu_and_mul(out.reshape(num_seqs, -1))

    def load_inputs(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(num_seqs, hidden, generator=gen))
        lens = case["seq_lens"].to(torch.int64)
        positions.copy_(lens - 1)
        rows = case["block_tables"].to(torch.int64)[
            torch.arange(num_seqs), (lens - 1) // block_size
        ]
        slots.copy_(rows * block_size + (lens - 1) % block_size)

    load_inputs(0)
    k0, v0 = static["key_cache"].clone(), static["value_cache"].clone()
    runner = backend.capture_graph(step)
    assert backend.ran["graph"] == "cuda_graph"
    for seed in (1, 2):
        load_inputs(seed)
        static["key_cache"].copy_(k0)
        static["value_cache"].copy_(v0)
        replayed = runner.replay().clone()
        static["key_cache"].copy_(k0)
        static["value_cache"].copy_(v0)
        eager = step()
        # Same kernels on the same inputs; the tolerance only allows a different cuBLAS
        # algorithm between the capture stream and this one. A stale replay is off by O(1).
        torch.testing.assert_close(replayed, eager)


def test_graphs_share_a_pool(make_backend, caps) -> None:
    if not caps.graph_capture:
        pytest.skip(f"graph capture is not supported on {caps.device_name}")
    from backends.cuda.graphs import new_pool

    backend = make_backend()
    pool = new_pool()
    a = torch.randn(8, 32, device=DEV)
    w = torch.randn(16, 32, device=DEV)
    r1 = backend.capture_graph(lambda: backend.silu_and_mul(backend.linear(a, w)), pool=pool)
    r2 = backend.capture_graph(lambda: backend.rms_norm(a, a[0], 1e-5), pool=pool)
    a.copy_(torch.randn(8, 32))
    # r2 may reuse r1's pool memory, so each replay is checked before the next one runs.
    torch.testing.assert_close(
        r1.replay(), backend.silu_and_mul(backend.linear(a, w)), rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(r2.replay(), backend.rms_norm(a, a[0], 1e-5), rtol=1e-3, atol=1e-3)
    assert backend.ran["graph"] == "cuda_graph"
