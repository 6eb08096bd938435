"""GPTQ checkpoints (AutoGPTQ, GPTQModel, AutoRound's auto_gptq export), 4- and 8-bit.

qweight int32 [K / pack, N] packed along K (element i at bits b * (i % pack)); qzeros int32
[K / G, N / pack] packed along N alike; scales [K / G, N]; g_idx int32 [K] (act-order only).
W[n, i] = (q[i, n] - (z[g_idx[i], n] + 1)) * s[g_idx[i], n] for checkpoint_format "gptq" (v1, the
default); no +1 for "gptq_v2". desc_act keeps the rows in order and permutes only g_idx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.quantization.base import (
    LinearSpec,
    QuantizationConfig,
    QuantizationConfigError,
    require,
)
from engine.quantization.packing import unpack
from engine.quantization.weight_only import WeightOnlyMethod, packed_layouts
from hal.backend import Backend

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQSettings:
    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    v1_zeros: bool = True  # checkpoint_format "gptq": stored zeros are z - 1

    def label(self) -> str:
        fmt = "v1" if self.v1_zeros else "v2"
        order = ", desc_act" if self.desc_act else ""
        sym = "sym" if self.sym else "asym"
        return f"{self.bits}-bit, group {self.group_size}, {sym}{order}, {fmt}"


class GPTQLinearMethod(WeightOnlyMethod):
    format_name = "gptq"

    def __init__(self, spec: LinearSpec, backend: Backend, settings: GPTQSettings) -> None:
        super().__init__(spec, backend, settings.bits, settings.group_size, settings.desc_act)
        self.settings = settings
        names = ("qweight", "scales", "qzeros", "g_idx")
        self._layouts = packed_layouts(
            self.bits, self.group_size, self.full_groups, n_major=False, zeros=True,
            g_idx=settings.desc_act, names=names,
        )  # fmt: skip
        # GPTQModel and AutoGPTQ save g_idx without desc_act too: read it when there, so a
        # checkpoint whose g_idx is not plain groups is dequantized as its library does.
        self._optional = () if settings.desc_act else packed_layouts(
            self.bits, self.group_size, self.full_groups, n_major=False, zeros=False,
            g_idx=True, names=names,
        )[-1:]  # fmt: skip

    @property
    def layouts(self):
        return self._layouts

    @property
    def optional_layouts(self):
        return self._optional

    def describe(self) -> str:
        return self.with_origin(f"gptq ({self.settings.label()})")

    def canonical(self, t: dict[str, torch.Tensor]):
        qweight = t["qweight"]  # [K / pack, N]
        q = qweight if self.bits == 4 else unpack(qweight, self.bits, dim=0)  # 4-bit: canonical
        zeros = unpack(t["qzeros"], self.bits, dim=1).to(torch.int16)  # [K / G, N]
        if self.settings.v1_zeros:
            zeros = zeros + 1
        return q, t["scales"], zeros, t.get("g_idx")


class GPTQConfig(QuantizationConfig):
    """quant_method "gptq": bits, group_size, sym, desc_act, checkpoint_format (or GPTQModel's
    "format"), pack_dtype, lm_head and GPTQModel's per-module `dynamic` overrides."""

    name = "gptq"

    def __init__(self, settings: GPTQSettings, dynamic: dict[str, dict[str, Any]] | None = None):
        self.settings = settings
        self.dynamic = dynamic or {}

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str) -> GPTQConfig:
        fmt = cfg.get("checkpoint_format") or cfg.get("format") or "gptq"
        if fmt not in CHECKPOINT_FORMATS:
            raise QuantizationConfigError(
                f"{source}: gptq checkpoint_format {fmt!r} is not supported; supported: "
                f"{', '.join(CHECKPOINT_FORMATS)}"
            )
        pack_dtype = cfg.get("pack_dtype", "int32")
        if pack_dtype != "int32":
            raise QuantizationConfigError(
                f"{source}: gptq pack_dtype {pack_dtype!r} is not supported; supported: int32"
            )
        if cfg.get("lm_head"):
            raise QuantizationConfigError(
                f"{source}: gptq lm_head=true (a quantized LM head) is not supported; supported: "
                "lm_head false"
            )
        settings = GPTQSettings(
            bits=int(require(cfg, "bits", source, "gptq")),
            group_size=int(require(cfg, "group_size", source, "gptq")),
            sym=bool(cfg.get("sym", True)),
            desc_act=bool(cfg.get("desc_act", False)),
            v1_zeros=fmt == "gptq",
        )
        dynamic = cfg.get("dynamic") or {}
        for key, override in dynamic.items():
            bad = sorted(set(override or {}) - {"bits", "group_size", "sym", "desc_act"})
            if bad and not key.startswith("-:"):
                raise QuantizationConfigError(
                    f"{source}: gptq dynamic[{key!r}] overrides {bad}; supported overrides: "
                    "bits, group_size, sym, desc_act"
                )
        return cls(settings, dynamic)

    def describe(self) -> str:
        return f"gptq ({self.settings.label()})"

    def settings_for(self, module: str) -> GPTQSettings | None:
        """GPTQModel's dynamic rules: "-:regex" skips a module, "+:regex" or "regex" overrides."""
        for key, override in self.dynamic.items():
            skip = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("-:", "+:") else key
            if re.match(pattern, module):
                if skip:
                    return None
                return replace(self.settings, **(override or {}))
        return self.settings

    def linear_method(self, spec: LinearSpec, backend: Backend) -> GPTQLinearMethod | None:
        settings = same_for_all_parts(spec, [self.settings_for(p.prefix) for p in spec.parts])
        return None if settings is None else GPTQLinearMethod(spec, backend, settings)


def same_for_all_parts(spec: LinearSpec, per_part: list[Any]) -> Any:
    """A fused layer runs one GEMM: its parts (q/k/v, gate/up) need one quantization setting."""
    if any(s != per_part[0] for s in per_part[1:]):
        names = ", ".join(f"{p.prefix}: {s}" for p, s in zip(spec.parts, per_part, strict=True))
        raise QuantizationConfigError(
            f"the fused {spec.layer_type} needs one quantization setting for its parts, got {names}"
        )
    return per_part[0]
