"""The fast CPU GGUF GEMM (`backends.cpu.gguf_fast`) against the reference: the exact tiled path bit
for bit on the weights and to fp32 roundoff on the product, the bf16 int4pack path within the
bound its bf16 scales, activations and output allow."""

from __future__ import annotations

import pytest
import torch

from backends.cpu import gguf as ref
from backends.cpu import gguf_fast as fast
from tests.backends.gguf.gguf_random import QTYPES, random_blocks

U_FP32, U_BF16 = 2.0**-24, 2.0**-8


def _shape(qtype: str, n: int, nblocks: int) -> tuple[int, int]:
    return n, nblocks * ref.block_type(qtype).block_size


@pytest.mark.parametrize("qtype", QTYPES)
def test_tiled_weights_bit_identical(qtype: str) -> None:
    n, k = _shape(qtype, 37, 3)
    blocks = random_blocks(qtype, n, k, seed=11)
    weight = fast.prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=False)
    assert weight.path == "tiled"
    want = ref.dequantize_gguf(blocks, qtype, (n, k))
    got = fast.dequantize_tiled(weight)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 5])
def test_tiled_linear_fp32(qtype: str, m: int, monkeypatch) -> None:
    monkeypatch.setattr(fast, "TILE_VALUES", 3 * 256)  # several tiles, a ragged last one
    n, k = _shape(qtype, 29, 3)
    blocks = random_blocks(qtype, n, k, seed=12)
    weight = fast.prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=False)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    y = fast.gguf_linear_cpu(x, weight, bias)
    w = ref.dequantize_gguf(blocks, qtype, (n, k)).double()
    want = x.double() @ w.t() + bias.double()
    mag = x.abs().max().item() * w.abs().max().item()
    # fp32: K roundings in the accumulator (16u sqrt(K) |x||w|) and the output's rounding
    allowed = 16 * U_FP32 * k**0.5 * mag + 16 * U_FP32 * want.abs()
    assert y.dtype == torch.float32 and ((y.double() - want).abs() <= allowed).all()


@pytest.mark.parametrize("qtype", fast.INT4PACK_TYPES)
def test_int4_repack_is_lossless(qtype: str) -> None:
    # The codes are the block's codes and (s, z) reproduce its scales: w = (q - 8) s + z in
    # fp64 equals the reference's fp32 weight up to the reference's own fp32 roundings.
    n, k = _shape(qtype, 16, 2)
    blocks = random_blocks(qtype, n, k, seed=13)
    q, s, z = fast.int4_codes_scales(blocks, qtype, n, k)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    terms = (q.double() - 8) * s.repeat_interleave(32, 1)
    w = terms + z.repeat_interleave(32, 1)
    want = ref.dequantize_gguf(blocks, qtype, (n, k)).double()
    bound = 2 * U_FP32 * (terms.abs() + z.abs().repeat_interleave(32, 1) + want.abs())
    assert ((w - want).abs() <= bound).all()


@pytest.mark.parametrize("qtype", fast.INT4PACK_TYPES)
@pytest.mark.parametrize("n", [48, 40])  # 40: not a multiple of the op's 16-row tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4pack_linear_within_bf16_bound(qtype: str, n: int, dtype: torch.dtype) -> None:
    k = 2 * ref.block_type(qtype).block_size
    blocks = random_blocks(qtype, n, k, seed=14)
    weight = fast.prepare_gguf_cpu(blocks, qtype, n, k, use_int4pack=True)
    assert weight.path == "int4pack" and weight.nbytes() < n * k  # under a byte per value
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    y = fast.gguf_linear_cpu(x, weight)
    assert y.dtype == dtype and tuple(y.shape) == (2, 3, n)
    w = ref.dequantize_gguf(blocks, qtype, (n, k)).double()
    want = x.double() @ w.t()
    # Worst case, not a random walk: x, s and z each rounded to bf16 (u relative), so a term's
    # error is at most u |x| (|w| + |q - 8||s| + |z|) (plus u^2), and y rounds to bf16 once.
    q, s, z = fast.int4_codes_scales(blocks, qtype, n, k)
    spread = (
        w.abs() + ((q.double() - 8) * s.repeat_interleave(32, 1)).abs()
        + z.abs().repeat_interleave(32, 1)
    )  # fmt: skip
    allowed = 1.01 * U_BF16 * (x.double().abs() @ spread.t()) + 2 * U_BF16 * want.abs()
    assert ((y.double() - want).abs() <= allowed + 1e-30).all()


def test_prepare_chooses_paths_and_rejects_bad_input() -> None:
    blocks = random_blocks("Q8_0", 16, 64, seed=0)
    assert fast.prepare_gguf_cpu(blocks, "Q8_0", 16, 64, use_int4pack=True).path == "tiled"
    with pytest.raises(ValueError, match=r"expected torch.uint8 \(16, 68\)"):
        fast.prepare_gguf_cpu(blocks[:, :60], "Q8_0", 16, 64)
    weight = fast.prepare_gguf_cpu(blocks, "Q8_0", 16, 64)
    with pytest.raises(ValueError, match="in_features 64"):
        fast.gguf_linear_cpu(torch.randn(2, 32), weight)
    with pytest.raises(ValueError, match="not a 4-bit type"):
        fast.int4_codes_scales(blocks, "Q8_0", 16, 64)
