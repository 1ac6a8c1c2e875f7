"""Faults inside the engine, made by the test fault hook (docs/RELIABILITY.md, "Faults").

Policy: an engine exception or a hung step kills the engine; every in-flight request ends with a
500 in OpenAI shape (a stream: an error event, then ``[DONE]``), ``/health`` and ``/ready`` turn
503, and the process exits with code 1. An out-of-memory step fails only its own requests and
the engine keeps serving with consistent page accounting.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from serving.engine.faults import (
    FAULT_ENV,
    FaultSpec,
    InjectedFault,
    InjectedOutOfMemory,
    fault_hook_from_env,
    is_out_of_memory,
)
from tests.api.server_utils import ServerProcess, real_server
from tests.reliability.conftest import (
    SMALL,
    assert_idle_and_no_leaks,
    completion,
    m,
    rel_server,
)

ARGS = ("--max-num-seqs", "2")  # 2 running, the others waiting in the engine


@dataclass
class Outcome:
    stream: bool
    status: int = 0
    body: dict[str, object] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)  # a stream's data payloads, [DONE] included

    @property
    def failed_in_openai_shape(self) -> bool:
        """A 500 error body, or a 200 stream whose last event before [DONE] is a 500 error."""
        if not self.stream:
            err = self.body.get("error")
            return self.status == 500 and isinstance(err, dict) and err["code"] == 500 \
                and "Traceback" not in str(err["message"])
        if self.status != 200 or self.events[-1:] != ["[DONE]"] or len(self.events) < 2:
            return False
        last = json.loads(self.events[-2])
        return "error" in last and last["error"]["code"] == 500

    @property
    def succeeded(self) -> bool:
        if not self.stream:
            return self.status == 200 and \
                self.body["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
        if self.status != 200 or self.events[-1:] != ["[DONE]"] or len(self.events) < 2:
            return False
        last = json.loads(self.events[-2])
        return "choices" in last and last["choices"][0]["finish_reason"] == "length"


def run_requests(server: ServerProcess, count: int = 4, max_tokens: int = 40) -> list[Outcome]:
    """``count`` greedy completions at once, every other one streamed; their outcomes."""
    outcomes = [Outcome(stream=i % 2 == 1) for i in range(count)]

    def one(o: Outcome, i: int) -> None:
        body = {"prompt": f"Request {i}:", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": o.stream}
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=120) as r:
            o.status = r.status_code
            if not o.stream or r.status_code != 200:
                o.body = json.loads(r.read())
                return
            o.events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=one, args=(o, i)) for i, o in enumerate(outcomes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes


def assert_dead_then_exits_1(server: ServerProcess, outcomes: list[Outcome]) -> None:
    assert all(o.failed_in_openai_shape for o in outcomes), outcomes
    # /health and /ready were 503 by the time the errors were sent (the engine is marked dead
    # first); the process may already be gone, which is as good.
    for path in ("/health", "/ready"):
        with contextlib.suppress(httpx.TransportError):
            assert httpx.get(server.url(path), timeout=1).status_code == 503
    assert server.proc is not None
    assert server.proc.wait(30) == 1
    assert "The engine stopped; shutting the server down (exit code 1)" in server.log()


def test_engine_exception_fails_requests_and_exits_1(tmp_path: Path) -> None:
    server = rel_server(tmp_path, *ARGS, fault="raise@6").start(900)
    try:
        outcomes = run_requests(server)
        assert_dead_then_exits_1(server, outcomes)
        assert "injected fault at engine step 6" in server.log()
    finally:
        server.stop()


def test_hung_step_is_caught_by_the_watchdog(tmp_path: Path) -> None:
    server = rel_server(tmp_path, *ARGS, "--engine-step-timeout", "3",
                        fault="hang@6").start(900)
    try:
        result: list[list[Outcome]] = []
        t = threading.Thread(target=lambda: result.append(run_requests(server)))
        t.start()
        deadline = time.monotonic() + 60
        while m(server, "engine_steps_total") < 5:  # the hang starts at step 6
            assert time.monotonic() < deadline
            time.sleep(0.05)
        frozen = m(server, "engine_steps_total")
        while True:  # steps frozen with work queued: /health must not stay 200
            assert time.monotonic() < deadline, "the watchdog never fired"
            try:
                health = httpx.get(server.url("/health"), timeout=5)
            except httpx.ConnectError:
                # the watchdog fired and the server already exited (the policy) between two
                # polls, which a loaded machine can stretch: its log says why
                assert server.proc is not None and server.proc.poll() is not None
                assert "the engine is hung" in server.log()
                break
            if health.status_code == 503:
                assert "hung" in health.json()["error"]["message"] or \
                    "stopped" in health.json()["error"]["message"]
                break
            time.sleep(0.2)
        t.join(60)
        assert frozen == 5 and "--engine-step-timeout" in server.log()
        assert_dead_then_exits_1(server, result[0])
    finally:
        server.stop()


def test_out_of_memory_fails_its_step_only(tmp_path: Path) -> None:
    server = rel_server(tmp_path, *ARGS, fault="oom@6").start(900)
    try:
        outcomes = run_requests(server)
        failed = [o for o in outcomes if o.failed_in_openai_shape]
        ok = [o for o in outcomes if o.succeeded]
        # the 2 requests running at step 6 fail; the 2 waiting ones run afterwards
        assert len(failed) == 2 and len(ok) == 2, outcomes
        assert m(server, "engine_failed_steps_total") == 1
        assert httpx.get(server.url("/health")).status_code == 200
        assert httpx.get(server.url("/ready")).status_code == 200
        assert_idle_and_no_leaks(server)
        r = completion(server)
        assert r.status_code == 200 and r.json()["choices"][0]["text"].strip()
        assert "ran out of memory" in server.log()
    finally:
        assert server.stop() == 0


def test_fault_hook_refused_without_the_flag(tmp_path: Path) -> None:
    server = real_server(tmp_path, *SMALL, XLASERVE_TEST_FAULT="raise@1")
    try:
        server.start(300)
    except RuntimeError as e:
        assert "exited with 1" in str(e)
    else:
        raise AssertionError("the server started with a fault hook and no --enable-test-hooks")
    finally:
        server.stop()
    assert "--enable-test-hooks is not" in server.log()


def test_fault_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FaultSpec.parse("oom@3") == FaultSpec("oom", 3)
    for bad in ("oom", "boom@3", "raise@0", "raise@x", "@2"):
        with pytest.raises(ValueError, match="KIND@N"):
            FaultSpec.parse(bad)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_hook_from_env(True) is None
    monkeypatch.setenv(FAULT_ENV, "raise@2")
    with pytest.raises(ValueError, match="--enable-test-hooks"):
        fault_hook_from_env(False)
    hook = fault_hook_from_env(True)
    assert hook is not None
    hook.before_execute()  # step 1: nothing
    with pytest.raises(InjectedFault, match="step 2"):
        hook.before_execute()
    hook.before_execute()  # fires once
    assert is_out_of_memory(InjectedOutOfMemory("RESOURCE_EXHAUSTED: out of memory"))
    assert not is_out_of_memory(InjectedFault("RESOURCE_EXHAUSTED"))  # only XLA's kind
