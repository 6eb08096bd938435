"""/v1/embeddings on a pooling engine through the `openai` client: the offline `LLM.embed`
vectors, float and base64, token-id input, dimensions, usage; the 400s on either kind of server."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from engine import LLM, PoolingParams
from tests.server.conftest import MODEL_NAME, make_engine, start_server


@pytest.fixture(scope="module")
def pooling_server(tiny_model):
    handle = start_server(make_engine(tiny_model, runner="pooling"))
    yield handle
    handle.stop()


def test_embeddings_route(pooling_server, tiny_model):
    client = pooling_server.client()
    offline = LLM(model=str(tiny_model), dtype="float32", device="cpu", runner="pooling",
                  kv_cache_memory_bytes=4 << 20)  # fmt: skip
    texts = ["The quick brown fox", "jumps over", "the lazy dog"]
    want = [o.outputs.embedding for o in offline.embed(texts, use_tqdm=False)]
    r = client.embeddings.create(model=MODEL_NAME, input=texts)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == MODEL_NAME
    for d, w in zip(r.data, want, strict=True):
        assert np.allclose(d.embedding, w, atol=1e-5)
    ids = offline.get_tokenizer().encode(texts[0])
    assert r.usage.prompt_tokens == r.usage.total_tokens
    # token ids, base64, dimensions
    r = client.embeddings.create(model=MODEL_NAME, input=ids, encoding_format="base64")
    vec = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype="<f4")  # little-endian f32
    assert np.allclose(vec, want[0], atol=1e-5)
    raw = pooling_server.http().post(
        "/v1/embeddings", json={"input": "jumps over", "encoding_format": "base64"}
    ).json()  # fmt: skip
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, want[1], atol=1e-5)
    r = client.embeddings.create(model=MODEL_NAME, input="jumps over", dimensions=8)
    cut = offline.embed("jumps over", PoolingParams(dimensions=8), use_tqdm=False)
    assert len(r.data[0].embedding) == 8
    assert np.allclose(r.data[0].embedding, cut[0].outputs.embedding, atol=1e-5)
    # errors
    with pytest.raises(openai.BadRequestError, match="exceeds the model's hidden size"):
        client.embeddings.create(model=MODEL_NAME, input="x", dimensions=10_000)
    with pytest.raises(openai.BadRequestError, match="give PoolingParams"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        client.embeddings.create(model=MODEL_NAME, input=[])
    pooling_server.wait_idle()


def test_a_text_server_refuses_embeddings(server):
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        server.client().embeddings.create(model=MODEL_NAME, input="hello")
