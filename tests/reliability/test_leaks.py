"""Nothing leaked (docs/RELIABILITY.md, "Leaks"): client disconnects abort their requests and
free their pages; the idle self-check counts any page that nobody holds; a failed step gives its
requests' pages back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.scheduler import Scheduler, SchedulerConfig
from tests.api.server_utils import ServerProcess
from tests.engine.test_scheduler import make, step
from tests.reliability.conftest import (
    Streams,
    assert_idle_and_no_leaks,
    completion,
    m,
    rel_server,
    wait_admitted,
)


def test_streaming_disconnects_abort_and_free_pages(server: ServerProcess) -> None:
    aborted = m(server, "requests_aborted_total")
    streams = Streams(server, 4)  # 2 running, 2 queued in the engine
    wait_admitted(server, 4)
    deadline = time.monotonic() + 60
    while m(server, "num_requests_running") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert m(server, "kv_cache_pages_used") > 0
    streams.close()  # each client hangs up after its next line (queued ones once they run)
    assert_idle_and_no_leaks(server)
    assert m(server, "requests_aborted_total") == aborted + 4
    for lines in streams.lines:
        assert lines and "[DONE]" not in lines[-1]  # they really were cut mid-stream


def test_non_streaming_disconnects_abort_and_free_pages(server: ServerProcess) -> None:
    aborted = m(server, "requests_aborted_total")
    errors: list[BaseException] = []

    def give_up_after_1s() -> None:
        try:
            httpx.post(server.url("/v1/completions"), timeout=1.0, json={
                "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True})
        except httpx.TimeoutException as e:
            errors.append(e)

    threads = [threading.Thread(target=give_up_after_1s) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 3 and all(isinstance(e, httpx.TimeoutException) for e in errors)
    assert_idle_and_no_leaks(server)
    assert m(server, "requests_aborted_total") == aborted + 3
    # A hang-up is the client's doing, not a server error (the 30-minute soak logged three as
    # "Unhandled error" 500s): the access log says 499, and nothing is logged at ERROR.
    log = server.log(200_000)
    assert log.count("POST /v1/completions 499 ") >= 3, log[-3000:]
    assert "Unhandled error" not in log and "RequestCancelled" not in log, log[-3000:]
    r = completion(server)  # and the server still answers
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_audit_finds_a_page_nobody_holds() -> None:
    """The self-check can fail: a sequence dropped without giving its pages back."""
    kv = KVCacheManager(32, 4, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(4, 32, 512), kv)
    make(s, "a", 10)
    make(s, "b", 6, first=50)
    step(s, s.schedule())
    assert kv.audit(s.num_pages_held) is None
    s.abort("b")
    assert kv.audit(s.num_pages_held) is None
    seq = s.requests["a"].seqs[0]
    s.running.remove(seq)  # forget it without free_seq: its 3 pages leak
    del s.seqs[seq.seq_id]
    problem = kv.audit(s.num_pages_held)
    assert problem is not None and "= 28 pages, but the pool has 31" in problem


def test_failed_step_frees_its_requests_pages() -> None:
    """An out-of-memory step: its requests end with "error" and give their pages back; a
    request that was not in the step is untouched."""
    kv = KVCacheManager(32, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(2, 32, 512), kv)
    make(s, "a", 10, n=2)
    step(s, s.schedule())
    make(s, "b", 6, first=50)  # waits: both sequence slots are taken by a
    sched = s.schedule()
    outs = s.fail_step(sched)
    assert sorted((o.request_id, o.index, o.finish_reason) for o in outs) == [
        ("a", 0, "error"), ("a", 1, "error")]
    assert list(s.requests) == ["b"]
    assert kv.num_used == 0 and kv.audit(s.num_pages_held) is None
    assert [r.num_tokens for r in s.schedule().rows] == [6]  # b runs next


def test_server_response_timeout_aborts_and_frees_pages(tmp_path: Path) -> None:
    """A non-streaming request cut by the server's own --response-timeout: 503 in OpenAI shape,
    the engine request aborted, its pages freed."""
    server = rel_server(tmp_path, "--max-num-seqs", "2", "--response-timeout", "1").start(900)
    try:
        r = completion(server, "Once upon a time", max_tokens=400, ignore_eos=True)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        assert_idle_and_no_leaks(server)
        assert m(server, "requests_aborted_total") == 1
        r = completion(server, max_tokens=4)  # short enough to beat the timeout
        assert r.status_code == 200
    finally:
        assert server.stop() == 0
