"""What the real server logs at its default level (captured from its output): never an API key,
right or wrong, never prompt or message text, even when a request fails; and nothing a client
sends can start a log line of its own (CR, LF and the other Unicode line breaks are escaped)."""

from __future__ import annotations

import socket

import httpx

from tests.api.server_utils import ServerProcess
from tests.reliability.conftest import HOSTILE_KEY

PROMPT = "CANARY-PROMPT-5d1e"
WRONG_KEY = "CANARY-WRONG-KEY-77b2"
INJECTED = "INJECTED-LOG-LINE"
# Every character str.splitlines() breaks a line at, besides CR and LF
LINE_BREAKS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
               "\u2029"]


def test_logs_hold_no_keys_and_no_prompts(hostile_server: ServerProcess) -> None:
    base = hostile_server.base_url
    auth = {"Authorization": f"Bearer {HOSTILE_KEY}"}
    msgs = [{"role": "user", "content": PROMPT}]
    with httpx.Client(base_url=base, headers=auth, timeout=120) as c:
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code \
            == 200
        assert c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2,
                                                    "stream": True}).status_code == 200
        assert c.post("/tokenize", json={"prompt": PROMPT}).status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, PROMPT: 1})
        assert r.status_code == 200  # an unknown field is accepted, and logged by name
        # failures: validation, context length, a template error quoting the message, a
        # grammar error
        for path, body in (
                ("/v1/completions", {"prompt": PROMPT, "max_tokens": "x"}),
                ("/v1/completions", {"prompt": PROMPT * 400, "max_tokens": 2}),
                ("/v1/chat/completions", {"messages": msgs, "chat_template":
                                          "{{ raise_exception(messages[0].content) }}"}),
                ("/v1/completions", {"prompt": PROMPT, "guided_regex": "(" + PROMPT})):
            assert c.post(path, json=body).status_code == 400
    for key in (WRONG_KEY, HOSTILE_KEY + "x"):
        r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT},
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401
    r = httpx.get(base + "/v1/models", params={"api_key": HOSTILE_KEY})
    assert r.status_code == 401
    log = hostile_server.log()
    assert "xlaserve.access" in log  # the access log is on: the check below is not vacuous
    for secret in (PROMPT, WRONG_KEY, HOSTILE_KEY):
        # the unknown field's name is logged as a field name, never the prompt itself
        lines = [ln for ln in log.splitlines() if secret in ln and
                 "present in the request but ignored" not in ln]
        assert not lines, (secret, lines[:3])


def test_no_client_bytes_start_a_log_line(hostile_server: ServerProcess) -> None:
    auth = f"Authorization: Bearer {HOSTILE_KEY}\r\n".encode()

    def raw(request: bytes) -> None:
        with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=30) as s:
            s.sendall(request)
            s.recv(65536)

    for br in LINE_BREAKS:
        enc = br.encode()
        raw(b"GET /v1/models" + enc.replace(b"\r", b"%0d").replace(b"\n", b"%0a") +
            INJECTED.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        if br not in ("\r", "\n", "\r\n"):  # raw in the request line or a header value
            raw(b"GET /v1/models" + enc + INJECTED.encode() + b" HTTP/1.1\r\nHost: x\r\n" +
                auth + b"\r\n")
            raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Request-Id: a" + enc +
                INJECTED.encode() + b"\r\nUser-Agent: u" + enc + INJECTED.encode() +
                b"\r\n\r\n")
    raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\r" + INJECTED.encode() +
        b"\r\n" + auth + b"\r\n")
    log = hostile_server.log()
    assert INJECTED in log  # what clients sent was logged, escaped
    for line in log.splitlines():  # splits at every line break above
        assert not line.startswith(INJECTED), line
