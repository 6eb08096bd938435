"""FP8 layers: checkpoints (quant_method "fp8", compressed-tensors float-quantized) and online FP8
(`quantization="fp8"`: float weights quantized per output channel at load).

Weights: e4m3 [N, K] with a per-tensor, per-channel ([N, 1]) or per-block ([N / 128, K / 128])
scale. Activations: dynamic per token (scale = absmax / fp8_max), per token and 128-column group
for block weights, or one static input_scale. Where the platform computes in e4m3fnuz (AMD
MI300), e4m3fn weights are re-encoded at load: bit pattern -128 (-0) -> 0, scales x 2.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from engine.parallel import TensorSource
from engine.quantization.base import (
    FLOAT_DTYPES,
    LinearMethod,
    LinearSpec,
    QuantizationConfig,
    QuantizationConfigError,
    QuantizedActivation,
    QuantizedWeightError,
    TensorLayout,
    per_part_rows,
    read_tensor,
    set_param,
)
from engine.quantization.gptq import same_for_all_parts
from hal.backend import Backend
from hal.errors import HalError

logger = logging.getLogger(__name__)

E4M3 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
WEIGHT_STRATEGIES = ("tensor", "channel", "block")
ACT_SCHEMES = ("dynamic_token", "dynamic_group", "static_tensor", "none")


class FP8UnavailableError(HalError):
    """Online FP8 asked for on a device without FP8 GEMMs."""


def platform_fp8_dtype(backend: Backend) -> torch.dtype:
    """The FP8 dtype this backend computes in, or an error when the device has no FP8.

    "Has FP8" means the capabilities name a native FP8 format (NVIDIA sm_89+: e4m3fn; AMD
    gfx942: e4m3fnuz; gfx950: e4m3fn), or the device is the CPU, whose reference backend emulates
    every FP8 format exactly (slowly: it is the oracle, not a fast path). A GPU that can only
    store FP8 (sm_80, MI200: "emulated" in its capabilities) has no FP8 GEMM: an error.
    """
    caps = backend.caps
    if caps.fp8_dtype is not None:
        return caps.fp8_dtype
    if caps.vendor == "cpu" and caps.supports("fp8_e4m3fn"):
        return torch.float8_e4m3fn
    cc = f", compute capability {caps.cc_str}" if caps.compute_capability else ""
    raise FP8UnavailableError(
        f"quantization='fp8': {caps.device_name} ({caps.arch}{cc}) has no native FP8 GEMM "
        "(its capabilities name no fp8_format); FP8 needs NVIDIA sm_89+ (Ada, Hopper) or AMD "
        "gfx942+ (MI300); run without quantization, or load a GPTQ/AWQ 4-bit checkpoint"
    )


def to_platform_fp8(
    w: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode e4m3fn weights as e4m3fnuz where the platform computes in fnuz (same bits mean
    half the value there, so scales double; -0 (bits -128) is NaN in fnuz, so it becomes 0)."""
    if fp8_dtype == torch.float8_e4m3fnuz and w.dtype == torch.float8_e4m3fn:
        bits = w.view(torch.int8)
        bits = torch.where(bits == -128, torch.zeros_like(bits), bits)
        return bits.view(torch.float8_e4m3fnuz), scale * 2.0
    return w, scale


