"""Every limit a client can push, on the real server: each is refused with its status and an
OpenAI-shaped error before any engine work, and the server keeps generating after it.

The server's limits are ``HOSTILE_LIMITS`` (conftest); the fixed ones come from the modules that
enforce them, so a changed bound changes the test with it."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import httpx
import pytest

from serving.api.body import MAX_JSON_DEPTH
from serving.api.protocol import MAX_STOP_SEQUENCES, MAX_STOP_STRING_CHARS
from serving.engine.sampling_params import BIAS_SLOTS, MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from tests.api.server_utils import ServerProcess
from tests.api.test_http_errors import check_error
from tests.reliability.conftest import HOSTILE_KEY, HOSTILE_LIMITS, hostile_alive

C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_C: dict[str, Any] = {"prompt": "Hello", "max_tokens": 2}
OK_CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LIM = HOSTILE_LIMITS


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# (path, body changes, status, needle in the message, param)
REFUSED: list[tuple[str, dict[str, Any], str, str | None]] = [
    (C, {"stop": [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]}, "at most", "stop"),
    (C, {"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "at most", "stop"),
    (C, {"stop_token_ids": list(range(1, MAX_STOP_TOKEN_IDS + 2))}, "at most", "stop_token_ids"),
    (C, {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "at most",
     "logit_bias"),
    (C, {"n": LIM["max_n"] + 1, "temperature": 1}, f"at most {LIM['max_n']}", "n"),
    (C, {"max_tokens": LIM["max_model_len"]}, "maximum context length", "max_tokens"),
    (C, {"max_tokens": 2**70}, "maximum context length", "max_tokens"),
    (C, {"logprobs": LIM["max_logprobs"] + 1}, f"max allowed: {LIM['max_logprobs']}", "logprobs"),
    # --max-logprobs caps prompt_logprobs too (it used to be checked against 20 only)
    (C, {"prompt_logprobs": LIM["max_logprobs"] + 1}, f"max allowed: {LIM['max_logprobs']}",
     "prompt_logprobs"),
    (CHAT, {"prompt_logprobs": LIM["max_logprobs"] + 1}, f"max allowed: {LIM['max_logprobs']}",
     "prompt_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": LIM["max_logprobs"] + 1},
     f"max allowed: {LIM['max_logprobs']}", "logprobs"),
    # min_tokens bans stop ids + EOS in the sampler's bias slots: too many is a 400, not a
    # silent truncation
    (C, {"min_tokens": 1, "logit_bias": {str(i): 0 for i in range(1000, 1000 + MAX_LOGIT_BIAS)},
         "stop_token_ids": list(range(2000, 2000 + BIAS_SLOTS - MAX_LOGIT_BIAS + 1))},
     f"at most {BIAS_SLOTS}", "stop_token_ids"),
    # an int32 field of the sampler: 2**40 used to crash the engine loop (OverflowError)
    (C, {"top_k": 2**40}, "at most", "top_k"),
    (C, {"seed": 2**64}, "less_than_equal", "seed"),
    (C, {"truncate_prompt_tokens": 2**70}, "truncate_prompt_tokens", "truncate_prompt_tokens"),
    (C, {"prompt": [2**40]}, "out of vocabulary", "prompt"),
    (C, {"stop_token_ids": [2**40]}, "out of vocabulary", "stop_token_ids"),
    (C, {"logit_bias": {str(2**40): 1}}, "out of vocabulary", "logit_bias"),
    (CHAT, {"chat_template_kwargs": nested(MAX_JSON_DEPTH + 1)}, "nested too deeply", None),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 3000}]}, "maximum context length",
     "messages"),
]


@pytest.mark.parametrize("path, change, needle, param", REFUSED,
                         ids=[f"{p.rsplit('/', 1)[1]}-{json.dumps(c)[:50]}"
                              for p, c, _, _ in REFUSED])
def test_limit_refused(hostile_http: httpx.Client, path: str, change: dict[str, Any],
                       needle: str, param: str | None) -> None:
    base = OK_C if path == C else OK_CHAT
    check_error(hostile_http.post(path, json={**base, **change}), 400, needle, param)
    hostile_alive(hostile_http)


def test_at_the_limits_is_served(hostile_http: httpx.Client) -> None:
    """The largest accepted value of each bound is served, not refused."""
    for change in ({"stop": [f"s{i}" for i in range(MAX_STOP_SEQUENCES)]},
                   {"stop_token_ids": list(range(1, MAX_STOP_TOKEN_IDS + 1))},
                   {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS)}},
                   {"n": LIM["max_n"], "temperature": 1},
                   {"prompt_logprobs": LIM["max_logprobs"]},
                   {"top_k": 2**31 - 1, "temperature": 1},
                   {"temperature": 1e308},
                   {"min_tokens": 2, "logit_bias": {str(i): 0 for i in range(1000, 1300)},
                    "stop_token_ids": list(range(2000, 2000 + BIAS_SLOTS - MAX_LOGIT_BIAS - 2))}):
        r = hostile_http.post(C, json={**OK_C, **change})
        assert r.status_code == 200, (change, r.text)
        body = r.json()
        assert all(c["text"] is not None for c in body["choices"])
    r = hostile_http.post(CHAT, json={**OK_CHAT,
                                      "chat_template_kwargs": {"x": nested(MAX_JSON_DEPTH - 2)}})
    assert r.status_code == 200, r.text


def test_min_tokens_bans_hold_past_the_logit_bias(hostile_http: httpx.Client) -> None:
    """With logit_bias filling its share of the slots, the banned ids still hold: the greedy
    first token, banned as a stop id under min_tokens, is not generated."""
    prompt = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 1,
              "return_token_ids": True}
    first = hostile_http.post(C, json=prompt).json()["choices"][0]["token_ids"][0]
    stops = [first, *range(2000, 2000 + BIAS_SLOTS - MAX_LOGIT_BIAS - 3)]
    r = hostile_http.post(C, json={**prompt, "min_tokens": 1, "stop_token_ids": stops,
                                   "logit_bias": {str(i): 0 for i in range(1000, 1300)}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"][0] != first


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"prompt": "x", "temperature": Infinity}', "Infinity"),
    (b'{"prompt": "x", "temperature": -Infinity}', "Infinity"),
    (b'{"prompt": "x", "temperature": 1e400}', "finite"),  # parsed as inf
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"prompt": "\xff\xfe", "max_tokens": 2}', "UTF-8"),
    (b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}', "UTF-8"),  # a surrogate encoded in UTF-8
    (b'{"prompt": "\\ud800 lone", "max_tokens": 2}', "surrogate"),
    (b'{"prompt": "x", "\\udc00": 1}', "surrogate"),
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b'{"a": ' * 200 + b"1" + b"}" * 200, "nested too deeply"),
])
def test_hostile_json(hostile_http: httpx.Client, content: bytes, needle: str) -> None:
    r = hostile_http.post(C, content=content, headers={"Content-Type": "application/json"})
    check_error(r, 400, needle)
    hostile_alive(hostile_http)


def test_hostile_chat_strings(hostile_http: httpx.Client) -> None:
    raw = b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    check_error(hostile_http.post(CHAT, content=raw,
                                  headers={"Content-Type": "application/json"}), 400, "surrogate")
    hostile_alive(hostile_http)


def test_body_over_limit_413_with_and_without_content_length(
        hostile_http: httpx.Client) -> None:
    big = {"prompt": "x" * (LIM["max_request_body"] + 1024), "max_tokens": 2}
    check_error(hostile_http.post(C, json=big), 413)

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(LIM["max_request_body"] // 1024 + 2):
            yield b"x" * 1024
        yield b'", "max_tokens": 2}'

    r = hostile_http.post(C, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    check_error(r, 413)
    hostile_alive(hostile_http)


def test_header_size_431(hostile_http: httpx.Client) -> None:
    check_error(hostile_http.get("/v1/models", headers={"X-Big": "a" * 70_000}), 431)
    many = {f"X-H{i}": "v" * 20 for i in range(1000)}
    check_error(hostile_http.get("/v1/models", headers=many), 431)
    hostile_alive(hostile_http)


def _trickle(server: ServerProcess, head: bytes, tail: bytes, out: dict[str, bytes]) -> None:
    """Send ``head`` at once, then ``tail`` a byte every 0.2 s until the server answers."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head)
        s.settimeout(0.2)
        reply = b""
        for i in range(100):  # 20 s: far past the 2 s request timeout
            if i < len(tail):
                try:
                    s.sendall(tail[i:i + 1])
                except OSError:
                    break
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            reply += data
            if not data or b"\r\n\r\n" in reply:
                break
        out[head.decode()[:40] + tail.decode()[:20]] = reply


