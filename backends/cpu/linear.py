"""Reference GEMMs: dense, FP8 scaled, INT8 W8A8 and 4-bit weight-only, accumulated in fp32.

On a CUDA device torch's global TF32 switch would apply to the fp32 matmuls; the reference is
meant to run with it off (the CPU has no TF32).
"""

from __future__ import annotations

import torch

from backends.cpu.quant import compute_dtype, dequantize_int4, is_fp8


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected [N={n}]")


def _check_gemm(x: torch.Tensor, w: torch.Tensor, x_name: str, w_name: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{w_name}: expected [N, K], got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{x_name}: last dim {x.shape[-1] if x.dim() else None} differs from "
            f"{w_name}'s K={w.shape[1]}"
        )


def _check_scale(name: str, scale: torch.Tensor, rows: int, what: str) -> None:
    if tuple(scale.shape) not in ((1,), (rows, 1)):
        raise ValueError(
            f"{name}: shape {tuple(scale.shape)} is neither [1] (per tensor) nor [{rows}, 1] "
            f"(per {what})"
        )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias. x: [..., K]; weight: [N, K]; returns [..., N] in x's dtype."""
    _check_gemm(x, weight, "x", "weight")
    _check_bias(bias, weight.shape[0])
    cd = compute_dtype(x.dtype)
    y = x.to(cd) @ weight.to(cd).t()
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)


def lora_add(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    num_slots: int,
    rank: int,
) -> torch.Tensor:
    """y += each token's LoRA delta in place (`Backend.lora_add`'s contract): h = x a^T in fp32
    with every column outside the token's slot ((column // rank) % num_slots) set to zero, then
    y = round(y + h b^T) with the product in fp32. Tokens of slot -1 get h = 0, so y + 0 keeps
    their bits (finite y)."""
    col_slot = torch.arange(a.shape[0], device=a.device) // rank % num_slots
    h = x.float() @ a.float().t()
    h = h * (token_slots.long()[:, None] == col_slot[None, :])
    y.copy_((y.float() + h @ b.float().t()).to(y.dtype))
    return y


