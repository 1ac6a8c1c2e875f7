"""Fixtures of the hostile-input suite (test_hostile_*, test_auth_*, test_fuzz_*): one real
server on the default model, started once per session, with small limits that make each bound
cheap to reach. Fixture names start with ``hostile_`` so that other reliability fixtures in this
directory cannot collide with them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.api.server_utils import ServerProcess, real_server

HOSTILE_KEY = "hostile-key-7f3a9c"
HOSTILE_AUTH = {"Authorization": f"Bearer {HOSTILE_KEY}"}
# The limits the hostile server runs with (each test refers to these, not to literals).
HOSTILE_LIMITS = {"max_model_len": 512, "max_request_body": 64 * 1024, "request_timeout": 2.0,
                  "render_timeout": 1.0, "max_n": 4, "max_logprobs": 5}


@pytest.fixture(scope="session")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    lim = HOSTILE_LIMITS
    server = real_server(
        tmp, "--max-model-len", str(lim["max_model_len"]), "--max-num-seqs", "8",
        "--api-key", HOSTILE_KEY, "--trust-request-chat-template",
        "--max-logprobs", str(lim["max_logprobs"]), "--max-n", str(lim["max_n"]),
        "--max-request-body", str(lim["max_request_body"]),
        "--request-timeout", str(lim["request_timeout"]),
        "--chat-template-render-timeout", str(lim["render_timeout"]),
        "--chat-template-workers", "2", name="hostile").start(900)
    yield server
    assert server.stop() == 0, server.log(4000)


@pytest.fixture
def hostile_http(hostile_server: ServerProcess) -> Iterator[httpx.Client]:
    """An authenticated client of the hostile server."""
    with httpx.Client(base_url=hostile_server.base_url, headers=HOSTILE_AUTH,
                      timeout=120) as client:
        yield client


def hostile_alive(client: httpx.Client) -> None:
    """After any hostile request: the server still generates a correct greedy answer."""
    r = client.post("/v1/completions", json={"prompt": "The capital of France is",
                                              "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
