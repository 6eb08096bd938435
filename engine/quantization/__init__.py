"""Quantized linear layers: one `QuantizationConfig` per checkpoint format (GPTQ, AWQ, AutoRound,
compressed-tensors, FP8, GGUF blocks) or online FP8, each giving every linear layer a
`LinearMethod`.

`get_quantization_config(quantization_config, quantization, backend, source)` picks the config
from config.json's quantization_config and the user's `quantization` argument.
"""

from __future__ import annotations

from typing import Any

from engine.quantization.auto_round import AutoRoundConfig
from engine.quantization.awq import AWQConfig
from engine.quantization.base import (
    LinearMethod,
    LinearSpec,
    Part,
    QuantizationConfig,
    QuantizationConfigError,
    QuantizedWeightError,
)
from engine.quantization.compressed_tensors import CompressedTensorsConfig
from engine.quantization.fp8 import FP8Config, FP8UnavailableError, OnlineFP8Config
from engine.quantization.gguf import GGUFConfig
from engine.quantization.gptq import GPTQConfig
from hal.backend import Backend

__all__ = [
    "LinearMethod",
    "LinearSpec",
    "Part",
    "QuantizationConfig",
    "QuantizationConfigError",
    "QuantizedWeightError",
    "FP8UnavailableError",
    "QUANT_METHODS",
    "ONLINE_METHODS",
    "get_quantization_config",
]

# quant_method in config.json -> parser(cfg, source)
QUANT_METHODS = {
    "gptq": GPTQConfig.from_dict,
    "awq": AWQConfig.from_dict,
    "auto-round": AutoRoundConfig,
    "intel/auto-round": AutoRoundConfig,
    "compressed-tensors": CompressedTensorsConfig,
    "fp8": FP8Config,
    "gguf": GGUFConfig,  # written by engine.loader.gguf for a .gguf file's block weights
}
# `quantization=` values that quantize a float checkpoint at load.
ONLINE_METHODS = ("fp8",)


def get_quantization_config(
    quantization_config: dict[str, Any] | None,
    quantization: str | None = None,
    backend: Backend | None = None,
    source: str = "config.json",
) -> QuantizationConfig | None:
    """The model's quantization: the checkpoint's quantization_config if it has one (a
    `quantization` argument must then agree with it), else online `quantization`, else None."""
    if quantization is not None and quantization not in ONLINE_METHODS:
        raise QuantizationConfigError(
            f"quantization: {quantization!r} is not supported; supported: "
            f"{', '.join(ONLINE_METHODS)} (pre-quantized checkpoints are detected from "
            "config.json's quantization_config)"
        )
    if quantization_config:
        if not isinstance(quantization_config, dict):
            raise QuantizationConfigError(
                f"{source}: quantization_config must be an object, got "
                f"{type(quantization_config).__name__}"
            )
        method = str(quantization_config.get("quant_method", "")).lower()
        if method not in QUANT_METHODS:
            raise QuantizationConfigError(
                f"{source}: quant_method {method or None!r} is not supported; supported: "
                f"{', '.join(QUANT_METHODS)}"
            )
        if quantization is not None and quantization != method:
            raise QuantizationConfigError(
                f"quantization: {quantization!r} was asked for, but {source} holds a {method} "
                "checkpoint; online quantization applies only to float checkpoints (drop the "
                "quantization argument to run it as it is)"
            )
        return QUANT_METHODS[method](quantization_config, source)
    if quantization == "fp8":
        return OnlineFP8Config(backend)
    return None
