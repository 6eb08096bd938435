"""AWQ GEMM checkpoints (AutoAWQ, GPTQModel, AutoRound's auto_awq export), 4-bit.

qweight int32 [K, N / 8] packed along N, nibble j holding column [0, 2, 4, 6, 1, 3, 5, 7][j] of its
group of 8; qzeros int32 [K / G, N / 8] likewise; scales [K / G, N]; no g_idx. W = (q - z) * s.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.quantization.base import (
    FLOAT_DTYPES,
    LinearSpec,
    QuantizationConfig,
    QuantizationConfigError,
    TensorLayout,
)
from engine.quantization.gptq import same_for_all_parts
from engine.quantization.packing import AWQ_ORDER, unpack
from engine.quantization.weight_only import WeightOnlyMethod
from hal.backend import Backend

VERSIONS = ("gemm",)


class AWQLinearMethod(WeightOnlyMethod):
    format_name = "awq"

    def __init__(self, spec: LinearSpec, backend: Backend, bits: int, group_size: int) -> None:
        super().__init__(spec, backend, bits, group_size, act_order=False)
        if bits != 4:
            raise QuantizationConfigError(f"awq: bits={bits} is not supported; supported: 4")
        g, i32 = self.group_size, (torch.int32,)
        gk = None if self.full_groups else 0
        self._layouts = (
            TensorLayout("qweight", lambda n, k: (k, n // 8), 1, 8, 0, 1, i32),
            TensorLayout("qzeros", lambda n, k: (k // g, n // 8), 1, 8, gk, g, i32),
            TensorLayout("scales", lambda n, k: (k // g, n), 1, 1, gk, g, FLOAT_DTYPES),
        )

    @property
    def layouts(self):
        return self._layouts

    def describe(self) -> str:
        return self.with_origin(f"awq (4-bit, group {self.group_size}, gemm)")

    def canonical(self, t: dict[str, torch.Tensor]):
        codes = unpack(t["qweight"], 4, dim=1, order=AWQ_ORDER)  # [K, N]
        zeros = unpack(t["qzeros"], 4, dim=1, order=AWQ_ORDER).to(torch.int16)  # [K / G, N]
        return codes, t["scales"], zeros, None


class AWQConfig(QuantizationConfig):
    """quant_method "awq": bits (or w_bit), group_size (or q_group_size), zero_point, version (or
    GPTQModel's format) "gemm", modules_to_not_convert."""

    name = "awq"

    def __init__(self, bits: int, group_size: int, skip: list[str]) -> None:
        self.bits, self.group_size, self.skip = bits, group_size, skip

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str) -> AWQConfig:
        bits = cfg.get("bits", cfg.get("w_bit"))
        group_size = cfg.get("group_size", cfg.get("q_group_size"))
        if bits is None or group_size is None:
            raise QuantizationConfigError(
                f"{source}: quantization_config (awq) lacks bits/w_bit or group_size/q_group_size"
            )
        if int(bits) != 4:
            raise QuantizationConfigError(
                f"{source}: awq bits={bits} is not supported; supported: 4"
            )
        version = str(cfg.get("version") or cfg.get("format") or "gemm").lower()
        if version not in VERSIONS:
            raise QuantizationConfigError(
                f"{source}: awq version {version!r} is not supported; supported: "
                f"{', '.join(VERSIONS)}"
            )
        if cfg.get("zero_point", True) is False:
            raise QuantizationConfigError(
                f"{source}: awq zero_point=false is not supported; supported: zero_point true"
            )
        return cls(int(bits), int(group_size), list(cfg.get("modules_to_not_convert") or []))

    def describe(self) -> str:
        return f"awq (4-bit, group {self.group_size}, gemm)"

    def linear_method(self, spec: LinearSpec, backend: Backend) -> AWQLinearMethod | None:
        # AutoAWQ skips a module when any modules_to_not_convert entry is a substring of its name.
        quantized = [not any(s in p.prefix for s in self.skip) for p in spec.parts]
        if not same_for_all_parts(spec, quantized):
            return None
        return AWQLinearMethod(spec, backend, self.bits, self.group_size)
