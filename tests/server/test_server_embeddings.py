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


def _cos(u, v) -> float:
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_score_and_rerank(pooling_server, tiny_model):
    http = pooling_server.http()
    offline = LLM(model=str(tiny_model), dtype="float32", device="cpu", runner="pooling",
                  kv_cache_memory_bytes=4 << 20)  # fmt: skip
    query, docs = "brown fox", ["a quick brown fox", "lazy dogs sleep", "foxes are brown"]
    emb = {t: o.outputs.embedding for t, o in zip([query, *docs],
                                                  offline.embed([query, *docs], use_tqdm=False),
                                                  strict=True)}  # fmt: skip
    want = [_cos(emb[query], emb[d]) for d in docs]
    r = http.post("/v1/score", json={"text_1": query, "text_2": docs}).json()
    assert [d["index"] for d in r["data"]] == [0, 1, 2] and r["object"] == "list"
    assert np.allclose([d["score"] for d in r["data"]], want, atol=1e-5)
    pairwise = http.post("/score", json={"text_1": [query, docs[0]], "text_2": docs[1:]}).json()
    assert np.allclose([d["score"] for d in pairwise["data"]],
                       [_cos(emb[query], emb[docs[1]]), _cos(emb[docs[0]], emb[docs[2]])],
                       atol=1e-5)  # fmt: skip
    got = offline.score(query, docs, use_tqdm=False)
    assert np.allclose([o.outputs.score for o in got], want, atol=1e-5)
    r = http.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 2}).json()
    best = sorted(range(3), key=lambda i: -want[i])[:2]
    assert [x["index"] for x in r["results"]] == best
    assert [x["document"]["text"] for x in r["results"]] == [docs[i] for i in best]
    assert np.allclose([x["relevance_score"] for x in r["results"]], [want[i] for i in best],
                       atol=1e-5)  # fmt: skip
    # errors
    bad = http.post("/v1/score", json={"text_1": [query, query], "text_2": docs})
    assert bad.status_code == 400 and "text_1 has 2 items and text_2 3" in bad.text
    assert http.post("/rerank", json={"query": query, "documents": []}).status_code == 400
    with pytest.raises(ValueError, match="text_1 has 2 items"):
        offline.score([query, query], docs)
    pooling_server.wait_idle()


def test_a_text_server_refuses_scores(server):
    r = server.http().post("/v1/score", json={"text_1": "a", "text_2": "b"})
    assert r.status_code == 400 and "--runner pooling" in r.text


def test_truncate_prompt_tokens_on_every_route(pooling_server, server):
    long = " ".join(["word"] * 30)  # ~150 tokens of the tiny vocabulary: fits the context
    http = pooling_server.http()
    full = http.post("/v1/embeddings", json={"input": long}).json()
    cut = http.post("/v1/embeddings", json={"input": long, "truncate_prompt_tokens": 5}).json()
    assert cut["usage"]["prompt_tokens"] == 5 < full["usage"]["prompt_tokens"]
    bad = http.post("/v1/embeddings", json={"input": long, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and "truncate_prompt_tokens must be" in bad.text
    r = server.http().post("/v1/completions", json={
        "prompt": long, "max_tokens": 2, "echo": True, "truncate_prompt_tokens": 4,
        "ignore_eos": True, "temperature": 0,
    }).json()  # fmt: skip
    assert r["usage"]["prompt_tokens"] == 4, r
    assert len(r["choices"][0]["text"]) < len(long)  # the echo is the kept tokens' text
