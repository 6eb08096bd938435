"""The quantization-method machinery: a config per checkpoint format gives each linear layer a
`LinearMethod` that checks, loads (tensor-parallel sharded), repacks and applies its weights.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.parallel import TensorSource, WeightLoadError
from hal.backend import Backend
from hal.errors import HalError

logger = logging.getLogger(__name__)


class QuantizationConfigError(HalError):
    """config.json's quantization_config names a format, packing, bit width or group size this
    engine cannot run; names the field, the value and what is supported."""


class QuantizedWeightError(WeightLoadError):
    """A quantized layer's tensor is missing, misshapen or of the wrong dtype, or its shard does
    not fall on a group or packing boundary; names the tensor, the value and the constraint."""


@dataclass(frozen=True)
class Part:
    """One checkpoint module of a (possibly fused) layer: its name, full output rows, and the
    [start, stop) of those rows this rank holds."""

    prefix: str  # e.g. "model.layers.0.self_attn.q_proj"
    full_n: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer as the quantization code sees it: W is [N, K] split into parts along N.

    Column-parallel layers hold every K column and a slice of each part's rows; a row-parallel
    layer holds one whole part and the [k_start, k_stop) slice of K.
    """

    layer_type: str  # "qkv_proj", "o_proj", "gate_up_proj", "down_proj", ...
    parts: tuple[Part, ...]
    input_size: int  # full K
    k_start: int
    k_stop: int
    params_dtype: torch.dtype  # the model's activation dtype

    @property
    def is_row_parallel(self) -> bool:
        return self.k_stop - self.k_start != self.input_size

    @property
    def n_local(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def k_local(self) -> int:
        return self.k_stop - self.k_start


@dataclass(frozen=True)
class TensorLayout:
    """How one checkpoint tensor of a quantized module is laid out and sharded.

    shape(n, k) gives the full checkpoint shape of a module with n output rows and k inputs.
    n_dim/k_dim: the dims that run along N and K (None: not split that way, every rank reads it
    whole along that axis); n_div/k_div: how many of N or K one index of that dim covers (8 for a
    4-bit packing, the group size for scales).
    """

    suffix: str
    shape: Any  # Callable[[int, int], tuple[int, ...]]
    n_dim: int | None
    n_div: int = 1
    k_dim: int | None = None
    k_div: int = 1
    dtypes: tuple[torch.dtype, ...] = ()  # accepted checkpoint dtypes (empty: any)
    what: str = ""  # "packing" or "group size", for messages
    shared: bool = False  # one tensor for the whole layer: every part must hold the same values


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _slice_of(start: int, stop: int, div: int, name: str, axis: str, what: str) -> tuple[int, int]:
    if start % div or stop % div:
        raise QuantizedWeightError(
            f"tensor {name!r}: this rank's {axis} slice [{start}:{stop}] does not fall on the "
            f"{what} boundary of {div}; choose a tensor_parallel_size that splits {axis} into "
            f"multiples of {div}"
        )
    return start // div, stop // div


def check_tensor(source: TensorSource, spec: LinearSpec, layout: TensorLayout) -> None:
    """Presence, full shape and shard alignment of `layout` for every part, reading no data."""
    for part in spec.parts:
        name = f"{part.prefix}.{layout.suffix}"
        if not source.has(name):
            raise QuantizedWeightError(
                f"{source.location(name)}: tensor {name!r} is missing (the checkpoint's "
                f"quantization_config needs it)"
            )
        expected = tuple(layout.shape(part.full_n, spec.input_size))
        actual = tuple(source.shape(name))
        if actual != expected and not (expected == (1,) and actual == ()):
            raise QuantizedWeightError(
                f"{source.location(name)}: tensor {name!r} has shape {list(actual)}, expected "
                f"{list(expected)} for a [{part.full_n}, {spec.input_size}] weight"
            )
        if layout.n_dim is not None and part.size != part.full_n:
            _slice_of(part.start, part.stop, layout.n_div, name, "N", layout.what or "packing")
        if layout.k_dim is not None and spec.is_row_parallel:
            _slice_of(spec.k_start, spec.k_stop, layout.k_div, name, "K", layout.what or "group")


def read_tensor(source: TensorSource, spec: LinearSpec, layout: TensorLayout) -> torch.Tensor:
    """This rank's slice of `layout`, every part's rows concatenated along n_dim, on the CPU.

    A tensor with no N dim comes back as one value per part ([num_parts], a per-tensor scale), or,
    when `shared` (g_idx), once, after checking that every part holds the same values.
    """
    pieces = []
    for part in spec.parts:
        name = f"{part.prefix}.{layout.suffix}"
        if layout.n_dim is not None and part.size != part.full_n:
            lo, hi = _slice_of(part.start, part.stop, layout.n_div, name, "N", "packing")
            t = source.read(name, layout.n_dim, lo, hi)
        elif layout.k_dim is not None and spec.is_row_parallel:
            lo, hi = _slice_of(spec.k_start, spec.k_stop, layout.k_div, name, "K", "group")
            t = source.read(name, layout.k_dim, lo, hi)
        else:
            t = source.read(name)
        if layout.dtypes and t.dtype not in layout.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in layout.dtypes)
            raise QuantizedWeightError(
                f"{source.location(name)}: tensor {name!r} has dtype "
                f"{str(t.dtype).removeprefix('torch.')}, expected {allowed}"
            )
        if layout.shared:
            if pieces and not torch.equal(pieces[0], t):
                raise QuantizedWeightError(
                    f"{source.location(name)}: tensor {name!r} differs from "
                    f"{spec.parts[0].prefix}.{layout.suffix}; the fused {spec.layer_type} runs "
                    "one GEMM, so its parts must share it"
                )
            pieces.append(t)
            continue
        pieces.append(t.reshape(1) if layout.n_dim is None else t)
    if layout.shared:
        return pieces[0]
    return torch.cat(pieces, dim=layout.n_dim if layout.n_dim is not None else 0)


