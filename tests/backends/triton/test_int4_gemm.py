"""The Triton 4-bit weight-only GEMM (`backends.triton.int4_gemm`) against the CPU reference
(`backends.cpu.linear.int4_linear` in float64), under TRITON_INTERPRET=1 without a GPU.

Tolerance (tests/conformance/tolerances.py, the conformance bound): |y - ref| <= u * sqrt(K) *
max|x| * max|W| + 4u * |ref| (fp32: 16u for both), u the unit roundoff of x's dtype. The kernel
rounds: the output once to x's dtype (4u covers it and the fp32 accumulation); in the
group-uniform path nothing else (dot products of x with the exact integers q - z, scaled per
group); with g_idx or an unaligned group size, the tensor-core kernel rounds each dequantized
weight once to x's dtype, one rounding per term adding as a random walk (the u * sqrt(K) term).
"""

from __future__ import annotations

import importlib
import itertools
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
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

from backends.cpu import linear as ref_linear  # noqa: E402
from backends.cpu import quant as ref_quant  # noqa: E402
from tests.conformance.tolerances import tolerance  # noqa: E402

if "backends.triton.int4_gemm" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.int4_gemm"])  # defined without the interpreter
ig = importlib.import_module("backends.triton.int4_gemm")

F64 = torch.float64
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_case(
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    act_order: bool,
    has_bias: bool,
    seed: int,
) -> dict:
    """Random codes, scales (in dtype), zeros, x and bias; g_idx desc_act-style: a random
    permutation of the input channels assigned to groups of group_size in order."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = k // group_size
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group_size).to(torch.int32)
    return {
        "x": torch.randn(m, k, generator=gen).to(dtype),
        "qweight": ref_quant.pack_int4(codes),
        "scales": (torch.rand(num_groups, n, generator=gen) * 0.05 + 0.005).to(dtype),
        "zeros": torch.randint(0, 16, (num_groups, n), generator=gen, dtype=torch.uint8),
        "group_size": group_size,
        "g_idx": g_idx,
        "bias": torch.randn(n, generator=gen).to(dtype) if has_bias else None,
    }


def dev(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def run_kernel(case: dict, **kw) -> torch.Tensor:
    args = [dev(case[key]) for key in ("x", "qweight", "scales", "zeros", "group_size", "g_idx")]
    return ig.int4_linear(*args, dev(case["bias"]), **kw)


def check(case: dict, y: torch.Tensor) -> None:
    """y against the CPU reference run in float64 on the same (upcast) inputs."""
    x = case["x"]
    assert y.dtype == x.dtype and tuple(y.shape) == (x.shape[0], case["qweight"].shape[1])

    def up(t):
        return None if t is None else t.to(F64)

    q = (case["qweight"], up(case["scales"]), case["zeros"], case["group_size"], case["g_idx"])
    ref = ref_linear.int4_linear(up(x), *q, up(case["bias"]))
    w = ref_quant.dequantize_int4(*q)
    k = x.shape[1]
    allowed = tolerance(x.dtype).allowed(ref, float(x.abs().max() * w.abs().max()), k)
    err = (y.cpu().to(F64) - ref).abs()
    worst = float((err / allowed).max())
    assert worst <= 1.0, f"max |y - ref| = {float(err.max()):.3g}, {worst:.2f}x the tolerance"


# -- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("act_order", [False, True])
def test_default_table_matches_reference(dtype: str, m: int, act_order: bool) -> None:
    # The default table picks the FMA kernel for M <= 4 and the tensor-core kernel above; the
    # group size and bias vary with the case so every pairing appears across the grid.
    i = m + (7 if act_order else 0) + len(dtype)
    group_size = (32, 64, 128, 256)[i % 4]
    case = make_case(m, 72, 256, group_size, FLOATS[dtype], act_order, i % 2 == 0, seed=i)
    check(case, run_kernel(case))


@pytest.mark.parametrize("kernel", ["fma", "dot"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, 24])
def test_group_sizes(kernel: str, group_size: int) -> None:
    # 256 = K is per-channel (one group). 24 is no power of two: the FMA kernel tiles it by 8,
    # the tensor-core kernel (tiles >= 16) gathers the scale per k.
    k = 192 if group_size == 24 else 256
    block_m = 16 if kernel == "dot" else 4
    cfg = ig.Int4Config(kernel, block_m, 32, 128, split_k=2)
    case = make_case(5, 40, k, group_size, torch.bfloat16, False, True, seed=group_size)
    check(case, run_kernel(case, config=cfg))


@pytest.mark.parametrize("kernel", ["fma", "dot"])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_split_k_and_kernels(kernel: str, split_k: int, act_order: bool) -> None:
    # split 3 over 4 tiles of K: uneven splits, partials summed by the reduce kernel.
    cfg = ig.Int4Config(kernel, 16 if kernel == "dot" else 2, 64, 64, split_k=split_k)
    case = make_case(3, 100, 256, 64, torch.float16, act_order, split_k == 3, seed=split_k)
    check(case, run_kernel(case, config=cfg))


def test_fp32_exact_products_without_tf32() -> None:
    # fp32 x and weights: with TF32 off the only roundings are fp32's; the bound is 16u.
    cfg = ig.Int4Config("dot", 16, 32, 64, split_k=1)
    case = make_case(20, 48, 128, 32, torch.float32, False, False, seed=9)
    check(case, run_kernel(case, config=cfg, allow_tf32=False))


def test_non_contiguous_x_and_mixed_scale_dtype() -> None:
    case = make_case(3, 24, 128, 32, torch.bfloat16, False, True, seed=3)
    case["x"] = case["x"].t().contiguous().t()  # [M, K] with stride(1) == M
    case["scales"] = case["scales"].to(torch.float32)  # fp32 scales with bf16 activations
    check(case, run_kernel(case))


def test_empty_m_and_n() -> None:
    case = make_case(0, 16, 64, 32, torch.float16, False, False, seed=1)
    assert run_kernel(case).shape == (0, 16)


# -- the tuning table ----------------------------------------------------------------------------
def test_pick_config_walks_the_table() -> None:
    assert ig.pick_config(1).kernel == "fma" and ig.pick_config(33).kernel == "dot"
    mine = ((8, ig.Int4Config("dot", 16, 32, 32)), (64, ig.Int4Config("dot", 32, 32, 32)))
    assert ig.pick_config(8, mine) is mine[0][1] and ig.pick_config(9, mine) is mine[1][1]
    assert ig.pick_config(1000, mine) is mine[1][1]  # past the end: the last entry


def test_vendor_table_is_used(monkeypatch) -> None:
    # A backend's own table (ROCm) replaces the default: M = 1 through the tensor-core kernel.
    launched = []
    real = ig._int4_dot_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(ig, "_int4_dot_kernel", Spy())
    case = make_case(1, 32, 64, 32, torch.float16, False, False, seed=2)
    check(case, run_kernel(case, configs=((2**30, ig.Int4Config("dot", 16, 32, 32, 1)),)))
    assert launched


def test_config_rejects_bad_blocks() -> None:
    with pytest.raises(ValueError, match="block_k: 8 must be a power of two >= 16"):
        ig.Int4Config("dot", 16, 32, 8)
    with pytest.raises(ValueError, match="block_n: 48"):
        ig.Int4Config("fma", 1, 48, 64)
    with pytest.raises(ValueError, match="kernel: 'gemv'"):
        ig.Int4Config("gemv", 1, 32, 64)


# -- bad input -----------------------------------------------------------------------------------
def _bad(**changes) -> dict:
    case = make_case(2, 16, 64, 32, torch.float16, False, False, seed=0)
    case.update(changes)
    return case


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x": torch.randn(2, 60).half()}, "K=60 is not a multiple of 8"),
        ({"x": torch.randn(2, 56).half()}, "differs from qweight's K"),
        ({"x": torch.randn(2, 64, 1).half()}, r"expected \[M, K\]"),
        ({"x": torch.randn(2, 64).to(torch.float64)}, "x: dtype torch.float64"),
        ({"qweight": torch.zeros(8, 16, dtype=torch.int64)}, "qweight: expected int32"),
        ({"zeros": torch.zeros(2, 16, dtype=torch.int32)}, "zeros: dtype torch.int32"),
        ({"scales": torch.ones(2, 16, dtype=torch.int32)}, "scales: dtype torch.int32"),
        ({"scales": torch.ones(2, 8).half()}, "scales/zeros: shapes"),
        ({"group_size": 48}, "group_size: 48 must be positive and divide K=64"),
        ({"group_size": 16}, "into the 2 groups"),
        ({"g_idx": torch.zeros(32, dtype=torch.int32)}, r"g_idx: expected int32 \[K=64\]"),
        ({"bias": torch.ones(15).half()}, r"bias: shape \(15,\)"),
    ],
)
def test_bad_input_is_a_clear_error(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_kernel(_bad(**changes))


def test_g_idx_out_of_range_on_cpu() -> None:
    if DEVICE != "cpu":
        pytest.skip("values are checked only where reading them back costs no device sync")
    with pytest.raises(ValueError, match=r"g_idx: values must lie in 0\.\.1"):
        run_kernel(_bad(g_idx=torch.full((64,), 2, dtype=torch.int32)))


# -- the packed layout ---------------------------------------------------------------------------
def uneven_g_idx(k: int, num_groups: int, seed: int) -> torch.Tensor:
    """A g_idx whose groups hold different numbers of channels (each group at least one)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.cat([torch.arange(num_groups), torch.randint(0, num_groups, (k - num_groups,),
                                                           generator=gen)])  # fmt: skip
    return g[torch.randperm(k, generator=gen)].to(torch.int32)


