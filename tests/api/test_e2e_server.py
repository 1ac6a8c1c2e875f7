"""End to end: the real ``serve`` command, the real SmolLM2-135M-Instruct, the official client.

One server for the whole module, started from a YAML config plus command-line overrides (which
the precedence test checks), with an API key and request-id headers.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.server_utils import ServerProcess, real_server
from tests.api.test_http_errors import check_error

KEY = "e2e-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "smollm2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tmp / "serve.yaml"
    cfg.write_text(
        "max-model-len: 2048\n"
        "max-num-seqs: 4            # overridden on the command line\n"
        f"served-model-name: [{NAME}, HuggingFaceTB/SmolLM2-135M-Instruct]\n"
        f"api-key: [{KEY}]\n"
        "enable-request-id-headers: true\n"
        "trust-request-chat-template: true\n"
        "max-n: 4\n")
    s = real_server(tmp, "--config", str(cfg), "--max-num-seqs", "16").start(900)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300) as c:
        yield c


def events(r: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in r.iter_lines():
        if line:
            assert line.startswith("data: ")
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def sse(http: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return events(r)


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def good_request(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=FRANCE, max_tokens=12,
                                       temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")


# -- config, info, auth -----------------------------------------------------------------------


def test_config_precedence_and_models(server: ServerProcess, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"]  # from the YAML
    card = httpx.get(server.url("/v1/models"), headers=AUTH).json()["data"][0]
    assert card["max_model_len"] == 2048  # from the YAML
    log = server.log()
    options = re.search(r"Non-default options: (\{.*\})", log)
    assert options and "'max_num_seqs': 16" in options.group(1)  # the command line won
    assert "Detected the chat template content format to be 'string'" in log


def test_open_and_protected_routes(server: ServerProcess) -> None:
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/health")).content == b""
    assert "version" in httpx.get(server.url("/version")).json()
    assert "xlaserve:num_requests_running" in httpx.get(server.url("/metrics")).text
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize")):
        check_error(httpx.request(method, server.url(path), json={}), 401, "API key")
        check_error(httpx.request(method, server.url(path), json={},
                                  headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong",
                      max_retries=0).models.list()


def test_request_id_header(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", headers={"X-Request-Id": "e2e-42"},
                  json={"messages": FRANCE, "max_tokens": 2})
    assert r.headers["x-request-id"] == "e2e-42" and r.json()["id"] == "chatcmpl-e2e-42"
    assert len(http.get("/health").headers["x-request-id"]) == 32


# -- generation ------------------------------------------------------------------------------


def test_chat_answers(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=FRANCE, max_tokens=32,
                                       temperature=0)
    (c,) = r.choices
    assert c.message.role == "assistant" and "Paris" in (c.message.content or "")
    assert c.finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens == 37
    assert r.model == NAME and r.id.startswith("chatcmpl-")


def test_completion_basic(client: openai.OpenAI) -> None:
    r = client.completions.create(model=NAME, prompt="Hello, my name is", max_tokens=5,
                                  temperature=0)
    (c,) = r.choices
    assert c.finish_reason == "length" and len(c.text) >= 5
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "The history of Rome", "max_tokens": 24}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}],
                              "max_tokens": 24}),
])
def test_stream_equals_non_stream(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    body = {**body, "temperature": 0}
    full = http.post(path, json=body).json()["choices"][0]
    evs = sse(http, path, {**body, "stream_options": {"include_usage": True}})
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 24
    if "messages" in body:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == full["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == full["text"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]
                if c["choices"][0].get("finish_reason")]
    assert finishes == [full["finish_reason"]]


def test_sixteen_concurrent_equal_alone(http: httpx.Client) -> None:
    topics = ["the moon", "bread", "rivers", "chess", "volcanoes", "owls", "rain", "music",
              "paper", "bees", "trains", "glass", "salt", "kites", "maps", "tea"]
    bodies = [{"model": NAME, "messages": [{"role": "user", "content": f"One fact about {t}."}],
               "max_tokens": 16, "temperature": 0} for t in topics]

    def run(b: dict[str, Any]) -> str:
        r = http.post("/v1/chat/completions", json=b)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    alone = [run(b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, bodies))
    assert together == alone


def test_seeded_sampling_and_n(http: httpx.Client) -> None:
    body = {"prompt": "My favourite animal is", "max_tokens": 12, "temperature": 1.0,
            "seed": 1234, "n": 2, "ignore_eos": True}
    a = http.post("/v1/completions", json=body).json()
    b = http.post("/v1/completions", json=body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert a["usage"]["completion_tokens"] == 24


def test_completion_logprobs_echo_and_stop(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 6,
                                          "temperature": 0, "logprobs": 3, "echo": True}).json()
    c = r["choices"][0]
    assert c["text"].startswith("The capital of France is")
    lp = c["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == r["usage"]["prompt_tokens"] + 6
    assert all(3 <= len(t) <= 4 for t in lp["top_logprobs"][1:])
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    r = http.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "max_tokens": 30,
                                          "temperature": 0, "stop": [" 7"]}).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == " 7" and " 7" not in c["text"]


def test_chat_logprobs_bytes(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 6,
                                               "temperature": 0, "logprobs": True,
                                               "top_logprobs": 4}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    joined = b"".join(bytes(i["bytes"]) for i in content).decode()
    assert joined == r["choices"][0]["message"]["content"]
    assert all(len(i["top_logprobs"]) == 4 for i in content)
    assert content[0]["top_logprobs"][0]["logprob"] >= content[0]["top_logprobs"][1]["logprob"]


def test_logit_bias_min_tokens_and_stop_token_ids(http: httpx.Client, server: ServerProcess
                                                  ) -> None:
    tid = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}
                    ).json()["tokens"][0]
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0,
                                          "logit_bias": {str(tid): 100},
                                          "return_token_ids": True}).json()
    assert r["choices"][0]["token_ids"] == [tid] * 4
    r = http.post("/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 40,
                                               "min_tokens": 30, "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] >= 30
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "temperature": 0,
                                          "stop_token_ids": [tid],
                                          "logit_bias": {str(tid): 100}}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == tid


def test_prompt_logprobs_and_continue_final_message(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "Paris is the capital of", "max_tokens": 1,
                                          "prompt_logprobs": 1}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == r["usage"]["prompt_tokens"]
    assert all(1 <= len(p) <= 2 for p in plp[1:])
    msgs = [*FRANCE, {"role": "assistant", "content": "The capital of France is"}]
    r = http.post("/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 5, "temperature": 0, "echo": True,
        "continue_final_message": True, "add_generation_prompt": False}).json()
    content = r["choices"][0]["message"]["content"]
    assert content.startswith("The capital of France is") and "Paris" in content


def test_cache_salt_separates_prefix_cache_namespaces(http: httpx.Client) -> None:
    """On the real engine: a salted request gets no prefix-cache hit from pages an unsalted or
    differently salted identical prompt left, and vice versa; the same salt (or none) hits."""
    def cached(prompt: str, salt: str | None = None) -> int:
        body: dict[str, Any] = {"model": NAME, "prompt": prompt, "max_tokens": 1,
                                "temperature": 0}
        if salt is not None:
            body["cache_salt"] = salt
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    # Each prompt starts with its own nonce: no earlier request can have cached any page of it.
    shared = f"{uuid.uuid4().hex} The river town of Aldermere sat on a slow green river. " * 2
    assert cached(shared) == 0
    assert cached(shared) >= 32  # the unsalted namespace hits (16-token pages)
    assert cached(shared, "tenant-a") == 0
    assert cached(shared, "tenant-a") >= 32
    assert cached(shared, "tenant-b") == 0
    first_salted = f"{uuid.uuid4().hex} The librarian stayed for thirty-one years there. " * 2
    assert cached(first_salted, "tenant-c") == 0
    assert cached(first_salted) == 0
    assert cached(first_salted) >= 32
    assert cached(first_salted, "tenant-c") >= 32


def test_tokenize_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == 2048
    assert r["token_strs"] == ["Hello", "Ġworld"]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == \
        {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": FRANCE}).json()
    assert chat["count"] == 37


# -- errors, disconnects, sandbox --------------------------------------------------------------


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "max allowed: 20"),
    ("/v1/completions", {"prompt": ""}, 400, "non-empty"),
    ("/v1/completions", {"prompt": [999999]}, 400, "out of vocabulary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4096}, 400, "2048"),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "greedy"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "The model `nope` does not"),
    ("/v1/chat/completions", {"messages": FRANCE, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "--enable-auto-tool-choice"),
    ("/v1/chat/completions", {"messages": FRANCE, "guided_regex": "(unclosed"}, 400,
     "Grammar error"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": FRANCE, "top_p": 0}, 400, "top_p"),
])
def test_error_matrix(http: httpx.Client, client: openai.OpenAI, path: str,
                      body: dict[str, Any], status: int, needle: str) -> None:
    check_error(http.post(path, json=body), status, needle)
    good_request(client)


def test_protocol_errors(server: ServerProcess, http: httpx.Client,
                         client: openai.OpenAI) -> None:
    check_error(http.post("/v1/completions", content=b"{bad json",
                          headers={"Content-Type": "application/json"}), 400, "JSON")
    check_error(http.post("/v1/completions", content=b"[1]",
                          headers={"Content-Type": "application/json"}), 400, "object")
    check_error(http.get("/v1/chat/completions"), 405)
    check_error(http.get("/v1/unknown"), 404)
    check_error(http.post("/v1/completions", json={"prompt": "x" * (5 * 1024 * 1024)}), 413)
    good_request(client)


def test_disconnect_mid_stream_frees_the_engine(server: ServerProcess, http: httpx.Client,
                                                client: openai.OpenAI) -> None:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300) as c, c.stream(
            "POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 1500,
                                             "ignore_eos": True, "stream": True}) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(3):
            assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while metric(http, "xlaserve:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(http, "xlaserve:num_requests_running") == 0
    assert metric(http, "xlaserve:num_requests_waiting") == 0
    good_request(client)


def test_disconnect_non_streaming_frees_the_engine(server: ServerProcess, http: httpx.Client,
                                                   client: openai.OpenAI) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url("/v1/completions"), headers=AUTH, timeout=2.0,
                   json={"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while metric(http, "xlaserve:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(http, "xlaserve:num_requests_running") == 0
    good_request(client)


def test_request_template_sandbox(http: httpx.Client, client: openai.OpenAI,
                                  tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for evil in (
        "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ x.__class__.__base__ }}",
        "{{ lipsum.__globals__['os'].system('touch %s') }}",
    ):
        r = http.post("/v1/chat/completions", json={
            "messages": FRANCE, "max_tokens": 2,
            "chat_template": evil.replace("%s", str(marker))})
        if r.status_code == 200:  # the sandbox rendered the unsafe parts as nothing
            assert "class" not in str(r.json())
        else:
            check_error(r, 400)
    assert not marker.exists()
    good_request(client)


def test_metrics_after_traffic(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    for name in ("xlaserve:num_requests_waiting", "xlaserve:kv_cache_usage_perc",
                 "xlaserve:prefix_cache_queries_total", "xlaserve:prefix_cache_hits_total",
                 "xlaserve:prompt_tokens_total", "xlaserve:generation_tokens_total",
                 'xlaserve:request_success_total{finished_reason="stop"',
                 'xlaserve:request_success_total{finished_reason="abort"',
                 "xlaserve:time_to_first_token_seconds_bucket",
                 "xlaserve:inter_token_latency_seconds_bucket",
                 "xlaserve:e2e_request_latency_seconds_count"):
        assert name in text, name
    assert metric(http, "xlaserve:generation_tokens_total") > 0
