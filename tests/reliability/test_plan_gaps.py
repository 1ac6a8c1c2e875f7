"""The checks of the test plan (docs/RELIABILITY.md, "The test plan (§6) and where each check
lives") that no other test made: each test names its check. Most run on the hostile server (the
real model, an API key, small limits: ``HOSTILE_LIMITS``); the ones about the HTTP process
itself (its bind address, its child processes, template trust) run on the fake engine, and the
pooling render paths on the default model served with ``--task embed``."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server_utils import ServerProcess, fake_server, real_server
from tests.api.test_http_errors import check_error
from tests.reliability.conftest import (
    HOSTILE_KEY,
    HOSTILE_LIMITS,
    Streams,
    assert_idle_and_no_leaks,
    completion,
    hostile_alive,
    m,
    wait_admitted,
)
from tests.reliability.test_hostile_templates import ESCAPES

C = "/v1/completions"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
OK_C: dict[str, Any] = {"prompt": "Hello", "max_tokens": 2}
OK_CHAT: dict[str, Any] = {"messages": MSG, "max_tokens": 2}
LIM = HOSTILE_LIMITS
VOCAB = 49152  # SmolLM2-135M's vocabulary (test_fuzz_requests.test_vocab_edge checks it)
JSON_CT = {"Content-Type": "application/json"}


def engine_work(server: ServerProcess) -> tuple[float, float]:
    """(engine steps, prompt tokens) so far: unchanged across a refusal means no engine work."""
    return m(server, "engine_steps_total"), m(server, "prompt_tokens_total")


# -- 1. Protocol and parsing ------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    (b'{"messages":', "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'"x"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"", "empty"),
])
def test_1_chat_malformed_bodies(hostile_http: httpx.Client, content: bytes, needle: str) -> None:
    """Check 1 on the chat route of the real server (test_http_errors covers completions)."""
    err = check_error(hostile_http.post(CHAT, content=content, headers=JSON_CT), 400, needle)
    assert err["type"] == "BadRequestError"  # vLLM's type; OpenAI's is invalid_request_error
    hostile_alive(hostile_http)


def _probe(server: ServerProcess, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            out.append(time.perf_counter() - t0)
            stop.wait(0.01)


def test_2_hostile_bodies_keep_the_event_loop_free(hostile_server: ServerProcess,
                                                   hostile_http: httpx.Client) -> None:
    """Check 2's values as §6 gives them (nesting as deep as the body limit allows), sent over
    and over while /health is probed: each is a 400, and /health keeps answering (the median
    under 100 ms; the parse never holds the event loop)."""
    deep = (LIM["max_request_body"] - 16) // 2
    bodies = [
        (b"[" * deep + b"]" * deep, "nested too deeply"),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 10_000 + b"}", "not valid JSON"),
        (b'{"prompt": "x", "temperature": 1e400}', "finite"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"prompt": "x", "temperature": Infinity}', "Infinity"),
        (b'{"prompt": "\xc3\x28", "max_tokens": 2}', "UTF-8"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ]
    stop, latencies = threading.Event(), []
    prober = threading.Thread(target=_probe, args=(hostile_server, stop, latencies))
    prober.start()
    try:
        rounds = 0
        while rounds < 3 or (len(latencies) < 20 and rounds < 200):
            rounds += 1
            for content, needle in bodies:
                path = CHAT if content.startswith(b'{"messages"') else C
                check_error(hostile_http.post(path, content=content, headers=JSON_CT), 400,
                            needle)
    finally:
        stop.set()
        prober.join()
    assert len(latencies) >= 20
    print(f"/health during hostile bodies: median {statistics.median(latencies) * 1e3:.1f} ms, "
          f"max {max(latencies) * 1e3:.1f} ms over {len(latencies)} probes, {rounds} rounds")
    assert statistics.median(latencies) < 0.1
    hostile_alive(hostile_http)


def _raw(server: ServerProcess, data: bytes, wait: float) -> bytes:
    """Send ``data`` on a fresh connection; what the server answers within ``wait`` seconds."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(data)
        s.settimeout(wait)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            pass
        return reply


