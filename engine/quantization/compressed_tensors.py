"""compressed-tensors checkpoints (llm-compressor): config_groups of targets with weight and input
activation schemes, an ignore list, and a format per model or per group.

pack-quantized (W4A16 / W8A16): weight_packed int32 [N, K / pack] along K holding q + 2^(b-1);
weight_scale [N, K / G] (or [N, 1] per channel); asymmetric weight_zero_point int32 [N / pack,
K / G] packed along N with the same offset; optional weight_g_idx [K]. W = (q - zp) * s.
int-quantized (W8A8): weight int8 [N, K], weight_scale [N, 1]; activations per token, dynamic,
scale = absmax / 127.5, q = clamp(round(x / scale), -128, 127) (as compressed-tensors computes
it: absmax / 127 does not reproduce it). float-quantized: FP8, see `engine.quantization.fp8`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.parallel import TensorSource
from engine.quantization.base import (
    LinearMethod,
    LinearSpec,
    QuantizationConfig,
    QuantizationConfigError,
    TensorLayout,
    name_matches,
    per_part_rows,
    read_tensor,
    set_param,
)
from engine.quantization.fp8 import FP8LinearMethod
from engine.quantization.gptq import same_for_all_parts
from engine.quantization.packing import unpack
from engine.quantization.weight_only import WeightOnlyMethod, packed_layouts
from hal.backend import Backend

logger = logging.getLogger(__name__)

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
INT8_ACT_SCALE_DIVISOR = 127.5  # compressed-tensors: absmax / ((127 - (-128)) / 2)
_FP32_EPS = float(torch.finfo(torch.float32).eps)  # compressed-tensors' floor of every scale


@dataclass(frozen=True)
class Scheme:
    """One config group's quantization, reduced to what the engine needs."""

    format: str
    weight_type: str  # "int" or "float"
    num_bits: int
    symmetric: bool
    strategy: str  # "tensor", "channel", "group", "block"
    group_size: int | None
    block: tuple[int, int] | None
    actorder: str | None
    act: str  # "none", "dynamic_token", "dynamic_group", "static_tensor"

    def label(self) -> str:
        w = f"{self.weight_type}{self.num_bits}"
        g = f" group {self.group_size}" if self.strategy == "group" else f" {self.strategy}"
        sym = "" if self.symmetric else " asym"
        order = ", actorder group (g_idx)" if self.actorder == "group" else ""
        return f"compressed-tensors {self.format} ({w}{g}{sym}{order}, activations {self.act})"


def _parse_scheme(group: dict[str, Any], fmt: str | None, name: str, source: str) -> Scheme:
    fmt = group.get("format") or fmt
    if fmt not in FORMATS:
        raise QuantizationConfigError(
            f"{source}: compressed-tensors format {fmt!r} (config group {name!r}) is not "
            f"supported; supported: {', '.join(FORMATS)}"
        )
    w = group.get("weights")
    if not w:
        raise QuantizationConfigError(
            f"{source}: compressed-tensors config group {name!r} has no weights scheme"
        )
    if group.get("output_activations"):
        raise QuantizationConfigError(
            f"{source}: compressed-tensors config group {name!r}: output_activations are not "
            "supported"
        )
    block = tuple(w["block_structure"]) if w.get("block_structure") else None
    act = "none"
    a = group.get("input_activations")
    if a:
        if a.get("type", "int") != w.get("type", "int") or int(a.get("num_bits", 8)) != 8:
            raise QuantizationConfigError(
                f"{source}: compressed-tensors config group {name!r}: input activations "
                f"{a.get('type')}{a.get('num_bits')} with {w.get('type')} weights are not "
                "supported; supported: int8 with int8 weights, float8 with float8 weights"
            )
        if not a.get("symmetric", True):
            raise QuantizationConfigError(
                f"{source}: compressed-tensors config group {name!r}: asymmetric input "
                "activations are not supported; supported: symmetric"
            )
        strategy, dynamic = a.get("strategy", "tensor"), a.get("dynamic", False)
        if dynamic and strategy == "token":
            act = "dynamic_token"
        elif dynamic and strategy == "group" and a.get("group_size") == (block or (0, 0))[1]:
            act = "dynamic_group"
        elif not dynamic and strategy == "tensor":
            act = "static_tensor"
        else:
            raise QuantizationConfigError(
                f"{source}: compressed-tensors config group {name!r}: input activations "
                f"strategy {strategy!r} dynamic={dynamic} are not supported; supported: dynamic "
                "token, dynamic group (with matching block weights), static tensor"
            )
    return Scheme(
        format=fmt,
        weight_type=w.get("type", "int"),
        num_bits=int(w.get("num_bits", 8)),
        symmetric=bool(w.get("symmetric", True)),
        strategy=w.get("strategy", "tensor"),
        group_size=w.get("group_size"),
        block=block,
        actorder=w.get("actorder"),
        act=act,
    )


