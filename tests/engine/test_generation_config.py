"""vLLM's generation_config: default sampling parameters from the model's generation_config.json,
for `LLM.generate` / `chat` without SamplingParams and for the server's omitted fields."""

from __future__ import annotations

import json
import shutil

import pytest
from models_fixtures import build_model, hf_greedy

from engine import LLM, SamplingParams
from engine.generation_config import FILE, override_generation_config_arg, sampling_defaults

QWEN_LIKE = {
    "bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.8,
    "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 7,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_gencfg")
    hf = build_model("llama", folder)
    return folder, hf


def _with_config(folder, tmp_path, config: dict | None):
    """A copy of the model folder whose generation_config.json is `config` (None: no file)."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / FILE).unlink(missing_ok=True)
    if config is not None:
        (copy / FILE).write_text(json.dumps(config))
    return copy


def test_defaults_from_the_file_and_overrides(tmp_path):
    (tmp_path / FILE).write_text(json.dumps(QWEN_LIKE))
    expect = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
              "max_tokens": 7}  # fmt: skip
    assert sampling_defaults(str(tmp_path)) == expect
    assert sampling_defaults(str(tmp_path), "vllm") == {}
    assert sampling_defaults(None, str(tmp_path)) == expect  # another folder's file
    assert sampling_defaults("model.gguf") == sampling_defaults(None) == {}
    over = sampling_defaults(str(tmp_path), "auto", {"temperature": 0.2, "max_new_tokens": 3})
    assert over == {**expect, "temperature": 0.2, "max_tokens": 3}
    assert sampling_defaults(str(tmp_path), "vllm", {"min_p": 0.1}) == {"min_p": 0.1}
    # only the sampling keys: bos / eos / do_sample are not defaults
    (tmp_path / FILE).write_text(json.dumps({"bos_token_id": 1, "do_sample": False}))
    assert sampling_defaults(str(tmp_path)) == {}


def test_bad_values_name_their_source(tmp_path):
    (tmp_path / FILE).write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match=f"from {tmp_path / FILE}: top_p must be in"):
        sampling_defaults(str(tmp_path))
    assert sampling_defaults(str(tmp_path), "vllm") == {}
    with pytest.raises(ValueError, match="from override_generation_config: temperature must be"):
        sampling_defaults(None, "auto", {"temperature": -1})
    with pytest.raises(ValueError, match="unknown key.*'do_sample'.*known: repetition_penalty"):
        sampling_defaults(None, "auto", {"do_sample": True})
    with pytest.raises(ValueError, match="must be 'auto'.*'vllm'.*or a folder"):
        sampling_defaults(None, str(tmp_path / "missing"))
    import argparse

    assert override_generation_config_arg('{"temperature": 0.5}') == {"temperature": 0.5}
    with pytest.raises(argparse.ArgumentTypeError, match="not JSON"):
        override_generation_config_arg("temperature=0.5")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a dict"):
        override_generation_config_arg("[1]")


def test_llm_uses_the_model_defaults(tiny, tmp_path):
    # A file asking for greedy, 5 tokens: generate and chat without SamplingParams follow it;
    # "vllm" ignores it; given SamplingParams are used as they are; overrides go on top.
    folder, hf = tiny
    model = _with_config(folder, tmp_path, {"temperature": 0.0, "max_new_tokens": 5})
    prompt = [5, 9, 23, 7]
    expected = hf_greedy(hf, prompt, 5)[0]
    llm = LLM(model=str(model), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5)
    (out,) = llm.generate(prompt_token_ids=[prompt])
    assert out.outputs[0].token_ids == expected
    given = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert len(llm.generate(prompt_token_ids=[prompt], sampling_params=given)[0].outputs[0]
               .token_ids) == 3  # fmt: skip
    plain = LLM(model=str(model), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20,
                generation_config="vllm")  # fmt: skip
    assert plain.get_default_sampling_params() == SamplingParams()
    over = LLM(model=str(model), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20,
               override_generation_config={"max_new_tokens": 2})  # fmt: skip
    (out2,) = over.generate(prompt_token_ids=[prompt])
    assert out2.outputs[0].token_ids == expected[:2]
    with pytest.raises(ValueError, match="override_generation_config: unknown key"):
        LLM(model=str(model), device="cpu", override_generation_config={"beams": 2})
