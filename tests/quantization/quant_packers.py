"""Checkpoint writers for the tests, written from issue 12's layout formulas and independent of
the loader: each returns the tensors a tool would save and the float weight they stand for.

W is [N out, K in]; every weight comes back with `w_deq`, the fp32 weight the formula gives.
"""

from __future__ import annotations

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_words(values: torch.Tensor, bits: int, dim: int, order: list[int] | None = None):
    """Unsigned b-bit values -> int32 words along `dim`; element i at bits b*i, or with `order`
    slot j holding element order[j]. Plain Python ints, so there is no shared code to trust."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    assert v.shape[-1] % per == 0 and int(v.min()) >= 0 and int(v.max()) < (1 << bits)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for slot in range(per):
        element = order[slot] if order else slot
        words += v[..., element] * (1 << (bits * slot))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def quantize(w: torch.Tensor, bits: int, groups: torch.Tensor, num_groups: int, sym: bool, seed=0):
    """Per (row, group) min-max quantization. groups: int64 [K], the group of each column.

    Returns codes [N, K] in 0..2^b-1, scales [N, G] fp32, zeros [N, G] ints (W = (q - z) * s).
    Zeros stay in 1..maxq so a v1 checkpoint (stored z - 1) never wraps.
    """
    maxq = (1 << bits) - 1
    n, k = w.shape
    scales = torch.empty(n, num_groups)
    zeros = torch.empty(n, num_groups, dtype=torch.int64)
    for g in range(num_groups):
        cols = w[:, groups == g]
        if sym:
            s = cols.abs().amax(1).clamp(min=1e-6) / (maxq / 2)
            z = torch.full((n,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = (hi - lo).clamp(min=1e-6) / maxq
            z = torch.round(-lo / s).to(torch.int64).clamp(1, maxq)
        scales[:, g], zeros[:, g] = s, z
    return scales, zeros


def codes_for(w, scales, zeros, groups, bits, scale_dtype):
    """Round scales to the checkpoint dtype first, then codes against the stored scale."""
    s = scales.to(scale_dtype).to(torch.float32)
    q = torch.round(w / s[:, groups]) + zeros[:, groups]
    q = q.clamp(0, (1 << bits) - 1).to(torch.int64)
    w_deq = (q - zeros[:, groups]).to(torch.float32) * s[:, groups]
    return q, s.to(scale_dtype), w_deq


def groups_of(k: int, group_size: int, act_order: bool, seed: int = 0) -> torch.Tensor:
    if not act_order:
        return torch.arange(k) // group_size
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g = torch.empty(k, dtype=torch.int64)
    g[perm] = torch.arange(k) // group_size  # act-order: groups follow a permutation of rows
    return g


def gptq(w, bits=4, group_size=32, sym=False, v1=True, desc_act=False, scale_dtype=torch.float16):
    """GPTQ: qweight [K/pack, N] along K, qzeros [K/G, N/pack] along N (v1 stores z - 1),
    scales [K/G, N], g_idx [K]."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    groups = groups_of(k, g, desc_act)
    scales, zeros = quantize(w, bits, groups, k // g, sym)
    q, s, w_deq = codes_for(w, scales, zeros, groups, bits, scale_dtype)
    stored_z = zeros - 1 if v1 else zeros
    tensors = {
        "qweight": pack_words(q.t(), bits, dim=0),
        "qzeros": pack_words(stored_z.t(), bits, dim=1),
        "scales": s.t().contiguous(),
        "g_idx": groups.to(torch.int32),
    }
    return tensors, w_deq


def awq(w, group_size=32, scale_dtype=torch.float16):
    """AWQ GEMM: qweight [K, N/8] along N in AWQ order, qzeros [K/G, N/8] alike, scales [K/G, N]."""
    n, k = w.shape
    groups = torch.arange(k) // group_size
    scales, zeros = quantize(w, 4, groups, k // group_size, sym=False)
    q, s, w_deq = codes_for(w, scales, zeros, groups, 4, scale_dtype)
    tensors = {
        "qweight": pack_words(q.t(), 4, dim=1, order=AWQ_ORDER),
        "qzeros": pack_words(zeros.t(), 4, dim=1, order=AWQ_ORDER),
        "scales": s.t().contiguous(),
    }
    return tensors, w_deq


def ct_packed(w, bits=4, group_size=32, sym=True, g_idx=False, scale_dtype=torch.bfloat16):
    """compressed-tensors pack-quantized: weight_packed [N, K/pack] along K of q + 2^(b-1) (q
    signed), weight_scale [N, K/G], weight_zero_point [N/pack, K/G] along N (+ offset), g_idx."""
    n, k = w.shape
    offset = 1 << (bits - 1)
    g = k if group_size is None else group_size
    groups = groups_of(k, g, g_idx, seed=1)
    scales, zeros = quantize(w, bits, groups, k // g, sym)
    q, s, w_deq = codes_for(w, scales, zeros, groups, bits, scale_dtype)
    q_signed, zp_signed = q - offset, zeros - offset  # W = (q_signed - zp_signed) * s
    tensors = {
        "weight_packed": pack_words(q_signed + offset, bits, dim=1),
        "weight_scale": s.contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_words(zp_signed + offset, bits, dim=0)
    if g_idx:
        tensors["weight_g_idx"] = groups.to(torch.int32)
    return tensors, w_deq


def ct_int8(w, scale_dtype=torch.bfloat16):
    """W8A8: weight int8 [N, K] = round(W / s), s = absmax / 127 per row, weight_scale [N, 1]."""
    s = (w.abs().amax(1, keepdim=True) / 127).to(scale_dtype).float()
    q = torch.round(w / s).clamp(-128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": s.to(scale_dtype)}, q.float() * s


def fp8(w, strategy="channel", block=(128, 128), scale_name="weight_scale"):
    """e4m3fn weight [N, K] with a per-tensor [1], per-channel [N, 1] or block scale."""
    n, k = w.shape
    if strategy == "block":
        bn, bk = block
        nb, kb = -(-n // bn), -(-k // bk)
        s = torch.empty(nb, kb)
        for i in range(nb):
            for j in range(kb):
                s[i, j] = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].abs().amax() / 448
        s_full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    elif strategy == "channel":
        s = w.abs().amax(1, keepdim=True) / 448
        s_full = s
    else:
        s = (w.abs().amax() / 448).reshape(1)
        s_full = s
    q = (w / s_full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": q, scale_name: s}, q.float() * s_full


def fp8_act(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """x dequantized after dynamic FP8 quantization per token (or per token and K group)."""
    if group is None:
        s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float64) * s
    return torch.cat([fp8_act(x[:, i : i + group]) for i in range(0, x.shape[1], group)], 1)


def int8_act(x: torch.Tensor) -> torch.Tensor:
    """x after compressed-tensors' dynamic per-token int8: s = absmax / 127.5, clamp -128..127."""
    s = x.abs().amax(1, keepdim=True) / 127.5
    return torch.round(x / s).clamp(-128, 127).to(torch.float64) * s
