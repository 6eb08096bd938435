"""Fast CPU GEMM on GGUF weights that stay quantized: torch's int4 CPU matmul after a repack for the
4-bit types (Q4_0, Q4_1, Q4_K), else raw blocks dequantized one row tile at a time.

Two paths, chosen at `prepare_gguf_cpu` time and recorded in `GGUFCpuWeight.path`:
- "int4pack": `aten._weight_int4pack_mm_for_cpu`, which computes w = (q - 8) * s + z per group of
  32 with one fused multiply-add. The codes repack losslessly (q - 8 is Q4_0's code, the nibble
  of Q4_1 / Q4_K), and s, z carry the block's scales: Q4_0 s = d, z = 0; Q4_1 s = d, z = m + 8d;
  Q4_K s = d * sc_j, z = 8s - dmin * m_j. Only the op's bfloat16 path is vectorized (its float32
  path is a scalar loop, 15-80x slower than a dense fp32 GEMM here), so s, z and x are rounded
  to bf16 and the result comes back in bf16: about 2^-9 relative error on each weight's scale
  and offset and on x, plus one bf16 rounding of y (bf16 GEMM accuracy; the 4-bit codes
  themselves are exact). Needs out_features % 16 == 0 (the op's tile), else rows are padded.
- "tiled": the blocks are unpacked once into int8 codes [N, K] with fp32 scales (and offsets)
  per group, w = codes * scale + offset, which reproduces the reference's fp32 roundings bit for
  bit (Q4_K's scale is d * sc_j and offset -(dmin * m_j); Q6_K's scale d * scales[j]). Each tile
  of rows is dequantized into an fp32 buffer of up to 4 MiB (`TILE_VALUES`) and multiplied: fp32
  accuracy, never the whole fp32 weight of a large model, about 1.1-1.25 bytes per value kept
  (unpacking nibbles per call with torch's uint8 ops costs ~10x more). Q8_0, Q6_K, and any type
  when int4pack is off.
- "dense": the tiled path's fp32 weight made once at load and kept (`dense_budget`: the caller's
  bytes left for such weights), so a call is one matmul: the same values, 4 bytes per value,
  and no per-call dequantize (~5x the matmul at batch 1). The CPU backend spends up to
  HAL_GGUF_DENSE_BYTES (default 1 GiB) per model on it, the rest stays tiled.

Decode-sized calls (up to 8 rows a call: 32 rows of a tiled weight, 16 of a dense one) of the
tiled and dense paths go to the C codes kernel (`backends/cpu/ckernels.py`) when the backend has
one: it multiplies the tiled layout's codes, scales and offsets directly (1 byte per weight read
instead of 4, half a byte for 4-bit codes kept two per byte, `nibbles`; a dense weight then
keeps its codes too, `keep_codes`), fp32 arithmetic summed per group (scale * sum(codes * x) +
offset * sum(x)), so only the summation order differs from the fp32 matmul.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.cpu.ckernels import load_codes_kernel, pack_codes4, unpack_codes4
from backends.cpu.gguf import check_blocks, q4k_scales_mins, q6k_codes
from backends.cpu.native import onednn_matmul
from backends.cpu.quant import compute_dtype

logger = logging.getLogger(__name__)

INT4PACK_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# The tiled codes of the 4-bit types kept two per byte (`nibbles`): the int8 code minus this bias
# is the 4-bit value (Q4_0's code is q - 8).
CODES4_BIAS = {"Q4_0": -8, "Q4_1": 0, "Q4_K": 0}
INT4PACK_GROUP = 32
INT4PACK_N_TILE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
# Values per dequantized fp32 tile (4 MiB): the dequantize (int8 -> fp32, scale, offset) costs
# ~5x the matmul at batch 1 and each tile pays ~5 torch calls, so whole weights of small models
# go in one tile. SmolLM2-135M's linears, 2 cores, 2026-11-27: 256 KiB tiles 89-121 ms per token
# at batch 1, 4 MiB 39-55 ms; 1.4-2.0x faster at M = 4-256 too (dense fp32 F.linear: 27 ms).
TILE_VALUES = 1 << 20
# Rows up to which a weight with no fp32 copy ("tiled") runs through the C codes kernel, MAX_M
# rows a call: on the default model's shapes (2-core AMD EPYC, 2026-11-29) two or four calls
# of 8 rows cost 0.9-1.0x / 0.6-0.7x one oneDNN fp32 matmul, far less than the tiled path's
# dequantize; a "dense" weight stops at DENSE_CHUNKED_ROWS.
CHUNKED_ROWS = 32
# Rows up to which a weight that also keeps its fp32 values ("dense", `keep_codes`) runs through
# the C codes kernel (MAX_M rows a call) instead of its oneDNN fp32 matmul: on the default model's
# four shapes with 4-bit codes (2-core AMD EPYC, 2026-11-29, per layer) M = 9 / 12 / 16 / 24 take
# 0.76 / 0.79 / 1.01 / 1.31x oneDNN's time.
DENSE_CHUNKED_ROWS = 16


def chunked_rows(path: str) -> int:
    """The most rows of x a weight on `path` ("tiled" or "dense") sends to the codes kernel."""
    return CHUNKED_ROWS if path == "tiled" else DENSE_CHUNKED_ROWS


@dataclass
class GGUFCpuWeight:
    """A GGUF weight [out_features, in_features] prepared for `gguf_linear_cpu`."""

    qtype: str
    out_features: int
    in_features: int
    path: str  # "int4pack", "tiled" or "dense"
    codes: torch.Tensor | None = None  # tiled: int8 [N, K]
    codes4: torch.Tensor | None = None  # tiled, 4-bit types with nibbles: uint8 [N, K / 2]
    scale: torch.Tensor | None = None  # tiled: fp32 [N, K / group, 1]
    offset: torch.Tensor | None = None  # tiled: fp32 [N, K / group, 1], or None
    packed: torch.Tensor | None = None  # int4pack: the op's uint8 [N_pad, K / 2]
    scale_zeros: torch.Tensor | None = None  # int4pack: bf16 [K / 32, N_pad, 2]
    dense: torch.Tensor | None = None  # dense: fp32 [N, K] (and the tiled fields with keep_codes)

    def nbytes(self) -> int:
        parts = (self.codes, self.codes4, self.scale, self.offset, self.packed, self.scale_zeros,
                 self.dense)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def int4_codes_scales(
    blocks: torch.Tensor, qtype: str, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit type as codes uint8 [N, K] in 0..15 and fp64 (s, z) [N, K / 32] with
    w = (q - 8) * s + z (exact in fp64; the reference rounds each step in fp32)."""
    bt = check_blocks(blocks, qtype, out_features, in_features)
    if bt.name not in INT4PACK_TYPES:
        raise ValueError(f"qtype: {bt.name} is not a 4-bit type ({', '.join(INT4PACK_TYPES)})")
    n, k = out_features, in_features
    b = blocks.reshape(n, k // bt.block_size, bt.type_size)

    def f16(off: int) -> torch.Tensor:  # [N, blocks]
        return b[..., off : off + 2].contiguous().view(torch.float16)[..., 0].to(torch.float32)

    def nib(qs: torch.Tensor, run: int) -> torch.Tensor:
        q = qs.reshape(n, -1, 1, run)
        return torch.cat([q & 0x0F, q >> 4], dim=-2).reshape(n, k)

    if bt.name == "Q4_K":
        sc, mn = q4k_scales_mins(b[..., 4:16])  # [N, K / 256, 8]
        s = (f16(0)[..., None] * sc.to(torch.float32)).reshape(n, -1).double()
        off = (f16(2)[..., None] * mn.to(torch.float32)).reshape(n, -1).double()
        return nib(b[..., 16:], 32), s, 8.0 * s - off
    d = f16(0).double()
    if bt.name == "Q4_0":
        return nib(b[..., 2:], 16), d, torch.zeros_like(d)
    return nib(b[..., 4:], 16), d, f16(2).double() + 8.0 * d  # Q4_1


def tiled_codes_scales(
    blocks: torch.Tensor, qtype: str, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Any type as int8 codes [N, K], fp32 scale [N, K / g, 1] and offset (or None) with
    fp32 codes * scale + offset equal, bit for bit, to `dequantize_gguf`."""
    bt = check_blocks(blocks, qtype, out_features, in_features)
    n, k = out_features, in_features
    b = blocks.reshape(n, k // bt.block_size, bt.type_size)
    if bt.name in INT4PACK_TYPES:
        q, s, z = int4_codes_scales(blocks, bt.name, n, k)
        if bt.name == "Q4_0":
            return (q.to(torch.int8) - 8), s.float()[..., None], None
        f16 = b[..., 2:4].contiguous().view(torch.float16).to(torch.float32)  # Q4_1 m / dmin
        if bt.name == "Q4_1":
            return q.to(torch.int8), s.float()[..., None], f16
        _, mn = q4k_scales_mins(b[..., 4:16])
        offset = -(f16 * mn.to(torch.float32)).reshape(n, -1, 1)  # x - y == x + (-y) exactly
        return q.to(torch.int8), s.float()[..., None], offset
    d_off = 0 if bt.name == "Q8_0" else 208
    d = b[..., d_off : d_off + 2].contiguous().view(torch.float16).to(torch.float32)  # [N, B, 1]
    if bt.name == "Q8_0":
        return b[..., 2:].contiguous().view(torch.int8).reshape(n, k), d, None
    sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)  # Q6_K [N, B, 16]
    codes = q6k_codes(b).to(torch.int8)  # [N, B, 256]
    return codes.reshape(n, k), (d * sc).reshape(n, -1, 1), None


def prepare_gguf_cpu(
    blocks: torch.Tensor,
    qtype: str | int,
    out_features: int,
    in_features: int,
    use_int4pack: bool = True,
    dense_budget: int = 0,
    keep_codes: bool = False,
    nibbles: bool = False,
) -> GGUFCpuWeight:
    """Prepare raw blocks uint8 [N, bytes_per_row] once at load time. `use_int4pack` takes the
    bf16 int4 op for Q4_0 / Q4_1 / Q4_K (see the module docstring for its accuracy); every other
    case runs the exact fp32 values: kept whole ("dense") when their 4 * N * K bytes fit
    `dense_budget`, else tiled. keep_codes: a dense weight keeps the tiled codes, scales and
    offsets beside its fp32 values (for the C codes kernel's small-M calls). nibbles: the codes
    of Q4_0 / Q4_1 / Q4_K kept two per byte (`codes4`, half the bytes; the C kernels read them
    and dequantize them, so the caller must have those kernels)."""
    bt = check_blocks(blocks, qtype, out_features, in_features)
    if not (use_int4pack and bt.name in INT4PACK_TYPES):
        codes, scale, offset = tiled_codes_scales(blocks, bt.name, out_features, in_features)
        weight = GGUFCpuWeight(
            bt.name, out_features, in_features, "tiled", codes=codes, scale=scale, offset=offset
        )
        dense = None
        if 4 * out_features * in_features <= dense_budget:
            dense = dequantize_tiled(weight).contiguous()
            if not keep_codes:
                return GGUFCpuWeight(bt.name, out_features, in_features, "dense", dense=dense)
            weight = dataclasses.replace(weight, path="dense", dense=dense)
        if nibbles and bt.name in CODES4_BIAS and in_features % 32 == 0:
            codes4 = pack_codes4(codes, CODES4_BIAS[bt.name])
            weight = dataclasses.replace(weight, codes=None, codes4=codes4)
        return weight
    q, s, z = int4_codes_scales(blocks, bt.name, out_features, in_features)
    n_pad = -out_features % INT4PACK_N_TILE
    if n_pad:  # padded rows: codes 8, scale 0, offset 0 -> weight 0; sliced off after the GEMM
        q = torch.cat([q, torch.full((n_pad, in_features), 8, dtype=q.dtype)])
        s = torch.cat([s, s.new_zeros(n_pad, s.shape[1])])
        z = torch.cat([z, z.new_zeros(n_pad, z.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    scale_zeros = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
    return GGUFCpuWeight(
        bt.name, out_features, in_features, "int4pack", packed=packed, scale_zeros=scale_zeros
    )


def dequantize_tiled(weight: GGUFCpuWeight, start: int = 0, stop: int | None = None):
    """Rows [start, stop) of a "tiled" weight as fp32 [rows, K] (4-bit codes through the C
    kernel's dequantize, the same bits as torch's below)."""
    if weight.codes4 is not None:
        bias = CODES4_BIAS[weight.qtype]
        kernel, _ = load_codes_kernel()
        rows = (weight.codes4[start:stop], bias, weight.scale[start:stop])
        offset = weight.offset[start:stop] if weight.offset is not None else None
        if kernel is not None:
            return kernel.dequantize4(*rows, offset)
        codes = unpack_codes4(weight.codes4[start:stop], bias)  # kernel gone since: torch
    else:
        codes = weight.codes[start:stop]
    scale = weight.scale[start:stop]
    w = codes.reshape(codes.shape[0], scale.shape[1], -1).to(torch.float32).mul_(scale)
    if weight.offset is not None:
        w.add_(weight.offset[start:stop])
    return w.reshape(codes.shape[0], -1)


def _tiled_matmul(x: torch.Tensor, weight: GGUFCpuWeight, onednn: bool = False) -> torch.Tensor:
    # x: [M, K] fp32/fp64 -> [M, N]; each tile of rows is dequantized into a fresh fp32 buffer
    # and multiplied as the "dense" path multiplies its whole weight (the same bits in one tile)
    n, k = weight.out_features, weight.in_features
    rows = max(1, TILE_VALUES // k)
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    for start in range(0, n, rows):
        w = dequantize_tiled(weight, start, start + rows).to(x.dtype)  # [rows, K]
        if onednn and x.dtype == torch.float32:
            y[:, start : start + w.shape[0]] = onednn_matmul(x, w, None)
        else:
            torch.mm(x, w.t(), out=y[:, start : start + w.shape[0]])
    return y


def _check_call(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x: last dim {x.shape[-1] if x.dim() else None} differs from in_features {k}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [{n}]")
    if x.device.type != "cpu":
        raise ValueError(f"x: on {x.device}; the CPU GGUF GEMM runs on CPU tensors only")


def dense_linear(
    x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = False
):
    """y = x @ dense.T (+ bias after, in the compute dtype) for a "dense" weight fp32 [N, K]: the
    tiled path's product with one tile, and as little work per call as F.linear (a decode step
    makes ~4 such calls per layer). onednn: an fp32 product through oneDNN's matmul (the CPU
    backend's "onednn" gemm) instead of F.linear. x: [..., K]; returns [..., N] in x's dtype."""
    _check_call(x, *dense.shape, bias)
    return _dense_matmul(x, dense, bias, onednn)


def _dense_matmul(
    x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None, onednn: bool = False
):
    cd = compute_dtype(x.dtype)
    xc, wc = (x if x.dtype == cd else x.to(cd)), (dense if dense.dtype == cd else dense.to(cd))
    if onednn and cd == torch.float32:
        y = onednn_matmul(xc, wc, None)
    else:
        y = F.linear(xc, wc)
    if bias is not None:
        y = y + bias.to(cd)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def codes_linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None, max_rows: int | None = None
) -> torch.Tensor | None:
    """y = x @ W.T + bias through the C codes kernel for a weight it bound
    (`ckernels.CodesKernel.bind`: W = codes * scale + offset, the tiled fields), or None when it
    does not take this call (x not float32 / bf16 / fp16, or more than `max_rows` rows: the
    kernel's MAX_M, or `chunked_rows` of the weight's path, which it then takes MAX_M
    rows at a time), for the caller's torch path. x: [..., K]; returns [..., N] in x's dtype."""
    n, k = weight.n, weight.k
    _check_call(x, n, k, bias)
    if compute_dtype(x.dtype) != torch.float32:
        return None
    x2 = x.reshape(-1, k)
    m, step = x2.shape[0], weight.kernel.max_m
    if m > (max_rows or step):
        return None
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    if m <= step:
        y = weight(x2)
    else:
        y = torch.cat([weight(x2[i : i + step]) for i in range(0, m, step)])
    if bias is not None:
        y = y + bias.to(torch.float32)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def bind_codes(weight: GGUFCpuWeight, codes_kernel):
    """The kernel's bound form of a tiled or dense weight's codes (None without a kernel, codes
    or a group size it takes)."""
    if codes_kernel is None or weight.path == "int4pack":
        return None
    if weight.codes is None and weight.codes4 is None:
        return None
    k = weight.in_features
    if not codes_kernel.takes(1, k, k // weight.scale.shape[1]):
        return None
    if weight.codes4 is not None:
        return codes_kernel.bind(
            weight.codes4, weight.scale, weight.offset, CODES4_BIAS[weight.qtype]
        )
    return codes_kernel.bind(weight.codes, weight.scale, weight.offset)


def gguf_linear_cpu(
    x: torch.Tensor,
    weight: GGUFCpuWeight,
    bias: torch.Tensor | None = None,
    onednn: bool = False,
    codes_kernel=None,
) -> torch.Tensor:
    """y = x @ W.T + bias for a prepared GGUF weight W [N, K]. x: [..., K]; returns [..., N] in
    x's dtype. onednn: the fp32 products of the tiled and dense paths through oneDNN's matmul
    (the CPU backend's "onednn" gemm) instead of torch.mm / F.linear. codes_kernel (a
    `ckernels.CodesKernel`): the calls it takes of a weight with codes go to it."""
    n, k = weight.out_features, weight.in_features
    _check_call(x, n, k, bias)
    bound = bind_codes(weight, codes_kernel)
    if bound is not None:
        y = codes_linear(x, bound, bias, chunked_rows(weight.path))
        if y is not None:
            return y
    x2 = x.reshape(-1, k)
    if weight.path == "int4pack":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16).contiguous(), weight.packed, INT4PACK_GROUP, weight.scale_zeros
        )[:, :n].to(compute_dtype(x.dtype))
    elif weight.path == "tiled":
        y = _tiled_matmul(x2.to(compute_dtype(x.dtype)).contiguous(), weight, onednn)
    elif weight.path == "dense":
        return _dense_matmul(x, weight.dense, bias, onednn)
    else:
        raise ValueError(f"weight.path: {weight.path!r} is not 'int4pack', 'tiled' or 'dense'")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
