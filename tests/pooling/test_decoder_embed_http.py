"""End to end: ``serve --task embed`` on the default model (SmolLM2-135M-Instruct, a decoder).

The real ``serve`` command with no model argument, on a free loopback port; the official
``openai`` client for ``/v1/embeddings`` (float and base64), httpx for ``/pooling``, ``/score``,
``/rerank`` and the refused generation routes. Values are checked against the transformers
golden file (``tests/golden/pooling/smollm2_embed.*``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.api.server_utils import ServerProcess, real_server
from tests.pooling.conftest import assert_error, assert_pooling_only_server, load_golden
from tests.pooling.test_decoder_pooling import EMB_ATOL, STATE_ATOL

NAME = "smollm2-embed"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("decoder-embed")
    # 128 tokens per step and per sequence: 4 packed buckets (16..128) x 2 output kinds. f32
    # weights: the golden comparison is to 1e-5 (the CPU default, f16 weights, is ~4e-4 off).
    s = real_server(tmp, "--task", "embed", "--served-model-name", NAME, "--dtype", "float32",
                    "--cpu-weight-dtype", "f32",
                    "--max-model-len", "128", "--max-num-seqs", "4",
                    "--max-num-batched-tokens", "128", name="decoder-embed").start(900)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def test_embeddings_float_match_transformers(client: openai.OpenAI) -> None:
    meta, gold = load_golden("smollm2_embed")
    res = client.embeddings.create(model=NAME, input=meta["sentences"],
                                   encoding_format="float")
    got = np.array([d.embedding for d in res.data], np.float32)
    assert [d.index for d in res.data] == list(range(8)) and got.shape == (8, 576)
    want = gold["embeddings"]
    assert np.sum(got * want, axis=1).min() >= 0.9999
    assert np.abs(got - want).max() <= EMB_ATOL
    n_tokens = sum(len(ids) for ids in meta["token_ids"])
    assert res.usage.prompt_tokens == n_tokens and res.usage.total_tokens == n_tokens
    assert res.model == NAME


def test_embeddings_base64_equals_float(client: openai.OpenAI) -> None:
    meta, gold = load_golden("smollm2_embed")
    texts = meta["sentences"][:3]
    floats = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    raw = client.embeddings.create(model=NAME, input=texts, encoding_format="base64")
    for f, b in zip(floats.data, raw.data, strict=True):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f.embedding, np.float32))
    default = client.embeddings.create(model=NAME, input=meta["token_ids"][0])  # ids; base64
    np.testing.assert_allclose(default.data[0].embedding, gold["embeddings"][0], atol=EMB_ATOL)


def test_embeddings_normalize_false_and_truncation(http: httpx.Client) -> None:
    meta, gold = load_golden("smollm2_embed")
    r = http.post("/v1/embeddings", json={"input": meta["sentences"][0], "normalize": False})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], gold["last_unnormalized"][0],
                               atol=STATE_ATOL)
    r = http.post("/v1/embeddings", json={"input": "word " * 200, "truncate_prompt_tokens": 10})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10
    assert_error(http.post("/v1/embeddings", json={"input": "word " * 200}), 400,
                 "Please reduce the length of the input")
    assert_error(http.post("/v1/embeddings", json={"input": "hi", "dimensions": 64}), 400,
                 "matryoshka")


def test_embeddings_of_chat_messages_use_the_models_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = http.post("/v1/embeddings", json={"messages": messages})
    assert chat.status_code == 200, chat.text
    tok = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    ids = tok.json()["tokens"]
    assert len(ids) > 8  # SmolLM2's template adds a system turn and <|im_start|> markers
    plain = http.post("/v1/embeddings", json={"input": ids})
    # The same tokens, so the same vector; the second request reuses the first's cached pages
    # (the prefix cache serves LAST pooling), so its last token is computed in a smaller step:
    # equal up to float summation order, not bit for bit.
    got = [d["embedding"] for d in plain.json()["data"]]
    want = [d["embedding"] for d in chat.json()["data"]]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert chat.json()["usage"] == plain.json()["usage"]


def test_pooling_returns_per_token_states(http: httpx.Client) -> None:
    meta, gold = load_golden("smollm2_embed")
    r = http.post("/pooling", json={"input": meta["sentences"][0]})
    assert r.status_code == 200, r.text
    states = np.array(r.json()["data"][0]["data"], np.float32)
    assert states.shape == (len(meta["token_ids"][0]), 576)
    np.testing.assert_allclose(states, gold["hidden_0"], atol=STATE_ATOL, rtol=0)


def test_score_is_cosine_and_rerank_orders_by_it(http: httpx.Client) -> None:
    meta, gold = load_golden("smollm2_embed")
    a, b, c = meta["sentences"][0], meta["sentences"][1], meta["sentences"][6]
    r = http.post("/score", json={"model": NAME, "text_1": a, "text_2": [b, c]})
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    emb = gold["embeddings"]
    np.testing.assert_allclose(scores, [emb[0] @ emb[1], emb[0] @ emb[6]], atol=1e-5)
    rr = http.post("/rerank", json={"query": a, "documents": [c, b]})
    assert rr.status_code == 200, rr.text
    results = rr.json()["results"]
    relevance = [x["relevance_score"] for x in results]
    assert relevance == sorted(relevance, reverse=True)
    by_index = {x["index"]: x["relevance_score"] for x in results}
    np.testing.assert_allclose([by_index[0], by_index[1]], [scores[1], scores[0]], atol=1e-5)


def test_generation_routes_refused(http: httpx.Client) -> None:
    assert_pooling_only_server(http, NAME, 128)
