"""Triton GEMM on raw GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K): y = x @ W.T, dequantizing each
weight tile in registers from the ggml blocks as `backends.cpu.gguf` defines them.

Decode friendly: one program per BLOCK_N output rows (and BLOCK_M tokens), looping over K one
chunk of blocks at a time, optionally split along K (fp32 partials summed on the host). Each byte
of nibbles is loaded once and gives two half tiles (low and high nibbles), each multiplied with
the matching activation columns, so no register shuffle is needed. Accumulation is fp32; fp32
activations use IEEE fp32 dots (no TF32), fp16 / bf16 dots round the dequantized weight to the
activation dtype. Under TRITON_INTERPRET=1, bf16 dots run in fp32 (the interpreter's bf16 dot is
wrong). On a GPU the compiler may fuse the dequantization's multiply-adds (FMA), so weights can
differ from the reference's separately rounded fp32 steps by an ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.cpu.gguf import block_type, check_blocks
from backends.triton.quant import FLOAT_DTYPES, interpreting

QTYPE_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q6_K": 4}


@triton.jit
def _dot(acc, x, w, DOT_F32: tl.constexpr):
    # acc [BM, BN] += x [BM, T] @ w[BN, T].T
    if DOT_F32:
        return tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w.to(x.dtype)), acc)


@triton.jit
def _load_x(x_ptr, rows, stride_x_row, k, n_rows):
    return tl.load(x_ptr + rows[:, None] * stride_x_row + k[None, :], mask=rows[:, None] < n_rows,
                   other=0.0)  # fmt: skip


@triton.jit
def _gguf_matmul_kernel(
    x_ptr,
    w_ptr,  # uint8 [N, bytes_per_row]
    wh_ptr,  # the same bytes as fp16 [N, bytes_per_row / 2]
    y_ptr,  # fp32 partials [SPLIT_K, M, N]
    stride_x_row,
    stride_w_row,  # bytes
    n_rows,  # M
    n_cols,  # N
    chunks_per_split,
    n_chunks,
    QTYPE: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    KB: tl.constexpr,  # ggml blocks per chunk (Q4_0/Q4_1/Q8_0; the K-quants use 1)
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_cols
    row_base = n.to(tl.int64) * stride_w_row  # [BLOCK_N] byte offset of each weight row
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, n_chunks)
    for chunk in range(first, last):
        if QTYPE <= 1:  # Q4_0 / Q4_1: byte t of the chunk's nibbles -> values j and j + 16
            t = tl.arange(0, KB * 16)
            blk = chunk * KB + t // 16
            j = t % 16
            boff = row_base[:, None] + (blk * TYPE_SIZE)[None, :]  # [BN, T] block starts
            qb = tl.load(w_ptr + boff + (2 + 2 * QTYPE) + j[None, :], mask=n_ok[:, None], other=0)
            d = tl.load(wh_ptr + boff // 2, mask=n_ok[:, None], other=0.0).to(tl.float32)
            lo = (qb & 0x0F).to(tl.float32)
            hi = (qb >> 4).to(tl.float32)
            if QTYPE == 0:
                w_lo = d * (lo - 8.0)
                w_hi = d * (hi - 8.0)
            else:
                m = tl.load(wh_ptr + boff // 2 + 1, mask=n_ok[:, None], other=0.0).to(tl.float32)
                w_lo = d * lo + m
                w_hi = d * hi + m
            k_lo = (blk * 32 + j).to(tl.int64)
            acc = _dot(acc, _load_x(x_ptr, rows64, stride_x_row, k_lo, n_rows), w_lo, DOT_F32)
            acc = _dot(acc, _load_x(x_ptr, rows64, stride_x_row, k_lo + 16, n_rows), w_hi,
                       DOT_F32)  # fmt: skip
        elif QTYPE == 2:  # Q8_0: one int8 per value
            t = tl.arange(0, KB * 32)
            blk = chunk * KB + t // 32
            boff = row_base[:, None] + (blk * TYPE_SIZE)[None, :]
            qb = tl.load(w_ptr + boff + 2 + (t % 32)[None, :], mask=n_ok[:, None], other=0)
            q = qb.to(tl.int32)
            q = tl.where(q >= 128, q - 256, q).to(tl.float32)
            d = tl.load(wh_ptr + boff // 2, mask=n_ok[:, None], other=0.0).to(tl.float32)
            k = (chunk * KB * 32 + t).to(tl.int64)
            acc = _dot(acc, _load_x(x_ptr, rows64, stride_x_row, k, n_rows), d * q, DOT_F32)
        elif QTYPE == 3:  # Q4_K: byte t = 32c + i -> values 64c + i (sub-block 2c) and +32
            t = tl.arange(0, 128)
            c = t // 32
            sb = row_base[:, None] + chunk * TYPE_SIZE  # [BN, 1]
            qb = tl.load(w_ptr + sb + 16 + t[None, :], mask=n_ok[:, None], other=0)
            d = tl.load(wh_ptr + sb // 2, mask=n_ok[:, None], other=0.0).to(tl.float32)
            dmin = tl.load(wh_ptr + sb // 2 + 1, mask=n_ok[:, None], other=0.0).to(tl.float32)
            # six-bit scale and min of sub-blocks 2c (c < 2: direct) and 2c + 1
            for half in tl.static_range(2):
                jj = (2 * c + half) % 4  # [T]
                hi_j = (2 * c + half) >= 4
                a = tl.load(w_ptr + sb + 4 + jj[None, :], mask=n_ok[:, None], other=0)
                b = tl.load(w_ptr + sb + 8 + jj[None, :], mask=n_ok[:, None], other=0)
                e = tl.load(w_ptr + sb + 12 + jj[None, :], mask=n_ok[:, None], other=0)
                sc = tl.where(hi_j[None, :], (e & 0x0F) | ((a >> 6) << 4), a & 0x3F)
                mn = tl.where(hi_j[None, :], (e >> 4) | ((b >> 6) << 4), b & 0x3F)
                if half == 0:
                    q = (qb & 0x0F).to(tl.float32)
                else:
                    q = (qb >> 4).to(tl.float32)
                w = (d * sc.to(tl.float32)) * q - dmin * mn.to(tl.float32)
                k = (chunk * 256 + 64 * c + 32 * half + t % 32).to(tl.int64)
                acc = _dot(acc, _load_x(x_ptr, rows64, stride_x_row, k, n_rows), w, DOT_F32)
        else:  # Q6_K: ql byte t = 64h + 32c0 + i -> values 128h + 32c0 + i and + 64
            t = tl.arange(0, 128)
            h = t // 64
            c0 = (t % 64) // 32
            i = t % 32
            sb = row_base[:, None] + chunk * TYPE_SIZE
            ql = tl.load(w_ptr + sb + t[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
            qh = tl.load(w_ptr + sb + 128 + (32 * h + i)[None, :], mask=n_ok[:, None], other=0)
            qh = qh.to(tl.int32)
            d = tl.load(wh_ptr + (sb + 208) // 2, mask=n_ok[:, None], other=0.0).to(tl.float32)
            for half in tl.static_range(2):
                v = 128 * h + 32 * (c0 + 2 * half) + i  # [T] value index in the super-block
                shift = (2 * c0 + 4 * half)[None, :]
                code = ((ql >> (4 * half)) & 0x0F) | (((qh >> shift) & 3) << 4)
                s = tl.load(w_ptr + sb + 192 + (v // 16)[None, :], mask=n_ok[:, None], other=0)
                s = s.to(tl.int32)
                s = tl.where(s >= 128, s - 256, s).to(tl.float32)
                w = (d * s) * (code.to(tl.float32) - 32.0)
                k = (chunk * 256 + v).to(tl.int64)
                acc = _dot(acc, _load_x(x_ptr, rows64, stride_x_row, k, n_rows), w, DOT_F32)
    y = y_ptr + split.to(tl.int64) * n_rows * n_cols + rows64[:, None] * n_cols + n[None, :]
    tl.store(y, acc, mask=(rows[:, None] < n_rows) & n_ok[None, :])


def _chunk_blocks(qtype: str, in_features: int) -> int:
    # ggml blocks per K step: 4 (128 values) for the 32-value types when K allows, 1 super-block
    bt = block_type(qtype)
    if bt.block_size == 256:
        return 1
    nb = in_features // 32
    return next(kb for kb in (4, 2, 1) if nb % kb == 0)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def gguf_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: str | int,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias with W [N, K] given as raw GGUF blocks uint8 [N, bytes_per_row] on x's
    device. x: [..., K] fp32 / fp16 / bf16; returns [..., N] in x's dtype. `split_k` (default:
    enough K splits to give every SM two programs) and `block_n` are tuning knobs."""
    bt = check_blocks(blocks, qtype, out_features, in_features)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not one of float32, bfloat16, float16")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x: last dim {x.shape[-1] if x.dim() else None} differs from in_features {in_features}"
        )
    if blocks.device != x.device:
        raise ValueError(f"blocks: on {blocks.device}, x on {x.device}; put both on one device")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [{out_features}]")
    n, k = out_features, in_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    w = blocks if blocks.is_contiguous() else blocks.contiguous()
    kb = _chunk_blocks(bt.name, k)
    n_chunks = k // (kb * bt.block_size)
    block_m = 16
    block_n = block_n or (64 if interpreting() else 32)
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(max(m, 1), block_m)
    if split_k is None:
        split_k = max(1, min(n_chunks, (2 * _num_sms(x.device)) // (grid_n * grid_m)))
    if split_k < 1:
        raise ValueError(f"split_k: {split_k} must be at least 1")
    per_split = triton.cdiv(n_chunks, split_k)
    split_k = triton.cdiv(n_chunks, per_split)  # no empty splits
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    if m and n:
        dot_f32 = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
        _gguf_matmul_kernel[(grid_n, grid_m, split_k)](
            x2, w, w.view(torch.float16), partial, x2.stride(0), w.stride(0), m, n, per_split,
            n_chunks, QTYPE=QTYPE_IDS[bt.name], TYPE_SIZE=bt.type_size, KB=kb, DOT_F32=dot_f32,
            BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
    y = partial[0] if split_k == 1 else partial.sum(dim=0)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
