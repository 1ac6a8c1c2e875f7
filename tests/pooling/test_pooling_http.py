"""End to end: the real ``serve`` command on MiniLM and on the tiny cross-encoder fixture.

The official ``openai`` client for ``/v1/embeddings`` (float and base64), httpx for
``/pooling``, ``/score``, ``/rerank`` and ``/classify``; values checked against the transformers
golden files. A generation server (the fake engine) refuses the pooling routes, and the pooling
servers refuse the generation routes, with vLLM's messages. Every field of every pooling request
model is used or refused with a 400 naming it (``tests/api/field_probes.py``); MiniLM renders
chat input with ``FIELDS_TEMPLATE``, which reads every template input.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.api.field_probes import (
    CROSS_ENCODER_ROUTES,
    EMBEDDING_MODEL_ROUTES,
    FIELDS_TEMPLATE,
    Route,
    case_id,
    cases,
    check_field,
)
from tests.api.server_utils import ServerProcess, fake_server, real_server
from tests.pooling.conftest import (
    CROSS_ENCODER,
    assert_error,
    assert_pooling_only_server,
    load_golden,
)

PAIR = ["A man is eating food.", "A man is eating a piece of bread."]


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("minilm")
    s = real_server(tmp, "all-minilm-l6-v2", "--served-model-name", "minilm",
                    "--max-model-len", "128", "--max-num-seqs", "8",
                    "--chat-template", FIELDS_TEMPLATE, name="minilm").start(900)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def ce_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("ce")
    s = real_server(tmp, str(CROSS_ENCODER), "--max-model-len", "64", "--max-num-seqs", "4",
                    name="ce").start(900)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(minilm_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=minilm_server.url("/v1"), api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(minilm_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=minilm_server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ce(ce_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ce_server.base_url, timeout=120) as c:
        yield c


# ------------------------------------------------------------------------------- embeddings


def test_embeddings_float_match_transformers(client: openai.OpenAI) -> None:
    meta, gold = load_golden("minilm")
    texts = meta["sentences"][:6]
    res = client.embeddings.create(model="minilm", input=texts, encoding_format="float",
                                   user="tester")
    got = np.array([d.embedding for d in res.data], np.float32)
    assert [d.index for d in res.data] == list(range(6))
    assert got.shape == (6, 384)
    cos = np.sum(got * gold["embeddings"][:6], axis=1)
    assert cos.min() >= 0.9999
    assert abs(float(got[0] @ got[1]) - 0.755) <= 0.005
    n_tokens = sum(len(ids) for ids in meta["token_ids"][:6])
    assert res.usage.prompt_tokens == n_tokens and res.usage.total_tokens == n_tokens
    assert res.model == "minilm" and res.object == "list"


def test_embeddings_base64_equals_float(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="minilm", input=PAIR, encoding_format="float")
    raw = client.embeddings.create(model="minilm", input=PAIR, encoding_format="base64")
    for f, b in zip(floats.data, raw.data, strict=True):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f.embedding, np.float32))
    # Without encoding_format the client asks for base64 and decodes it itself.
    default = client.embeddings.create(model="minilm", input=PAIR)
    np.testing.assert_allclose(np.array(default.data[0].embedding),
                               np.array(floats.data[0].embedding), atol=1e-7)


def test_embeddings_token_id_inputs(client: openai.OpenAI) -> None:
    meta, gold = load_golden("minilm")
    ids = meta["token_ids"][0]
    one = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    many = client.embeddings.create(model="minilm", input=[ids, meta["token_ids"][1]],
                                    encoding_format="float")
    assert one.usage.prompt_tokens == len(ids)
    assert many.usage.prompt_tokens == len(ids) + len(meta["token_ids"][1])
    np.testing.assert_allclose(one.data[0].embedding, gold["embeddings"][0], atol=1e-4)
    np.testing.assert_allclose(many.data[1].embedding, gold["embeddings"][1], atol=1e-4)


def test_embeddings_refusals(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError, match="matryoshka"):
        client.embeddings.create(model="minilm", input="hi", dimensions=128)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    long_text = "word " * 200
    assert_error(http.post("/v1/embeddings", json={"input": long_text}), 400,
                 "Please reduce the length of the input")
    assert_error(http.post("/v1/embeddings", json={"input": "hi", "truncate_prompt_tokens": 129}),
                 400, "Please, select a smaller truncation size")
    assert_error(http.post("/v1/embeddings", json={"input": []}), 400, "must not be empty")
    assert_error(http.post("/v1/embeddings", json={"input": [[101, 999999, 102]]}), 400,
                 "out of vocabulary")
    assert_error(http.post("/v1/embeddings", json={"input": "hi", "encoding_format": "int8"}), 400,
                 "encoding_format")
    assert_error(http.post("/v1/embeddings", json={"input": "hi", "priority": 1}), 400, "priority")
    assert_error(http.post("/v1/embeddings", json={"prompt": "hi"}), 400, "`input` or `messages`")


def test_embeddings_truncation(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"input": "word " * 200, "truncate_prompt_tokens": 10})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 10
    r = http.post("/v1/embeddings", json={"input": "word " * 200, "truncate_prompt_tokens": -1})
    assert r.json()["usage"]["prompt_tokens"] == 128


def test_embeddings_chat_messages_equal_rendered_prompt(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    chat = http.post("/v1/embeddings", json={"messages": messages})
    assert chat.status_code == 200, chat.text
    tok = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    ids = tok.json()["tokens"]
    assert ids[0] != 101  # add_special_tokens is false for chat input, as vLLM
    plain = http.post("/v1/embeddings", json={"input": ids})
    a, b = chat.json(), plain.json()
    assert a["data"] == b["data"] and a["usage"] == b["usage"]


# ------------------------------------------------------------------------------- pooling


def test_pooling_returns_per_token_states(http: httpx.Client) -> None:
    meta, gold = load_golden("minilm")
    r = http.post("/pooling", json={"input": meta["sentences"][0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("pool-") and body["data"][0]["object"] == "pooling"
    states = np.array(body["data"][0]["data"], np.float32)
    assert states.shape == (len(meta["token_ids"][0]), 384)
    np.testing.assert_allclose(states, gold["hidden_0"], atol=2e-4)
    assert body["usage"]["prompt_tokens"] == len(meta["token_ids"][0])
    b64 = http.post("/pooling", json={"input": meta["sentences"][0], "encoding_format": "base64"})
    flat = np.frombuffer(base64.b64decode(b64.json()["data"][0]["data"]), dtype="<f4")
    np.testing.assert_array_equal(flat, states.reshape(-1))


# ------------------------------------------------------------------------------- score/rerank


def test_score_with_embedding_model_is_cosine(http: httpx.Client) -> None:
    r = http.post("/score", json={"model": "minilm", "text_1": PAIR[0], "text_2": PAIR[1]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == [0]
    assert abs(body["data"][0]["score"] - 0.755) <= 0.005
    one_to_n = http.post("/score", json={"text_1": PAIR[0], "text_2": [PAIR[1], PAIR[0]]}).json()
    assert len(one_to_n["data"]) == 2
    assert abs(one_to_n["data"][1]["score"] - 1.0) < 1e-5
    n_to_n = http.post("/v1/score", json={"text_1": PAIR, "text_2": PAIR[::-1]}).json()
    assert [round(d["score"], 4) for d in n_to_n["data"]] == [round(body["data"][0]["score"],
                                                                    4)] * 2
    assert_error(http.post("/score", json={"text_1": PAIR, "text_2": [*PAIR, "x"]}), 400,
                 "1:1, 1:N or N:N")
    assert_error(http.post("/score", json={"text_1": [], "text_2": "x"}), 400, "At least one")


def test_rerank_with_embedding_model(http: httpx.Client) -> None:
    docs = ["The weather is cold today.", "A man eats a sandwich.", "Stock prices fell."]
    r = http.post("/rerank", json={"query": PAIR[0], "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("rerank-") and body["usage"]["total_tokens"] > 0
    results = body["results"]
    assert len(results) == 2 and results[0]["index"] == 1
    assert results[0]["document"]["text"] == docs[1]
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]


def test_generation_routes_refused(http: httpx.Client) -> None:
    assert_pooling_only_server(http, "minilm", 128)


@pytest.mark.parametrize("case", list(cases(EMBEDDING_MODEL_ROUTES)), ids=case_id)
def test_field_is_used_or_refused(case: tuple[Route, str], http: httpx.Client) -> None:
    check_field(http, *case)


# ------------------------------------------------------------------------------- cross-encoder


def test_cross_encoder_scores_match_transformers(ce: httpx.Client) -> None:
    meta, gold = load_golden("cross_encoder")
    pairs = [p for p in meta["pairs"] if len(p[0]) < 60]  # the long pair exceeds 64 tokens
    idx = [meta["pairs"].index(p) for p in pairs]
    r = ce.post("/score", json={"text_1": [p[0] for p in pairs],
                                "text_2": [p[1] for p in pairs]})
    assert r.status_code == 200, r.text
    got = np.array([d["score"] for d in r.json()["data"]])
    np.testing.assert_allclose(got, gold["scores"][idx, 0], atol=1e-4, rtol=0)
    assert r.json()["usage"]["prompt_tokens"] == sum(len(meta["token_ids"][i]) for i in idx)
    one_to_n = ce.post("/score", json={"text_1": meta["pairs"][0][0],
                                       "text_2": [meta["pairs"][0][1], meta["pairs"][1][1]]})
    np.testing.assert_allclose([d["score"] for d in one_to_n.json()["data"]],
                               gold["scores"][:2, 0], atol=1e-4)
    raw = ce.post("/score", json={"text_1": meta["pairs"][0][0], "text_2": meta["pairs"][0][1],
                                  "activation": False})
    assert abs(raw.json()["data"][0]["score"] - float(gold["logits"][0, 0])) < 1e-4


def test_cross_encoder_rerank(ce: httpx.Client) -> None:
    meta, gold = load_golden("cross_encoder")
    query = "What is the capital of France?"
    docs = [meta["pairs"][3][1], meta["pairs"][2][1], "Berlin is big."]
    for path in ("/rerank", "/v1/rerank"):
        r = ce.post(path, json={"query": query, "documents": docs})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert sorted(x["index"] for x in results) == [0, 1, 2]
        scores = [x["relevance_score"] for x in results]
        assert scores == sorted(scores, reverse=True)
        by_index = {x["index"]: x["relevance_score"] for x in results}
        assert abs(by_index[0] - float(gold["scores"][3, 0])) < 1e-4
        assert abs(by_index[1] - float(gold["scores"][2, 0])) < 1e-4
        assert {x["document"]["text"] for x in results} == set(docs)
    top = ce.post("/rerank", json={"query": query, "documents": docs, "top_n": 1}).json()
    assert len(top["results"]) == 1


def test_cross_encoder_classify_and_refusals(ce: httpx.Client) -> None:
    r = ce.post("/classify", json={"input": ["what is jax", "berlin"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["num_classes"] for d in data] == [1, 1] and data[0]["label"] == "LABEL_0"
    assert 0.0 < data[0]["probs"][0] < 1.0
    assert ce.post("/classify", json={"input": []}).json()["data"] == []
    assert_error(ce.post("/classify", json={"input": ""}), 400, "empty")
    assert_error(ce.post("/v1/embeddings", json={"input": "hi"}), 400,
                 "The model does not support Embeddings API")
    assert_error(ce.post("/score", json={"text_1": "a", "text_2": "b",
                                         "truncate_prompt_tokens": 65}),
                 400, "Please, select a smaller truncation size")
    assert_error(ce.post("/score", json={"text_1": "word " * 80, "text_2": "b"}), 400,
                 "for score. Please reduce the length of the input")
    assert_error(ce.post("/v1/completions", json={"prompt": "hi"}), 400,
                 "The model does not support Completions API")
    pooled = ce.post("/pooling", json={"input": "what is jax"})
    assert pooled.status_code == 200 and len(pooled.json()["data"][0]["data"]) == 1


@pytest.mark.parametrize("case", list(cases(CROSS_ENCODER_ROUTES)), ids=case_id)
def test_cross_encoder_field_is_used_or_refused(case: tuple[Route, str], ce: httpx.Client
                                                ) -> None:
    check_field(ce, *case)


# ------------------------------------------------------------------------------- generate model


def test_generation_server_refuses_pooling_routes(tmp_path: Path) -> None:
    server = fake_server(tmp_path, "--max-model-len", "512").start(120)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            for path, body, api in (
                    ("/v1/embeddings", {"input": "hi"}, "Embeddings API"),
                    ("/pooling", {"input": "hi"}, "Pooling API"),
                    ("/score", {"text_1": "a", "text_2": "b"}, "Score API"),
                    ("/rerank", {"query": "a", "documents": ["b"]}, "Rerank (Score) API"),
                    ("/classify", {"input": "hi"}, "Classification API")):
                assert_error(c.post(path, json=body), 400, f"The model does not support {api}")
    finally:
        assert server.stop() == 0
