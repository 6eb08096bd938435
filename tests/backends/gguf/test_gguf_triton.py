"""The Triton GGUF GEMM (`backends.triton.gguf`) against the CPU reference for every block type,
under TRITON_INTERPRET=1 on CPU tensors without a GPU, natively with one; fp32, fp16 and bf16
activations (bf16 dots run in fp32 under the interpreter), split-K and ragged N and M."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

if "backends.triton.gguf" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.gguf"])
from backends.cpu import gguf as ref  # noqa: E402
from backends.triton import gguf as tgguf  # noqa: E402
from tests.backends.gguf.gguf_random import QTYPES, random_blocks  # noqa: E402

# dtype -> (atol per sqrt(K) of max|x| max|w|, rtol). fp32: 16u (IEEE dots, K roundings as a
# random walk). fp16 / bf16: the weight rounded to the dot dtype (one u per term) and the output
# rounded once, with a factor 2 of headroom: atol 2u, rtol 4u.
TOL = {torch.float32: (2.0**-20, 2.0**-20), torch.float16: (2.0**-10, 2.0**-9),
       torch.bfloat16: (2.0**-7, 2.0**-6)}  # fmt: skip


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_gguf_linear_matches_reference(qtype: str, dtype: torch.dtype) -> None:
    bs = ref.block_type(qtype).block_size
    n, k, m = 40, (3 * bs if bs == 32 else 2 * bs), 3  # ragged N; K of 3 blocks -> 1-block steps
    blocks = random_blocks(qtype, n, k, seed=21)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = tgguf.gguf_linear(x.to(DEVICE), blocks.to(DEVICE), qtype, n, k, bias.to(DEVICE))
    assert y.dtype == dtype and tuple(y.shape) == (m, n)
    want = ref.gguf_linear(x.double(), blocks, qtype, n, k, bias.double())
    w = ref.dequantize_gguf(blocks, qtype, (n, k))
    atol, rtol = TOL[dtype]
    mag = x.double().abs().max() * w.abs().max()
    err = (y.cpu().double() - want).abs()
    assert (err <= atol * k**0.5 * mag + rtol * want.abs()).all(), err.max()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K"])
def test_split_k_and_many_rows(qtype: str) -> None:
    bs = ref.block_type(qtype).block_size
    n, k, m = 24, (16 * bs if bs == 32 else 3 * bs), 18  # two M tiles, 4 (or 3) K chunks
    blocks = random_blocks(qtype, n, k, seed=22)
    x = torch.randn(2, 9, k, generator=torch.Generator().manual_seed(2))
    want = ref.gguf_linear(x.double(), blocks, qtype, n, k)
    mag = x.abs().max().item() * ref.dequantize_gguf(blocks, qtype, (n, k)).abs().max().item()
    for split in (1, 2, 3):
        y = tgguf.gguf_linear(x.to(DEVICE), blocks.to(DEVICE), qtype, n, k, split_k=split)
        assert tuple(y.shape) == (2, 9, n) and m == 18
        assert ((y.cpu().double() - want).abs() <= 2.0**-20 * (k**0.5 * mag + want.abs())).all()


def test_bad_input() -> None:
    blocks = random_blocks("Q4_0", 16, 64, seed=0).to(DEVICE)
    with pytest.raises(ValueError, match="in_features 64"):
        tgguf.gguf_linear(torch.randn(2, 32, device=DEVICE), blocks, "Q4_0", 16, 64)
    with pytest.raises(ValueError, match="torch.int32 is not one of"):
        tgguf.gguf_linear(torch.zeros(2, 64, dtype=torch.int32, device=DEVICE), blocks, "Q4_0",
                          16, 64)  # fmt: skip
    with pytest.raises(ValueError, match="not a supported GGUF block type"):
        tgguf.gguf_linear(torch.randn(2, 64, device=DEVICE), blocks, "IQ2_XS", 16, 64)
    with pytest.raises(ValueError, match="split_k: 0"):
        tgguf.gguf_linear(torch.randn(2, 64, device=DEVICE), blocks, "Q4_0", 16, 64, split_k=0)
