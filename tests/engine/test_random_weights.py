"""load_format="dummy": random weights drawn from config.json's shapes, the same on every rank."""

from __future__ import annotations

import json

import pytest
import torch
from models_fixtures import build_model

from engine import LLM, SamplingParams
from engine.loader.hf import read_hf_config
from engine.loader.random_weights import RandomSource, expected_shapes
from engine.parallel import WeightLoadError


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A tiny model folder with its weights removed: config.json and tokenizer only."""
    folder = tmp_path_factory.mktemp("config_only")
    build_model("llama_bias", folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    return folder


def test_shapes_cover_every_parameter(config_only):
    """Every tensor the model loads is in the layout, with the shape the checkpoint would have."""
    config = read_hf_config(config_only)
    shapes = expected_shapes(config)
    hf = json.loads((config_only / "config.json").read_text())
    assert shapes["model.embed_tokens.weight"] == (hf["vocab_size"], hf["hidden_size"])
    assert shapes["model.layers.1.mlp.down_proj.bias"] == (hf["hidden_size"],)
    assert len([n for n in shapes if n.startswith("model.layers.0.")]) == 9 + 3 + 1 + 3


def test_slices_are_slices_of_the_full_tensor(config_only):
    """TP ranks read slices of one tensor: a slice equals the same slice of the full read."""
    src = RandomSource(read_hf_config(config_only), torch.device("cpu"), torch.float32, seed=3)
    name = "model.layers.0.mlp.gate_proj.weight"
    full = src.read(name)
    assert torch.equal(src.read(name, 0, 32, 96), full[32:96])
    assert torch.equal(src.read(name, 1, 16, 48), full[:, 16:48])
    assert abs(float(full.std()) - 0.02) < 0.004
    assert torch.equal(src.read("model.norm.weight"), torch.ones(src.shape("model.norm.weight")))
    other = RandomSource(read_hf_config(config_only), torch.device("cpu"), torch.float32, seed=4)
    assert not torch.equal(other.read(name), full)


def test_engine_runs_on_random_weights(config_only):
    llm = LLM(model=str(config_only), device="cpu", load_format="dummy", seed=1)
    out = llm.generate(
        prompt_token_ids=[[5, 6, 7, 8]],
        sampling_params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(WeightLoadError, match="no \\*.safetensors"):
        LLM(model=str(config_only), device="cpu")  # the default format needs weight files


def test_bad_load_format(config_only):
    with pytest.raises(ValueError, match="load_format"):
        LLM(model=str(config_only), device="cpu", load_format="pt")


QUANT_CONFIGS = {
    "gptq4": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
              "desc_act": False},
    "gptq8": {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True,
              "desc_act": False},
    "w8a8": {
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                  "dynamic": True, "symmetric": True},
        }},
    },
    "fp8block": {"quant_method": "fp8", "activation_scheme": "dynamic",
                 "weight_block_size": [128, 128]},
}  # fmt: skip


@pytest.mark.parametrize("name", list(QUANT_CONFIGS))
def test_quantized_random_weights(config_only, tmp_path, name):
    """A quantization_config gives random tensors in that checkpoint layout: the quantized
    layers load through their method and dequantize to weights of about INIT_STD."""
    folder = tmp_path / name
    folder.mkdir()
    for f in config_only.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    hf = json.loads((config_only / "config.json").read_text())
    hf["quantization_config"] = QUANT_CONFIGS[name]
    (folder / "config.json").write_text(json.dumps(hf))
    llm = LLM(model=str(folder), device="cpu", load_format="dummy", seed=1)
    layer = llm.engine.model.layers[0].mlp.down_proj
    w = layer.quant_method.dequantize(layer)
    assert abs(float(w.float().std()) - 0.02) < 0.004, float(w.float().std())
    assert abs(float(w.float().mean())) < 0.002  # centred: the zero is the codes' midpoint
    out = llm.generate(
        prompt_token_ids=[[5, 6, 7, 8]],
        sampling_params=SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out[0].outputs[0].token_ids) == 3


def test_unsupported_quantized_random_weights(config_only, tmp_path):
    folder = tmp_path / "awq"
    folder.mkdir()
    for f in config_only.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    hf = json.loads((config_only / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="no random weights for quant_method 'awq'"):
        LLM(model=str(folder), device="cpu", load_format="dummy")