def test_slow_clients_get_408(hostile_server: ServerProcess,
                              hostile_http: httpx.Client) -> None:
    """A head or a body trickling in is cut at --request-timeout from the request's first byte
    (Sanic's own timeout restarts with every byte and stops at the head)."""
    auth = f"Authorization: Bearer {HOSTILE_KEY}\r\n".encode()
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    cases = [
        (post, b"X-Slow: " + b"a" * 200),  # the head never ends
        (post + auth + b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n",
         b"x" * 200),
        (post + auth + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"1\r\nx\r\n" * 100),
    ]
    replies: dict[str, bytes] = {}
    threads = [threading.Thread(target=_trickle, args=(hostile_server, h, t, replies))
               for h, t in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 3
    for key, reply in replies.items():
        assert reply.startswith(b"HTTP/1.1 408"), (key, reply[:200])
        body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == 408
    # A keep-alive connection idle for longer than the timeout is not a slow client.
    assert hostile_http.get("/v1/models").status_code == 200
    threading.Event().wait(LIM["request_timeout"] + 1)
    assert hostile_http.get("/v1/models").status_code == 200
    hostile_alive(hostile_http)


def test_refusals_cost_no_engine_work(hostile_http: httpx.Client) -> None:
    def steps() -> float:
        for line in hostile_http.get("/metrics").text.splitlines():
            if line.startswith("xlaserve:engine_steps_total"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no engine_steps_total")

    before = steps()
    for path, change, _, _ in REFUSED:
        r = hostile_http.post(path, json={**(OK_C if path == C else OK_CHAT), **change})
        assert r.status_code == 400
    assert steps() == before
