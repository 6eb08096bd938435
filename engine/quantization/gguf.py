"""GGUF weights kept quantized: linear layers whose GGUF tensors are Q4_0, Q4_1, Q8_0, Q4_K or
Q6_K keep their ggml blocks, prepared once by `backend.prepare_gguf` and run by
`backend.gguf_linear`; F32/F16/BF16 tensors and other quant types are dequantized at load.

A fused layer (qkv_proj, gate_up_proj) concatenates its parts' block rows along N, which is
lossless (a row is its own blocks); parts of different types stay separate GEMMs side by side.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from engine.parallel import TensorSource
from engine.quantization.base import (
    LinearMethod,
    LinearSpec,
    Part,
    QuantizationConfig,
    QuantizationConfigError,
    QuantizedWeightError,
    TensorLayout,
)
from hal.backend import GGUF_BLOCK_TYPES, Backend, GGUFWeight

logger = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")  # read dequantized (they are floats already)
DEQUANTIZE_ENV = "HAL_GGUF_DEQUANTIZE"  # engine.loader.gguf reads it; named here for messages


class GGUFLinearMethod(LinearMethod):
    """One layer's GGUF blocks: one prepared weight per run of parts sharing a type."""

    def __init__(self, spec: LinearSpec, backend: Backend, qtypes: tuple[str, ...]) -> None:
        super().__init__(spec, backend)
        if len(qtypes) != len(spec.parts):
            raise ValueError(f"qtypes: got {len(qtypes)}, expected one per part")
        self.qtypes = qtypes
        # [(qtype, parts)]: consecutive parts of one type share one GEMM.
        self.segments: list[tuple[str, list[Part]]] = []
        for part, qtype in zip(spec.parts, qtypes, strict=True):
            if self.segments and self.segments[-1][0] == qtype:
                self.segments[-1][1].append(part)
            else:
                self.segments.append((qtype, [part]))

    @property
    def layouts(self) -> tuple[TensorLayout, ...]:
        return ()  # `check` reads the GGUF types and shapes itself

    @property
    def kernel(self) -> str:
        calls = f", {len(self.segments)} GEMMs" if len(self.segments) > 1 else ""
        return f"gguf_linear ({self.backend.chosen('gguf_gemm')}{calls})"

    def describe(self) -> str:
        return f"gguf {'/'.join(dict.fromkeys(self.qtypes))} blocks"

    def check(self, source: TensorSource) -> None:
        spec = self.spec
        for part, qtype in zip(spec.parts, self.qtypes, strict=True):
            name = f"{part.prefix}.weight"
            where = source.location(name)
            if not hasattr(source, "read_blocks"):
                raise QuantizedWeightError(
                    f"{where}: tensor {name!r} is GGUF {qtype}, but this source "
                    f"({type(source).__name__}) cannot read raw blocks; load it from its .gguf"
                )
            if not source.has(name):
                raise QuantizedWeightError(f"{where}: tensor {name!r} is missing")
            expected = (part.full_n, spec.input_size)
            if tuple(source.shape(name)) != expected:
                raise QuantizedWeightError(
                    f"{where}: tensor {name!r} has shape {list(source.shape(name))}, expected "
                    f"{list(expected)}"
                )
            found = source.tensor_type(name)
            if found != qtype:
                raise QuantizedWeightError(
                    f"{where}: tensor {name!r} is {found}, but the model was built for {qtype}"
                )
            block = GGUF_BLOCK_TYPES[qtype][0]
            if spec.is_row_parallel and (spec.k_start % block or spec.k_stop % block):
                raise QuantizedWeightError(
                    f"{where}: tensor {name!r} is {qtype}, whose rows hold whole blocks of "
                    f"{block} values, but this rank's K slice [{spec.k_start}:{spec.k_stop}] "
                    f"of K = {spec.input_size} does not fall on a block boundary; choose a "
                    f"tensor_parallel_size that splits {spec.input_size} into multiples of "
                    f"{block}, or set {DEQUANTIZE_ENV}=1 to load the weights dequantized"
                )

    def _read(self, source: TensorSource, part: Part) -> torch.Tensor:
        # This rank's blocks of one part: uint8 [part rows, K_local / block * type_size]
        name, spec = f"{part.prefix}.weight", self.spec
        if spec.is_row_parallel:
            return source.read_blocks(name, 1, spec.k_start, spec.k_stop)
        if part.size != part.full_n:
            return source.read_blocks(name, 0, part.start, part.stop)
        return source.read_blocks(name)

    def load(self, layer: nn.Module, source: TensorSource) -> None:
        weights = []
        for i, (qtype, parts) in enumerate(self.segments):
            pieces = [self._read(source, part) for part in parts]
            blocks = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # rows along N
            n = sum(p.size for p in parts)
            weight = self.backend.prepare_gguf(blocks, qtype, n, self.spec.k_local)
            suffix = "" if len(self.segments) == 1 else f"_{i}"
            for key, t in weight.tensors.items():
                # A parameter shares t's storage, so the memory plan counts the real bytes.
                param = nn.Parameter(t, requires_grad=False)
                layer.register_parameter(f"gguf_{key}{suffix}", param)
                weight.tensors[key] = param
            weights.append(weight)
        layer.gguf_weights = weights

    def _weights(self, layer: nn.Module) -> list[GGUFWeight]:
        weights = getattr(layer, "gguf_weights", None)
        if weights is None:
            raise RuntimeError(f"{self.spec.parts[0].prefix}: GGUF weights used before load()")
        return weights

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: [M, K_local] -> [M, N_local]
        weights = self._weights(layer)
        if len(weights) == 1:
            return self.backend.gguf_linear(x, weights[0], bias)
        outs, start = [], 0
        for w in weights:
            b = None if bias is None else bias[start : start + w.out_features]
            outs.append(self.backend.gguf_linear(x, w, b))
            start += w.out_features
        return torch.cat(outs, dim=-1)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """fp32 [N_local, K_local] through the backend's own GEMM on an identity: exact wherever
        its gguf_linear is exact in fp32 (CPU reference and tiled paths, the Triton kernel)."""
        eye = torch.eye(self.spec.k_local, dtype=torch.float32, device=self.backend.device)
        return torch.cat([self.backend.gguf_linear(eye, w).t() for w in self._weights(layer)])


