"""The server's request defaults from the model's generation_config.json (vLLM's rule): a field a
request leaves out takes the file's value, a field it gives stays; --generation-config vllm and
overrides as for `LLM`."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.generation_config import FILE
from engine.server.protocol import ChatCompletionRequest
from tests.server.conftest import MODEL_NAME, make_engine, start_server

FILE_VALUES = {"temperature": 0.0, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
               "repetition_penalty": 1.1, "max_new_tokens": 4}  # fmt: skip


def test_omitted_fields_take_the_defaults() -> None:
    defaults = {"temperature": 0.0, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                "repetition_penalty": 1.1, "max_tokens": 4}  # fmt: skip
    msgs = [{"role": "user", "content": "hi"}]
    bare = ChatCompletionRequest(messages=msgs).to_sampling_params(8, None, defaults=defaults)
    assert (bare.temperature, bare.top_p, bare.top_k, bare.min_p, bare.repetition_penalty) == (
        0.0, 0.9, 20, 0.05, 1.1,
    )  # fmt: skip
    given = ChatCompletionRequest(messages=msgs, temperature=0.5, top_k=3, min_p=0.0,
                                  repetition_penalty=1.0)  # fmt: skip
    p = given.to_sampling_params(8, None, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
        0.5, 0.9, 3, 0.0, 1.0,
    )  # fmt: skip
    plain = ChatCompletionRequest(messages=msgs).to_sampling_params(8, None)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p,
            plain.repetition_penalty) == (1.0, 1.0, -1, 0.0, 1.0)  # fmt: skip


@pytest.fixture(scope="module")
def model_with_config(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gencfg") / "model"
    shutil.copytree(tiny_model, folder)
    (folder / FILE).write_text(json.dumps(FILE_VALUES))
    return folder


@pytest.mark.parametrize("mode", ["auto", "vllm"])
def test_max_tokens_default_from_the_file(model_with_config, mode: str) -> None:
    # max_new_tokens 4 in the file: requests without max_tokens get 4 tokens ("vllm": the
    # server's own defaults, 16 on completions); a request's own max_tokens stays.
    handle = start_server(make_engine(model_with_config, generation_config=mode))
    try:
        client = handle.client()
        extra = {"ignore_eos": True}
        cmpl = client.completions.create(model=MODEL_NAME, prompt="Hello", extra_body=extra)
        assert cmpl.usage.completion_tokens == (4 if mode == "auto" else 16)
        chat = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], extra_body=extra,
            max_tokens=6 if mode == "vllm" else None,
        )  # fmt: skip
        assert chat.usage.completion_tokens == (4 if mode == "auto" else 6)
        own = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2,
                                        extra_body=extra)  # fmt: skip
        assert own.usage.completion_tokens == 2
        if mode == "auto":  # temperature 0 from the file: the same text twice
            again = client.completions.create(model=MODEL_NAME, prompt="Hello", extra_body=extra)
            assert again.choices[0].text == cmpl.choices[0].text
    finally:
        handle.stop()


def test_chat_template_of_the_server_and_of_a_request(tiny_model) -> None:
    # --chat-template replaces the model's template for chat and /tokenize; a request's own
    # chat_template (vLLM's field) replaces the server's.
    server_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    request_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    handle = start_server(make_engine(tiny_model), chat_template=server_template)
    try:
        tok = handle.engine.tokenizer
        msgs = [{"role": "user", "content": "Hi"}]
        with handle.http() as http:
            r = http.post("/tokenize", json={"messages": msgs})
            assert r.json()["tokens"] == tok.encode("[Hi]", add_special_tokens=False)
        client = handle.client()
        chat = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1)
        assert chat.usage.prompt_tokens == len(tok.encode("[Hi]", add_special_tokens=False))
        own = client.chat.completions.create(
            model=MODEL_NAME, messages=msgs, max_tokens=1,
            extra_body={"chat_template": request_template},
        )  # fmt: skip
        assert own.usage.prompt_tokens == len(tok.encode("<Hi>", add_special_tokens=False))
    finally:
        handle.stop()
