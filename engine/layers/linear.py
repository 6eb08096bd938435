"""Tensor-parallel linear layers: column-parallel (QKV, gate/up) and row-parallel (o_proj, down).

Weights follow Hugging Face's [out_features, in_features]. A column-parallel layer holds a slice of
the output rows and needs no communication; a row-parallel layer holds a slice of the input columns
and sums the ranks' partial products with one all-reduce. At tp_size 1 both are one backend.linear.
Given a quantization config, a layer the config quantizes holds no float weight: its
`quant_method` (engine.quantization) creates, loads and applies the quantized parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.parallel import ParallelContext, TensorSource, load_tensor
from engine.quantization import LinearMethod, LinearSpec, Part, QuantizationConfig
from hal.backend import Backend

if TYPE_CHECKING:
    from engine.layers.rotary import RotaryEmbedding
    from engine.lora import LoRASlots


def _param(shape: tuple[int, ...], backend: Backend, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=backend.device, dtype=dtype), requires_grad=False)


def _quantize(
    layer: nn.Module,
    quant_config: QuantizationConfig | None,
    parts: list[Part],
    k_range: tuple[int, int],
    input_size: int,
    dtype: torch.dtype,
    layer_type: str,
) -> LinearMethod | None:
    """The layer's quantization method (None: float), registering no float weight if quantized."""
    if quant_config is None:
        return None
    if any(not p.prefix for p in parts):
        raise ValueError(f"{layer_type}: a quantized layer needs its checkpoint prefix(es)")
    spec = LinearSpec(layer_type, tuple(parts), input_size, k_range[0], k_range[1], dtype)
    method = quant_config.linear_method(spec, layer.backend)
    if method is not None:
        layer.register_parameter("weight", None)  # the method registers its own at load
    return method


def _check_prefixes(layer: nn.Module, prefixes: list[str]) -> None:
    expected = [p.prefix for p in layer.quant_method.spec.parts]
    if list(prefixes) != expected:
        raise ValueError(f"prefixes: loading {prefixes}, but the layer was built for {expected}")


class QuantizableLinear(nn.Module):
    """What every linear layer shares: its optional `quant_method` and the pre-load check."""

    quant_method: LinearMethod | None = None
    lora: LoRASlots | None = None  # LoRA adapters' slots (engine.lora), set when serving them

    def fp8_input_dtype(self) -> torch.dtype | None:
        """The FP8 dtype this layer wants its input quantized to per token (the op before it
        may then fuse the quantize), else None (also with LoRA: its deltas read the input)."""
        method = self.quant_method
        return None if method is None or self.lora is not None else method.fp8_input_dtype(self)

    def _with_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.lora is None else self.lora.add(x, y)

    def check_weights(self, source: TensorSource) -> None:
        """Raise on a missing, misshapen or unshardable quantized tensor, reading no data."""
        if self.quant_method is not None:
            self.quant_method.check(source)


def check_quantized_weights(model: nn.Module, source: TensorSource) -> None:
    """Check every quantized layer's tensors before any weight is read (bad input fails early)."""
    for module in model.modules():
        if isinstance(module, QuantizableLinear):
            module.check_weights(source)


def describe_quantization(model: nn.Module) -> list[str]:
    """One line per layer type: its quantization method and the kernel that runs it."""
    seen: dict[str, str] = {}
    for module in model.modules():
        if not isinstance(module, QuantizableLinear):
            continue
        method = module.quant_method
        name = module.layer_type
        line = (
            "unquantized -> linear"
            if method is None
            else (f"{method.describe()} -> {method.kernel}")
        )
        seen.setdefault(name, line)
    return [f"{name}: {line}" for name, line in seen.items()]


