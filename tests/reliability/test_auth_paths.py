"""API-key auth on the real server: no path spelling reaches a protected handler without the key,
public routes stay public, the key compare is constant-time over digests, and errors raised
before a request's head is parsed keep their own status."""

from __future__ import annotations

import hashlib
import http.client
import socket
from typing import Any

import pytest

import serving.api.app as app_module
from serving.api.app import PUBLIC_PATHS
from tests.api.server_utils import ServerProcess
from tests.api.test_http_security import ROUTES
from tests.reliability.conftest import HOSTILE_KEY

PROTECTED = sorted({p for p, _ in ROUTES if p.strip("/") not in PUBLIC_PATHS})


def tricks(path: str) -> list[str]:
    """Spellings of ``path`` that a lenient router or proxy might map onto it."""
    head, _, last = path.rpartition("/")
    enc = f"{head}/%{ord(last[0]):02x}{last[1:]}" if last else path
    return [path, "/" + path, path.upper(), enc, path + "/", path + "//", path + "/.",
            "/." + path, "/health/.." + path, "/metrics/.." + path, "/version/../.." + path,
            "/health%2f..%2f" + path.lstrip("/"), path.replace("/", "%2f"), path + "%00",
            path + ";x=1", path + "?api_key=" + HOSTILE_KEY, path + "#frag",
            path + "%20", "/%2e%2e" + path, path.replace("/", "\\")]


def send(server: ServerProcess, method: str, path: str,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request with ``path`` sent byte for byte (no client-side normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        body = b"{}" if method == "POST" else None
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        try:
            r = conn.getresponse()
        except http.client.RemoteDisconnected:
            return 0, b""  # closed without an answer: no handler ran either
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", PROTECTED)
def test_path_tricks_never_reach_a_handler_without_the_key(hostile_server: ServerProcess,
                                                           path: str) -> None:
    """Auth is deny-by-default (it runs before routing decides anything, and an unmatched path
    is not public), so every spelling, matched or not, is 401 without the key."""
    for trick in tricks(path):
        for method in ("GET", "POST"):
            for headers in ({}, {"Authorization": f"Basic {HOSTILE_KEY}"},
                            {"Authorization": f"Bearer {HOSTILE_KEY}x"}):
                status, body = send(hostile_server, method, trick, headers)
                # Sanic drops a request line whose target is not a path ("\\v1\\models")
                ok = status == 401 or (status == 0 and not trick.startswith("/"))
                assert ok, (method, trick, headers, status, body[:200])


def test_the_key_opens_protected_routes_and_public_ones_need_none(
        hostile_server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {HOSTILE_KEY}"}
    status, _ = send(hostile_server, "GET", "/v1/models", auth)
    assert status == 200
    status, _ = send(hostile_server, "GET", "/v1/models",
                     {"Authorization": f"bearer {HOSTILE_KEY}"})
    assert status == 200  # the scheme is case-insensitive, as RFC 7235 says
    for public in sorted(PUBLIC_PATHS):
        status, _ = send(hostile_server, "GET", "/" + public)
        assert status == 200, public


def test_errors_before_the_head_keep_their_status(hostile_server: ServerProcess) -> None:
    """Sanic runs request middleware for a request that failed before its head was parsed;
    that must not turn a malformed request into a 401 (nor let it reach a handler)."""
    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=30) as s:
            s.sendall(data)
            return s.recv(65536)

    assert raw(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 431")
    # Sanic's placeholder method, sent by a client, is still a request that needs the key
    assert raw(b"NONE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 401")
    assert not raw(b"NONE /v1/models HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 2")


def test_key_compare_is_constant_time_over_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared (no early exit on a match) with hmac.compare_digest,
    always over two SHA-256 digests, so neither the key's length nor its prefix nor which key
    matched shows in the time taken."""
    keys = ["first-key", "second", "a-much-longer-third-key-0123456789"]
    digests = app_module._key_digests(keys)
    calls: list[tuple[Any, Any]] = []
    real = app_module.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    for header, expected in ((f"Bearer {keys[0]}", True), (f"Bearer {keys[1]}", True),
                             (f"Bearer {keys[2]}", True), ("Bearer first", False),
                             ("Bearer first-key-and-more", False), ("Bearer ", False),
                             ("Bearer " + "x" * 10_000, False)):
        calls.clear()
        assert app_module._authorized(header, digests) is expected, header
        assert len(calls) == len(keys), header  # no early exit
        token = header.partition(" ")[2].strip()
        for given, stored in calls:
            assert isinstance(given, bytes) and len(given) == len(stored) == 32
            assert given == hashlib.sha256(token.encode()).digest()
            assert token.encode() not in (given, stored)
