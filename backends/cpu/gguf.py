"""Reference GGUF block quantization: the ggml block layouts of Q4_0, Q4_1, Q8_0, Q4_K and Q6_K,
their exact dequantization (bit-identical to `gguf.quants.dequantize`) and a GEMM on raw blocks.

A quantized weight [N out, K in] is stored as uint8 [N, K / block_size * type_size]: each row is
its K / block_size blocks back to back, so rows slice freely and columns slice in whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.cpu.quant import compute_dtype

QK_K = 256  # values per K-quant super-block


@dataclass(frozen=True)
class GGUFBlockType:
    """One ggml block type: `block_size` values stored in `type_size` bytes (ggml-common.h)."""

    name: str
    ggml_type: int  # the GGMLQuantizationType value in GGUF files
    block_size: int
    type_size: int
    layout: str


# Field layouts, offsets in bytes within one block (all multi-byte fields little-endian):
# Q4_0: d fp16 @0, qs[16] @2; value j (0..15) = low nibble of qs[j], j + 16 = its high nibble;
#       w = d * (q - 8).
# Q4_1: d fp16 @0, m fp16 @2, qs[16] @4 as Q4_0; w = d * q + m.
# Q8_0: d fp16 @0, qs int8[32] @2; w = d * q.
# Q4_K: d fp16 @0, dmin fp16 @2, scales[12] @4 (8 six-bit scales and mins), qs[128] @16. Value
#       64c + l (l < 32) is the low nibble of qs[32c + l], 64c + 32 + l its high nibble; sub-block
#       j = value // 32 has sc_j, m_j: j < 4: scales[j] & 63, scales[j + 4] & 63; j >= 4:
#       sc_j = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4,
#       m_j = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4.
#       w = (d * sc_j) * q - dmin * m_j.
# Q6_K: ql[128] @0, qh[64] @128, scales int8[16] @192, d fp16 @208. Value 128h + 32c + l
#       (h < 2, c < 4, l < 32): low 4 bits = nibble c // 2 of ql[64h + 32(c % 2) + l], high 2 bits
#       = bits 2c..2c+1 of qh[32h + l]; q = that 6-bit code - 32; w = (d * scales[value // 16]) * q.
BLOCK_TYPES: dict[str, GGUFBlockType] = {
    t.name: t
    for t in (
        GGUFBlockType("Q4_0", 2, 32, 18, "d fp16, qs[16]"),
        GGUFBlockType("Q4_1", 3, 32, 20, "d fp16, m fp16, qs[16]"),
        GGUFBlockType("Q8_0", 8, 32, 34, "d fp16, qs int8[32]"),
        GGUFBlockType("Q4_K", 12, QK_K, 144, "d fp16, dmin fp16, scales[12], qs[128]"),
        GGUFBlockType("Q6_K", 14, QK_K, 210, "ql[128], qh[64], scales int8[16], d fp16"),
    )
}
_BY_ID = {t.ggml_type: t for t in BLOCK_TYPES.values()}


def block_type(qtype: str | int) -> GGUFBlockType:
    """The block type of a name ("Q4_K") or ggml type id (12, or a GGMLQuantizationType)."""
    found = BLOCK_TYPES.get(qtype.upper()) if isinstance(qtype, str) else _BY_ID.get(int(qtype))
    if found is None:
        names = getattr(qtype, "name", qtype)
        valid = ", ".join(f"{t.name} ({t.ggml_type})" for t in BLOCK_TYPES.values())
        raise ValueError(f"qtype: {names!r} is not a supported GGUF block type; valid: {valid}")
    return found


def bytes_per_row(qtype: str | int, in_features: int) -> int:
    """Bytes of one stored row of `in_features` values (which must fill whole blocks)."""
    bt = block_type(qtype)
    if in_features <= 0 or in_features % bt.block_size:
        raise ValueError(
            f"in_features: {in_features} is not a positive multiple of {bt.name}'s block size "
            f"{bt.block_size}; GGUF rows hold whole blocks"
        )
    return in_features // bt.block_size * bt.type_size


def check_blocks(blocks: torch.Tensor, qtype: str | int, out_features: int, in_features: int):
    """Validate raw blocks uint8 [out_features, bytes_per_row]; returns the block type."""
    bt = block_type(qtype)
    expected = (out_features, bytes_per_row(bt.name, in_features))
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected:
        raise ValueError(
            f"blocks: got {blocks.dtype} {tuple(blocks.shape)}, expected torch.uint8 {expected} "
            f"for a {bt.name} weight [{out_features}, {in_features}] ({bt.type_size} bytes per "
            f"{bt.block_size} values)"
        )
    return bt


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    # b: uint8 [..., type_size] -> fp32 [..., 1], the fp16 field at `offset` (little-endian)
    return b[..., offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    # qs: uint8 [..., n * run] -> [..., n * 2 * run]: each run of bytes gives its low nibbles,
    # then its high nibbles (the order of Q4_0, Q4_1 and Q4_K values)
    q = qs.reshape(*qs.shape[:-1], -1, 1, run)
    q = torch.cat([q & 0x0F, q >> 4], dim=-2)
    return q.reshape(*qs.shape[:-1], -1)


def q4k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 packed bytes [..., 12] -> six-bit (sc, m), each uint8 [..., 8]."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def q6k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks uint8 [..., 210] -> their codes - 32 (-32..31) as fp32 [..., 256]."""
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)  # [.., half, 1, 64]
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(*lead, 2, 4, 32)  # chunk c uses c // 2
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(4, 1)
    qh = (qh >> shifts) & 0x03  # [.., half, 4, 32]
    codes = (ql | (qh << 4)).to(torch.float32) - 32.0  # exact small integers
    return codes.reshape(*lead, QK_K)


