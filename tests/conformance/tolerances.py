"""Per-dtype error bounds for comparing a backend against the float64 reference.

Every bound is a small multiple of the dtype's unit roundoff u (half the machine epsilon: the
largest relative error of one round-to-nearest), so a tolerance can be read as "k roundings".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Unit roundoff u = 2^-(significand bits): the relative error bound of a single rounding.
UNIT_ROUNDOFF: dict[str, float] = {
    "fp32": 2.0**-24,  # 24-bit significand
    "tf32": 2.0**-11,  # 11-bit significand (10 stored): products of fp32 GEMMs with TF32 on
    "bf16": 2.0**-8,  # 8-bit significand
    "fp16": 2.0**-11,  # 11-bit significand
    "fp8_e4m3fn": 2.0**-4,  # 4-bit significand
    "fp8_e4m3fnuz": 2.0**-4,
    "fp8_e5m2": 2.0**-3,  # 3-bit significand
}

# The smallest positive subnormal: below it relative error is meaningless, so it floors `atol`.
SUBNORMAL_MIN: dict[str, float] = {
    "fp32": 2.0**-149,
    "bf16": 2.0**-133,
    "fp16": 2.0**-24,
    "fp8_e4m3fn": 2.0**-9,
    "fp8_e4m3fnuz": 2.0**-10,
    "fp8_e5m2": 2.0**-16,
}

DTYPE_NAME: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e4m3fnuz: "fp8_e4m3fnuz",
    torch.float8_e5m2: "fp8_e5m2",
}


@dataclass(frozen=True)
class Tolerance:
    """|out - ref| <= atol * sqrt(k) * magnitude + rtol * |ref| + floor, elementwise.

    `magnitude` is the scale of the op's inputs (max |x|, or max |x| * max |w| for a product), so
    atol bounds the rounding that cancellation leaves behind; k is the reduction length.
    """

    atol: float
    rtol: float
    floor: float = 0.0

    def allowed(self, ref: torch.Tensor, magnitude: float = 1.0, k: int = 1) -> torch.Tensor:
        return self.atol * math.sqrt(max(k, 1)) * magnitude + self.rtol * ref.abs() + self.floor


# dtype -> (atol, rtol), the values used when a result is rounded to that dtype:
# - fp32: 16u = 2^-20 (~9.5e-7). Output rounding (u) plus the few-ulp error of the fp32
#   transcendentals the ops use (exp, tanh, rsqrt, sigmoid in SLEEF/libdevice are <= 4 ulp = 8u)
#   plus a different summation order; atol is scaled by sqrt(K), the random-walk growth of K
#   roundings in an fp32 accumulator (Higham & Mary's probabilistic bound).
# - bf16: 4u = 2^-6 (~1.6e-2, torch.testing's default for bf16). Output rounding (u) plus the
#   one intermediate rounding to bf16 a contract allows (the residual sum, attention's
#   probabilities before P @ V, the scale stored in the dtype), with a factor 2 of headroom.
#   atol = u per sqrt(K): one bf16 rounding per accumulated term, adding as a random walk.
# - fp16: the same multiples of u = 2^-11: rtol 2^-9 (~2e-3), atol 2^-11 (~4.9e-4).
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (16 * UNIT_ROUNDOFF["fp32"], 16 * UNIT_ROUNDOFF["fp32"]),
    "bf16": (UNIT_ROUNDOFF["bf16"], 4 * UNIT_ROUNDOFF["bf16"]),
    "fp16": (UNIT_ROUNDOFF["fp16"], 4 * UNIT_ROUNDOFF["fp16"]),
}


# FP8 tensor cores (Hopper) do not keep a full fp32 accumulator: the DeepSeek-V3 report (sec.
# 3.3.2) measures about 14 retained bits. An FP8 GEMM is held to that accumulator, u = 2^-14,
# with two roundings (2u) of headroom, whenever it is looser than the output dtype's tolerance.
FP8_ACCUMULATOR_U = 2.0**-14


def tolerance(dtype: str | torch.dtype, tf32: bool = False, fp8_gemm: bool = False) -> Tolerance:
    """The tolerance for a result rounded to `dtype`; `tf32` widens fp32 to TF32's products and
    `fp8_gemm` to an FP8 tensor core's accumulator."""
    name = DTYPE_NAME.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in TOLERANCES:
        raise ValueError(f"dtype: no tolerance for {name!r}; valid: {', '.join(TOLERANCES)}")
    atol, rtol = TOLERANCES[name]
    if name == "fp32" and tf32:
        # TF32 rounds each GEMM operand to 11 significant bits: two roundings per product.
        atol, rtol = 4 * UNIT_ROUNDOFF["tf32"], 4 * UNIT_ROUNDOFF["tf32"]
    if fp8_gemm:
        atol, rtol = max(atol, 2 * FP8_ACCUMULATOR_U), max(rtol, 2 * FP8_ACCUMULATOR_U)
    return Tolerance(atol=atol, rtol=rtol, floor=SUBNORMAL_MIN[name])


def quantization_tolerance(fp8_dtype: str | torch.dtype) -> Tolerance:
    """Half a step of an FP8 format: |dequant(quant(x)) - x| <= u * |x| + half a subnormal step,
    both in units of the scale (the caller multiplies by it)."""
    name = DTYPE_NAME.get(fp8_dtype, fp8_dtype) if isinstance(fp8_dtype, torch.dtype) else fp8_dtype
    if name not in UNIT_ROUNDOFF or not name.startswith("fp8"):
        raise ValueError(f"fp8_dtype: {name!r} is not an FP8 format")
    return Tolerance(atol=SUBNORMAL_MIN[name] / 2, rtol=UNIT_ROUNDOFF[name])
