"""The CPU engine's fast paths: GEMM in the input dtype (oneDNN's matmul for fp32; F.linear,
which reaches oneDNN for bf16 / fp16, AMX/AVX-512 where present), KV-cache writes/copies as
single index_copy_ calls, and RMSNorm / rotary in fewer torch calls.

Same contracts as `linear.linear`, `kv_cache.write_kv`/`copy_blocks`, `norm.rms_norm` and
`rotary.rotary` (the oracles they are tested against; the KV ops, the norm and the rotary are
bitwise equal: the same fp32 arithmetic in the same order, one rounding to the output dtype).
For the GEMM with bf16/fp16 inputs torch's CPU kernels accumulate in fp32 internally and round
the result once, so the error bound is the dtype's unit roundoff on the output, as for the
reference; only the summation order differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.cpu import norm, rotary
from backends.cpu.ckernels import load_rms_norm_kernel, load_rotary_kernel
from backends.cpu.kv_cache import _check_block_pairs, encode_kv
from backends.cpu.linear import _check_bias, _check_gemm


def native_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ weight.T + bias in x's dtype. x: [..., K]; weight: [N, K] (same dtype as x)."""
    _check_gemm(x, weight, "x", "weight")
    _check_bias(bias, weight.shape[0])
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """fp32 x [..., K] @ weight [N, K].T (+ bias) through oneDNN's matmul primitive (the op
    torch's own compiler emits for CPU linears), without a prepacked weight."""
    k = weight.shape[1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, k), weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`native_linear`, with float32 through oneDNN's matmul rather than F.linear (MKL's sgemv /
    sgemm): on a 2-core AMD EPYC (2026-11-29) 1.05-2.6x faster at M = 1-128 on the default
    model's shapes, 2.2x on its LM head at M = 1 (`python bench/cpu_linear.py`), fp32
    accumulation either way, only the summation order differs. Other dtypes (bf16 / fp16
    already reach oneDNN through F.linear, fp64 is not a oneDNN type) take `native_linear`."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return native_linear(x, weight, bias)  # checks the shapes itself
    _check_gemm(x, weight, "x", "weight")
    _check_bias(bias, weight.shape[0])
    if weight.dtype != torch.float32:
        weight = weight.float()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    return onednn_matmul(x, weight, bias)


def onednn_reasons() -> list[str]:
    """Why `onednn_linear`'s oneDNN path cannot run in this torch (empty: it can): built without
    oneDNN, no `mkldnn._linear_pointwise` op, or a probe product that fails or differs from
    F.linear's by more than fp32 summation order allows."""
    if not torch.backends.mkldnn.is_available():
        return ["torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"]
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return [f"torch {torch.__version__} has no mkldnn._linear_pointwise op"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, generator=g)
    w = torch.randn(24, 40, generator=g)
    b = torch.randn(24, generator=g)
    try:
        got = onednn_matmul(x, w, b)
    except RuntimeError as e:  # an op that exists but cannot run here
        return [f"mkldnn._linear_pointwise failed on a probe: {str(e).splitlines()[0]}"]
    ref = F.linear(x.double(), w.double(), b.double())
    bound = 64 * 2**-24 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    if got.shape != ref.shape or not bool(((got.double() - ref).abs() <= bound).all()):
        return ["mkldnn._linear_pointwise's probe product differs from F.linear's"]
    return []


class _SlotCheck:
    """The last slot mapping that passed `_check_slots`: every layer of a step writes the same
    slots, so the checks (two host reads and a sort) run once a step, not once a layer. One
    tuple (values, limit, all_valid), read once and replaced whole: threads that write KV at
    once (ranks as threads in tests, several engines in one process) never see one mapping's
    values with another's verdict. With three separate class attributes the tensor-parallel
    thread tests segfaulted in about 1 run in 12, mostly inside this check (3 of 37 runs of
    test_parallel_layers' model tests; 0 of 80 since). How the race became a crash is not
    understood; a stale verdict alone would only raise in index_copy_."""

    last: tuple[torch.Tensor, int, bool] | None = None


