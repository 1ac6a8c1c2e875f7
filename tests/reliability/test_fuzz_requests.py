"""Property-based fuzzing (hypothesis) of every endpoint's request model on the real server.

Positive: requests drawn from each model's valid ranges are all served (200, the right number of
choices, usage within max_tokens; a stream ends with [DONE] and no error event). Negative: a valid
base request with a few fields replaced by arbitrary JSON, arbitrary JSON documents, and
arbitrary bytes: never a 5xx, every 4xx in the OpenAI error shape. After each property the server
still generates correctly. ``max_tokens`` stays at 1-2 so a few hundred cases per endpoint take
seconds; ``XLASERVE_FUZZ_SCALE`` multiplies the case counts for a longer hunt.

Fields left out of the negative mutations, and why: the structured-output fields
(``guided_*``, ``structured_outputs``, ``response_format``) compile grammars whose abuse cases
belong to the structured-outputs suite, and ``max_tokens`` draws only invalid or tiny values so
that no case generates hundreds of tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.api.pooling_protocol import EmbeddingCompletionRequest
from serving.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeCompletionRequest,
)
from tests.api.server_utils import ServerProcess
from tests.api.test_http_errors import check_error
from tests.reliability.conftest import HOSTILE_AUTH, HOSTILE_LIMITS, hostile_alive

SCALE = float(os.environ.get("XLASERVE_FUZZ_SCALE", "1"))
VOCAB = 49152  # SmolLM2-135M's vocabulary; test_vocab_edge checks it against the server
LIM = HOSTILE_LIMITS
POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
               "/v1/embeddings", "/pooling", "/score", "/v1/score", "/rerank", "/v1/rerank",
               "/v2/rerank", "/classify"]
NOT_MUTATED = {"guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs",
               "response_format", "max_tokens", "max_completion_tokens"}


def fuzz_settings(examples: int) -> Any:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_http(hostile_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile_server.base_url, headers=HOSTILE_AUTH,
                      timeout=120) as client:
        yield client
        assert client.get("/health").status_code == 200
        hostile_alive(client)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | FLOAT | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
TOKEN = st.integers(0, VOCAB - 1)
# None (up to the context) or a valid count above 2 would make a case generate for seconds
TINY_OR_INVALID_MAX_TOKENS = st.one_of(
    st.integers(1, 2), st.integers(max_value=0), st.integers(min_value=LIM["max_model_len"]),
    JSON.filter(lambda v: v is not None and not (type(v) is int and v > 2)))


@st.composite
def sampling(draw: st.DrawFn, max_tokens_field: str = "max_tokens") -> dict[str, Any]:
    """Valid values of the shared sampling fields (n stays 1; ``positive_n`` sets it)."""
    out: dict[str, Any] = {max_tokens_field: draw(st.integers(1, 2))}
    opt = {
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 1),
        "top_k": st.sampled_from([-1, 0, 1, 5]) | st.integers(1, 2**31 - 1),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.05, 2), "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": TEXT | st.lists(TEXT, max_size=4), "stop_token_ids": st.lists(TOKEN, max_size=8),
        "include_stop_str_in_output": st.booleans(), "ignore_eos": st.booleans(),
        "logit_bias": st.dictionaries(TOKEN.map(str), st.floats(-100, 100), max_size=5),
        "skip_special_tokens": st.booleans(), "spaces_between_special_tokens": st.booleans(),
        "truncate_prompt_tokens": st.integers(1, 50), "user": TEXT, "cache_salt": TEXT,
        "return_token_ids": st.booleans(), "min_tokens": st.integers(0, 1),
    }
    for name in draw(st.sets(st.sampled_from(sorted(opt)), max_size=6)):
        out[name] = draw(opt[name])
    return out


def stream_fields(draw: st.DrawFn) -> dict[str, Any]:
    if not draw(st.booleans()):
        return {}
    return {"stream": True, "stream_options": {"include_usage": draw(st.booleans())}}


@st.composite
def positive_completion(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(TEXT | st.lists(TEXT, min_size=1, max_size=3) |
                  st.lists(TOKEN, min_size=1, max_size=20))
    body = {"prompt": prompt, **draw(sampling()), **stream_fields(draw)}
    if draw(st.booleans()):
        body["logprobs"] = draw(st.integers(0, LIM["max_logprobs"]))
    if draw(st.booleans()):
        body["echo"] = True
    if not body.get("stream") and draw(st.booleans()):
        body["prompt_logprobs"] = draw(st.integers(0, LIM["max_logprobs"]))
    if isinstance(prompt, str) and body.get("temperature", 1.0) > 0.01:
        body["n"] = draw(st.integers(1, LIM["max_n"]))
    return body


@st.composite
def positive_chat(draw: st.DrawFn) -> dict[str, Any]:
    content = TEXT | st.lists(TEXT.map(lambda t: {"type": "text", "text": t}), min_size=1,
                              max_size=3)
    history = draw(st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]), "content": content}),
        max_size=3))
    messages = [*history, {"role": "user", "content": draw(content)}]
    field = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body = {"messages": messages, **draw(sampling(field)), **stream_fields(draw)}
    if draw(st.booleans()):
        body["logprobs"] = True
        body["top_logprobs"] = draw(st.integers(0, LIM["max_logprobs"]))
    if body.get("temperature", 1.0) > 0.01:
        body["n"] = draw(st.integers(1, LIM["max_n"]))
    if draw(st.booleans()):
        body["chat_template_kwargs"] = {"enable_thinking": draw(st.booleans())}
    return body


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], model: type[Any]) -> dict[str, Any]:
    """``base`` with 1-3 of ``model``'s fields (or unknown ones) set to arbitrary JSON."""
    names = sorted(set(model.model_fields) - NOT_MUTATED)
    body = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names) | st.text(max_size=12))
        body[name] = draw(JSON)
    if "max_tokens" in model.model_fields and draw(st.booleans()):
        body["max_tokens"] = draw(TINY_OR_INVALID_MAX_TOKENS)
    return body


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_not_5xx(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        check_error(r, r.status_code)


def events(r: httpx.Response) -> list[Any]:
    lines = [ln for ln in r.text.split("\n") if ln.startswith("data: ")]
    assert lines and lines[-1] == "data: [DONE]", r.text[-300:]
    out = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert not any("error" in e for e in out), out
    return out


def check_served(r: httpx.Response, body: dict[str, Any], prompts: int) -> None:
    assert r.status_code == 200, (body, r.text[:500])
    n = body.get("n", 1)
    budget = body.get("max_tokens") or body.get("max_completion_tokens")
    if body.get("stream"):
        evs = events(r)
        finished = [c for e in evs for c in e["choices"] if c.get("finish_reason")]
        assert len(finished) == n * prompts
        return
    out = r.json()
    assert len(out["choices"]) == n * prompts
    assert out["usage"]["completion_tokens"] <= budget * n * prompts
    for c in out["choices"]:
        assert c["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def test_vocab_edge(fuzz_http: httpx.Client) -> None:
    assert fuzz_http.post("/detokenize", json={"tokens": [VOCAB - 1]}).status_code == 200
    check_error(fuzz_http.post("/detokenize", json={"tokens": [VOCAB]}), 400, "vocabulary")


@fuzz_settings(50)
@given(body=positive_completion())
def test_completions_positive(fuzz_http: httpx.Client, body: dict[str, Any]) -> None:
    prompt = body["prompt"]
    prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1
    check_served(fuzz_http.post("/v1/completions", json=body), body, prompts)


@fuzz_settings(40)
@given(body=positive_chat())
def test_chat_positive(fuzz_http: httpx.Client, body: dict[str, Any]) -> None:
    check_served(fuzz_http.post("/v1/chat/completions", json=body), body, 1)


@fuzz_settings(60)
@given(body=st.fixed_dictionaries({"prompt": TEXT}, optional={
    "add_special_tokens": st.booleans(), "return_token_strs": st.booleans()}) |
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
        min_size=1, max_size=3)}, optional={"add_generation_prompt": st.booleans()}))