class ColumnParallelLinear(QuantizableLinear):
    """y_local = x @ W[rows of this rank].T (+ bias); output features split across ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.backend = backend
        self.parallel = parallel
        self.input_size = input_size
        self.output_size = output_size
        self.layer_type = prefix.rsplit(".", 1)[-1] or "linear"
        self.row_start, self.row_stop = parallel.shard(output_size, "output_size")
        self.output_size_per_rank = self.row_stop - self.row_start
        parts = [Part(prefix, output_size, self.row_start, self.row_stop)]
        self.quant_method = _quantize(
            self, quant_config, parts, (0, input_size), input_size, dtype, self.layer_type
        )
        if self.quant_method is None:
            self.weight = _param((self.output_size_per_rank, input_size), backend, dtype)
        self.bias = _param((self.output_size_per_rank,), backend, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size] -> [num_tokens, output_size / tp_size]
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return self.backend.linear(x, self.weight, self.bias)

    def load(self, source: TensorSource, prefix: str) -> None:
        full = (self.output_size, self.input_size)
        if self.quant_method is not None:
            _check_prefixes(self, [prefix])
            self.quant_method.load(self, source)
        else:
            load_tensor(
                self.weight, source, f"{prefix}.weight", full, 0, self.row_start, self.row_stop
            )
        if self.bias is not None:
            name = f"{prefix}.bias"
            load_tensor(self.bias, source, name, full[:1], 0, self.row_start, self.row_stop)


class MergedColumnParallelLinear(QuantizableLinear):
    """Several column-parallel projections of one input fused into one GEMM (gate_up_proj).

    Each rank holds its slice of every part, concatenated: [gate_local; up_local], so the
    activation (silu_and_mul) pairs the right halves without communication.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefixes: list[str] | None = None,
        layer_type: str = "gate_up_proj",
    ) -> None:
        super().__init__()
        self.backend = backend
        self.parallel = parallel
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.layer_type = layer_type
        self.ranges = [parallel.shard(n, "output_size") for n in self.output_sizes]
        local = sum(stop - start for start, stop in self.ranges)
        names = list(prefixes) if prefixes is not None else [""] * len(self.output_sizes)
        if len(names) != len(self.output_sizes):
            raise ValueError(f"prefixes: got {len(names)}, expected {len(self.output_sizes)}")
        parts = [
            Part(name, size, start, stop)
            for name, size, (start, stop) in zip(names, self.output_sizes, self.ranges, strict=True)
        ]
        self.quant_method = _quantize(
            self, quant_config, parts, (0, input_size), input_size, dtype, layer_type
        )
        if self.quant_method is None:
            self.weight = _param((local, input_size), backend, dtype)
        self.bias = _param((local,), backend, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size] -> [num_tokens, sum(output_sizes) / tp_size]
        if self.quant_method is not None:
            return self._with_lora(x, self.quant_method.apply(self, x, self.bias))
        return self._with_lora(x, self.backend.linear(x, self.weight, self.bias))

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu_and_mul(forward(x)) for a [gate, up] layer: [num_tokens, output_sizes[0] /
        tp_size], which the backend may run as one fused launch (float weights)."""
        if len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            raise ValueError(f"output_sizes: {self.output_sizes}; silu_and_mul wants [D, D]")
        if self.quant_method is not None or self.lora is not None:
            return self.backend.silu_and_mul(self.forward(x))
        return self.backend.linear_silu_and_mul(x, self.weight, self.bias)

    def load(self, source: TensorSource, prefixes: list[str]) -> None:
        if len(prefixes) != len(self.output_sizes):
            raise ValueError(f"prefixes: got {len(prefixes)}, expected {len(self.output_sizes)}")
        if self.quant_method is not None:
            _check_prefixes(self, prefixes)
            self.quant_method.load(self, source)
        offset = 0
        for prefix, size, (start, stop) in zip(
            prefixes, self.output_sizes, self.ranges, strict=True
        ):
            rows = slice(offset, offset + stop - start)
            full = (size, self.input_size)
            if self.quant_method is None:
                load_tensor(self.weight[rows], source, f"{prefix}.weight", full, 0, start, stop)
            if self.bias is not None:
                load_tensor(self.bias[rows], source, f"{prefix}.bias", full[:1], 0, start, stop)
            offset += stop - start


class QKVParallelLinear(QuantizableLinear):
    """q, k and v projections in one GEMM, split by heads.

    Query heads split evenly across ranks; KV heads split evenly too, or, when tp_size exceeds
    their number, each rank holds the one KV head its query heads read (replicated).
    Output per rank: [q (num_heads/tp * head_dim); k (kv_local * head_dim); v (same)].
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefixes: tuple[str, str, str] | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.layer_type = "qkv_proj"
        self.parallel = parallel
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        q_start, q_stop = parallel.shard(num_heads, "num_heads")
        kv_start, kv_stop = parallel.kv_head_range(num_kv_heads)
        self.num_heads = q_stop - q_start
        self.num_kv_heads = kv_stop - kv_start
        self.q_rows = (q_start * head_dim, q_stop * head_dim)
        self.kv_rows = (kv_start * head_dim, kv_stop * head_dim)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        local = self.q_size + 2 * self.kv_size
        q_name, k_name, v_name = prefixes if prefixes is not None else ("", "", "")
        parts = [
            Part(q_name, num_heads * head_dim, *self.q_rows),
            Part(k_name, num_kv_heads * head_dim, *self.kv_rows),
            Part(v_name, num_kv_heads * head_dim, *self.kv_rows),
        ]
        self.quant_method = _quantize(
            self, quant_config, parts, (0, hidden_size), hidden_size, dtype, self.layer_type
        )
        if self.quant_method is None:
            self.weight = _param((local, hidden_size), backend, dtype)
        self.bias = _param((local,), backend, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden] -> [num_tokens, q_size + 2 * kv_size]
        if self.quant_method is not None:
            return self._with_lora(x, self.quant_method.apply(self, x, self.bias))
        return self._with_lora(x, self.backend.linear(x, self.weight, self.bias))

    def forward_rotary_write_kv(
        self,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        positions: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: float | None = None,
    ) -> torch.Tensor:
        """The projection, its q and k rotated by `rotary` at `positions`, the rotated k and v
        written to the paged caches (slot -1 skips); returns the rotated q [T, heads, D]. Float
        weights go to the backend as one op (`Backend.linear_rotary_write_kv`, which may fuse
        it into the GEMM); quantized ones (and LoRA) run the GEMM, then
        `rotary.forward_write_kv`."""
        if self.quant_method is not None or self.lora is not None:
            q, k, v = self.split(self.forward(x))
            query, _ = rotary.forward_write_kv(positions, q, k, v, key_cache, value_cache,
                                               slot_mapping, kv_scale)  # fmt: skip
            return query
        query, _ = self.backend.linear_rotary_write_kv(
            x, self.weight, self.bias, self.num_heads, self.num_kv_heads, positions,
            rotary.cos_sin_cache, rotary.is_neox, key_cache, value_cache, slot_mapping, kv_scale,
        )  # fmt: skip
        return query

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[num_tokens, q_size + 2 kv_size] -> q [T, heads, D], k and v [T, kv_heads, D]."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n = qkv.shape[0]
        return (
            q.view(n, self.num_heads, self.head_dim),
            k.view(n, self.num_kv_heads, self.head_dim),
            v.view(n, self.num_kv_heads, self.head_dim),
        )

    def load(self, source: TensorSource, q_prefix: str, k_prefix: str, v_prefix: str) -> None:
        parts = (
            (q_prefix, self.total_num_heads, self.q_rows, 0),
            (k_prefix, self.total_num_kv_heads, self.kv_rows, self.q_size),
            (v_prefix, self.total_num_kv_heads, self.kv_rows, self.q_size + self.kv_size),
        )
        if self.quant_method is not None:
            _check_prefixes(self, [q_prefix, k_prefix, v_prefix])
            self.quant_method.load(self, source)
        for prefix, heads, (start, stop), offset in parts:
            rows = slice(offset, offset + stop - start)
            full = (heads * self.head_dim, self.hidden_size)
            if self.quant_method is None:
                load_tensor(self.weight[rows], source, f"{prefix}.weight", full, 0, start, stop)
            if self.bias is not None:
                load_tensor(self.bias[rows], source, f"{prefix}.bias", full[:1], 0, start, stop)


