"""Admission control on the real server (docs/RELIABILITY.md, "Admission control").

The session server admits 2 running + 2 queued requests and 3000 queued prompt tokens. Past
either limit: 503 ``server_overloaded`` with ``Retry-After``, before the body is tokenized (the
engine's prompt-token counter does not move), counted in ``requests_rejected_total``.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.server_utils import ServerProcess
from tests.reliability.conftest import (
    Streams,
    assert_idle_and_no_leaks,
    completion,
    m,
    wait_admitted,
)

CAPACITY = 4  # --max-num-seqs 2 + --max-queued-requests 2


def check_overloaded(r: httpx.Response, reason_word: str) -> None:
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "server_overloaded" and err["code"] == 503
    assert reason_word in err["message"]
    assert r.headers["retry-after"] == "1"


def test_burst_past_capacity_is_refused_before_any_work(server: ServerProcess) -> None:
    held = Streams(server, CAPACITY)
    try:
        wait_admitted(server, CAPACITY)
        # admitted is not yet in the engine (tokenizing happens after admission): wait until
        # all four are there, so that their prompt tokens are counted before the burst
        deadline = time.monotonic() + 60
        while m(server, "num_requests_running") + m(server, "num_requests_waiting") < CAPACITY:
            assert time.monotonic() < deadline, "the held requests never reached the engine"
            time.sleep(0.02)
        prompt_tokens = m(server, "prompt_tokens_total")
        rejected = m(server, "requests_rejected_total", reason="requests")
        chat = {"messages": [{"role": "user", "content": "Hello there " * 50}], "max_tokens": 5}
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(httpx.post, server.url(path), json=body, timeout=30)
                       for path, body in [("/v1/completions", {"prompt": "x" * 500})] * 20 +
                       [("/v1/chat/completions", chat)] * 20]
            answers = [f.result() for f in futures]
        for r in answers:
            check_overloaded(r, "requests are already admitted")
        # no tokenization, no template, no engine request for any of the 40
        assert m(server, "prompt_tokens_total") == prompt_tokens
        assert m(server, "requests_rejected_total", reason="requests") == rejected + 40
        assert httpx.get(server.url("/ready")).status_code == 200  # refusing is not unready
    finally:
        held.close()
    assert all(s == 200 for s in held.status)
    assert_idle_and_no_leaks(server)
    r = completion(server)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].strip()


def test_openai_client_sees_503_server_overloaded(server: ServerProcess) -> None:
    held = Streams(server, CAPACITY)
    try:
        wait_admitted(server, CAPACITY)
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="", prompt="Hi", max_tokens=3)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
    finally:
        held.close()
    assert_idle_and_no_leaks(server)


def test_prompt_token_budget(server: ServerProcess) -> None:
    """One admitted request holds a few tokens; a 4000-byte prompt would pass the 3000-token
    budget (estimated from the body before tokenizing) → 503. Alone, the same request is
    admitted and gets its real answer (here: 400, longer than the 512-token context)."""
    big = "word " * 800
    held = Streams(server, 1)
    try:
        wait_admitted(server, 1)
        rejected = m(server, "requests_rejected_total", reason="prompt_tokens")
        check_overloaded(completion(server, big), "prompt")
        assert m(server, "requests_rejected_total", reason="prompt_tokens") == rejected + 1
    finally:
        held.close()
    wait_admitted(server, 0)
    r = completion(server, big)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"].lower()
    assert_idle_and_no_leaks(server)


def test_listen_backlog_holds_a_burst(server: ServerProcess) -> None:
    """The listening socket queues ``--backlog`` (2048, capped by the kernel's somaxconn)
    connections: with Sanic's 100, a burst of 1,600 left 416 connections without any answer
    while the event loop was busy refusing the others (bench/soak.py --burst)."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    # ss columns of a listening socket: State Recv-Q Send-Q(=the backlog) Local Peer
    assert out and out[0] == "LISTEN", out
    assert int(out[2]) == min(2048, somaxconn), out
