"""Response shapes, streaming, logprobs, tokenize, metrics and disconnects over real HTTP.

The server is the real one (Sanic app, middleware, SSE) around the deterministic fake engine
(``tests/api/fake_engine.py``), whose output text is fixed: "The capital of France is Paris. ...".
The same behaviours against the real model are in ``test_e2e_server.py``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.api.conftest import good_request_still_works
from tests.api.fake_engine import CANNED
from tests.api.server_utils import ServerProcess


@pytest.fixture
def client(fake: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url("/v1"), api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream(http: httpx.Client, path: str, body: dict) -> list[dict | str]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not in /metrics"
    return total


# -- info endpoints -----------------------------------------------------------------------------


def test_models_health_version(http: httpx.Client, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-smollm2"]
    card = http.get("/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["max_model_len"] == 512 and card["root"]
    h = http.get("/health")
    assert h.status_code == 200 and h.content == b""
    assert isinstance(http.get("/version").json()["version"], str)


# -- completions --------------------------------------------------------------------------------


def test_completion_basic(client: openai.OpenAI) -> None:
    r = client.completions.create(model="fake-smollm2", prompt="Hello, my name is",
                                  max_tokens=5, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.model == "fake-smollm2"
    (c,) = r.choices
    assert c.text == "The capital of France is" and c.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_completion_without_model_uses_served_name(http: httpx.Client) -> None:
    for model in (None, ""):
        body = {"prompt": "Hi", "max_tokens": 2}
        if model is not None:
            body["model"] = model
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == "fake-smollm2"


def test_completion_default_max_tokens_is_16(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "Hi", "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] == 16


def test_completion_stops_at_eos(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 200,
                                          "temperature": 0}).json()
    (c,) = r["choices"]
    assert c["text"] == CANNED and c["finish_reason"] == "stop" and c["stop_reason"] is None


def test_completion_stream_equals_full(http: httpx.Client) -> None:
    body = {"prompt": "Hello, my name is", "max_tokens": 12, "temperature": 0}
    full = http.post("/v1/completions", json=body).json()
    events = stream(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert all(c["usage"] is None for c in chunks)
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)


def test_completion_stream_usage(http: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 6, "temperature": 0}
    events = stream(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    assert all(c["usage"] is None for c in chunks[:-1])
    # continuous usage: every chunk carries cumulative counts that never decrease
    events = stream(http, "/v1/completions", {**body, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    chunks = [e for e in events if isinstance(e, dict)]
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 6
    # stream_options: {} asks for nothing
    events = stream(http, "/v1/completions", {**body, "stream_options": {}})
    assert all(e["usage"] is None for e in events if isinstance(e, dict))


def test_completion_batch_and_n(http: httpx.Client) -> None:
    body = {"prompt": ["Hello", "Bonjour"], "n": 2, "max_tokens": 4, "temperature": 1.0,
            "seed": 1}
    r = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["completion_tokens"] == 16
    events = stream(http, "/v1/completions", body)
    finish = {}
    for e in events:
        if isinstance(e, dict):
            (c,) = e["choices"]  # exactly one choice per chunk
            if c["finish_reason"]:
                assert c["index"] not in finish
                finish[c["index"]] = c["finish_reason"]
    assert finish == {0: "length", 1: "length", 2: "length", 3: "length"}


def test_completion_identical_prompts(http: httpx.Client) -> None:
    for prompt in (["a", "a"], [[1, 2, 3], [1, 2, 3]]):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4,
                                              "temperature": 0}).json()
        texts = [c["text"] for c in r["choices"]]
        assert [c["index"] for c in r["choices"]] == [0, 1] and texts[0] == texts[1]


def test_completion_token_prompt(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": [0, 0, 0, 0, 0], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("k", [0, 1, 5])
def test_completion_logprobs(http: httpx.Client, k: int) -> None:
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0,
                                          "logprobs": k}).json()
    lp = r["choices"][0]["logprobs"]
    n = len(lp["tokens"])
    assert n == 5 and len(lp["token_logprobs"]) == n and len(lp["text_offset"]) == n
    for top, tok, logprob in zip(lp["top_logprobs"], lp["tokens"], lp["token_logprobs"],
                                 strict=True):
        assert max(k, 1) <= len(top) <= k + 1 and top[tok] == logprob
    offsets = [0]
    for tok in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert lp["text_offset"] == offsets
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]


def test_completion_echo(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3,
                                          "temperature": 0, "echo": True, "logprobs": 1}).json()
    c = r["choices"][0]
    assert c["text"] == "Hello there" + "The capital of"
    lp = c["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == r["usage"]["prompt_tokens"] + 3
    # max_tokens 0 with echo: the prompt alone
    r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 0,
                                          "echo": True}).json()
    assert r["choices"][0]["text"] == "Hello there"
    assert r["usage"]["completion_tokens"] == 0
    # streaming echo: the prompt comes first
    events = stream(http, "/v1/completions", {"prompt": "Hello there", "max_tokens": 3,
                                              "temperature": 0, "echo": True})
    text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))
    assert text == "Hello there" + "The capital of"


def test_completion_stop_strings(http: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 50, "temperature": 0, "stop": ["Paris"]}
    c = http.post("/v1/completions", json=body).json()["choices"][0]
    assert c["text"] == "The capital of France is " and c["finish_reason"] == "stop"
    assert c["stop_reason"] == "Paris"
    c = http.post("/v1/completions", json={**body, "include_stop_str_in_output": True}
                  ).json()["choices"][0]
    assert c["text"].endswith("Paris")
    events = stream(http, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict)) == \
        "The capital of France is "


def test_completion_return_token_ids_and_as_ids(http: httpx.Client,
                                                smollm2_tokenizer) -> None:  # type: ignore[no-untyped-def]
    r = http.post("/v1/completions", json={
        "prompt": "Hi", "max_tokens": 3, "temperature": 0, "return_token_ids": True,
        "logprobs": 1, "return_tokens_as_token_ids": True}).json()
    c = r["choices"][0]
    assert c["prompt_token_ids"] == smollm2_tokenizer.encode("Hi")
    assert smollm2_tokenizer.decode(c["token_ids"]) == c["text"]
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]


def test_prompt_logprobs(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "Hello there friend", "max_tokens": 2,
                                          "prompt_logprobs": 2}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == r["usage"]["prompt_tokens"]
    for pos in plp[1:]:
        assert 1 <= len(pos) <= 3
        for entry in pos.values():
            assert set(entry) == {"logprob", "rank", "decoded_token"}


# -- chat ---------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_basic(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="fake-smollm2", messages=MESSAGES,
                                       max_completion_tokens=10, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    (c,) = r.choices
    assert c.message.role == "assistant" and c.finish_reason == "length"
    assert c.message.content == "The capital of France is Paris. It is known"
    assert r.usage.prompt_tokens == 37 and r.usage.completion_tokens == 10  # SmolLM2 template


def test_chat_max_tokens_default_fills_context(http: httpx.Client) -> None:
    long = [{"role": "user", "content": "hello " * 460}]
    r = http.post("/v1/chat/completions", json={"messages": long, "temperature": 0,
                                               "ignore_eos": True}).json()
    assert r["usage"]["total_tokens"] == 512  # the output fills max_model_len - prompt
    assert r["choices"][0]["finish_reason"] == "length"


def test_chat_stream(http: httpx.Client, client: openai.OpenAI) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    full = http.post("/v1/chat/completions", json=body).json()
    events = stream(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["object"] == "chat.completion.chunk"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks
            if c["choices"][0].get("finish_reason")] == ["length"]
    # the official client reads the same stream
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="fake-smollm2", messages=MESSAGES, max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == text


def test_chat_stream_n_and_usage(http: httpx.Client) -> None:
    events = stream(http, "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 4, "n": 3, "temperature": 0.8,
        "stream_options": {"include_usage": True}})
    chunks = [e for e in events if isinstance(e, dict)]
    roles = [c["choices"][0]["index"] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1, 2]
    finish = [c["choices"][0]["index"] for c in chunks
              if c["choices"] and c["choices"][0].get("finish_reason")]
    assert sorted(finish) == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_chat_logprobs(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4,
                                               "temperature": 0, "logprobs": True,
                                               "top_logprobs": 5}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert len(item["top_logprobs"]) == 5
        assert item["logprob"] >= -9999.0
        assert bytes(item["bytes"]).decode() == item["token"]
        for alt in item["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"}
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                               "logprobs": True}).json()
    assert all(i["top_logprobs"] == [] for i in r["choices"][0]["logprobs"]["content"])
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).json()
    assert r["choices"][0]["logprobs"] is None
    events = stream(http, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3,
                                                   "logprobs": True, "top_logprobs": 2})
    lp = [i for e in events if isinstance(e, dict) and e["choices"]
          and e["choices"][0].get("logprobs") for i in e["choices"][0]["logprobs"]["content"]]
    assert len(lp) == 3 and all(len(i["top_logprobs"]) == 2 for i in lp)


def test_chat_content_parts_equal_string(http: httpx.Client) -> None:
    body = {"max_tokens": 6, "temperature": 0}
    a = http.post("/v1/chat/completions", json={**body, "messages": MESSAGES}).json()
    b = http.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "user", "content": [{"type": "text",
                                      "text": "What is the capital of France?"}]}]}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


def test_chat_continue_final_message_with_echo(http: httpx.Client) -> None:
    msgs = [*MESSAGES, {"role": "assistant", "content": "Sure! The answer"}]
    r = http.post("/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 3, "temperature": 0, "echo": True,
        "continue_final_message": True, "add_generation_prompt": False}).json()
    assert r["choices"][0]["message"]["content"] == "Sure! The answer" + "The capital of"
    r = http.post("/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 3, "temperature": 0,
        "continue_final_message": True, "add_generation_prompt": False}).json()
    assert r["choices"][0]["message"]["content"] == "The capital of"


def test_chat_accepted_and_ignored_fields(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi", "extra_key": 1}], "max_tokens": 2,
        "user": "u-1", "parallel_tool_calls": False, "foo": 1, "tool_choice": "none",
        "response_format": {"type": "text"}, "store": False})
    assert r.status_code == 200, r.text


def test_chat_custom_role_and_tool_message(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "narrator", "content": "and then"}]})
    assert r.status_code == 200, r.text


# -- tokenize -----------------------------------------------------------------------------------


def test_tokenize_detokenize(http: httpx.Client, smollm2_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = smollm2_tokenizer
    r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r == {"count": 2, "max_model_len": 512, "tokens": tok.encode("Hello world"),
                 "token_strs": None}
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    for agp in (True, False):
        r = http.post("/tokenize", json={"messages": MESSAGES,
                                         "add_generation_prompt": agp}).json()
        expected = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False,
                                                      add_generation_prompt=agp),
                              add_special_tokens=False)
        assert r["tokens"] == expected and r["count"] == len(expected)
    ids = tok.encode("Héllo, wörld! 日本")
    assert http.post("/detokenize", json={"tokens": ids}).json() == \
        {"prompt": tok.decode(ids)}
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": True,
                                        "continue_final_message": True}).status_code == 400


# -- metrics ------------------------------------------------------------------------------------


def test_metrics(http: httpx.Client) -> None:
    before = metric(http, "xlaserve:request_success_total")
    for _ in range(3):
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}
                         ).status_code == 200
    text = http.get("/metrics").text
    for name in ("xlaserve:num_requests_running", "xlaserve:num_requests_waiting",
                 "xlaserve:kv_cache_usage_perc", "xlaserve:prefix_cache_queries_total",
                 "xlaserve:prefix_cache_hits_total", "xlaserve:prompt_tokens_total",
                 "xlaserve:generation_tokens_total", "xlaserve:request_success_total",
                 "xlaserve:time_to_first_token_seconds_bucket",
                 "xlaserve:inter_token_latency_seconds_bucket",
                 "xlaserve:e2e_request_latency_seconds_bucket", 'model_name="fake-smollm2"'):
        assert name in text, name
    assert metric(http, "xlaserve:request_success_total") == before + 3
    assert 'finished_reason="length"' in text


# -- concurrency and disconnects ----------------------------------------------------------------


def test_concurrent_requests_match_sequential(http: httpx.Client) -> None:
    bodies = [{"prompt": f"Prompt {i}", "max_tokens": 5 + i % 4, "temperature": 0}
              for i in range(16)]
    alone = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(
            lambda b: http.post("/v1/completions", json=b).json()["choices"][0]["text"], bodies))
    assert together == alone


def wait_until_idle(http: httpx.Client, deadline_s: float = 20.0) -> float:
    end = time.monotonic() + deadline_s
    while True:
        running = metric(http, "xlaserve:num_requests_running")
        if running == 0 or time.monotonic() > end:
            return running
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts(fake: ServerProcess, http: httpx.Client) -> None:
    with httpx.Client(base_url=fake.base_url, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 400,
                                             "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(http, "xlaserve:num_requests_running") == 1
    # leaving the block closed the connection mid-stream
    assert wait_until_idle(http) == 0
    assert metric(http, "xlaserve:kv_cache_pages_used") == 0
    assert 'finished_reason="abort"' in http.get("/metrics").text
    good_request_still_works(http)


def test_disconnect_non_streaming_aborts(fake: ServerProcess, http: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake.url("/v1/chat/completions"), timeout=0.5, json={
            "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True})
    assert wait_until_idle(http) == 0
    good_request_still_works(http)


def test_engine_failure_is_500_or_error_event(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "please FAIL", "max_tokens": 3})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == 500 and "Traceback" not in err["message"]
    events = stream(http, "/v1/completions", {"prompt": "please FAIL", "max_tokens": 3})
    assert events[-1] == "[DONE]"
    assert any(isinstance(e, dict) and "error" in e and e["error"]["code"] == 500
               for e in events)
    good_request_still_works(http)


def test_request_id_is_used_in_response_ids(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", headers={"X-Request-Id": "abc-123"},
                  json={"messages": MESSAGES, "max_tokens": 2}).json()
    assert r["id"] == "chatcmpl-abc-123"
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                          "request_id": "body-id"}).json()
    assert r["id"] == "cmpl-body-id"
    # without --enable-request-id-headers there is no response header
    assert "x-request-id" not in http.get("/health").headers


def test_event_loop_free_during_slow_requests(fake: ServerProcess, http: httpx.Client) -> None:
    """Long generations in flight do not stop /health from answering."""
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=fake.base_url, timeout=60) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"prompt": "x", "max_tokens": 20})

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for _ in range(10):
            assert http.get("/health").status_code == 200
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_sse_framing_is_exact(fake: ServerProcess) -> None:
    raw = httpx.post(fake.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2,
                                                        "stream": True}).text
    assert re.fullmatch(r"(data: \{.*\}\n\n)+data: \[DONE\]\n\n", raw, flags=re.S)