class RowParallelLinear(QuantizableLinear):
    """y = all_reduce(x_local @ W[:, columns of this rank].T) + bias; input features split."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        bias: bool = False,
        reduce_results: bool = True,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        if bias and not reduce_results and parallel.tp_size > 1:
            raise ValueError("bias: a row-parallel bias needs reduce_results=True (added once)")
        self.backend = backend
        self.parallel = parallel
        self.input_size = input_size
        self.output_size = output_size
        self.reduce_results = reduce_results
        self.layer_type = prefix.rsplit(".", 1)[-1] or "linear"
        self.col_start, self.col_stop = parallel.shard(input_size, "input_size")
        self.input_size_per_rank = self.col_stop - self.col_start
        parts = [Part(prefix, output_size, 0, output_size)]
        k_range = (self.col_start, self.col_stop)
        self.quant_method = _quantize(
            self, quant_config, parts, k_range, input_size, dtype, self.layer_type
        )
        if self.quant_method is None:
            self.weight = _param((output_size, self.input_size_per_rank), backend, dtype)
        self.bias = _param((output_size,), backend, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size / tp_size] -> [num_tokens, output_size]
        whole = self.parallel.tp_size == 1
        bias = self.bias if whole else None  # with TP: added once, after the sum
        pushable = self.quant_method is None and self.lora is None
        if not whole and not self.reduce_results and pushable:
            y = self._pushed(x)
            if y is not None:
                return y
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x, bias)
        else:
            y = self.backend.linear(x, self.weight, bias)
        y = self._with_lora(x, y)  # with TP: this rank's share of the delta, summed with y
        if whole:
            return y
        if self.reduce_results:  # y: a partial sum over this rank's columns
            y = self.parallel.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def _pushed(self, x: torch.Tensor) -> torch.Tensor | None:
        # The partial sum computed by a backend GEMM that also writes it as the words of the
        # one-shot all-reduce that reduces it next (the caller's norm), which then only
        # collects; None where no such path serves this call (the plain linear runs instead).
        linear_push = getattr(self.backend, "linear_push", None)
        if linear_push is None or x.shape[-1] == 0:
            return None
        target = self.parallel.ll_push(x.numel() // x.shape[-1], self.output_size, x.dtype)
        if target is None:
            return None
        y = linear_push(x, self.weight, target)
        if y is not None and target.done:
            self.parallel.mark_pushed(y)
        return y

    def load(self, source: TensorSource, prefix: str) -> None:
        full = (self.output_size, self.input_size)
        if self.quant_method is not None:
            _check_prefixes(self, [prefix])
            self.quant_method.load(self, source)
        else:
            load_tensor(
                self.weight, source, f"{prefix}.weight", full, 1, self.col_start, self.col_stop
            )
        if self.bias is not None:
            load_tensor(self.bias, source, f"{prefix}.bias", full[:1])
