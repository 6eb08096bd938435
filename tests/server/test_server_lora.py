"""LoRA adapters served as models (`hal serve --enable-lora --lora-modules NAME=PATH`): the
model list, completions through each adapter equal to transformers on PEFT's merge, unknown
names and bad flags refused."""

from __future__ import annotations

import argparse

import pytest

from engine.server.cli import add_serve, lora_modules
from hal.errors import HalError
from tests.engine.lora_fixtures import NUM_TOKENS, PROMPT, build_lora_fixture
from tests.server.conftest import MODEL_NAME, make_engine, start_server


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    fx = build_lora_fixture(tmp_path_factory.mktemp("lora_server"))
    engine = make_engine(fx.base, enable_lora=True, max_loras=1, max_lora_rank=8)
    handle = start_server(engine, lora_modules={n: str(p) for n, p in fx.adapters.items()})
    yield fx, handle
    handle.stop()


def complete(handle, model: str, **kw):
    body = {"model": model, "prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **kw}  # fmt: skip
    with handle.http() as http:
        return http.post("/v1/completions", json=body)


def test_models_and_completions_through_adapters(lora_server) -> None:
    fx, handle = lora_server
    with handle.http() as http:
        cards = http.get("/v1/models").json()["data"]
        one = http.get("/v1/models/qv4").json()
    assert [c["id"] for c in cards] == [MODEL_NAME, "all8", "qv4"]
    assert cards[1]["parent"] == MODEL_NAME and cards[1]["root"] == str(fx.adapters["all8"])
    assert one["id"] == "qv4" and one["parent"] == MODEL_NAME
    # one slot: the adapters take turns, each request gets its own adapter's tokens
    for name in ("all8", "qv4", MODEL_NAME, "all8"):
        r = complete(handle, name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name
        assert body["choices"][0]["token_ids"] == fx.refs[None if name == MODEL_NAME else name]
    handle.wait_idle()


def test_unknown_model_names_what_is_served(lora_server) -> None:
    _, handle = lora_server
    r = complete(handle, "nope")
    assert r.status_code == 404
    error = r.json()["error"]
    assert f"`{MODEL_NAME}`, `all8`, `qv4`" in error["message"]
    assert error["code"] == "model_not_found"


def test_flags() -> None:
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--lora-modules", "a=/x", "b=/y"])
    with pytest.raises(HalError, match="--lora-modules needs --enable-lora"):
        lora_modules(args)
    args = parser.parse_args(["serve", "--enable-lora", "--lora-modules", "a=/x", "a=/y"])
    with pytest.raises(HalError, match="'a' is given twice"):
        lora_modules(args)
    args = parser.parse_args(
        ["serve", "--enable-lora", "--lora-modules", "a=/x", "--max-loras", "3"]
    )
    assert lora_modules(args) == {"a": "/x"} and args.max_loras == 3 and args.enable_lora
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--enable-lora", "--lora-modules", "noequals"])


def test_adapters_loaded_and_unloaded_at_run_time(tmp_path_factory) -> None:
    # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (--allow-runtime-lora-updating):
    # a loaded adapter serves as a model at once; an unloaded one is gone from the list and
    # its name gets 404; bad folders and names are refused with the reason.
    fx = build_lora_fixture(tmp_path_factory.mktemp("lora_runtime"))
    engine = make_engine(fx.base, enable_lora=True, max_loras=1, max_lora_rank=8)
    handle = start_server(engine, allow_runtime_lora_updating=True)
    try:
        with handle.http() as http:
            load = {"lora_name": "qv4", "lora_path": str(fx.adapters["qv4"])}
            r = http.post("/v1/load_lora_adapter", json=load)
            assert r.status_code == 200 and "added successfully" in r.text, r.text
            again = http.post("/v1/load_lora_adapter", json=load)
            assert again.status_code == 400 and "already been loaded" in again.text
            bad = http.post("/v1/load_lora_adapter",
                            json={"lora_name": "x", "lora_path": str(fx.base)})  # fmt: skip
            assert bad.status_code == 400 and "adapter_config.json not found" in bad.text
            assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [MODEL_NAME, "qv4"]
            out = complete(handle, "qv4").json()
            assert out["choices"][0]["token_ids"] == fx.refs["qv4"]
            r = http.post("/v1/unload_lora_adapter", json={"lora_name": "qv4"})
            assert r.status_code == 200 and "removed successfully" in r.text
            assert complete(handle, "qv4").status_code == 404
            gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "qv4"})
            assert gone.status_code == 404 and "cannot be found" in gone.text
            # loaded again (a new id): served again, and nothing of the old one is kept
            assert http.post("/v1/load_lora_adapter", json=load).status_code == 200
            assert complete(handle, "qv4").json()["choices"][0]["token_ids"] == fx.refs["qv4"]
        handle.wait_idle()
        manager = engine.engine.lora
        served = handle.app.state.server.lora_modules["qv4"].lora_int_id
        assert list(manager.adapters) == list(manager.slot_of) == [served]
    finally:
        handle.stop()


def test_runtime_updating_routes_need_the_switch(lora_server) -> None:
    _, handle = lora_server  # started without allow_runtime_lora_updating
    with handle.http() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 404
