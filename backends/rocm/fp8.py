"""FP8 on AMD: the arch's format (gfx942: e4m3fnuz, max 240; gfx950: OCP e4m3fn, max 448), and
loading the canonical e4m3fn checkpoints on e4m3fnuz hardware.

e4m3fnuz has an exponent bias of 8 where e4m3fn has 7, so one bit pattern means half the value
(normals and subnormals alike), and its only NaN is 0x80, e4m3fn's negative zero. Re-encoding a
weight therefore keeps its bits, turns 0x80 into 0 and e4m3fn's NaNs (S.1111.111) into 0x80, and
doubles its scale: every dequantized value, and so every GEMM result, is unchanged (vLLM's
`normalize_e4m3fn_to_e4m3fnuz` does the same).
"""

from __future__ import annotations

import torch

from hal.capabilities import FP8_FORMATS, Capabilities
from hal.errors import HalError

_FNUZ_NAN = -128  # 0x80 as int8
_FN_NAN_CODES = (0x7F, -1)  # 0x7F and 0xFF as int8


class Fp8UnsupportedError(HalError):
    """FP8 was asked for on a device (arch) that has no FP8 format."""


def fp8_dtype_for(caps: Capabilities, requested: str | torch.dtype | None = None) -> torch.dtype:
    """The FP8 dtype to compute in on `caps`: its native format for None, "auto" or "fp8"; an
    explicit e4m3 format must be the native one (checkpoints in e4m3fn are re-encoded at load by
    `reencode_e4m3fn_to_fnuz`, not computed in a format the matrix cores lack); e5m2 is allowed
    (KV caches store it, decoded exactly in the kernels)."""
    if caps.fp8_dtype is None:
        raise Fp8UnsupportedError(
            f"fp8: {caps.device_name} ({caps.arch}) has no FP8 format; FP8 needs gfx942 "
            "(MI300, e4m3fnuz) or gfx950 (MI350, e4m3fn); use bfloat16/float16 or int8 instead"
        )
    if requested is None or requested in ("auto", "fp8", "fp8_e4m3"):
        return caps.fp8_dtype
    names = {str(d).replace("torch.float8_", ""): d for d, _ in FP8_FORMATS.values()}
    dtype = names.get(requested) if isinstance(requested, str) else requested
    if dtype not in names.values():
        raise ValueError(
            f"fp8 dtype: {requested!r} is not one of auto, fp8, fp8_e4m3, {', '.join(names)}"
        )
    if dtype == torch.float8_e5m2 or dtype == caps.fp8_dtype:
        return dtype
    fix = (
        "load e4m3fn checkpoints through reencode_e4m3fn_to_fnuz"
        if caps.fp8_format == "e4m3fnuz"
        else "use e4m3fn"
    )
    raise Fp8UnsupportedError(
        f"fp8 dtype: {dtype} is not the format {caps.device_name} ({caps.arch}) computes in "
        f"({caps.fp8_dtype}); {fix}"
    )


def reencode_e4m3fn_to_fnuz(
    weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3fn tensor and its scale -> the same values as e4m3fnuz with the scale doubled.

    weight: float8_e4m3fn [...]; scale: fp32, any shape (per tensor or per channel). Returns
    (float8_e4m3fnuz weight, fp32 scale * 2): dequantized values are equal bit for bit (-0
    becomes +0; NaN stays NaN).
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(
            f"weight: dtype {weight.dtype} is not torch.float8_e4m3fn (the checkpoint format)"
        )
    if not scale.is_floating_point():
        raise ValueError(f"scale: dtype {scale.dtype} is not a floating-point type")
    bits = weight.view(torch.int8)
    nan = (bits == _FN_NAN_CODES[0]) | (bits == _FN_NAN_CODES[1])
    bits = torch.where(bits == _FNUZ_NAN, torch.zeros_like(bits), bits)  # -0 -> +0
    bits = torch.where(nan, torch.full_like(bits, _FNUZ_NAN), bits)
    return bits.view(torch.float8_e4m3fnuz), scale.to(torch.float32) * 2.0


def load_fp8_weight(
    caps: Capabilities, weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's FP8 weight and scale in the format `caps` computes in: as is when it
    already is, re-encoded when the checkpoint is e4m3fn and the hardware e4m3fnuz; an arch
    without FP8 raises `Fp8UnsupportedError` naming it."""
    target = fp8_dtype_for(caps)
    if weight.dtype == target:
        return weight, scale.to(torch.float32)
    if weight.dtype == torch.float8_e4m3fn and target == torch.float8_e4m3fnuz:
        return reencode_e4m3fn_to_fnuz(weight, scale)
    raise Fp8UnsupportedError(
        f"weight: {weight.dtype} cannot be loaded as {target} on {caps.device_name} "
        f"({caps.arch}); FP8 checkpoints are stored as e4m3fn"
    )
