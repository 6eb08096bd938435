"""The packed 4-bit weight's dequantize kernel (`dequantize_packed_triton`) bit for bit against the
torch reference, and the CUDA backend's large-M path (dequantize + cuBLAS) under TRITON_INTERPRET=1.

Both sides form w = (q - z) * s in fp32 (q - z exact, the product rounded once) and round that
once more to the target dtype, so they agree exactly; the GEMM is checked like the kernel's.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

# The helpers set TRITON_INTERPRET (no GPU) before the kernels import, and reload them under it.
from tests.backends.triton.test_int4_gemm import (  # noqa: E402
    DEVICE,
    FLOATS,
    _cuda_backend,
    check,
    decode_packed,
    dev,
    ig,
    packed_case,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

# name: (group_size, K, g_idx kind, the kernel's scale mode). N = 37 everywhere: odd, and a
# partial last block of rows. K = 320 is 40 words: one full tile of 32 words and a partial one.
CASES = {
    "g256_tile_in_group": (256, 512, None, 0),
    "g128_group_per_word": (128, 256, None, 1),
    "g32_k_tail": (32, 320, None, 1),
    "g12_groups_split_words": (12, 96, None, 2),
    "desc_act": (64, 256, "desc_act", 1),  # sorted by group at repack: perm, equal groups
    "uneven_g_idx": (32, 320, "uneven", 2),  # unequal groups: g_idx gathered per k
}


def _case(name: str, dtype: torch.dtype, seed: int):
    group_size, k, g_kind, mode = CASES[name]
    case, p = packed_case(1, 37, k, group_size, dtype, g_kind, False, seed)
    block_r = min(ig.DEQUANT_BLOCK_R, k // 8)
    assert ig._dequant_scale_mode(p, block_r) == mode, "the case no longer takes its mode"
    return case, p


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("name", list(CASES))
def test_dequant_equals_reference_bit_for_bit(name: str, dtype: str) -> None:
    # fp16 scales (the checkpoint's usual dtype: q * s is then exact in fp32) and fp32 scales
    # (the product rounds, so only (q - z) * s, not q * s - z * s, matches).
    for scales_dtype in (torch.float16, torch.float32):
        case, p = _case(name, scales_dtype, seed=len(name) + len(dtype))
        want = ig.dequantize_packed(p).to(FLOATS[dtype])  # [N, K], the checkpoint's order
        got = ig.dequantize_packed_triton(p, FLOATS[dtype], checkpoint_order=True)
        assert got.dtype == FLOATS[dtype] and got.shape == want.shape
        assert torch.equal(got, want), f"scales {scales_dtype}"
        # Packed order (the default): column k is the checkpoint's channel perm[k].
        packed = ig.dequantize_packed_triton(p, FLOATS[dtype])
        k = p.in_features
        perm = p.perm if p.perm is not None else torch.arange(k, device=p.qweight.device)
        assert torch.equal(packed, want[:, perm])
        assert (p.perm is not None) == (CASES[name][2] is not None)  # g_idx: sorted by group


@pytest.mark.parametrize("name", list(CASES))
def test_dequant_rounds_fp32_once_then_to_dtype(name: str) -> None:
    # Independently of the torch reference: (q - z) * s is exact in float64 (a 5-bit integer
    # times a <= 24-bit scale), so fp32's one rounding of it is the float64 value rounded to fp32,
    # and each dtype's result is that fp32 value rounded (to nearest even) once more.
    for scales_dtype in (torch.float32, torch.bfloat16):
        _, p = _case(name, scales_dtype, seed=3)
        exact = decode_packed(p)  # float64 [N, K], the checkpoint's order
        for dtype in FLOATS.values():
            got = ig.dequantize_packed_triton(p, dtype, checkpoint_order=True)
            assert torch.equal(got.cpu(), exact.to(torch.float32).to(dtype)), (scales_dtype, dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dequant_is_the_dequant_gemm_weight(dtype: str) -> None:
    # The weight the dequant_gemm fallback (`int4_linear_dequant`) builds from the canonical
    # layout: the same fp32 math and one rounding to x's dtype.
    from backends.cuda.quant import dequantize_int4

    case, p = packed_case(1, 19, 256, 32, torch.float16, "desc_act", False, seed=11)
    q = (case["qweight"], case["scales"], case["zeros"], 32, case["g_idx"])
    want = dequantize_int4(*q, out_dtype=FLOATS[dtype])  # [N, K]
    got = ig.dequantize_packed_triton(p, FLOATS[dtype], checkpoint_order=True)
    assert torch.equal(got.cpu(), want)


def test_dequant_launch_covers_the_grid(monkeypatch) -> None:
    # Blocks of 16 rows x 32 words: N = 37 and K = 320 take 3 x 2 programs.
    grids = []
    real = ig._int4_dequant_packed_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(ig, "_int4_dequant_packed_kernel", Spy())
    _, p = _case("g32_k_tail", torch.bfloat16, seed=0)
    ig.dequantize_packed_triton(p, torch.bfloat16)
    assert grids == [(3, 2)]


def test_dequant_empty_and_bad_input() -> None:
    qw = dev(torch.zeros(0, 8, dtype=torch.int32))
    empty = ig.Int4Packed(qw, dev(torch.ones(0, 1)), dev(torch.zeros(0, 1, dtype=torch.uint8)), 64)
    assert ig.dequantize_packed_triton(empty, torch.float16).shape == (0, 64)
    _, p = _case("g128_group_per_word", torch.float16, seed=0)
    with pytest.raises(ValueError, match="dtype: torch.float64 is not one of float32"):
        ig.dequantize_packed_triton(p, torch.float64)
    with pytest.raises(ValueError, match="p: expected an Int4Packed"):
        ig.dequantize_packed_triton(p.qweight, torch.float16)


# -- the CUDA backend's large-M dispatch ----------------------------------------------------------
def test_default_threshold() -> None:
    from backends.cuda.backend import CudaBackend

    assert CudaBackend.int4_dequant_min_m == 384  # the H100 crossing (backends/cuda/backend.py)


@pytest.mark.parametrize(
    ("g_kind", "dtype", "has_bias"),
    [("desc_act", "bf16", True), ("uneven", "fp32", False), (None, "fp16", True)],
)
def test_backend_dequantizes_from_the_threshold(g_kind: str | None, dtype: str, has_bias) -> None:
    # The threshold lowered on the instance keeps the shapes small: M = 8 and 9 dequantize and
    # run cuBLAS, M = 7 keeps the packed kernel; both within the kernel's tolerance (`check`).
    backend = _cuda_backend()
    backend.int4_dequant_min_m = 8
    backend.allow_tf32 = False  # the fp32 bound assumes fp32 products (a GPU may default to TF32)
    for m, impl in ((9, "triton_dequant+cublas"), (8, "triton_dequant+cublas"), (7, "triton")):
        case, _ = packed_case(m, 37, 256, 32, FLOATS[dtype], g_kind, has_bias, seed=m)
        q = [dev(case[key]) for key in ("qweight", "scales", "zeros", "group_size", "g_idx")]
        weight = backend.prepare_int4(*q)
        assert weight.layout == "packed"
        backend.ran.clear()
        y = backend.int4_linear_prepared(dev(case["x"]), weight, dev(case["bias"]))
        assert backend.ran["int4_gemm"] == impl, (m, backend.ran)
        check(case, y)


def test_backend_large_m_keeps_the_fallback_and_checks_k() -> None:
    # Inputs the kernels cannot take (float64) still go to dequant_gemm above the threshold, and
    # an x of the wrong K is a clear error, not a silent column selection.
    backend = _cuda_backend()
    backend.int4_dequant_min_m = 4
    case, _ = packed_case(6, 24, 128, 32, torch.bfloat16, "desc_act", False, seed=2)
    q = [dev(case[key]) for key in ("qweight", "scales", "zeros", "group_size", "g_idx")]
    weight = backend.prepare_int4(*q)
    x64 = dev(case["x"]).to(torch.float64)
    y64 = backend.int4_linear_prepared(x64, weight)
    assert backend.ran["int4_gemm"] == "dequant_gemm"
    w = ig.dequantize_packed(weight.data).to(torch.float64)
    torch.testing.assert_close(y64, x64 @ w.t(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="x: K=136 differs from the packed weight's K=128"):
        backend.int4_linear_prepared(torch.randn(6, 136, device=DEVICE).bfloat16(), weight)
