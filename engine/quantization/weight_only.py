"""Integer weight-only layers (GPTQ, AWQ, AutoRound, compressed-tensors pack-quantized): each format
repacks its tensors into one canonical form, run through backend.int4_linear (4-bit) or as a
dequantized GEMM (8-bit, W8A16: the HAL has no 8-bit weight-only op).

Canonical form, per rank: codes [K_local, N_local] (4-bit: packed as the HAL's int32 [K / 8, N]),
scales [groups, N_local] in the checkpoint's dtype, zeros [groups, N_local] unpacked with every
offset applied (W = (q - zeros[g]) * scales[g]), and g_idx int32 [K_local] when the groups are
not consecutive runs of group_size rows (act-order); then scales and zeros keep every group.
"""

from __future__ import annotations

import logging
from abc import abstractmethod

import torch
from torch import nn

from engine.parallel import TensorSource
from engine.quantization.base import (
    FLOAT_DTYPES,
    LinearMethod,
    LinearSpec,
    QuantizationConfigError,
    QuantizedWeightError,
    TensorLayout,
    check_tensor,
    read_tensor,
    set_param,
)
from engine.quantization.packing import pack_int4_rows
from hal.backend import Backend

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)


def resolve_group_size(group_size: int, bits: int, spec: LinearSpec, method: str) -> int:
    """group_size -1 means one group per output channel (G = K); otherwise G must divide K."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationConfigError(
            f"{method}: bits={bits} is not supported; supported: "
            f"{', '.join(map(str, SUPPORTED_BITS))}"
        )
    k = spec.input_size
    if group_size == -1:
        return k
    if not isinstance(group_size, int) or group_size <= 0:
        raise QuantizationConfigError(
            f"{method}: group_size={group_size!r} is not supported; supported: -1 (per channel) "
            "or a positive group size"
        )
    if k % group_size:
        name = spec.parts[0].prefix
        raise QuantizationConfigError(
            f"{method}: layer {name} has K={k} inputs, not a multiple of group_size={group_size}"
            f"; every quantized layer's input size must divide into whole groups"
        )
    return group_size


class WeightOnlyMethod(LinearMethod):
    """Shared load tail, apply and dequantize of the integer weight-only formats."""

    format_name = "weight-only"
    origin = ""  # the producing format when it reuses another's layout ("auto-round ...")

    def __init__(
        self, spec: LinearSpec, backend: Backend, bits: int, group_size: int, act_order: bool
    ) -> None:
        super().__init__(spec, backend)
        self.bits = bits
        self.group_size = resolve_group_size(group_size, bits, spec, self.format_name)
        self.pack = 32 // bits
        self.act_order = act_order
        # With act-order groups, a row-parallel shard's rows reach any group: keep them all.
        # One group per channel (G = K) is shared by every K slice: every rank keeps it whole.
        self.per_channel = self.group_size == spec.input_size
        self.full_groups = (act_order and spec.is_row_parallel) or self.per_channel
        # The group size this rank's rows see: a per-channel group spans only its K slice.
        self.local_group_size = spec.k_local if self.per_channel else self.group_size

    def with_origin(self, text: str) -> str:
        return f"{self.origin} as {text}" if self.origin else text

    @property
    def optional_layouts(self) -> tuple[TensorLayout, ...]:
        """Tensors read when every part has them (GPTQModel's g_idx without desc_act)."""
        return ()

    def _present(self, source: TensorSource) -> tuple[TensorLayout, ...]:
        return tuple(
            layout
            for layout in self.optional_layouts
            if all(source.has(f"{p.prefix}.{layout.suffix}") for p in self.spec.parts)
        )

    def check(self, source: TensorSource) -> None:
        super().check(source)
        for layout in self._present(source):
            check_tensor(source, self.spec, layout)

    @abstractmethod
    def canonical(
        self, t: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Checkpoint slices by suffix -> (codes uint8 [K, N] or, 4-bit, canonical int32
        [K / 8, N]; scales [groups, N]; zeros int16 [groups, N] with offsets applied; g_idx)."""

    @property
    def kernel(self) -> str:
        if self.bits == 4:
            return f"int4_linear ({self.backend.chosen('int4_gemm')})"
        return f"dequantize + linear ({self.backend.chosen('gemm')}), W8A16"

    def load(self, layer: nn.Module, source: TensorSource) -> None:
        layouts = self.layouts + self._present(source)
        t = {layout.suffix: read_tensor(source, self.spec, layout) for layout in layouts}
        q, scales, zeros, g_idx = self.canonical(t)
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            k0, k1 = self.spec.k_start, self.spec.k_stop
            consecutive = torch.arange(k0, k1, dtype=torch.int32) // self.group_size
            if torch.equal(g_idx, consecutive) and not (
                self.act_order and self.spec.is_row_parallel
            ):
                g_idx = None  # plain groups: the kernels' faster path
            else:
                if not self.act_order:
                    self._check_unordered_g_idx()
                if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= scales.shape[0]):
                    raise QuantizationConfigError(
                        f"{self.spec.parts[0].prefix}: g_idx values lie in {int(g_idx.min())}.."
                        f"{int(g_idx.max())}, outside the {scales.shape[0]} groups of its scales"
                    )
        device = self.backend.device
        if self.bits == 4:
            qweight = q if q.dtype == torch.int32 else pack_int4_rows(q)  # int32 [K / 8, N]
            self._prepare_int4(layer, qweight, scales, zeros.to(torch.uint8), g_idx)
            return
        set_param(layer, "qweight", q.to(torch.uint8), device)  # [K, N]
        set_param(layer, "zeros", zeros.to(torch.int16), device)  # [groups, N], <= 256
        set_param(layer, "scales", scales, device)
        layer.register_buffer("g_idx", None if g_idx is None else g_idx.to(device))

    def _prepare_int4(self, layer: nn.Module, qweight, scales, zeros, g_idx) -> None:
        """The backend's own form of the weight (`prepare_int4`; the CUDA backend repacks for its
        kernel), registered so the memory plan counts it. The canonical layout keeps the names
        qweight / scales / zeros / g_idx; another layout's tensors are int4_<name>."""
        weight = self.backend.prepare_int4(qweight, scales, zeros, self.local_group_size, g_idx)
        canonical = weight.layout == "canonical"
        for key, t in weight.tensors.items():
            if canonical and key == "g_idx":
                layer.register_buffer("g_idx", t)
                continue
            # A parameter shares t's storage (the backend's own form keeps pointing at it).
            param = nn.Parameter(t, requires_grad=False)
            layer.register_parameter(key if canonical else f"int4_{key}", param)
            weight.tensors[key] = param
        if canonical and "g_idx" not in weight.tensors:
            layer.register_buffer("g_idx", None)
        layer.int4_weight = weight

    def _check_unordered_g_idx(self) -> None:
        """A g_idx that is not consecutive groups in a checkpoint whose config says no act-order:
        GPTQModel and transformers dequantize with it, so it is followed (column-parallel); a
        row-parallel shard read only its K range of scales, which such a g_idx may leave."""
        name = f"{self.spec.parts[0].prefix}.g_idx"
        if self.spec.is_row_parallel:
            raise QuantizedWeightError(
                f"tensor {name!r}: its groups are not consecutive runs of group_size="
                f"{self.group_size} rows, but quantization_config says desc_act/actorder is off;"
                " this rank's K shard cannot hold every group it needs. Set desc_act: true in "
                "config.json's quantization_config (the checkpoint is act-ordered)"
            )
        logger.warning(
            "%s: groups are not consecutive though desc_act is off; following g_idx (as "
            "GPTQModel does)",
            name,
        )

    def _groups(self, layer: nn.Module) -> torch.Tensor:
        if layer.g_idx is not None:
            return layer.g_idx.to(torch.int64)
        k = self.spec.k_local
        return torch.arange(k, device=layer.scales.device) // self.local_group_size

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        if self.bits == 4:
            layout = layer.int4_weight.layout
            if layout != "canonical":
                raise ValueError(
                    f"{self.spec.parts[0].prefix}: the weight is in the {self.backend.name} "
                    f"backend's {layout!r} layout; dequantize reads the canonical one (load it "
                    "on the CPU backend)"
                )
            shifts = torch.arange(8, device=layer.qweight.device, dtype=torch.int32) * 4
            q = (layer.qweight[:, None, :] >> shifts[None, :, None]) & 0xF
            q = q.reshape(-1, layer.qweight.shape[1])  # [K, N]
        else:
            q = layer.qweight
        g = self._groups(layer)
        w = (q.to(torch.float32) - layer.zeros.to(torch.float32)[g]) * layer.scales.float()[g]
        return w.t()  # [N, K]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.bits == 4:
            # x: [M, K] -> [M, N]
            return self.backend.int4_linear_prepared(x, layer.int4_weight, bias)
        w = self.dequantize(layer).to(x.dtype)  # [N, K], rounded once to the activation dtype
        return self.backend.linear(x, w, bias)


def packed_layouts(
    bits: int, group_size: int, full_groups: bool, *, n_major: bool, zeros: bool, g_idx: bool,
    names: tuple[str, str, str, str],
) -> tuple[TensorLayout, ...]:  # fmt: skip
    """GPTQ-style ([K / pack, N], n_major False) or compressed-tensors-style ([N, K / pack])
    layouts of (weight, scales, zeros, g_idx) tensors named `names`."""
    pack, g = 32 // bits, group_size
    gk = None if full_groups else (0 if not n_major else 1)
    w_name, s_name, z_name, i_name = names
    i32 = (torch.int32,)
    # compressed-tensors: weight_packed [N, K / pack], scale [N, K / G], zp [N / pack, K / G]
    if n_major:
        out = [
            TensorLayout(w_name, lambda n, k: (n, k // pack), 0, 1, 1, pack, i32),
            TensorLayout(s_name, lambda n, k: (n, k // g), 0, 1, gk, g, FLOAT_DTYPES),
        ]
        if zeros:
            out.append(TensorLayout(z_name, lambda n, k: (n // pack, k // g), 0, pack, gk, g, i32))
    else:  # GPTQ: qweight [K / pack, N], scales [K / G, N], qzeros [K / G, N / pack]
        out = [
            TensorLayout(w_name, lambda n, k: (k // pack, n), 1, 1, 0, pack, i32),
            TensorLayout(s_name, lambda n, k: (k // g, n), 1, 1, gk, g, FLOAT_DTYPES),
        ]
        if zeros:
            out.append(TensorLayout(z_name, lambda n, k: (k // g, n // pack), 1, pack, gk, g, i32))
    if g_idx:
        out.append(TensorLayout(i_name, lambda n, k: (k,), None, 1, 0, 1, i32, shared=True))
    return tuple(out)
