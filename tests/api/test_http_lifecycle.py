"""Startup (/ready 503 while loading, exit 1 on load failure) and SIGTERM drain (fake engine)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.api.server_utils import fake_server


def test_ready_is_503_while_loading_then_200(tmp_path: Path) -> None:
    """/ready (readiness) and /v1 routes are 503 while loading; /health (liveness) is 200."""
    server = fake_server(tmp_path, XLASERVE_FAKE_LOAD_DELAY_S="8").launch()
    try:
        seen_loading = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(server.url("/ready"), timeout=2)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if r.status_code == 503:
                assert "loading" in r.json()["error"]["message"]
                if not seen_loading:  # right after startup: loading lasts 8 s more
                    v = httpx.post(server.url("/v1/completions"), json={"prompt": "x"})
                    assert v.status_code == 503
                    assert httpx.get(server.url("/version")).status_code == 200
                    assert httpx.get(server.url("/health")).status_code == 200
                seen_loading = True
            elif r.status_code == 200:
                break
            time.sleep(0.1)
        assert seen_loading
        assert httpx.get(server.url("/ready")).status_code == 200
        assert httpx.get(server.url("/health")).status_code == 200
    finally:
        assert server.stop() == 0


def test_load_failure_exits_nonzero(tmp_path: Path) -> None:
    server = fake_server(tmp_path, XLASERVE_FAKE_LOAD_FAIL="1")
    try:
        server.start(60)
    except RuntimeError as e:
        assert "exited with 1" in str(e)
        assert "simulated load failure" in server.log()
    else:
        raise AssertionError("the server became healthy although its engine failed to load")
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    server = fake_server(tmp_path, "--shutdown-timeout", "30",
                         XLASERVE_FAKE_STEP_S="0.02").start(120)
    events: list[str] = []
    first_chunk = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", server.url("/v1/completions"), timeout=60, json={
                "prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first_chunk.set()

    t = threading.Thread(target=consume)
    t.start()
    assert first_chunk.wait(30)
    server.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # while draining: no new work, and /ready says so (/health, liveness, stays 200)
    try:
        assert httpx.get(server.url("/ready"), timeout=5).status_code == 503
        assert httpx.get(server.url("/health"), timeout=5).status_code == 200
        r = httpx.post(server.url("/v1/completions"), json={"prompt": "x"}, timeout=5)
        assert r.status_code == 503
    except httpx.ConnectError:
        pass  # the listener may already be closed: also a refusal
    t.join(60)
    assert events[-1] == "data: [DONE]"
    finals = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
    assert finals[-1]["finish_reason"] == "length"
    assert sum(1 for f in finals if f["text"] or f["finish_reason"]) == 100
    assert server.stop(timeout=60) == 0
    assert "waiting up to" in server.log()


def test_sigterm_aborts_after_the_drain_timeout(tmp_path: Path) -> None:
    server = fake_server(tmp_path, "--shutdown-timeout", "0.5",
                         XLASERVE_FAKE_STEP_S="0.05").start(120)
    result: dict[str, object] = {}

    def long_request() -> None:
        try:
            r = httpx.post(server.url("/v1/completions"), timeout=60, json={
                "prompt": "x", "max_tokens": 1000, "ignore_eos": True})
            result["status"] = r.status_code
            result["body"] = r.json()
        except httpx.HTTPError as e:
            result["error"] = repr(e)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    server.send_signal(signal.SIGTERM)
    t.join(60)
    code = server.stop(timeout=60)
    assert code == 0
    if "status" in result:  # the request ended early with finish_reason "abort"
        assert result["status"] == 200
        choice = result["body"]["choices"][0]  # type: ignore[index]
        assert choice["finish_reason"] in ("abort", None)
        assert result["body"]["usage"]["completion_tokens"] < 1000  # type: ignore[index]
    else:  # or its connection was closed
        assert "error" in result


def test_engine_death_exits_nonzero(tmp_path: Path) -> None:
    server = fake_server(tmp_path).start(120)
    r = httpx.post(server.url("/v1/completions"), json={"prompt": "now CRASH", "max_tokens": 3})
    assert r.status_code == 500 and "Traceback" not in r.text
    assert server.proc is not None
    assert server.proc.wait(60) == 1
    assert "The engine stopped" in server.log()
    server.stop()