def packed_case(m, n, k, group_size, dtype, g_kind, has_bias, seed) -> tuple[dict, object]:
    case = make_case(m, n, k, group_size, dtype, g_kind == "desc_act", has_bias, seed)
    if g_kind == "uneven":
        case["g_idx"] = uneven_g_idx(k, k // group_size, seed)
    q = (case["qweight"], case["scales"], case["zeros"], group_size, case["g_idx"])
    return case, ig.repack_int4_for_triton(*(dev(t) for t in q))


def run_packed(case: dict, packed, **kw) -> torch.Tensor:
    return ig.int4_linear(dev(case["x"]), packed, bias=dev(case["bias"]), **kw)


def decode_packed(p) -> torch.Tensor:
    """W [N, K] float64 in the checkpoint's channel order, decoded from an Int4Packed by its
    documented layout (independently of the kernels)."""
    qw = p.qweight.cpu()
    n, k = qw.shape[0], qw.shape[1] * 8
    codes = torch.stack([(qw >> (4 * i)) & 0xF for i in range(8)], dim=2).reshape(n, k)
    g = p.g_idx.cpu().long() if p.g_idx is not None else torch.arange(k) // p.group_size
    w = (codes.to(F64) - p.zeros.cpu().to(F64)[:, g]) * p.scales.cpu().to(F64)[:, g]
    perm = p.perm.cpu() if p.perm is not None else torch.arange(k)
    out = torch.empty_like(w)
    out[:, perm] = w  # packed k holds the checkpoint's channel perm[k]
    return out


@pytest.mark.parametrize("g_kind", [None, "desc_act", "uneven"])
def test_repack_is_lossless(g_kind: str | None) -> None:
    case, p = packed_case(1, 24, 256, 32, torch.float16, g_kind, False, seed=5)
    want = ref_quant.dequantize_int4(
        case["qweight"], case["scales"].to(F64), case["zeros"], 32, case["g_idx"]
    )
    assert torch.equal(decode_packed(p), want)  # (q - z) * s is exact in float64
    assert p.scales.dtype == case["scales"].dtype and p.zeros.dtype == torch.uint8
    if g_kind is None:  # a plain transpose
        assert torch.equal(p.qweight.cpu(), case["qweight"].t()) and p.perm is None
    elif g_kind == "desc_act":  # sorted into contiguous groups of 32: the per-group path
        assert p.g_idx is None and p.group_size == 32 and p.perm is not None
    else:  # unequal groups: the sorted g_idx stays, scales are gathered per k
        assert p.g_idx is not None and p.group_size == 0
        assert bool((p.g_idx.cpu()[1:] >= p.g_idx.cpu()[:-1]).all())


# name: (group_size, K, g_idx kind, block_k, {kernel: the scale mode it must take})
PACKED_CASES = {
    "tile_in_group": (128, 256, None, 64, {"fma": 0, "dot": 0}),
    "groups_per_tile": (32, 256, None, 128, {"fma": 1, "dot": 0}),  # dot shrinks its tile
    "group_24": (24, 192, None, 64, {"fma": 1, "dot": 1}),
    "group_12": (12, 96, None, 32, {"fma": 2, "dot": 2}),  # groups split words
    "desc_act": (64, 256, "desc_act", 64, {"fma": 0, "dot": 0}),
    "uneven_g_idx": (32, 256, "uneven", 64, {"fma": 2, "dot": 2}),
}


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("name", list(PACKED_CASES))
@pytest.mark.parametrize("kernel", ["fma", "dot"])
def test_packed_matches_reference(kernel: str, name: str, dtype: str) -> None:
    group_size, k, g_kind, block_k, modes = PACKED_CASES[name]
    seed = len(name) + len(dtype)
    case, p = packed_case(3, 24, k, group_size, FLOATS[dtype], g_kind, seed % 2 == 0, seed)
    cfg = ig.Int4Config(kernel, 1 if kernel == "fma" else 16, 16, block_k, split_k=2)
    assert ig._packed_scale_mode(p, cfg)[0] == modes[kernel]
    check(case, run_packed(case, p, config=cfg))


@pytest.mark.parametrize("kernel", ["fma", "dot"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_packed_split_k_and_k_tail(kernel: str, split_k: int) -> None:
    # K = 192 in tiles of 128: a partial last tile (masked loads), uneven splits; N = 40 in
    # blocks of 32: rows past N re-read the last one and are never stored.
    case, p = packed_case(5, 40, 192, 64, torch.bfloat16, None, True, seed=split_k)
    cfg = ig.Int4Config(kernel, 1 if kernel == "fma" else 16, 32, 128, split_k=split_k)
    check(case, run_packed(case, p, config=cfg))


@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_packed_default_table(m: int) -> None:
    # PACKED_CONFIGS: fma for M = 1, tensor cores above; desc_act and a non-contiguous x.
    dtype = (torch.bfloat16, torch.float16, torch.float32)[m % 3]
    case, p = packed_case(m, 40, 256, 128, dtype, "desc_act", m % 2 == 1, seed=m)
    case["x"] = case["x"].t().contiguous().t()
    check(case, run_packed(case, p))


def spy_packed_kernel(monkeypatch) -> list:
    """The grids `_int4_packed_kernel` is launched with from now on (the kernel still runs)."""
    launched = []
    real = ig._int4_packed_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(ig, "_int4_packed_kernel", Spy())
    return launched


def test_packed_launches_the_packed_kernel(monkeypatch) -> None:
    launched = spy_packed_kernel(monkeypatch)
    case, p = packed_case(2, 16, 64, 32, torch.float16, None, False, seed=3)
    check(case, run_packed(case, p))
    assert launched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scales": torch.ones(2, 16)}, "scales: must be None with an Int4Packed"),
        ({"group_size": 32, "g_idx": torch.zeros(64)}, "group_size, g_idx: must be None"),
        ({"x": torch.randn(2, 72).half()}, "K=72 differs from the packed weight's K=64"),
        ({"bias": torch.ones(15).half()}, r"bias: shape \(15,\)"),
        ({"config": ig.Int4Config("fma", 2, 16, 64)}, "block_m=2; the packed layout's fma"),
    ],
)
def test_packed_bad_input(kwargs: dict, message: str) -> None:
    case, p = packed_case(2, 16, 64, 32, torch.float16, None, False, seed=0)
    x = kwargs.pop("x", case["x"])
    with pytest.raises(ValueError, match=message):
        ig.int4_linear(dev(x), p, **{key: dev(v) for key, v in kwargs.items()})


def test_repack_bad_input() -> None:
    case = make_case(2, 16, 64, 32, torch.float16, False, False, seed=0)
    with pytest.raises(ValueError, match="qweight: expected int32"):
        ig.repack_int4_for_triton(case["qweight"].long(), case["scales"], case["zeros"], 32)
    with pytest.raises(ValueError, match=r"g_idx: values must lie in 0\.\.1"):
        ig.repack_int4_for_triton(case["qweight"], case["scales"], case["zeros"], 32,
                                  torch.full((64,), 5, dtype=torch.int32))  # fmt: skip


# -- the tensor-core "pairs" order (backends/triton/int4_tc.py) ----------------------------------
def pairs_case(m, n, k, group_size, dtype, g_kind, has_bias, seed) -> tuple[dict, object]:
    case = make_case(m, n, k, group_size, dtype, g_kind == "desc_act", has_bias, seed)
    q = (case["qweight"], case["scales"], case["zeros"], group_size, case["g_idx"])
    return case, ig.repack_int4_for_triton(*(dev(t) for t in q), order="pairs")


def decode_pairs(p) -> torch.Tensor:
    """W [N, K] float64 in the checkpoint's channel order from the pairs order as int4_tc's
    docstring states it (nibble i < 4 of word j of a 128-k chunk: k = 32 i + 2 j, nibble i + 4:
    k = 32 i + 2 j + 1), then pairs_perm (the desc_act sort); independent of `perm`."""
    qw = p.qweight.cpu()
    n, k = qw.shape[0], qw.shape[1] * 8
    codes = torch.empty(n, k, dtype=torch.int64)
    for r in range(k // 8):
        c, j = divmod(r, 16)
        for i in range(8):
            codes[:, c * 128 + 32 * (i % 4) + 2 * j + i // 4] = (qw[:, r].long() >> (4 * i)) & 0xF
    g = torch.arange(k) // p.group_size
    w = (codes.to(F64) - p.zeros.cpu().to(F64)[:, g]) * p.scales.cpu().to(F64)[:, g]
    sort = p.pairs_perm.cpu() if p.pairs_perm is not None else torch.arange(k)
    out = torch.empty_like(w)
    out[:, sort] = w
    return out


@pytest.mark.parametrize("g_kind", [None, "desc_act"])
def test_pairs_repack_is_lossless(g_kind: str | None) -> None:
    case, p = pairs_case(1, 24, 256, 128, torch.bfloat16, g_kind, False, seed=11)
    want = ref_quant.dequantize_int4(
        case["qweight"], case["scales"].to(F64), case["zeros"], 128, case["g_idx"]
    )
    assert p.order == "pairs" and p.group_size == 128 and p.g_idx is None
    assert torch.equal(decode_pairs(p), want)
    assert torch.equal(decode_packed(p), want)  # the k-order view through perm, for the others
    assert (p.pairs_perm is None) == (g_kind is None)


# (M, N, K, group size, dtype, g_idx kind, config): one or more chunks per split, uneven splits,
# N and M past the block (rows re-read, never stored), groups of two chunks, desc_act.
PAIRS_RUNS = [
    (1, 40, 256, 128, "bf16", None, None),
    (3, 24, 384, 128, "fp16", "desc_act", None),
    (17, 48, 512, 256, "bf16", None, (16, 32, 3)),
    (5, 40, 640, 128, "fp16", None, (16, 16, 2)),
    (33, 16, 256, 128, "bf16", "desc_act", (32, 16, 1)),
]


@pytest.mark.parametrize("run", range(len(PAIRS_RUNS)))
def test_pairs_matches_reference(run: int) -> None:
    m, n, k, group_size, dtype, g_kind, cfg = PAIRS_RUNS[run]
    case, p = pairs_case(m, n, k, group_size, FLOATS[dtype], g_kind, run % 2 == 0, seed=run)
    config = None if cfg is None else ig.int4_tc.Int4PairsConfig(cfg[0], cfg[1], split_k=cfg[2])
    check(case, run_packed(case, p, config=config))


def test_pairs_plain_ops_on_gpu(monkeypatch) -> None:
    # On NVIDIA GPUs the pairs come from inline PTX; the plain Triton ops (ROCm's path) must
    # give the same numbers. Under the interpreter both are the interpreter's own path.
    monkeypatch.setattr(ig.int4_tc, "USE_PTX", False)
    case, p = pairs_case(4, 40, 256, 128, torch.bfloat16, None, True, seed=7)
    check(case, run_packed(case, p))


def test_pairs_fp32_x_takes_the_k_order_kernels(monkeypatch) -> None:
    launched = spy_packed_kernel(monkeypatch)
    case, p = pairs_case(2, 24, 256, 128, torch.float32, None, False, seed=2)
    check(case, run_packed(case, p))
    assert launched  # through perm, which includes the pairs shuffle


@pytest.mark.parametrize(("n", "tile_rows", "runs"), [
    (64, 32, ((1, None), (5, (16, 16, 2)), (33, (32, 64, 1)))),  # tiles wider than a block
    (48, 16, ((3, (16, 32, 3)),)),  # blocks spanning two tiles
])  # fmt: skip
def test_tiled_pairs_give_the_same_bits(n: int, tile_rows: int, runs: tuple) -> None:
    # Tiles of rows (each kernel step one contiguous run) hold the same words as the row-major
    # pairs order (decoded here from the documented layout, independently of the module), and
    # every consumer gives the same bits: the tensor-core kernel, the dequantize kernel, the
    # k-order kernels fp32 x takes (an untiled copy) and the torch decode.
    case = make_case(1, n, 384, 128, torch.bfloat16, True, False, seed=21)
    q = [dev(t) for t in (case["qweight"], case["scales"], case["zeros"])]
    flat = ig.repack_int4_for_triton(*q, 128, dev(case["g_idx"]), order="pairs")
    tiled = ig.repack_int4_for_triton(*q, 128, dev(case["g_idx"]), order="pairs",
                                      tile_rows=tile_rows)  # fmt: skip
    words = tiled.qweight.cpu()
    assert words.shape == (n // tile_rows, 384 // 128, tile_rows, 16)
    assert (tiled.out_features, tiled.in_features) == (n, 384)
    rows = torch.empty(n, 384 // 8, dtype=torch.int32)
    for t, c, r, j in itertools.product(*(range(d) for d in words.shape)):
        rows[t * tile_rows + r, c * 16 + j] = words[t, c, r, j]
    assert torch.equal(rows, flat.qweight.cpu())
    assert torch.equal(ig.dequantize_packed(tiled), ig.dequantize_packed(flat))
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(ig.dequantize_packed_triton(tiled, dtype),
                           ig.dequantize_packed_triton(flat, dtype))  # fmt: skip
    for m, cfg in runs:
        config = None if cfg is None else ig.int4_tc.Int4PairsConfig(cfg[0], cfg[1], cfg[2])
        for dtype in (torch.bfloat16, torch.float32):  # fp32: the k-order kernels
            x = dev(torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(dtype))
            kw = {"config": config} if dtype != torch.float32 else {}
            assert torch.equal(ig.int4_linear(x, tiled, **kw), ig.int4_linear(x, flat, **kw))
    # Rows the tile does not divide, or tiles of no power of two, stay row-major; tiling by
    # hand with such rows is refused (the kernels find a row's tile by a shift).
    assert ig.repack_int4_for_triton(*q, 128, order="pairs", tile_rows=40).qweight.dim() == 2
    odd = [d for d in range(3, n) if n % d == 0 and d & (d - 1)]  # 48: 3, 6, 12, 24
    for d in odd:
        assert ig.repack_int4_for_triton(*q, 128, order="pairs", tile_rows=d).qweight.dim() == 2
    with pytest.raises(ValueError, match="must be a power of two"):
        ig.int4_tc.tile_pairs(flat.qweight, odd[0] if odd else 3)


def test_pairs_bad_input() -> None:
    case = make_case(2, 16, 256, 64, torch.float16, False, False, seed=0)
    q = (case["qweight"], case["scales"], case["zeros"], 64)
    with pytest.raises(
        ValueError, match=r"group size 64 is not a multiple of 128 \(per-k scales\); use order .k."
    ):
        ig.repack_int4_for_triton(*q, order="pairs")
    with pytest.raises(ValueError, match="order: 'ij' is not 'k' or 'pairs'"):
        ig.repack_int4_for_triton(*q, order="ij")
    assert ig.pairs_reason(256, 4, 64) == "group size 64 is not a multiple of 128 (per-k scales)"
    assert ig.pairs_reason(200, 1, 200) == "K=200 is not a multiple of 128"
    case, p = packed_case(2, 16, 256, 128, torch.float16, None, False, seed=0)
    with pytest.raises(ValueError, match="an Int4PairsConfig needs a weight repacked"):
        run_packed(case, p, config=ig.int4_tc.Int4PairsConfig(16, 16))
    with pytest.raises(ValueError, match="block_m: 8 must be a power of two >= 16"):
        ig.int4_tc.Int4PairsConfig(8, 16)


# -- dispatch through the CUDA backend -------------------------------------------------------------
def test_cuda_backend_dispatches_to_triton() -> None:
    import backends  # noqa: F401  (registers the candidates)
    from backends.cuda import interpreter_capabilities
    from hal.select import load_backend

    caps = interpreter_capabilities() if INTERPRET else None
    if INTERPRET and caps is None:
        pytest.skip("Triton interpreter capabilities unavailable")
    backend = load_backend(caps, device=DEVICE, configured="require:cuda") if INTERPRET else None
    if backend is None:
        from platforms import detect

        backend = load_backend(detect(), configured="require:cuda")
    assert backend.chosen("int4_gemm") == "triton"
    case = make_case(3, 24, 64, 32, torch.bfloat16, True, True, seed=4)
    y = backend.int4_linear(
        *(
            dev(case[key])
            for key in ("x", "qweight", "scales", "zeros", "group_size", "g_idx", "bias")
        )
    )
    assert backend.ran["int4_gemm"] == "triton"
    check(case, y)


def _cuda_backend():
    import backends  # noqa: F401  (registers the candidates)
    from backends.cuda import interpreter_capabilities
    from hal.select import load_backend

    if INTERPRET:
        caps = interpreter_capabilities()
        if caps is None:
            pytest.skip("Triton interpreter capabilities unavailable")
        return load_backend(caps, device=DEVICE, configured="require:cuda")
    from platforms import detect

    return load_backend(detect(), configured="require:cuda")


@pytest.mark.parametrize("g_kind", [None, "desc_act", "uneven"])
def test_dequantize_packed_is_the_checkpoint_weight(g_kind: str | None) -> None:
    case, p = packed_case(1, 24, 256, 32, torch.float16, g_kind, False, seed=7)
    want = ref_quant.dequantize_int4(
        case["qweight"], case["scales"].float(), case["zeros"], 32, case["g_idx"]
    )
    assert torch.equal(ig.dequantize_packed(p).cpu(), want)  # fp32 (q - z) * s both ways


def test_cuda_backend_prepares_the_packed_layout() -> None:
    # prepare_int4 repacks once (layout "packed"); int4_linear_prepared runs the packed kernel,
    # and an input the kernel cannot take (float64 x) falls back to dequantize + cuBLAS.
    from hal.backend import Int4Weight

    backend = _cuda_backend()
    case = make_case(3, 24, 128, 32, torch.bfloat16, True, True, seed=9)
    q = [dev(case[key]) for key in ("qweight", "scales", "zeros", "group_size", "g_idx")]
    weight = backend.prepare_int4(*q)
    assert isinstance(weight, Int4Weight) and weight.layout == "packed"
    assert weight.out_features == 24 and weight.in_features == 128
    assert weight.nbytes() < 24 * 128 * 2  # smaller than the bf16 weight
    y = backend.int4_linear_prepared(dev(case["x"]), weight, dev(case["bias"]))
    assert backend.ran["int4_gemm"] == "triton"
    check(case, y)
    x64 = dev(case["x"]).to(torch.float64)
    y64 = backend.int4_linear_prepared(x64, weight)
    assert backend.ran["int4_gemm"] == "dequant_gemm"
    w = ref_quant.dequantize_int4(
        case["qweight"], case["scales"].float(), case["zeros"], 32, case["g_idx"]
    )
    torch.testing.assert_close(y64.cpu(), x64.cpu() @ w.to(torch.float64).t(), rtol=1e-12,
                               atol=1e-12)  # fmt: skip


def test_default_prepare_int4_keeps_the_canonical_layout(cpu_caps) -> None:
    from hal.select import load_backend

    backend = load_backend(cpu_caps, configured="cpu")
    case = make_case(2, 16, 64, 32, torch.float32, False, False, seed=3)
    q = [case[key] for key in ("qweight", "scales", "zeros", "group_size", "g_idx")]
    weight = backend.prepare_int4(*q)
    assert weight.layout == "canonical" and set(weight.tensors) == {"qweight", "scales", "zeros"}
    check(case, backend.int4_linear_prepared(case["x"], weight))
    weight.layout = "packed"
    with pytest.raises(ValueError, match="layout 'packed'; the cpu backend runs 'canonical'"):
        backend.int4_linear_prepared(case["x"], weight)