class FP8LinearMethod(LinearMethod):
    """An FP8 checkpoint layer: weight e4m3 [N, K] and its scale, through backend.fp8_linear."""

    def __init__(
        self,
        spec: LinearSpec,
        backend: Backend,
        weight_strategy: str,
        act_scheme: str,
        block: tuple[int, int] = (128, 128),
        scale_name: str = "weight_scale",
        label: str = "fp8",
    ) -> None:
        super().__init__(spec, backend)
        if weight_strategy not in WEIGHT_STRATEGIES:
            raise QuantizationConfigError(
                f"{label}: weight strategy {weight_strategy!r} is not supported; supported: "
                f"{', '.join(WEIGHT_STRATEGIES)}"
            )
        if act_scheme not in ACT_SCHEMES:
            raise QuantizationConfigError(
                f"{label}: activation scheme {act_scheme!r} is not supported; supported: "
                f"{', '.join(ACT_SCHEMES)}"
            )
        self.weight_strategy, self.act_scheme = weight_strategy, act_scheme
        self.block, self.scale_name, self.label = tuple(block), scale_name, label
        self.fp8_dtype = backend.caps.fp8_dtype  # None on CPU: keep the checkpoint's format
        layouts = [TensorLayout("weight", lambda n, k: (n, k), 0, 1, 1, 1, E4M3)]
        if weight_strategy == "tensor":
            layouts.append(TensorLayout(scale_name, lambda n, k: (1,), None))
        elif weight_strategy == "channel":
            layouts.append(TensorLayout(scale_name, lambda n, k: (n, 1), 0, 1, None, 1))
        if act_scheme == "static_tensor":
            layouts.append(TensorLayout("input_scale", lambda n, k: (1,), None))
        self._layouts = tuple(layouts)

    @property
    def layouts(self):
        return self._layouts

    def describe(self) -> str:
        w = (
            f"block {self.block[0]}x{self.block[1]}"
            if self.weight_strategy == "block"
            else (f"per-{self.weight_strategy}")
        )
        return f"{self.label} (weights {w}, activations {self.act_scheme.replace('_', ' ')})"

    @property
    def kernel(self) -> str:
        if self.act_scheme == "none":
            return f"dequantize + linear ({self.backend.chosen('gemm')}), FP8 weight-only"
        impl = self.backend.chosen("fp8_gemm")
        if self.weight_strategy == "block":
            impl = self.backend.chosen("fp8_block_gemm")
            per = f"per token per {self.block[1]} columns"
            return f"block-scaled fp8_linear ({impl}), activations {per}"
        if self.act_scheme == "dynamic_token":
            # qkv, gate_up and down_proj get theirs from rms_norm_quant_fp8 / silu_and_mul_quant_fp8
            return (
                f"fp8_linear ({impl}), activations per token (quantized by the norm or SiLU "
                "launch that feeds the layer, where one does)"
            )
        return f"fp8_linear ({impl})"

    # -- load ----------------------------------------------------------------------------------
    def _block_layout(self) -> TensorLayout:
        bn, bk = self.block
        return TensorLayout(
            self.scale_name, lambda n, k: (math.ceil(n / bn), math.ceil(k / bk)), None
        )

    def check(self, source: TensorSource) -> None:
        super().check(source)
        if self.weight_strategy != "block":
            return
        bn, bk = self.block
        layout = self._block_layout()
        for part in self.spec.parts:
            name = f"{part.prefix}.{self.scale_name}"
            if not source.has(name):
                raise QuantizedWeightError(f"{source.location(name)}: tensor {name!r} is missing")
            expected = layout.shape(part.full_n, self.spec.input_size)
            if tuple(source.shape(name)) != expected:
                raise QuantizedWeightError(
                    f"{source.location(name)}: tensor {name!r} has shape "
                    f"{list(source.shape(name))}, expected {list(expected)} ({bn}x{bk} blocks "
                    f"of a [{part.full_n}, {self.spec.input_size}] weight)"
                )
        if self.spec.is_row_parallel and self.spec.k_start % bk:
            raise QuantizedWeightError(
                f"tensor {self.spec.parts[0].prefix}.weight: this rank's K slice starts at "
                f"{self.spec.k_start}, not a multiple of the {bk}-column FP8 block; choose a "
                f"tensor_parallel_size that splits K into multiples of {bk}"
            )

    def _read_block_scales(self, source: TensorSource) -> torch.Tensor:
        """The parts' [N / bn, K / bk] scales for this rank's rows and K blocks: fp32 [N_local /
        bn, K_local / bk] when every part's rows are whole bn-row blocks and K has several blocks
        (the kernels read one scale per bn rows), else one row per weight row [N_local,
        K_local / bk]."""
        bn, bk = self.block
        # One K block (K <= bk) is the per-channel case, whose fp8_linear takes one scale per row
        one_block = math.ceil(self.spec.k_stop / bk) - self.spec.k_start // bk == 1
        whole = not one_block and all(
            p.start % bn == 0 and (p.stop - p.start) % bn == 0 for p in self.spec.parts
        )
        rows = []
        for part in self.spec.parts:
            s = source.read(f"{part.prefix}.{self.scale_name}").to(torch.float32)
            if whole:
                s = s[part.start // bn : part.stop // bn]
            else:
                s = s.repeat_interleave(bn, dim=0)[part.start : part.stop]
            rows.append(s[:, self.spec.k_start // bk : math.ceil(self.spec.k_stop / bk)])
        return torch.cat(rows, dim=0)

    def load(self, layer: nn.Module, source: TensorSource) -> None:
        w = read_tensor(source, self.spec, self._layouts[0])  # [N, K] e4m3
        if self.weight_strategy == "block":
            scale = self._read_block_scales(source)
        elif self.weight_strategy == "tensor":
            scale = per_part_rows(read_tensor(source, self.spec, self._layouts[1]), self.spec)
        else:
            scale = read_tensor(source, self.spec, self._layouts[1]).to(torch.float32)
        checkpoint_dtype = w.dtype
        w, scale = to_platform_fp8(w, scale, self.fp8_dtype)
        if self.weight_strategy == "block":
            w, scale = self._to_blocks(w, scale)
        device = self.backend.device
        set_param(layer, "weight", w, device)  # fp8 [N, K] or, block, [N, G * bk]
        set_param(layer, "weight_scale", scale, device)  # fp32 [N, 1] or, block, [G, N / R]
        if self.act_scheme == "static_tensor":
            # One activation scale for the fused GEMM: the largest of its parts' (vLLM's rule).
            s = read_tensor(source, self.spec, self._layouts[-1]).to(torch.float32).amax()
            if w.dtype != checkpoint_dtype:  # re-encoded for fnuz: half the value per code
                s = s * 2.0
            set_param(layer, "input_scale", s.reshape(1), device)

    def _to_blocks(self, w: torch.Tensor, scale: torch.Tensor):
        """fp8 [N, K] and fp32 [N / R, K / bk] -> [N, G * bk] (a partial last block padded with
        zero codes) and the scales as [G, N / R], whose transpose is the [N / R, G] block-scaled
        fp8_linear takes: one K block's scales for consecutive rows are contiguous."""
        n, k = w.shape
        bk = self.block[1]
        nb = math.ceil(k / bk)
        if k % bk:  # fp8 zeros are the zero bit pattern in every format
            bits = torch.zeros(n, nb * bk, dtype=torch.uint8, device=w.device)
            bits[:, :k] = w.view(torch.uint8)
            w = bits.view(w.dtype)
        return w.contiguous(), scale.t().contiguous()

    # -- run -----------------------------------------------------------------------------------
    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        w, s = layer.weight.to(torch.float32), layer.weight_scale
        if self.weight_strategy == "block":  # [N, G * bk] and [G, N / R] back to [N, K]
            n, nb = w.shape[0], s.shape[0]
            s = s.t().repeat_interleave(n // s.shape[1], dim=0)  # [N, G]
            w = (w.reshape(n, nb, -1) * s[:, :, None]).reshape(n, -1)
            return w[:, : self.spec.k_local]
        return w * s

    def _quantize_x(self, layer: nn.Module, x: torch.Tensor):
        if self.act_scheme == "static_tensor":
            return self.backend.quantize_fp8(x, layer.weight.dtype, scale=layer.input_scale)
        return self.backend.quantize_fp8(x, layer.weight.dtype, per_token=True)

    def fp8_input_dtype(self, layer: nn.Module) -> torch.dtype | None:
        # Per-token dynamic activations against a per-channel or per-tensor weight: the norm or
        # SiLU-and-mul before this layer may quantize in the same launch.
        w = getattr(layer, "weight", None)
        if self.act_scheme != "dynamic_token" or self.weight_strategy == "block" or w is None:
            return None
        return w.dtype if w.dtype.is_floating_point and w.element_size() == 1 else None

    def apply(self, layer: nn.Module, x, bias: torch.Tensor | None = None):
        if isinstance(x, QuantizedActivation):  # quantized by the op before (fp8_input_dtype)
            return self.backend.fp8_linear(
                x.q, x.scale, layer.weight, layer.weight_scale, bias, out_dtype=x.dtype
            )
        if self.act_scheme == "none":
            return self.backend.linear(x, self.dequantize(layer).to(x.dtype), bias)
        if self.weight_strategy != "block":
            x_q, x_scale = self._quantize_x(layer, x)  # [M, K] fp8, [M, 1] or [1]
            return self.backend.fp8_linear(
                x_q, x_scale, layer.weight, layer.weight_scale, bias, out_dtype=x.dtype
            )
        # Block scales: activations quantized per token per 128-column group (each group a row
        # of its own to the per-token quantizer), then one block-scaled GEMM.
        m, nb = x.shape[0], layer.weight_scale.shape[0]
        kp = layer.weight.shape[1]
        if x.shape[1] < kp:  # the partial last block: zero columns meet zero weights
            x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
        x_q, x_scale = self.backend.quantize_fp8(
            x.contiguous().reshape(m * nb, kp // nb), layer.weight.dtype, per_token=True
        )
        return self.backend.fp8_linear(
            x_q.reshape(m, kp), x_scale.reshape(m, nb), layer.weight, layer.weight_scale.t(),
            bias, out_dtype=x.dtype,
        )  # fmt: skip


class OnlineFP8LinearMethod(FP8LinearMethod):
    """A float checkpoint's layer quantized to FP8 at load: per output channel, scale =
    max(row absmax, eps) / fp8_max; activations per token, dynamically."""

    def __init__(self, spec: LinearSpec, backend: Backend) -> None:
        super().__init__(spec, backend, "channel", "dynamic_token", label="fp8 online")
        self.fp8_dtype = platform_fp8_dtype(backend)
        self._layouts = (TensorLayout("weight", lambda n, k: (n, k), 0, 1, 1, 1, FLOAT_DTYPES),)

    def load(self, layer: nn.Module, source: TensorSource) -> None:
        device = self.backend.device
        w = read_tensor(source, self.spec, self._layouts[0])
        # Quantize what the float model would hold (the weight in the model dtype).
        w = w.to(device=device, dtype=self.spec.params_dtype)
        q, scale = self.backend.quantize_fp8(w, self.fp8_dtype, per_token=True)  # per row of W
        set_param(layer, "weight", q, device)  # [N, K] fp8
        set_param(layer, "weight_scale", scale, device)  # fp32 [N, 1]


class FP8Config(QuantizationConfig):
    """quant_method "fp8" checkpoints: activation_scheme dynamic / static, weight_block_size
    ([128, 128] -> weight_scale_inv per block; absent -> per-tensor weight_scale), and the
    unquantized modules (modules_to_not_convert / ignored_layers)."""

    name = "fp8"

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        scheme = cfg.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise QuantizationConfigError(
                f"{source}: fp8 activation_scheme {scheme!r} is not supported; supported: "
                "dynamic, static"
            )
        fmt = cfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationConfigError(
                f"{source}: fp8 fmt {fmt!r} is not supported; supported: e4m3"
            )
        self.block = cfg.get("weight_block_size")
        if self.block is not None:
            if len(self.block) != 2 or any(int(b) <= 0 for b in self.block):
                raise QuantizationConfigError(
                    f"{source}: fp8 weight_block_size {self.block!r} must be two positive sizes"
                )
            if scheme != "dynamic":
                raise QuantizationConfigError(
                    f"{source}: fp8 block weights with activation_scheme {scheme!r} are not "
                    "supported; supported: dynamic"
                )
            self.block = (int(self.block[0]), int(self.block[1]))
        self.scheme = scheme
        self.skip = list(cfg.get("modules_to_not_convert") or cfg.get("ignored_layers") or [])

    def describe(self) -> str:
        w = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor"
        return f"fp8 (weights {w}, activations {self.scheme})"

    def linear_method(self, spec: LinearSpec, backend: Backend) -> FP8LinearMethod | None:
        quantized = [not any(s in p.prefix for s in self.skip) for p in spec.parts]
        if not same_for_all_parts(spec, quantized):
            return None
        if self.block is not None:
            return FP8LinearMethod(
                spec, backend, "block", "dynamic_group", self.block, "weight_scale_inv"
            )
        act = "dynamic_token" if self.scheme == "dynamic" else "static_tensor"
        return FP8LinearMethod(spec, backend, "tensor", act)


class OnlineFP8Config(QuantizationConfig):
    """`quantization="fp8"` on a float checkpoint; fails at once on a device without FP8."""

    name = "fp8"

    def __init__(self, backend: Backend | None = None) -> None:
        if backend is not None:
            platform_fp8_dtype(backend)

    def describe(self) -> str:
        return "fp8 online (weights per output channel at load, activations per token)"

    def linear_method(self, spec: LinearSpec, backend: Backend) -> OnlineFP8LinearMethod:
        return OnlineFP8LinearMethod(spec, backend)
