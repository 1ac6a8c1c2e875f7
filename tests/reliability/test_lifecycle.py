"""Lifecycle of the real server (docs/RELIABILITY.md, "Lifecycle"): liveness and readiness while
loading, the SIGTERM drain, and ``--shutdown-timeout 0``."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.api.server_utils import ServerProcess
from tests.reliability.conftest import m, rel_server, wait_admitted


def stream_events(server: ServerProcess, out: list[str], max_tokens: int) -> None:
    body = {"prompt": "Tell me a story.", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=120) as r:
        assert r.status_code == 200
        out.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))


def finish_reason(events: list[str]) -> str | None:
    """The finish_reason of a completed stream (its last chunk before [DONE])."""
    assert events[-1] == "[DONE]", events[-3:]
    reason: str | None = json.loads(events[-2])["choices"][0]["finish_reason"]
    return reason


def test_loading_then_sigterm_drains(tmp_path: Path) -> None:
    server = rel_server(tmp_path, "--max-num-seqs", "2", "--shutdown-timeout", "30").launch()
    try:
        # loading: alive (/health 200) but not ready (/ready and /v1 503)
        seen_loading = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(server.url("/ready"), timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if ready.status_code == 200:
                break
            assert ready.status_code == 503 and "loading" in ready.json()["error"]["message"]
            if not seen_loading:
                seen_loading = True
                assert httpx.get(server.url("/health")).status_code == 200
                r = httpx.post(server.url("/v1/completions"), json={"prompt": "x"})
                assert r.status_code == 503
            time.sleep(0.05)
        assert seen_loading

        # SIGTERM with 4 streams in flight (2 running, 2 queued): all of them finish
        streams: list[list[str]] = [[] for _ in range(4)]
        threads = [threading.Thread(target=stream_events, args=(server, s, 24))
                   for s in streams]
        for t in threads:
            t.start()
        wait_admitted(server, 4)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with contextlib.suppress(httpx.TransportError):  # or the listener is already closed
            assert httpx.get(server.url("/ready"), timeout=5).status_code == 503
            r = httpx.post(server.url("/v1/completions"), json={"prompt": "x"}, timeout=5)
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        for t in threads:
            t.join(120)
        assert [finish_reason(s) for s in streams] == ["length"] * 4
        assert server.stop(timeout=60) == 0
    finally:
        server.stop()


def test_shutdown_timeout_0_aborts_in_flight(tmp_path: Path) -> None:
    server = rel_server(tmp_path, "--max-num-seqs", "2", "--shutdown-timeout", "0").start(900)
    try:
        streams: list[list[str]] = [[], []]
        full: list[httpx.Response] = []
        threads = [threading.Thread(target=stream_events, args=(server, s, 400))
                   for s in streams]
        threads.append(threading.Thread(target=lambda: full.append(httpx.post(
            server.url("/v1/completions"), timeout=120, json={
                "prompt": "Hi", "max_tokens": 400, "ignore_eos": True}))))
        for t in threads:
            t.start()
        wait_admitted(server, 3)
        while m(server, "generation_tokens_total") < 4:
            time.sleep(0.05)
        sent = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.proc is not None
        assert server.proc.wait(30) == 0
        took = time.monotonic() - sent
        for t in threads:
            t.join(30)
        assert [finish_reason(s) for s in streams] == ["abort", "abort"]
        assert full[0].status_code == 200
        choice = full[0].json()["choices"][0]
        assert choice["finish_reason"] == "abort"
        assert full[0].json()["usage"]["completion_tokens"] < 400
        assert took < 5.0, f"exit took {took:.1f} s"
    finally:
        server.stop()