class CTWeightOnlyMethod(WeightOnlyMethod):
    """pack-quantized int4 / int8 weights, activations in float."""

    format_name = "compressed-tensors pack-quantized"

    def __init__(self, spec: LinearSpec, backend: Backend, scheme: Scheme) -> None:
        group = scheme.group_size if scheme.strategy == "group" else -1
        super().__init__(spec, backend, scheme.num_bits, group, scheme.actorder == "group")
        self.scheme = scheme
        self._layouts = packed_layouts(
            self.bits, self.group_size, self.full_groups, n_major=True,
            zeros=not scheme.symmetric, g_idx=self.act_order,
            names=("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"),
        )  # fmt: skip

    @property
    def layouts(self):
        return self._layouts

    def describe(self) -> str:
        return self.scheme.label()

    def canonical(self, t: dict[str, torch.Tensor]):
        offset = 1 << (self.bits - 1)  # stored code = q + offset, so the code is q's unsigned form
        codes = unpack(t["weight_packed"], self.bits, dim=1)  # [N, K]
        scales = t["weight_scale"].t()  # [groups, N]
        if self.scheme.symmetric:
            zeros = torch.full(scales.shape, offset, dtype=torch.int16)
        else:
            zeros = unpack(t["weight_zero_point"], self.bits, dim=0).t().to(torch.int16)
        return codes.t(), scales.contiguous(), zeros, t.get("weight_g_idx")