def dequantize_blocks(b: torch.Tensor, qtype: str | int) -> torch.Tensor:
    """uint8 blocks [..., type_size] -> fp32 values [..., block_size], the ggml formulas with the
    same fp32 rounding steps as `gguf.quants` (each product and sum rounded separately)."""
    bt = block_type(qtype)
    if b.dtype != torch.uint8 or b.shape[-1] != bt.type_size:
        raise ValueError(
            f"blocks: got {b.dtype} [..., {b.shape[-1]}], expected uint8 [..., {bt.type_size}]"
        )
    lead = b.shape[:-1]
    if bt.name == "Q4_0":
        q = _nibbles(b[..., 2:], 16).to(torch.float32) - 8.0
        return _f16(b, 0) * q
    if bt.name == "Q4_1":
        q = _nibbles(b[..., 4:], 16).to(torch.float32)
        return _f16(b, 0) * q + _f16(b, 2)
    if bt.name == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).to(torch.float32)
        return _f16(b, 0) * q
    if bt.name == "Q4_K":
        sc, mn = q4k_scales_mins(b[..., 4:16])
        scale = (_f16(b, 0) * sc.to(torch.float32))[..., None]  # [..., 8, 1]
        offset = (_f16(b, 2) * mn.to(torch.float32))[..., None]
        q = _nibbles(b[..., 16:], 32).to(torch.float32).reshape(*lead, 8, 32)
        return (scale * q - offset).reshape(*lead, QK_K)
    # Q6_K
    sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
    scale = (_f16(b, 208) * sc)[..., None]  # [..., 16, 1]
    return (scale * q6k_codes(b).reshape(*lead, 16, 16)).reshape(*lead, QK_K)


def dequantize_gguf(
    blocks: torch.Tensor, qtype: str | int, shape: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """Raw blocks uint8 [rows, bytes_per_row] -> fp32 [rows, cols] with shape = (rows, cols),
    bit-identical to `gguf.quants.dequantize`."""
    if len(shape) != 2:
        raise ValueError(f"shape: {tuple(shape)} is not 2-D (rows, cols)")
    rows, cols = int(shape[0]), int(shape[1])
    bt = check_blocks(blocks, qtype, rows, cols)
    b = blocks.reshape(rows, cols // bt.block_size, bt.type_size)
    return dequantize_blocks(b, bt.name).reshape(rows, cols)


def slice_blocks(
    blocks: torch.Tensor, qtype: str | int, in_features: int, dim: int, start: int, stop: int
) -> torch.Tensor:
    """The raw blocks of weight[start:stop, :] (dim 0, any rows: column-parallel) or
    weight[:, start:stop] (dim 1, whole blocks only: row-parallel), as a view."""
    bt = check_blocks(blocks, qtype, blocks.shape[0], in_features)
    size = blocks.shape[0] if dim == 0 else in_features
    if dim not in (0, 1) or not 0 <= start <= stop <= size:
        raise ValueError(f"slice: dim {dim} [{start}:{stop}] is outside the weight's {size}")
    if dim == 0:
        return blocks[start:stop]
    if start % bt.block_size or stop % bt.block_size:
        raise ValueError(
            f"slice: columns [{start}:{stop}] cut through {bt.name} blocks of {bt.block_size} "
            "values; shard K at multiples of the block size"
        )
    return blocks[:, start // bt.block_size * bt.type_size : stop // bt.block_size * bt.type_size]


def gguf_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: str | int,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequantize_gguf(blocks).T + bias in fp32 (fp64 for fp64 x). x: [..., K];
    blocks: uint8 [N, bytes_per_row]; returns [..., N] in x's dtype."""
    check_blocks(blocks, qtype, out_features, in_features)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x: last dim {x.shape[-1] if x.dim() else None} differs from in_features {in_features}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [{out_features}]")
    cd = compute_dtype(x.dtype)
    w = dequantize_gguf(blocks, qtype, (out_features, in_features)).to(cd)  # [N, K]
    y = x.to(cd) @ w.t()
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)