def _check_slots(slots: torch.Tensor, limit: int) -> bool:
    """Checks int64 slots against a cache of `limit` slots (-1: skip; no slot twice); returns
    whether none is -1. Values equal to the last mapping that passed are not checked again
    (compared by value: the engine refills its host buffers in place)."""
    last = _SlotCheck.last  # one read: values, limit and verdict belong together
    if (
        last is not None
        and last[1] == limit
        and last[0].shape == slots.shape
        and torch.equal(last[0], slots)
    ):
        return last[2]
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= limit):
        raise ValueError(f"slot_mapping: slots must be -1 (skip) or lie in 0..{limit - 1}")
    valid = slots >= 0
    all_valid = bool(valid.all())
    kept = slots if all_valid else slots[valid]
    if kept.unique().numel() != kept.numel():
        raise ValueError("slot_mapping: a slot appears twice; each token needs its own slot")
    _SlotCheck.last = (slots.clone(), limit, all_valid)
    return all_valid


def native_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float | None = None,
) -> None:
    """`Backend.write_kv` as one index_copy_ per cache over the flattened slots (bitwise equal
    to `kv_cache.write_kv`, which checks the same inputs and is the oracle)."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if key.shape != value.shape or key.shape != (slot_mapping.shape[0], num_kv_heads, head_dim):
        raise ValueError(
            f"key/value: shapes {tuple(key.shape)}/{tuple(value.shape)}, expected "
            f"[num_tokens={slot_mapping.shape[0]}, {num_kv_heads}, {head_dim}]"
        )
    slots = slot_mapping.to(torch.int64)
    all_valid = _check_slots(slots, num_blocks * block_size)
    if not all_valid:
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    for cache, x in ((key_cache, key), (value_cache, value)):
        stored = encode_kv(x, cache.dtype, kv_scale)
        if cache.element_size() == 1:  # index_copy_ has no fp8 kernel: move the bytes
            cache, stored = cache.view(torch.uint8), stored.view(torch.uint8)
        cache.view(flat).index_copy_(0, slots, stored)


def native_copy_blocks(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """`Backend.copy_blocks`: every source block is read before any destination is written."""
    for cache in caches:
        s, d = _check_block_pairs(src, dst, cache.shape[0], cache.shape[0])
        if s.numel():
            flat = cache.view(torch.uint8) if cache.element_size() == 1 else cache
            flat.index_copy_(0, d, flat.index_select(0, s))


def native_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`norm.rms_norm` through torch's `F.rms_norm` (one call: x * rsqrt(mean(x^2) + eps),
    then * weight, in fp32) and one rounding to x's dtype: the reference's arithmetic in its
    order, about half its time at decode sizes. float64 goes to the reference."""
    if x.dtype == torch.float64:
        return norm.rms_norm(x, weight, eps, residual)
    norm.check_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual if x.dtype == torch.float32 else (x.float() + residual.float()).to(x.dtype)
    h = x if x.dtype == torch.float32 else x.float()
    w = weight if weight.dtype == torch.float32 else weight.float()
    y = F.rms_norm(h, (h.shape[-1],), w, eps)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if residual is None else (y, x)