def _scaled_output(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    # acc: [M, N] fp32; x_scale: [1] or [M, 1]; w_scale: [1] or [N, 1] -> broadcast as [1, N]
    y = acc * x_scale.to(acc.dtype) * w_scale.to(acc.dtype).reshape(1, -1)
    if bias is not None:
        y = y + bias.to(acc.dtype)
    return y.to(out_dtype)


def _check_quantized(x_q, x_scale, w_q, w_scale, bias, ok, kind: str) -> None:
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if not ok(t.dtype):
            raise ValueError(f"{name}: dtype {t.dtype} is not {kind}")
    if x_q.dim() != 2:
        raise ValueError(f"x_q: expected [M, K], got shape {tuple(x_q.shape)}")
    _check_gemm(x_q, w_q, "x_q", "w_q")
    _check_scale("x_scale", x_scale, x_q.shape[0], "token")
    _check_scale("w_scale", w_scale, w_q.shape[0], "output channel")
    _check_bias(bias, w_q.shape[0])


def is_block_scaled(x_scale: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """`fp8_linear`'s block-scaled case: a scale with more than one column ([M, G] / [N, G])."""
    return any(s.dim() == 2 and s.shape[1] > 1 for s in (x_scale, w_scale))


def check_fp8_block_scales(x_q, x_scale, w_q, w_scale, bias) -> None:
    """The block-scaled `fp8_linear` inputs: fp8 x_q [M, K] and w_q [N, K], x_scale [M, G] and
    w_scale [N / R, G] (R consecutive rows share scales, R dividing N; R = 1: per row) with G
    dividing K; ValueError naming the tensor otherwise."""
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if not is_fp8(t.dtype):
            raise ValueError(f"{name}: dtype {t.dtype} is not an FP8 format")
    if x_q.dim() != 2:
        raise ValueError(f"x_q: expected [M, K], got shape {tuple(x_q.shape)}")
    _check_gemm(x_q, w_q, "x_q", "w_q")
    (m, k), n = x_q.shape, w_q.shape[0]
    if x_scale.dim() != 2 or x_scale.shape[0] != m or x_scale.shape[1] < 1:
        raise ValueError(
            f"x_scale: shape {tuple(x_scale.shape)}, expected [M={m}, G] (one scale per token "
            "per K block)"
        )
    g = x_scale.shape[1]
    if w_scale.dim() != 2 or w_scale.shape[1] != g or w_scale.shape[0] < 1 or n % w_scale.shape[0]:
        raise ValueError(
            f"w_scale: shape {tuple(w_scale.shape)}, expected [N / R, G={g}] (one scale per R "
            f"consecutive output rows, R dividing N={n}, per K block; G as in x_scale)"
        )
    if k % g:
        raise ValueError(f"x_scale: G={g} blocks do not divide K={k} (pad K to a multiple)")
    _check_bias(bias, n)


def fp8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y = (x_q * x_scale) @ (w_q * w_scale).T + bias, as (x_q @ w_q.T in fp32) * scales.

    x_q: fp8 [M, K]; x_scale: [1] or [M, 1]; w_q: fp8 [N, K] (any FP8 format, may differ from
    x_q's); w_scale: [1] or [N, 1]. Returns [M, N] in out_dtype.
    Block-scaled (`is_block_scaled`): x_scale [M, G], w_scale [N / R, G] (R consecutive rows
    share one scale per block: a checkpoint's 128 x 128 blocks give R = 128), K = G * B; block
    g's fp32 sum over its B columns is scaled by x_scale[:, g] * w_scale[n // R, g] before the
    blocks add.
    """
    if is_block_scaled(x_scale, w_scale):
        check_fp8_block_scales(x_q, x_scale, w_q, w_scale, bias)
        (m, k), n, g = x_q.shape, w_q.shape[0], x_scale.shape[1]
        xb = x_q.to(torch.float32).reshape(m, g, k // g)
        wb = w_q.to(torch.float32).reshape(n, g, k // g)
        xs = x_scale.to(torch.float32)
        ws = w_scale.to(torch.float32).repeat_interleave(n // w_scale.shape[0], dim=0)
        acc = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
        for j in range(g):
            acc += (xb[:, j] @ wb[:, j].t()) * xs[:, j : j + 1] * ws[:, j].reshape(1, -1)
        one = torch.ones(1, dtype=torch.float32, device=x_q.device)
        return _scaled_output(acc, one, one, bias, out_dtype)
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, is_fp8, "an FP8 format")
    acc = x_q.to(torch.float32) @ w_q.to(torch.float32).t()  # [M, N]
    return _scaled_output(acc, x_scale, w_scale, bias, out_dtype)


def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8: y = (x_q @ w_q.T, exact integer) * x_scale * w_scale.T + bias in out_dtype.

    The integer product is accumulated exactly (in float64, exact for K < 2^38, which works on
    every device) and equals an int32 accumulator while |acc| < 2^31.
    """
    _check_quantized(x_q, x_scale, w_q, w_scale, bias, lambda d: d == torch.int8, "torch.int8")
    acc = x_q.to(torch.float64) @ w_q.to(torch.float64).t()  # [M, N], exact integers
    return _scaled_output(acc.to(torch.float32), x_scale, w_scale, bias, out_dtype)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequantize_int4(...).T + bias; the weight is dequantized in fp32 (not rounded to
    scales' dtype first). x: [M, K]; returns [M, N] in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    k = qweight.shape[0] * 8 if qweight.dim() == 2 else -1
    if x.shape[1] != k:
        raise ValueError(f"x: K={x.shape[1]} differs from qweight's K = 8 * rows = {k}")
    cd = compute_dtype(x.dtype)
    w = dequantize_int4(qweight, scales, zeros, group_size, g_idx, out_dtype=cd)  # [N, K]
    _check_bias(bias, w.shape[0])
    y = x.to(cd) @ w.t()
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)
