"""Issue 12's bad input: unknown quant_method or packing, unsupported bits or group sizes, a layer
that does not divide into groups, a missing scale or zero tensor, a shard off a group or packing
boundary: each a clear error naming the tensor or field and the value, before any weight is read.
"""

from __future__ import annotations

import pytest
import quant_packers as packers
import torch
from test_linear_methods import GPTQ, DictSource, PartialCollectives, _ct_w4, _w

from engine.layers.linear import ColumnParallelLinear, RowParallelLinear, check_quantized_weights
from engine.parallel import SINGLE, ParallelContext
from engine.quantization import (
    QuantizationConfigError,
    QuantizedWeightError,
    get_quantization_config,
)
from hal.select import load_backend


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"quant_method": "bitsandbytes"}, ["quant_method", "'bitsandbytes'", "gptq"]),
        ({**GPTQ, "checkpoint_format": "marlin"}, ["checkpoint_format", "'marlin'", "gptq_v2"]),
        ({**GPTQ, "lm_head": True}, ["lm_head"]),
        ({**GPTQ, "pack_dtype": "int16"}, ["pack_dtype", "int16", "int32"]),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, ["gemv", "gemm"]),
        ({"quant_method": "awq", "bits": 8, "group_size": 32}, ["bits=8", "supported: 4"]),
        (
            {"quant_method": "auto-round", "bits": 4, "group_size": 32,
             "packing_format": "auto_round:fp8_static"},
            ["packing_format", "auto_round:fp8_static", "auto_round:auto_gptq"],
        ),
        (
            {**_ct_w4(), "format": "marlin-24",
             "config_groups": {"g": {**_ct_w4()["config_groups"]["g"], "format": None}}},
            ["format", "'marlin-24'", "pack-quantized"],
        ),
        (_ct_w4(bits=2), ["int2", "supported"]),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
         ["activation_scheme", "static"]),
        ({"quant_method": "gptq", "group_size": 32}, ["'bits'"]),
    ],
)  # fmt: skip
def test_bad_config_names_field_and_value(cfg, words):
    with pytest.raises(QuantizationConfigError) as e:
        get_quantization_config(cfg, source="x/config.json")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_online_quantization_of_a_quantized_checkpoint_is_refused():
    with pytest.raises(QuantizationConfigError, match="gptq checkpoint"):
        get_quantization_config(GPTQ, quantization="fp8")
    with pytest.raises(QuantizationConfigError, match="'int4'"):
        get_quantization_config(None, quantization="int4")


@pytest.mark.parametrize(
    "cfg, k, words",
    [
        ({**GPTQ, "bits": 3}, 64, ["bits=3", "supported: 4, 8"]),
        ({**GPTQ, "group_size": 64}, 96, ["K=96", "group_size=64", "p"]),
        ({**GPTQ, "group_size": 0}, 64, ["group_size=0"]),
    ],
)
def test_unsupported_bits_or_group_size_fail_at_build(backend, cfg, k, words):
    quant = get_quantization_config(cfg)
    with pytest.raises(QuantizationConfigError) as e:
        ColumnParallelLinear(k, 16, backend, SINGLE, torch.float32, False, quant, prefix="p")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize(
    "cfg, pack, drop",
    [
        (GPTQ, packers.gptq, "scales"),
        (GPTQ, packers.gptq, "qzeros"),
        ({**GPTQ, "desc_act": True}, lambda w: packers.gptq(w, desc_act=True), "g_idx"),
        (_ct_w4(sym=False), lambda w: packers.ct_packed(w, sym=False), "weight_zero_point"),
        (_ct_w4(), packers.ct_packed, "weight_scale"),
    ],
)
def test_missing_scale_or_zero_is_named_before_any_read(backend, cfg, pack, drop):
    tensors, _ = pack(_w(32, 64))
    del tensors[drop]
    source = DictSource({f"p.{n}": t for n, t in tensors.items()})
    layer = ColumnParallelLinear(64, 32, backend, SINGLE, torch.float32, False,
                                 get_quantization_config(cfg), prefix="p")  # fmt: skip
    with pytest.raises(QuantizedWeightError, match=f"'p.{drop}' is missing"):
        check_quantized_weights(layer, source)
    assert source.reads == 0


def test_misshapen_tensor_is_named(backend):
    tensors, _ = packers.gptq(_w(32, 64))
    tensors["scales"] = tensors["scales"][:1]
    source = DictSource({f"p.{n}": t for n, t in tensors.items()})
    layer = ColumnParallelLinear(64, 32, backend, SINGLE, torch.float32, False,
                                 get_quantization_config(GPTQ), prefix="p")  # fmt: skip
    with pytest.raises(QuantizedWeightError, match=r"'p.scales' has shape \[1, 32\], expected"):
        layer.check_weights(source)


def test_shard_off_the_group_or_packing_boundary(backend):
    quant = get_quantization_config(GPTQ)  # group 32, 8 nibbles per word
    tensors, _ = packers.gptq(_w(32, 64))
    source = DictSource({f"p.{n}": t for n, t in tensors.items()})
    rank = ParallelContext(0, 4, PartialCollectives())
    row = RowParallelLinear(64, 32, backend, rank, torch.float32, False, True, quant, "p")
    with pytest.raises(QuantizedWeightError, match=r"K slice \[0:16\].*group boundary of 32"):
        row.check_weights(source)
    tensors, _ = packers.gptq(_w(24, 64))
    source = DictSource({f"p.{n}": t for n, t in tensors.items()})
    col = ColumnParallelLinear(64, 24, backend, ParallelContext(0, 2, PartialCollectives()),
                               torch.float32, False, quant, prefix="p")  # fmt: skip
    with pytest.raises(QuantizedWeightError, match=r"'p.qzeros'.*N slice \[0:12\].*of 8"):
        col.check_weights(source)
    assert source.reads == 0


def test_wrong_dtype_is_named(backend):
    tensors, _ = packers.gptq(_w(32, 64))
    tensors["qweight"] = tensors["qweight"].to(torch.int64)
    source = DictSource({f"p.{n}": t for n, t in tensors.items()})
    layer = ColumnParallelLinear(64, 32, backend, SINGLE, torch.float32, False,
                                 get_quantization_config(GPTQ), prefix="p")  # fmt: skip
    with pytest.raises(QuantizedWeightError, match="'p.qweight' has dtype int64, expected int32"):
        layer.load(source, "p")


def test_fused_parts_with_different_schemes_are_refused(backend):
    from engine.layers.linear import MergedColumnParallelLinear

    cfg = {**_ct_w4(), "ignore": ["m.up"]}
    with pytest.raises(QuantizationConfigError, match="gate_up_proj needs one quantization"):
        MergedColumnParallelLinear(64, [32, 32], backend, SINGLE, torch.float32, False,
                                   get_quantization_config(cfg), ["m.gate", "m.up"])  # fmt: skip


def test_ignored_layer_stays_float(backend):
    cfg = {**_ct_w4(), "ignore": ["re:.*down_proj$"]}
    name = "model.layers.0.mlp.down_proj"
    quant = get_quantization_config(cfg)
    layer = RowParallelLinear(64, 32, backend, SINGLE, torch.float32, False, True, quant, name)
    assert layer.quant_method is None and layer.weight.shape == (32, 64)