def test_3_oversized_content_length_is_refused_before_the_body(
        hostile_server: ServerProcess, hostile_http: httpx.Client) -> None:
    """Check 3: a head announcing 1 GB is answered 413 at once, with no byte of the body sent
    (a server that read the body first would wait, then time out with 408)."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + HOSTILE_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
    reply = _raw(hostile_server, head, wait=LIM["request_timeout"] * 0.75)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    hostile_alive(hostile_http)


def test_3_body_limit_boundary(hostile_http: httpx.Client) -> None:
    """Check 3: a body of exactly --max-request-body bytes is served, one more byte is 413."""
    base = json.dumps(OK_C).encode()
    exact = base + b" " * (LIM["max_request_body"] - len(base))  # trailing JSON whitespace
    r = hostile_http.post(C, content=exact, headers=JSON_CT)
    assert r.status_code == 200, r.text
    check_error(hostile_http.post(C, content=exact + b" ", headers=JSON_CT), 413)
    hostile_alive(hostile_http)


def test_4_slow_connections_do_not_delay_a_normal_request(
        hostile_server: ServerProcess, hostile_http: httpx.Client) -> None:
    """Check 4: 200 clients trickling their heads in hold no worker: a normal request served
    meanwhile is not delayed by more than 1 s, and every slow client then gets its 408."""
    def timed() -> float:
        t0 = time.perf_counter()
        hostile_alive(hostile_http)
        return time.perf_counter() - t0

    timed()
    alone = min(timed() for _ in range(3))
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", hostile_server.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        slow.append(s)
    try:
        beside = timed()
        print(f"a 2-token completion: {alone * 1e3:.0f} ms alone, {beside * 1e3:.0f} ms beside "
              "200 slow clients")
        assert beside - alone < 1.0
        deadline = time.monotonic() + LIM["request_timeout"] + 10
        for s in slow:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for s in slow:
            s.close()
    hostile_alive(hostile_http)


# -- 6-10. Schema and range validation --------------------------------------------------------

WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    (C, {"max_tokens": "10"}, "max_tokens"),
    (C, {"max_tokens": True}, "max_tokens"),
    (C, {"max_tokens": 1.5}, "max_tokens"),
    (C, {"temperature": "hot"}, "temperature"),
    (C, {"stop": 123}, "stop"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"stop": 123}, "stop"),
    (CHAT, {"max_tokens": "10"}, "max_tokens"),
]


def test_6_wrong_types_name_the_field_and_cost_no_engine_work(
        hostile_server: ServerProcess, hostile_http: httpx.Client) -> None:
    """Check 6 on the real server: ``param`` is the field itself (a value that fits no member
    of a union, like ``stop: 123``, used to be reported as ``stop.str``); the error body stays
    small and does not echo a huge input; the engine never sees any of them."""
    before = engine_work(hostile_server)
    for path, change, param in WRONG_TYPES:
        base = OK_C if path == C else OK_CHAT
        check_error(hostile_http.post(path, json={**base, **change}), 400, param=param)
    huge = "A" * (LIM["max_request_body"] - 1024)
    r = hostile_http.post(C, json={**OK_C, "max_tokens": huge})
    err = check_error(r, 400, param="max_tokens")
    assert len(r.content) < 4096 and "AAAA" not in err["message"]
    assert engine_work(hostile_server) == before
    hostile_alive(hostile_http)


# Check 7 and 8's values as §6 lists them, those no other table has verbatim.
BOUNDS: list[tuple[str, dict[str, Any], str]] = [
    (C, {"max_tokens": 2**63}, "max_tokens"),
    (C, {"n": -1}, "n"),
    (C, {"n": 10**6, "temperature": 1}, "n"),
    (C, {"logit_bias": {str(VOCAB): 1}}, "logit_bias"),  # the first id past the vocabulary
    (C, {"seed": 2**64}, "seed"),
    (C, {"prompt": [VOCAB]}, "prompt"),
    (CHAT, {"max_tokens": 2**63}, "max_tokens"),
    (CHAT, {"n": 10**6, "temperature": 1}, "n"),
]


def test_7_8_bounds_as_listed(hostile_server: ServerProcess, hostile_http: httpx.Client) -> None:
    before = engine_work(hostile_server)
    for path, change, param in BOUNDS:
        base = OK_C if path == C else OK_CHAT
        for stream in (False, True):  # a stream is refused before it starts: JSON, never SSE
            r = hostile_http.post(path, json={**base, **change, "stream": stream})
            check_error(r, 400, param=param)
    raw = b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}'
    check_error(hostile_http.post(C, content=raw, headers=JSON_CT), 400, "NaN")
    assert engine_work(hostile_server) == before
    hostile_alive(hostile_http)


def test_7_8_served_as_vllm_serves_them(hostile_http: httpx.Client) -> None:
    """Where §6 asks for a 400 but vLLM (whose API the server matches) serves the request, the
    server serves it, and the docs say so: ``seed: -1`` (seeds are signed 64-bit), a custom
    role, and a tool message without ``tool_call_id`` (vLLM's custom message type)."""
    for path, change in ((C, {"seed": -1, "temperature": 1}),
                         (CHAT, {"messages": [{"role": "hacker", "content": "hi"}]}),
                         (CHAT, {"messages": [*MSG, {"role": "tool", "content": "42"}]})):
        base = OK_C if path == C else OK_CHAT
        r = hostile_http.post(path, json={**base, **change})
        assert r.status_code == 200, (change, r.text)
        assert r.json()["usage"]["completion_tokens"] >= 1


def test_9_models_on_the_real_server(hostile_http: httpx.Client) -> None:
    """Check 9 on the real engine and both routes: an unknown model is 404 before any work,
    no ``model`` is served by the default one."""
    for path, base in ((C, OK_C), (CHAT, OK_CHAT)):
        err = check_error(hostile_http.post(path, json={**base, "model": "does-not-exist"}), 404,
                          "The model `does-not-exist` does not exist.", "model")
        assert err["type"] == "NotFoundError"
        r = hostile_http.post(path, json=base)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == hostile_http.get("/v1/models").json()["data"][0]["id"]


def test_10_context_length_boundary_before_admission(hostile_server: ServerProcess,
                                                     hostile_http: httpx.Client) -> None:
    """Check 10 at the exact boundary: a prompt of max_model_len + 1 tokens and a prompt that
    leaves too little room for max_tokens are 400 naming both numbers, before the engine sees
    them; one token less is served."""
    ctx = LIM["max_model_len"]
    before = engine_work(hostile_server)
    err = check_error(hostile_http.post(C, json={"prompt": [1] * (ctx + 1)}), 400,
                      f"maximum context length is {ctx} tokens", "prompt")
    assert f"{ctx + 1} input tokens" in err["message"]
    err = check_error(hostile_http.post(C, json={"prompt": [1] * (ctx - 1), "max_tokens": 2}),
                      400, f"maximum context length is {ctx} tokens", "max_tokens")
    assert f"requested {ctx + 1} tokens" in err["message"]
    assert m(hostile_server, "num_requests_waiting") == 0
    assert engine_work(hostile_server) == before
    r = hostile_http.post(C, json={"prompt": [1] * (ctx - 1), "max_tokens": 1})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (ctx - 1, 1)


# -- 11-13. Templates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default model served with --task embed, request templates trusted."""
    server = real_server(tmp_path_factory.mktemp("plan-embed"), "--task", "embed",
                         "--max-model-len", "128", "--max-num-seqs", "4",
                         "--max-num-batched-tokens", "128", "--trust-request-chat-template",
                         name="embed").start(900)
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("path", ["/v1/embeddings", "/pooling"])
def test_11_escapes_on_the_pooling_render_paths(embed_server: ServerProcess, tmp_path: Path,
                                               path: str) -> None:
    """Check 11 on the render paths besides chat and /tokenize (test_hostile_templates has
    those): embedding or pooling a conversation renders its template too."""
    url = embed_server.url(path)
    r = httpx.post(url, json={"messages": MSG, "chat_template": "{{ messages[0].content }}"},
                   timeout=60)
    assert r.status_code == 200, r.text  # the path renders request templates
    marker = tmp_path / "pwned"
    for payload in ESCAPES:
        r = httpx.post(url, timeout=60, json={
            "messages": MSG, "chat_template": payload.replace("MARKER", str(marker))})
        assert r.status_code in (200, 400), (payload, r.text)
        if r.status_code == 400:
            assert "Traceback" not in check_error(r, 400)["message"]
    assert not marker.exists()
    r = httpx.post(url, json={"input": "still serving"}, timeout=60)
    assert r.status_code == 200, r.text


def test_12_huge_range_in_a_template_is_400(hostile_http: httpx.Client) -> None:
    template = "{% for i in range(10**9) %}{% endfor %}{{ messages[0].content }}"
    t0 = time.monotonic()
    r = hostile_http.post(CHAT, json={**OK_CHAT, "chat_template": template})
    check_error(r, 400, "range", "messages")
    assert time.monotonic() - t0 < LIM["render_timeout"] + 5  # refused, not run to the limit
    hostile_alive(hostile_http)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The fake engine with the server's defaults (no --host, request templates untrusted)."""
    server = fake_server(tmp_path_factory.mktemp("plan"), "--max-model-len", "512").start(120)
    yield server
    assert server.stop() == 0


def test_13_untrusted_templates_on_every_render_path(fake: ServerProcess) -> None:
    """Check 13 beyond the chat route (test_http_errors has it): /tokenize refuses a request
    template too, reserved kwargs are refused, and an ordinary kwarg still works."""
    with httpx.Client(base_url=fake.base_url, timeout=60) as c:
        check_error(c.post("/tokenize", json={"messages": MSG, "chat_template": "{{ 'x' }}"}),
                    400, "--trust-request-chat-template", "chat_template")
        check_error(c.post("/tokenize", json={"messages": MSG, "chat_template_kwargs": {
            "chat_template": "{{ 'x' }}"}}), 400, "--trust-request-chat-template",
            "chat_template")
        for key, value in (("add_generation_prompt", False), ("tokenize", True),
                           ("messages", MSG)):
            check_error(c.post(CHAT, json={**OK_CHAT, "chat_template_kwargs": {key: value}}),
                        400, key)
        r = c.post(CHAT, json={**OK_CHAT, "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200, r.text


# -- 16, 18. Auth and exposure ----------------------------------------------------------------


def test_16_host_header_tricks_case_changed_key_and_preflight(
        hostile_server: ServerProcess, hostile_http: httpx.Client) -> None:
    """Check 16's cases that test_auth_paths does not send: a Host header that looks like a
    path, a key in the wrong case; and an OPTIONS request with a body runs no inference."""
    for host in ("x/v1/../health", "a/b", "127.0.0.1/health"):
        r = httpx.get(hostile_server.url("/v1/models"), headers={"Host": host})
        check_error(r, 401, "API key")
    r = httpx.get(hostile_server.url("/v1/models"),
                  headers={"Authorization": f"Bearer {HOSTILE_KEY.upper()}"})
    check_error(r, 401, "API key")
    before = engine_work(hostile_server)
    for headers in ({}, {"Origin": "http://elsewhere.example",
                         "Access-Control-Request-Method": "POST"}):
        r = httpx.request("OPTIONS", hostile_server.url(C), headers={**JSON_CT, **headers},
                          content=json.dumps({"prompt": "x", "max_tokens": 2}).encode())
        assert r.status_code == 204 and r.content == b""
        assert "access-control-allow-origin" not in r.headers  # no CORS unless configured
    assert engine_work(hostile_server) == before
    hostile_alive(hostile_http)


def _listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port`` (from /proc/net/tcp[6])."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = [line.split() for line in f.readlines()[1:]]
        for row in rows:
            addr, _, hex_port = row[1].partition(":")
            if int(hex_port, 16) == port and row[3] == "0A":  # TCP_LISTEN
                found.append(addr)
    return found


def test_18_listens_on_loopback_only_by_default(fake: ServerProcess) -> None:
    """Check 18: started without --host, the only listening socket is 127.0.0.1 (so the host's
    other addresses refuse connections)."""
    assert _listening(fake.port) == ["0100007F"]  # 127.0.0.1, little-endian hex


# -- 25. Determinism --------------------------------------------------------------------------


def test_25_determinism(hostile_http: httpx.Client) -> None:
    """Greedy: 5 runs in a row equal, and 16 copies of the same request at once equal to it
    alone. Seeded sampling: the same seed repeats, another seed differs."""
    def text(body: dict[str, Any]) -> str:
        r = hostile_http.post(C, json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    greedy = {"prompt": "The history of Rome began", "max_tokens": 16, "temperature": 0,
              "ignore_eos": True}
    runs = [text(greedy) for _ in range(5)]
    assert len(set(runs)) == 1
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(text, [greedy] * 16))
    assert together == [runs[0]] * 16
    seeded = {"prompt": "My favourite animal is", "max_tokens": 16, "temperature": 1.0,
              "ignore_eos": True}
    a, b = text({**seeded, "seed": 7}), text({**seeded, "seed": 7})
    assert a == b
    assert text({**seeded, "seed": 8}) != a


# -- 31. Shutdown leaves no process behind ----------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_31_sigterm_leaves_no_child_process(tmp_path: Path) -> None:
    """Check 31: the server's children (the chat-template workers) are gone once it has exited
    0 after SIGTERM."""
    server = fake_server(tmp_path, "--chat-template-workers", "2").start(120)
    try:
        r = httpx.post(server.url(CHAT), json=OK_CHAT, timeout=60)  # the workers have rendered
        assert r.status_code == 200, r.text
        assert server.proc is not None
        children = _children(server.proc.pid)
        assert len(children) >= 2
        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in children):
            assert time.monotonic() < deadline, [p for p in children if _alive(p)]
            time.sleep(0.05)
    finally:
        server.stop()


# -- 23. Admitted requests complete while the excess is refused --------------------------------


def test_23_admitted_requests_complete_beside_the_refusals(server: ServerProcess) -> None:
    """Check 23's other half (test_admission cuts its held streams): the requests admitted
    before a burst run to their end, with ``[DONE]``, while the burst gets 503s."""
    capacity = 4  # the session server: --max-num-seqs 2 + --max-queued-requests 2
    held = Streams(server, capacity, max_tokens=48)
    wait_admitted(server, capacity)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: completion(server, max_tokens=4), range(20)))
    assert [r.status_code for r in answers] == [503] * 20
    held.join()
    assert held.status == [200] * capacity
    for lines in held.lines:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert_idle_and_no_leaks(server)