def c_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    kernel=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`native_rms_norm` in one C call (`kernel`, else `ckernels.load_rms_norm_kernel`: the
    same bits) for fp32 contiguous rows of 16-16384 values; every other input, or no kernel
    here, as `native_rms_norm`."""
    kernel = kernel or load_rms_norm_kernel()[0]
    if kernel is None or not kernel.takes(x, weight, residual):
        return native_rms_norm(x, weight, eps, residual)
    norm.check_norm(x, weight, eps, residual)
    return kernel.run(x, weight, eps, residual)


def native_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    check_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary.rotary` for NeoX pairs written into one preallocated fp32 tensor per input
    (x1 cos - x2 sin and x2 cos + x1 sin as the reference computes them, without its two
    concatenations); GPT-J pairs and float64 go to the reference."""
    if not is_neox or query.dtype == torch.float64:
        return rotary.rotary(positions, query, key, cos_sin_cache, is_neox, check_range)
    rot = rotary.check_rotary(positions, query, key, cos_sin_cache, check_range)
    half = rot // 2
    cs = cos_sin_cache.float().index_select(0, positions.to(torch.int64))  # [num_tokens, rot]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xc = x if x.dtype == torch.float32 else x.float()
        out = torch.empty_like(xc)
        x1, x2 = xc[..., :half], xc[..., half:rot]
        o1, o2 = out[..., :half], out[..., half:rot]
        torch.mul(x1, cos, out=o1)
        o1.sub_(x2 * sin)
        torch.mul(x2, cos, out=o2)
        o2.add_(x1 * sin)
        if rot < xc.shape[-1]:
            out[..., rot:] = xc[..., rot:]
        return out if out.dtype == x.dtype else out.to(x.dtype)

    return rotate(query), rotate(key)


def _rows_f32(*ts: torch.Tensor) -> bool:
    # fp32 CPU [T, H, D] with heads D apart and unit element stride (any token stride)
    for t in ts:
        if t.dtype != torch.float32 or not t.is_cpu or t.dim() != 3:
            return False
        _, hs, es = t.stride()
        if es != 1 or (hs != t.shape[2] and t.shape[1] > 1):
            return False
    return True


def _c_takes(positions, query, key, cos_sin_cache, is_neox) -> bool:
    return (
        is_neox
        and _rows_f32(query, key)
        and cos_sin_cache.dtype == torch.float32
        and cos_sin_cache.is_contiguous()
        and cos_sin_cache.is_cpu
        and positions.is_cpu
    )


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def c_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    check_range: bool = True,
    kernel=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary.rotary` through the C kernel (`kernel`, else `ckernels.load_rotary_kernel`) for
    fp32 NeoX rows: the reference's bits in one pass (positions always range-checked, in the
    kernel); GPT-J pairs, other dtypes or layouts, or no kernel here go to `native_rotary`."""
    kernel = kernel or load_rotary_kernel()[0]
    if kernel is None or not _c_takes(positions, query, key, cos_sin_cache, is_neox):
        return native_rotary(positions, query, key, cos_sin_cache, is_neox, check_range)
    rotary.check_rotary(positions, query, key, cos_sin_cache, check_range=False)
    return kernel.run(_int64(positions), query, key, cos_sin_cache)


def c_rotary_write_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kernel=None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`Backend.rotary_write_kv` in one C pass (`kernel`, else `ckernels.load_rotary_kernel`)
    for fp32 NeoX rows and fp32 caches (the rotated key and the value stored as
    `native_write_kv` stores them: the same bits), or None when the kernel does not take these
    inputs (the caller composes rotary and write_kv). Every check of both ops runs before
    anything is written."""
    kernel = kernel or load_rotary_kernel()[0]
    if kernel is None or not _c_takes(positions, query, key, cos_sin_cache, is_neox):
        return None
    caches = (key_cache, value_cache)
    if not _rows_f32(value) or not all(
        c.dtype == torch.float32 and c.is_contiguous() and c.is_cpu and c.dim() == 4 for c in caches
    ):
        return None
    rotary.check_rotary(positions, query, key, cos_sin_cache, check_range=False)
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    want = (slot_mapping.shape[0], num_kv_heads, head_dim)
    if key.shape != value.shape or key.shape != want or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"key/value: shapes {tuple(key.shape)}/{tuple(value.shape)}, expected "
            f"[num_tokens={slot_mapping.shape[0]}, {num_kv_heads}, {head_dim}] (caches "
            f"{tuple(key_cache.shape)}/{tuple(value_cache.shape)})"
        )
    slots = _int64(slot_mapping)
    _check_slots(slots, num_blocks * block_size)  # range and no slot twice
    return kernel.run(
        _int64(positions), query, key, cos_sin_cache, value, key_cache, value_cache, slots
    )
