"""The chunk-strided 4-bit layout (`backends.triton.int4_packed`): the repack is lossless and the
kernels match the CPU reference (float64) within the conformance bound, under TRITON_INTERPRET=1
without a GPU. Cases, helpers and the tolerance argument are test_int4_gemm.py's: with 128-k
chunks inside one group the products use the exact integers (q - z) (only the fp32 accumulation
and the final rounding to x's dtype err); with per-run or per-k scales the tensor-core kernel
rounds each (q - z) * s once to x's dtype (the u * sqrt(K) term)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from tests.backends.triton.test_int4_gemm import (
    F64,
    FLOATS,
    INTERPRET,
    check,
    dev,
    make_case,
    uneven_g_idx,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

from backends.cpu import quant as ref_quant  # noqa: E402

if "backends.triton.int4_packed" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.int4_packed"])  # defined without the interpreter
ip = importlib.import_module("backends.triton.int4_packed")
ig = importlib.import_module("backends.triton.int4_gemm")


def strided_case(m, n, k, group_size, dtype, g_kind, has_bias, seed):
    case = make_case(m, n, k, group_size, dtype, g_kind == "desc_act", has_bias, seed)
    if g_kind == "uneven":
        case["g_idx"] = uneven_g_idx(k, k // group_size, seed)
    q = (case["qweight"], case["scales"], case["zeros"], group_size, case["g_idx"])
    return case, ip.repack_int4(*(dev(t) for t in q))


def run(case: dict, p, **kw) -> torch.Tensor:
    return ip.int4_strided_linear(dev(case["x"]), p, bias=dev(case["bias"]), **kw)


def decode(p) -> torch.Tensor:
    """W [N, K] float64 in the checkpoint's channel order from the documented layout: word
    16c + j, nibble i holds packed k = 128c + 16i + j (decoded here independently of unpack)."""
    qw = p.qweight.cpu()
    n, kp = qw.shape[0], qw.shape[1] * 8
    codes = torch.empty(n, kp, dtype=torch.int64)
    for word in range(kp // 8):
        c, j = divmod(word, 16)
        for i in range(8):
            codes[:, 128 * c + 16 * i + j] = (qw[:, word].long() >> (4 * i)) & 0xF
    k = p.in_features
    assert bool((codes[:, k:] == 0).all())  # the padding past K holds zero codes
    codes = codes[:, :k]
    g = p.g_idx.cpu().long()[:k] if p.g_idx is not None else torch.arange(k) // p.group_size
    z, s = p.zeros.cpu().to(F64), p.scales.cpu().to(F64)  # [groups, N]
    w = (codes.to(F64) - z[g].t()) * s[g].t()
    perm = p.perm.cpu() if p.perm is not None else torch.arange(k)
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


# name: (group_size, K, g_idx kind, the mode the repack must pick)
CASES = {
    "group_128": (128, 256, None, 0),
    "one_group_k_tail": (200, 200, None, 0),  # K not a multiple of 128: padded chunk
    "group_256": (256, 512, None, 0),
    "group_32": (32, 256, None, 1),
    "group_64_k_tail": (64, 320, None, 1),
    "group_24": (24, 192, None, 2),  # runs of 16 k straddle groups: per-k groups
    "desc_act": (64, 256, "desc_act", 1),
    "desc_act_128": (128, 384, "desc_act", 0),
    "uneven_g_idx": (32, 256, "uneven", 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_repack_is_lossless(name: str) -> None:
    group_size, k, g_kind, mode = CASES[name]
    case, p = strided_case(1, 24, k, group_size, torch.float16, g_kind, False, seed=len(name))
    want = ref_quant.dequantize_int4(
        case["qweight"], case["scales"].to(F64), case["zeros"], group_size, case["g_idx"]
    )
    assert p.mode == mode
    assert torch.equal(decode(p), want)  # (q - z) * s is exact in float64
    codes, groups = ip.unpack_int4(p)
    assert codes.shape == (24, k) and groups.shape == (k,)
    assert p.scales.dtype == case["scales"].dtype and p.zeros.dtype == torch.uint8


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kernel", ["fma", "dot"])
def test_matches_reference(kernel: str, name: str, dtype: str) -> None:
    group_size, k, g_kind, _ = CASES[name]
    seed = len(name) + len(dtype)
    m = 1 if kernel == "fma" else 3
    case, p = strided_case(m, 24, k, group_size, FLOATS[dtype], g_kind, seed % 2 == 0, seed)
    cfg = ig.Int4Config(kernel, 1 if kernel == "fma" else 16, 16, 128, split_k=2)
    check(case, run(case, p, config=cfg))


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("kernel", ["fma", "dot"])
def test_split_k(kernel: str, split_k: int) -> None:
    case, p = strided_case(5, 40, 640, 128, torch.bfloat16, None, True, seed=split_k)
    cfg = ig.Int4Config(kernel, 1 if kernel == "fma" else 16, 32, 128, split_k=split_k)
    check(case, run(case, p, config=cfg))


@pytest.mark.parametrize("m", [1, 2, 17])
def test_default_table(m: int) -> None:
    case, p = strided_case(m, 40, 256, 128, torch.float16, "desc_act", m % 2 == 1, seed=m)
    check(case, run(case, p))


def test_empty_and_noncontiguous_x() -> None:
    case, p = strided_case(4, 16, 256, 64, torch.float32, None, False, seed=2)
    wide = torch.randn(4, 512).to(torch.float32)
    case["x"] = wide[:, ::2]  # stride 2
    check(case, run(case, p))
    assert run({"x": torch.empty(0, 256), "bias": None}, p).shape == (0, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x": torch.randn(2, 72).half()}, "K=72 differs from the packed weight's K=256"),
        ({"config": ig.Int4Config("fma", 2, 16, 64)}, "block_m=2; the strided layout's fma"),
        ({"bias": torch.randn(3).half()}, "bias: shape (3,), expected [N=16]"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    case, p = strided_case(2, 16, 256, 32, torch.float16, None, False, seed=0)
    args = {"x": dev(case["x"]), "bias": None, **{k: dev(v) for k, v in kwargs.items()}}
    x, bias = args.pop("x"), args.pop("bias")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):  # fmt: skip
        ip.int4_strided_linear(x, p, bias, **args)
    with pytest.raises(ValueError, match="expected an Int4Strided"):
        ip.int4_strided_linear(x, case["qweight"])