class CTInt8Method(LinearMethod):
    """W8A8 int8: weight int8 [N, K] per channel (or tensor), activations int8 per token."""

    def __init__(self, spec: LinearSpec, backend: Backend, scheme: Scheme) -> None:
        super().__init__(spec, backend)
        self.scheme = scheme
        layouts = [TensorLayout("weight", lambda n, k: (n, k), 0, 1, 1, 1, (torch.int8,))]
        if scheme.strategy == "channel":
            layouts.append(TensorLayout("weight_scale", lambda n, k: (n, 1), 0, 1, None))
        else:
            layouts.append(TensorLayout("weight_scale", lambda n, k: (1,), None))
        if scheme.act == "static_tensor":
            layouts.append(TensorLayout("input_scale", lambda n, k: (1,), None))
        self._layouts = tuple(layouts)

    @property
    def layouts(self):
        return self._layouts

    def describe(self) -> str:
        return self.scheme.label()

    @property
    def kernel(self) -> str:
        return f"int8_linear ({self.backend.chosen('int8_gemm')})"

    def load(self, layer: nn.Module, source: TensorSource) -> None:
        device = self.backend.device
        set_param(layer, "weight", read_tensor(source, self.spec, self._layouts[0]), device)
        scale = read_tensor(source, self.spec, self._layouts[1]).to(torch.float32)
        if self.scheme.strategy != "channel":
            scale = per_part_rows(scale, self.spec)
        set_param(layer, "weight_scale", scale, device)  # fp32 [N, 1]
        if self.scheme.act == "static_tensor":
            s = read_tensor(source, self.spec, self._layouts[2]).to(torch.float32).amax()
            set_param(layer, "input_scale", s.reshape(1), device)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.to(torch.float32) * layer.weight_scale

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.scheme.act == "static_tensor":
            x_scale = layer.input_scale
        else:
            absmax = x.abs().amax(dim=1, keepdim=True).to(torch.float32)  # [M, 1]
            x_scale = (absmax / INT8_ACT_SCALE_DIVISOR).clamp(min=_FP32_EPS)
        x_q, x_scale = self.backend.quantize_int8(x, scale=x_scale)  # given scale: static path
        return self.backend.int8_linear(
            x_q, x_scale, layer.weight, layer.weight_scale, bias, out_dtype=x.dtype
        )


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        self.source = source
        status = cfg.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise QuantizationConfigError(
                f"{source}: compressed-tensors quantization_status {status!r} is not supported; "
                "supported: compressed"
            )
        sparsity = cfg.get("sparsity_config") or {}
        if sparsity.get("format") not in (None, "dense"):
            raise QuantizationConfigError(
                f"{source}: compressed-tensors sparsity format {sparsity.get('format')!r} is not "
                "supported; supported: none (dense)"
            )
        if cfg.get("kv_cache_scheme"):
            logger.warning(
                "%s: compressed-tensors kv_cache_scheme ignored: the KV cache stays in the model "
                "dtype (its FP8 scales are not used)",
                source,
            )
        groups = cfg.get("config_groups") or {}
        if not groups:
            raise QuantizationConfigError(
                f"{source}: compressed-tensors config has no config_groups"
            )
        fmt = cfg.get("format")
        self.groups = []
        for name, group in groups.items():
            scheme = _parse_scheme(group, fmt, name, source)
            self._validate(scheme, name)
            self.groups.append((list(group.get("targets") or []), scheme))
        self.ignore = list(cfg.get("ignore") or [])

    def _validate(self, s: Scheme, name: str) -> None:
        where = f"{self.source}: compressed-tensors config group {name!r}"
        if s.format == "pack-quantized":
            ok = s.weight_type == "int" and s.num_bits in (4, 8) and s.act == "none"
            ok = ok and s.strategy in ("group", "channel")
            what = "int4/int8 weights, group or channel strategy, no input activations"
        elif s.format in ("int-quantized", "naive-quantized"):
            ok = s.weight_type == "int" and s.num_bits == 8 and s.symmetric
            ok = ok and s.strategy in ("channel", "tensor") and s.act != "none"
            ok = ok and s.act in ("dynamic_token", "static_tensor")
            what = "symmetric int8 weights per channel or tensor with int8 activations"
        else:
            ok = s.weight_type == "float" and s.num_bits == 8 and s.symmetric
            ok = ok and s.strategy in ("tensor", "channel", "block")
            ok = ok and (s.strategy != "block" or s.act in ("dynamic_group", "none"))
            what = "float8 weights per tensor, channel or block (block with group activations)"
        if not ok:
            raise QuantizationConfigError(
                f"{where}: {s.format} with {s.weight_type}{s.num_bits} "
                f"{'sym' if s.symmetric else 'asym'} weights, strategy {s.strategy!r}, "
                f"activations {s.act} is not supported; supported: {what}"
            )
        if s.actorder not in (None, "group", "weight", "static", False):
            raise QuantizationConfigError(
                f"{where}: actorder {s.actorder!r} is not supported; supported: group, weight"
            )

    def describe(self) -> str:
        return "compressed-tensors (" + "; ".join(s.label() for _, s in self.groups) + ")"

    def scheme_for(self, module: str) -> Scheme | None:
        if name_matches(module, self.ignore, "Linear"):
            return None
        for targets, scheme in self.groups:
            if name_matches(module, targets, "Linear"):
                return scheme
        return None

    def linear_method(self, spec: LinearSpec, backend: Backend) -> LinearMethod | None:
        scheme = same_for_all_parts(spec, [self.scheme_for(p.prefix) for p in spec.parts])
        if scheme is None:
            return None
        if scheme.format == "pack-quantized":
            return CTWeightOnlyMethod(spec, backend, scheme)
        if scheme.format in ("int-quantized", "naive-quantized"):
            return CTInt8Method(spec, backend, scheme)
        return FP8LinearMethod(
            spec, backend, scheme.strategy, scheme.act, scheme.block or (128, 128),
            label="compressed-tensors float-quantized",
        )  # fmt: skip