def set_param(layer: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    """Register (or replace) a frozen parameter on `layer`, so the memory plan counts its bytes."""
    layer.register_parameter(name, nn.Parameter(value.to(device).contiguous(), requires_grad=False))


def per_part_rows(values: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    """[num_parts] per-tensor values -> fp32 [N_local, 1], each part's value on its rows."""
    sizes = torch.tensor([p.size for p in spec.parts])
    return values.to(torch.float32).repeat_interleave(sizes).reshape(-1, 1)


@dataclass(frozen=True)
class QuantizedActivation:
    """A linear layer's input already quantized per token to FP8 by the op before it (the
    backend's `rms_norm_quant_fp8` / `silu_and_mul_quant_fp8`), for a method whose
    `fp8_input_dtype` asked for it: q fp8 [M, K], scale fp32 [M, 1], and the float dtype the
    layer returns (the model's)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class LinearMethod(ABC):
    """One quantized layer's weights: `check` (no data read), `load`, `apply`, `dequantize`."""

    def __init__(self, spec: LinearSpec, backend: Backend) -> None:
        self.spec = spec
        self.backend = backend

    def fp8_input_dtype(self, layer: nn.Module) -> torch.dtype | None:
        """The FP8 dtype this layer quantizes its input to per token, dynamically (then the op
        before it may hand `apply` a QuantizedActivation instead); None: it takes floats."""
        return None

    @property
    @abstractmethod
    def layouts(self) -> tuple[TensorLayout, ...]:
        """The checkpoint tensors this layer reads (beyond the float bias)."""

    @property
    @abstractmethod
    def kernel(self) -> str:
        """The backend op (and its chosen implementation) that runs this layer."""

    def describe(self) -> str:
        """The format and settings, for the start-up log."""
        return type(self).__name__

    def check(self, source: TensorSource) -> None:
        """Every tensor present, shaped and shardable: raises before any weight is read."""
        for layout in self.layouts:
            check_tensor(source, self.spec, layout)

    @abstractmethod
    def load(self, layer: nn.Module, source: TensorSource) -> None:
        """Read this rank's shards, repack them and register them as parameters of `layer`."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [M, K_local] -> [M, N_local] in x's dtype, through the backend's quantized op."""

    @abstractmethod
    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The float weight [N_local, K_local] (fp32) the layer's quantized form stands for."""


class QuantizationConfig(ABC):
    """A checkpoint format's settings, parsed from quantization_config; one per model."""

    name: str = "abstract"

    @abstractmethod
    def linear_method(self, spec: LinearSpec, backend: Backend) -> LinearMethod | None:
        """The method for one layer, or None when the layer stays unquantized (ignored)."""

    def describe(self) -> str:
        return self.name


def name_matches(name: str, patterns: list[str] | tuple[str, ...], class_name: str = "") -> bool:
    """compressed-tensors/GPTQModel matching: "re:<regex>" (re.match), an exact module name, a
    dotted suffix of it ("q_proj" or "self_attn.q_proj"), or the module class ("Linear")."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or name.endswith("." + p) or (class_name and p == class_name):
            return True
    return False


def require(cfg: dict[str, Any], key: str, source: str, method: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise QuantizationConfigError(
            f"{source}: quantization_config ({method}) lacks the field {key!r}"
        )
    return cfg[key]
