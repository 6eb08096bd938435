"""AutoRound checkpoints (quant_method "auto-round"): its own format names its packing in
`packing_format`; its auto_gptq / auto_awq exports are plain GPTQ / AWQ checkpoints.

packing_format (auto-round 0.16): "auto_round:auto_gptq" (the symmetric default) packs like GPTQ v1
(stored zero = z - 1); "auto_round" (asymmetric; also ":gptqmodel", ":triton", ":exllamav2"
backends) packs GPTQ's layout with zeros as they are (v2); "auto_round:auto_awq" packs like AWQ.
"""

from __future__ import annotations

from typing import Any

from engine.quantization.awq import AWQLinearMethod
from engine.quantization.base import (
    LinearSpec,
    QuantizationConfig,
    QuantizationConfigError,
    require,
)
from engine.quantization.gptq import GPTQLinearMethod, GPTQSettings, same_for_all_parts
from engine.quantization.weight_only import WeightOnlyMethod
from hal.backend import Backend

_GPTQ_V2_BACKENDS = ("", "gptqmodel", "triton", "exllamav2", "torch")


def packing_kind(packing_format: str, source: str) -> str:
    """The layout ("gptq_v1", "gptq_v2" or "awq") of an auto-round packing_format."""
    pf = packing_format.replace("autoround", "auto_round").replace("auto-round", "auto_round")
    head, _, rest = pf.partition(":")
    if head == "auto_round":
        if "awq" in rest:
            return "awq"
        if "gptq" in rest and "gptqmodel" not in rest:
            return "gptq_v1"
        if rest.split(":")[0] in _GPTQ_V2_BACKENDS:
            return "gptq_v2"
    raise QuantizationConfigError(
        f"{source}: auto-round packing_format {packing_format!r} is not supported; supported: "
        "auto_round:auto_gptq, auto_round:auto_awq, auto_round (:gptqmodel, :triton, :exllamav2)"
    )


class AutoRoundConfig(QuantizationConfig):
    """bits, group_size, sym, packing_format, data_type "int", act_bits 16, extra_config per-layer
    overrides (bits >= 16: left unquantized), block_name_to_quantize."""

    name = "auto-round"

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        self.bits = int(require(cfg, "bits", source, "auto-round"))
        self.group_size = int(require(cfg, "group_size", source, "auto-round"))
        self.sym = bool(cfg.get("sym", True))
        self.packing_format = cfg.get("packing_format") or "auto_round:auto_gptq"
        self.kind = packing_kind(self.packing_format, source)
        data_type = cfg.get("data_type", "int")
        if data_type != "int":
            raise QuantizationConfigError(
                f"{source}: auto-round data_type {data_type!r} is not supported; supported: int"
            )
        act_bits = int(cfg.get("act_bits", 16) or 16)
        if act_bits < 16:
            raise QuantizationConfigError(
                f"{source}: auto-round act_bits={act_bits} (quantized activations) is not "
                "supported; supported: 16 (weight-only)"
            )
        self.extra = cfg.get("extra_config") or {}
        blocks = cfg.get("block_name_to_quantize") or cfg.get("to_quant_block_names")
        if isinstance(blocks, str):
            blocks = [b.strip() for b in blocks.split(",")]
        self.blocks = [b for b in (blocks or []) if isinstance(b, str)]

    def describe(self) -> str:
        return (
            f"auto-round ({self.bits}-bit, group {self.group_size}, "
            f"{'sym' if self.sym else 'asym'}, {self.packing_format})"
        )

    def _settings(self, module: str) -> tuple[int, int, bool] | None:
        if self.blocks and not any(module.startswith(b) for b in self.blocks):
            return None
        extra = self.extra.get(module, {})
        bits = int(extra.get("bits", self.bits))
        if bits >= 16:
            return None
        return bits, int(extra.get("group_size", self.group_size)), bool(extra.get("sym", self.sym))

    def linear_method(self, spec: LinearSpec, backend: Backend) -> WeightOnlyMethod | None:
        settings = same_for_all_parts(spec, [self._settings(p.prefix) for p in spec.parts])
        if settings is None:
            return None
        bits, group_size, sym = settings
        method: WeightOnlyMethod
        if self.kind == "awq":
            method = AWQLinearMethod(spec, backend, bits, group_size)
        else:
            gptq = GPTQSettings(bits, group_size, sym, False, v1_zeros=self.kind == "gptq_v1")
            method = GPTQLinearMethod(spec, backend, gptq)
        method.origin = f"auto-round {self.packing_format}"
        return method
