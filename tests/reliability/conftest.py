"""Fixtures of the reliability suite.

- Hostile input (test_hostile_*, test_auth_*, test_fuzz_*): one real server on the default model,
  started once per session, with small limits that make each bound cheap to reach. Its fixtures
  start with ``hostile_`` so that the other fixtures here cannot collide with them.
- Load, lifecycle, faults and leaks (test_admission, test_lifecycle, test_faults, test_leaks,
  test_load): the real ``serve`` command on the default model with small compile shapes
  (``SMALL``), so that each start takes seconds once the compilation cache is warm. Every test
  that runs such a server ends with ``assert_idle_and_no_leaks``: running, waiting and used KV
  pages back to 0 within 2 s, and ``xlaserve:kv_leak_detected_total`` 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.server_utils import ServerProcess, metric, real_server

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
    try:
        # After every hostile, fuzzed and refused request of the session (§6 checks 22, 26,
        # 27): the engine is idle with no leaked page, and nothing compiled after warm-up.
        assert_idle_and_no_leaks(server)
        assert m(server, "num_recompiles_total") == 0, server.log(4000)
    finally:
        code = server.stop()
    assert code == 0, server.log(4000)
    # §6 check 19 over the whole session (auth tricks put the key in paths and headers)
    assert HOSTILE_KEY not in server.log()


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


# Short compiles: two token buckets, a 512-token context.
SMALL = ("--max-model-len", "512", "--max-num-batched-tokens", "64", "--token-buckets", "16,64")
PREFIX = "xlaserve:"


def rel_server(tmp: Path, *args: str, name: str = "serve", fault: str | None = None
               ) -> ServerProcess:
    """A real server with ``SMALL`` shapes; ``fault`` sets the test fault hook
    ($XLASERVE_TEST_FAULT, with --enable-test-hooks)."""
    if fault is None:
        return real_server(tmp, *SMALL, *args, name=name)
    return real_server(tmp, *SMALL, "--enable-test-hooks", *args, name=name,
                       XLASERVE_TEST_FAULT=fault)


def m(server: ServerProcess, name: str, **labels: str) -> float:
    return metric(server.base_url, PREFIX + name, **labels)


def wait_idle(server: ServerProcess, within: float = 2.0) -> None:
    """Running, waiting and used KV pages all 0 within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        state = {k: m(server, k) for k in ("num_requests_running", "num_requests_waiting",
                                           "kv_cache_pages_used")}
        if not any(state.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is not idle {within} s later: {state}")
        time.sleep(0.05)


def assert_idle_and_no_leaks(server: ServerProcess, within: float = 2.0) -> None:
    wait_idle(server, within)
    time.sleep(0.6)  # the engine thread's idle self-check runs once it has seen the idle state
    assert m(server, "kv_leak_detected_total") == 0, server.log(4000)


def wait_admitted(server: ServerProcess, count: int, timeout: float = 60.0) -> None:
    """Until exactly ``count`` requests are admitted (``http_requests_in_flight``)."""
    deadline = time.monotonic() + timeout
    while m(server, "http_requests_in_flight") != count:
        assert time.monotonic() < deadline, f"{count} requests were not admitted in time"
        time.sleep(0.02)


def completion(server: ServerProcess, prompt: str = "The capital of France is",
               max_tokens: int = 8, **extra: object) -> httpx.Response:
    return httpx.post(server.url("/v1/completions"), timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})


class Streams:
    """``count`` long streaming completions held open in threads until ``close()``: each
    keeps the lines it read; ``close()`` disconnects the clients that are still reading."""

    def __init__(self, server: ServerProcess, count: int, max_tokens: int = 400,
                 **extra: object) -> None:
        self.lines: list[list[str]] = [[] for _ in range(count)]
        self.status: list[int | None] = [None] * count
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(server, i, max_tokens, extra),
                                          daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def _read(self, server: ServerProcess, i: int, max_tokens: int,
              extra: dict[str, object]) -> None:
        body = {"prompt": f"Story number {i}:", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, **extra}
        try:
            with httpx.stream("POST", server.url("/v1/completions"), json=body,
                              timeout=120) as r:
                self.status[i] = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines[i].append(line)
                    if self._stop.is_set():
                        return  # leaving the block closes the connection mid-stream
        except httpx.HTTPError:
            pass

    def join(self, timeout: float = 120.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def close(self) -> None:
        self._stop.set()
        self.join()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Small on purpose: 2 running + 2 queued requests, 3000 queued prompt tokens."""
    tmp = tmp_path_factory.mktemp("reliability")
    s = rel_server(tmp, "--max-num-seqs", "2", "--max-queued-requests", "2",
                   "--max-queued-prompt-tokens", "3000").start(900)
    yield s
    try:
        assert_idle_and_no_leaks(s)
        assert m(s, "num_recompiles_total") == 0, s.log(4000)  # §6 check 26
    finally:
        code = s.stop()
    assert code == 0