def test_tokenize_positive(fuzz_http: httpx.Client, body: dict[str, Any]) -> None:
    r = fuzz_http.post("/tokenize", json=body)
    assert r.status_code == 200, (body, r.text)
    out = r.json()
    assert out["count"] == len(out["tokens"])
    r = fuzz_http.post("/detokenize", json={"tokens": out["tokens"]})
    assert r.status_code == 200, r.text


@fuzz_settings(150)
@given(body=mutated({"prompt": "Hello", "max_tokens": 1}, CompletionRequest))
def test_completions_negative(fuzz_http: httpx.Client, body: dict[str, Any]) -> None:
    check_not_5xx(fuzz_http.post("/v1/completions", json=body))


@fuzz_settings(150)
@given(body=mutated({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                    ChatCompletionRequest))
def test_chat_negative(fuzz_http: httpx.Client, body: dict[str, Any]) -> None:
    check_not_5xx(fuzz_http.post("/v1/chat/completions", json=body))


@fuzz_settings(100)
@given(path_body=st.sampled_from([
    ("/tokenize", {"prompt": "hi"}, TokenizeCompletionRequest),
    ("/detokenize", {"tokens": [1, 2]}, DetokenizeRequest),
    ("/v1/embeddings", {"input": "hi"}, EmbeddingCompletionRequest)]).flatmap(
        lambda pbm: st.tuples(st.just(pbm[0]), mutated(pbm[1], pbm[2]))))
def test_other_routes_negative(fuzz_http: httpx.Client, path_body: tuple[str, Any]) -> None:
    path, body = path_body
    check_not_5xx(fuzz_http.post(path, json=body))


@fuzz_settings(200)
@given(path=st.sampled_from(POST_ROUTES),
       content=JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
       ctype=st.sampled_from(["application/json", "application/json; charset=utf-8",
                              "text/plain", ""]))
def test_arbitrary_bodies(fuzz_http: httpx.Client, path: str, content: bytes,
                          ctype: str) -> None:
    r = fuzz_http.post(path, content=content, headers={"Content-Type": ctype} if ctype else {})
    check_not_5xx(r)
