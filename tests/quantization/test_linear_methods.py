"""Every quantized layout through its LinearMethod: the dequantized weight equals the formula
applied to the packer's codes (bit for bit in fp32), the layer's output equals x @ W.T with the
activation quantization the format prescribes, and tensor-parallel shards recombine exactly.

Tolerances: weights are exact (small integers times a scale, computed in fp32 by both sides).
Outputs of fp32 GEMMs are compared with rtol 1e-5 / atol 1e-5 * |x| |W| scale: K <= 256 terms in
fp32 (unit roundoff 6e-8) leave ~K * u = 1.5e-5 relative in the worst case.
"""

from __future__ import annotations

import pytest
import quant_packers as packers
import torch

from engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.parallel import SINGLE, ParallelContext
from engine.quantization import QuantizedWeightError, get_quantization_config
from hal.select import load_backend

N, K = 48, 128


class DictSource:
    """A TensorSource over an in-memory dict that counts its reads."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.reads = tensors, 0

    def has(self, name):
        return name in self.tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        self.reads += 1
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (stop or t.shape[dim]) - start)

    def location(self, name):
        return "memory"


class PartialCollectives:
    """Each rank returns its own part; the test sums / concatenates them."""

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim):
        return x

    def gather(self, x, dim, dst):
        return x


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


def _w(n=N, k=K, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.2


def _x(m=5, k=K, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


# name -> (quantization_config, packer(w) -> (tensors, w_deq), activation transform)
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False}
CT_W4 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": 32},
        }
    },
    "ignore": ["lm_head"],
}  # fmt: skip


def _ct(weights: dict, fmt: str, acts: dict | None = None) -> dict:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"g": group}}


def _ct_w4(sym=True, group_size=32, actorder=None, bits=4):
    strategy = "group" if group_size else "channel"
    return _ct(
        {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
         "group_size": group_size, "actorder": actorder},
        "pack-quantized",
    )  # fmt: skip


INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_TOKEN = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "token",
    "dynamic": True,
}
FP8_GROUP = {**FP8_TOKEN, "strategy": "group", "group_size": 128}

CASES = {
    "gptq_v1_asym": (GPTQ, lambda w: packers.gptq(w), None),
    "gptq_v1_sym": ({**GPTQ, "sym": True}, lambda w: packers.gptq(w, sym=True), None),
    "gptq_v2": (
        {**GPTQ, "checkpoint_format": "gptq_v2"},
        lambda w: packers.gptq(w, v1=False),
        None,
    ),
    "gptq_desc_act": (
        {**GPTQ, "desc_act": True},
        lambda w: packers.gptq(w, desc_act=True),
        None,
    ),
    "gptq_per_channel": (
        {**GPTQ, "group_size": -1}, lambda w: packers.gptq(w, group_size=-1), None
    ),
    "gptq_8bit": ({**GPTQ, "bits": 8}, lambda w: packers.gptq(w, bits=8), None),
    "gptq_8bit_bf16_scales": (
        {**GPTQ, "bits": 8, "sym": True},
        lambda w: packers.gptq(w, bits=8, sym=True, scale_dtype=torch.bfloat16),
        None,
    ),
    "awq": (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
        lambda w: packers.awq(w),
        None,
    ),
    "auto_round_auto_gptq": (
        {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True,
         "packing_format": "auto_round:auto_gptq"},
        lambda w: packers.gptq(w, sym=True, v1=True),
        None,
    ),
    "auto_round_asym_v2": (
        {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": False,
         "packing_format": "auto_round"},
        lambda w: packers.gptq(w, v1=False),
        None,
    ),
    "auto_round_auto_awq": (
        {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": False,
         "packing_format": "auto_round:auto_awq"},
        lambda w: packers.awq(w),
        None,
    ),
    "ct_w4a16_sym": (_ct_w4(), lambda w: packers.ct_packed(w), None),
    "ct_w4a16_asym": (_ct_w4(sym=False), lambda w: packers.ct_packed(w, sym=False), None),
    "ct_w4a16_g_idx": (
        _ct_w4(sym=False, actorder="group"),
        lambda w: packers.ct_packed(w, sym=False, g_idx=True),
        None,
    ),
    "ct_w4a16_channel": (
        _ct_w4(group_size=None), lambda w: packers.ct_packed(w, group_size=None), None
    ),
    "ct_w8a16": (_ct_w4(bits=8), lambda w: packers.ct_packed(w, bits=8), None),
    "ct_w8a8_int8": (
        _ct({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            "int-quantized", INT8_TOKEN),
        lambda w: packers.ct_int8(w),
        packers.int8_act,
    ),
    "ct_fp8_channel": (
        _ct({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
            "float-quantized", FP8_TOKEN),
        lambda w: packers.fp8(w),
        packers.fp8_act,
    ),
    "ct_fp8_tensor": (
        _ct({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"},
            "float-quantized", FP8_TOKEN),
        lambda w: packers.fp8(w, strategy="tensor"),
        packers.fp8_act,
    ),
    "ct_fp8_block": (
        _ct({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
             "block_structure": [128, 128]}, "float-quantized", FP8_GROUP),
        lambda w: packers.fp8(w, strategy="block"),
        lambda x: packers.fp8_act(x, group=128),
    ),
    "fp8_checkpoint_block": (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        lambda w: packers.fp8(w, strategy="block", scale_name="weight_scale_inv"),
        lambda x: packers.fp8_act(x, group=128),
    ),
}  # fmt: skip


def _checkpoint(case: str, parts: dict[str, torch.Tensor]):
    """{prefix: float weight} -> (source, quant config, {prefix: w_deq}, activation transform)."""
    cfg, pack, act = CASES[case]
    tensors, deq = {}, {}
    for prefix, w in parts.items():
        t, deq[prefix] = pack(w)
        tensors.update({f"{prefix}.{name}": v for name, v in t.items()})
    return DictSource(tensors), get_quantization_config(cfg), deq, act


def _reference(x: torch.Tensor, w_deq: torch.Tensor, act) -> torch.Tensor:
    xa = act(x) if act is not None else x.double()
    return xa @ w_deq.double().t()


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_dequantizes_to_formula_and_runs(backend, case):
    w = _w()
    source, quant, deq, act = _checkpoint(case, {"p": w})
    layer = ColumnParallelLinear(K, N, backend, SINGLE, torch.float32, False, quant, prefix="p")
    assert layer.quant_method is not None and layer.weight is None
    layer.load(source, "p")
    torch.testing.assert_close(layer.quant_method.dequantize(layer), deq["p"], rtol=0, atol=0)
    # The formula's weight is a real approximation of W (a wrong zero or nibble order is not).
    assert (deq["p"] - w).abs().max() < 0.25 * w.abs().max()
    x = _x()
    _close(layer(x), _reference(x, deq["p"], act))


@pytest.mark.parametrize("k", [256, 192])
def test_fp8_block_weight_padded_and_scales_transposed(backend, k):
    # Block weights are stored [N, G * 128] (a partial last block, K = 192, padded with zero
    # codes) and scales [G, N] (one block's scales contiguous across rows; per row, as N = 64 is
    # no whole 128-row block), one block-scaled fp8_linear per call; the formula's weight and
    # output either way.
    source, quant, deq, act = _checkpoint("ct_fp8_block", {"p": _w(N, k)})
    layer = ColumnParallelLinear(k, N, backend, SINGLE, torch.float32, False, quant, prefix="p")
    layer.load(source, "p")
    nb = -(-k // 128)
    assert tuple(layer.weight.shape) == (N, nb * 128) and layer.weight.is_contiguous()
    assert tuple(layer.weight_scale.shape) == (nb, N)
    assert not layer.weight.view(torch.uint8)[:, k:].any()
    torch.testing.assert_close(layer.quant_method.dequantize(layer), deq["p"], rtol=0, atol=0)
    x = _x(k=k)
    _close(layer(x), _reference(x, deq["p"], act))


def test_fp8_block_scales_kept_per_block_when_rows_align(backend):
    # Fused q/k/v parts of 256 / 128 / 128 rows: whole 128-row blocks, so one scale per block
    # of rows ([G, N / 128]), as the checkpoint has them.
    ws = {f"a.{n}": _w(r, 256, seed=i) for i, (n, r) in enumerate([("q", 256), ("k", 128),
                                                                    ("v", 128)])}  # fmt: skip
    source, quant, deq, act = _checkpoint("ct_fp8_block", ws)
    qkv = QKVParallelLinear(256, 64, 4, 2, backend, SINGLE, torch.float32, False, quant,
                            ("a.q", "a.k", "a.v"))  # fmt: skip
    qkv.load(source, "a.q", "a.k", "a.v")
    assert tuple(qkv.weight_scale.shape) == (2, 4)
    full = torch.cat([deq["a.q"], deq["a.k"], deq["a.v"]])
    torch.testing.assert_close(qkv.quant_method.dequantize(qkv), full, rtol=0, atol=0)
    x = _x(k=256)
    _close(qkv(x), _reference(x, full, act))


def test_weights_stay_quantized_in_memory(backend):
    source, quant, _, _ = _checkpoint("gptq_v1_asym", {"p": _w()})
    layer = ColumnParallelLinear(K, N, backend, SINGLE, torch.float32, False, quant, prefix="p")
    layer.load(source, "p")
    params = dict(layer.named_parameters())
    assert params["qweight"].dtype == torch.int32 and tuple(params["qweight"].shape) == (K // 8, N)
    assert params["scales"].dtype == torch.float16  # the checkpoint's dtype, not widened
    total = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert total < N * K * 4 / 6  # int4 + fp16 group scales + uint8 zeros vs fp32


@pytest.mark.parametrize("case", ["gptq_v1_asym", "awq", "ct_w4a16_asym", "ct_w8a8_int8",
                                  "ct_fp8_channel", "gptq_desc_act", "ct_w4a16_g_idx"])  # fmt: skip
def test_fused_qkv_and_gate_up(backend, case):
    # q 64 rows, k and v 32 rows each; gate and up 48 rows each.
    ws = {f"a.{n}": _w(r, K, seed=i) for i, (n, r) in enumerate([("q", 64), ("k", 32), ("v", 32)])}
    source, quant, deq, act = _checkpoint(case, ws)
    qkv = QKVParallelLinear(K, 16, 4, 2, backend, SINGLE, torch.float32, False, quant,
                            ("a.q", "a.k", "a.v"))  # fmt: skip
    qkv.load(source, "a.q", "a.k", "a.v")
    full = torch.cat([deq["a.q"], deq["a.k"], deq["a.v"]])
    torch.testing.assert_close(qkv.quant_method.dequantize(qkv), full, rtol=0, atol=0)
    x = _x()
    _close(qkv(x), _reference(x, full, act))
    ws = {"m.gate": _w(48, K, seed=5), "m.up": _w(48, K, seed=6)}
    source, quant, deq, act = _checkpoint(case, ws)
    mlp = MergedColumnParallelLinear(K, [48, 48], backend, SINGLE, torch.float32, False, quant,
                                     ["m.gate", "m.up"])  # fmt: skip
    mlp.load(source, ["m.gate", "m.up"])
    _close(mlp(x), _reference(x, torch.cat([deq["m.gate"], deq["m.up"]]), act))


def _tp(rank: int, size: int) -> ParallelContext:
    return ParallelContext(rank, size, PartialCollectives())


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_parallel_shards_recombine(backend, case):
    """tp=2: column-parallel outputs concatenate, row-parallel partial sums add up, to tp=1's."""
    n, k = 64, 256
    w = _w(n, k, seed=3)
    source, quant, deq, act = _checkpoint(case, {"p": w})
    x = _x(4, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9))
    source.tensors["p.bias"] = bias
    single = ColumnParallelLinear(k, n, backend, SINGLE, torch.float32, True, quant, prefix="p")
    single.load(source, "p")
    expected = single(x)
    cols, rows = [], []
    for r in range(2):
        col = ColumnParallelLinear(k, n, backend, _tp(r, 2), torch.float32, True, quant, "p")
        col.load(source, "p")
        cols.append(col(x))
        row = RowParallelLinear(k, n, backend, _tp(r, 2), torch.float32, True, True, quant, "p")
        row.load(source, "p")
        torch.testing.assert_close(
            row.quant_method.dequantize(row), deq["p"][:, r * k // 2 : (r + 1) * k // 2]
        )
        rows.append(row(x[:, r * k // 2 : (r + 1) * k // 2]))
    torch.testing.assert_close(torch.cat(cols, 1), expected, rtol=0, atol=0)
    # Each row-parallel rank quantizes its own activation slice (per-token scales of that slice).
    halves = [slice(r * k // 2, (r + 1) * k // 2) for r in range(2)]
    ref = sum(_reference(x[:, h], deq["p"][:, h], act) for h in halves) + bias.double()
    _close(sum(rows) - bias, ref)


def test_gptq_g_idx_is_followed_without_desc_act(backend, caplog):
    """GPTQModel saves g_idx without desc_act too. Plain groups: dropped (the fast path); groups
    that are not consecutive: followed as GPTQModel does (logged), refused on a row-parallel
    shard, which holds only its own K range of scales."""
    w = _w()
    cfg = get_quantization_config(GPTQ)  # desc_act false
    plain, deq = packers.gptq(w)
    layer = ColumnParallelLinear(K, N, backend, SINGLE, torch.float32, False, cfg, prefix="p")
    layer.load(DictSource({f"p.{k}": v for k, v in plain.items()}), "p")
    assert layer.g_idx is None
    torch.testing.assert_close(layer.quant_method.dequantize(layer), deq, rtol=0, atol=0)
    shuffled, deq = packers.gptq(w, desc_act=True)
    source = DictSource({f"p.{k}": v for k, v in shuffled.items()})
    layer = ColumnParallelLinear(K, N, backend, SINGLE, torch.float32, False, cfg, prefix="p")
    with caplog.at_level("WARNING"):
        layer.load(source, "p")
    assert "not consecutive" in caplog.text and layer.g_idx is not None
    torch.testing.assert_close(layer.quant_method.dequantize(layer), deq, rtol=0, atol=0)
    x = _x()
    _close(layer(x), _reference(x, deq, None))
    row = RowParallelLinear(K, N, backend, _tp(0, 2), torch.float32, False, True, cfg, "p")
    with pytest.raises(QuantizedWeightError, match=r"p\.g_idx.*desc_act: true"):
        row.load(source, "p")