class GGUFConfig(QuantizationConfig):
    """quant_method "gguf" (set by engine.loader.gguf, never in a config.json): `tensor_types`
    maps each Hugging Face tensor name to its GGML type."""

    name = "gguf"

    def __init__(self, cfg: dict[str, Any], source: str = "model.gguf") -> None:
        types = cfg.get("tensor_types")
        if not isinstance(types, dict) or not types:
            raise QuantizationConfigError(
                f"{source}: quantization_config (gguf) needs 'tensor_types', a mapping of tensor "
                "names to GGML types (engine.loader.gguf.GGUFSource.config() writes it)"
            )
        self.tensor_types = {str(k): str(v) for k, v in types.items()}
        self.source = source
        self._logged: set[tuple[str, tuple[str, ...]]] = set()

    def linear_method(self, spec: LinearSpec, backend: Backend) -> GGUFLinearMethod | None:
        types = tuple(self.tensor_types.get(f"{p.prefix}.weight") for p in spec.parts)
        if any(t is None for t in types):
            return None  # the float loader reports the missing tensor
        if all(t in GGUF_BLOCK_TYPES for t in types):
            return GGUFLinearMethod(spec, backend, types)
        if all(t in FLOAT_TYPES for t in types):
            return None
        other = sorted({t for t in types if t not in GGUF_BLOCK_TYPES and t not in FLOAT_TYPES})
        why = (
            f"{', '.join(other)} has no gguf_gemm kernel (kept as blocks: "
            f"{', '.join(GGUF_BLOCK_TYPES)})"
            if other
            else "its parts mix float and block-quantized tensors"
        )
        key = (spec.layer_type, types)
        if key not in self._logged:
            self._logged.add(key)
            logger.info(
                "gguf: %s (%s) is dequantized at load: %s", spec.layer_type, "/".join(types), why
            )
        return None

    def describe(self) -> str:
        counts = Counter(self.tensor_types.values())
        found = ", ".join(f"{n} {t}" for t, n in counts.most_common())
        return (
            f"gguf ({found}; linear weights of {'/'.join(GGUF_BLOCK_TYPES)} stay blocks, the "
            "rest is dequantized at load)"
        )
