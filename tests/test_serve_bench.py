"""Tests of the load generator ``bench/serve_bench.py``.

The part under test is the load generator, so it runs against a small fake OpenAI SSE server
started in-process on loopback (a real socket and real HTTP, driven by the real httpx client).
The fake server records every request body and the peak number of requests in flight, streams a
known number of tokens, and fails chosen requests, so the test can check what the generator sent,
how many it kept in flight, and how it counted. The statistics are checked on synthetic results
with hand-computed values. No assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "serve_bench.py"
_spec = importlib.util.spec_from_file_location("serve_bench", _PATH)
assert _spec is not None and _spec.loader is not None
sb = importlib.util.module_from_spec(_spec)
sys.modules["serve_bench"] = sb  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(sb)


# --------------------------------------------------------------------------- fake server


@dataclass
class FakeState:
    """Knobs and observations of the fake server (touched only on its loop's thread while it
    runs; read by the test after the benchmark returns)."""

    tokens_per_chunk: int = 1
    fail_indices: set[int] = field(default_factory=set)  # by arrival order among POSTs
    hold_until_inflight: int = 0  # first chunk waits until this many requests are in flight
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    posts: int = 0
    reached: asyncio.Event | None = None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, headers, body


def _write_json(writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )


async def _handle(
    state: FakeState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        method, path, _headers, raw = await _read_request(reader)
        if method == "GET" and path == "/v1/models":
            _write_json(writer, 200, {"object": "list", "data": [{"id": "fake-model"}]})
            return
        body = json.loads(raw)
        index = state.posts
        state.posts += 1
        state.bodies.append(body)
        state.paths.append(path)
        if index in state.fail_indices:
            _write_json(writer, 500, {"error": {"message": "injected failure"}})
            return
        state.inflight += 1
        state.max_inflight = max(state.max_inflight, state.inflight)
        if state.reached is None:
            state.reached = asyncio.Event()
        if state.inflight >= state.hold_until_inflight:
            state.reached.set()
        try:
            if state.hold_until_inflight:
                # Generous: only a broken generator (never reaching the level) waits this long.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.reached.wait(), 10.0)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            chat = path.endswith("/chat/completions")
            n = int(body["max_tokens"])

            def event(obj: dict[str, Any]) -> None:
                writer.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            if chat:  # servers open chat streams with a role-only delta: no text, not a token
                event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            sent = 0
            while sent < n:
                k = min(state.tokens_per_chunk, n - sent)
                text = "".join(f" t{sent + j}" for j in range(k))
                sent += k
                reason = "length" if sent == n else None
                choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
                if chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                event({"choices": [choice]})
                await writer.drain()
                await asyncio.sleep(0)
            if (body.get("stream_options") or {}).get("include_usage"):
                event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}})
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            state.inflight -= 1
    finally:
        writer.close()


@dataclass
class FakeServer:
    base_url: str
    state: FakeState


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    state = FakeState()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        server = await asyncio.start_server(lambda r, w: _handle(state, r, w), "127.0.0.1", 0)
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    assert started.wait(10)
    try:
        yield FakeServer(f"http://127.0.0.1:{holder['port']}", state)
    finally:

        async def stop() -> None:
            holder["server"].close()
            await holder["server"].wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --------------------------------------------------------------------------- statistics


def test_percentile_matches_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1, 2, 3, 4
    assert sb.percentile(xs, 0) == 1.0
    assert sb.percentile(xs, 100) == 4.0
    assert sb.percentile(xs, 50) == pytest.approx(2.5)
    assert sb.percentile(xs, 99) == pytest.approx(3.97)  # pos 2.97 -> 3 + 0.97 * (4 - 3)
    assert sb.percentile([7.0], 99) == 7.0
    assert math.isnan(sb.percentile([], 50))
    np = pytest.importorskip("numpy")
    data = [0.3, 5.0, 1.25, 9.5, 2.0, 2.0, 7.75]
    for q in (1, 25, 50, 90, 99):
        assert sb.percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_summarize_hand_computed() -> None:
    R = sb.RequestResult
    results = [
        # usage says 5 tokens, 4 chunks streamed (one chunk carried two tokens)
        R(
            ok=True,
            ttft_s=0.1,
            e2e_s=0.5,
            itl_s=[0.1, 0.1, 0.2],
            chunk_tokens=4,
            usage_tokens=5,
            finish_reason="length",
        ),
        R(
            ok=True,
            ttft_s=0.3,
            e2e_s=1.1,
            itl_s=[0.2, 0.2],
            chunk_tokens=3,
            usage_tokens=3,
            finish_reason="stop",
        ),
        R(ok=False, error="HTTP 500: boom", ttft_s=0.01, e2e_s=0.02, chunk_tokens=99),
    ]
    s = sb.summarize(results, concurrency=2, duration_s=2.0)
    assert (s.num_requests, s.completed, s.errors) == (3, 2, 1)
    assert s.output_tokens == 8 and s.token_source == "usage"  # the failure's 99 left out
    assert s.output_tokens_per_s == pytest.approx(4.0)
    assert s.requests_per_s == pytest.approx(1.0)
    assert s.mean_output_tokens == pytest.approx(4.0)
    assert s.ttft_ms_p50 == pytest.approx(200.0)  # median of 100, 300
    assert s.ttft_ms_p99 == pytest.approx(100 + 0.99 * 200)
    assert s.itl_ms_p50 == pytest.approx(200.0)  # pooled 100, 100, 200, 200, 200
    assert s.itl_ms_p99 == pytest.approx(200.0)
    # TPOT: (0.5 - 0.1) / 4 = 100 ms and (1.1 - 0.3) / 2 = 400 ms -> median 250 ms
    assert s.tpot_ms_p50 == pytest.approx(250.0)
    assert s.e2e_s_p50 == pytest.approx(0.8)
    assert s.e2e_s_p99 == pytest.approx(0.5 + 0.99 * 0.6)
    assert s.finish_reasons == {"length": 1, "stop": 1}
    assert s.first_errors == ["HTTP 500: boom"]


def test_summarize_token_sources_and_empty() -> None:
    R = sb.RequestResult
    chunks = sb.summarize([R(ok=True, ttft_s=0.1, e2e_s=0.2, chunk_tokens=2)], 1, 1.0)
    assert chunks.token_source == "chunks" and chunks.output_tokens == 2
    mixed = sb.summarize(
        [R(ok=True, chunk_tokens=2), R(ok=True, chunk_tokens=1, usage_tokens=3)], 1, 1.0
    )
    assert mixed.token_source == "mixed" and mixed.output_tokens == 5
    none = sb.summarize([R(ok=False, error="x")], 4, 1.0)
    assert none.completed == 0 and none.errors == 1 and none.output_tokens == 0
    assert math.isnan(none.ttft_ms_p50) and math.isnan(none.mean_output_tokens)


def test_prompts_repeatable_and_distinct() -> None:
    a = sb.make_prompts(5, None, 12, seed=3)
    assert a == sb.make_prompts(5, None, 12, seed=3)
    assert len(set(a)) == 5 and all(len(p.split()) == 12 for p in a)
    assert a != sb.make_prompts(5, None, 12, seed=4)
    assert sb.make_prompts(3, "hello", 12, seed=0) == ["hello"] * 3


# --------------------------------------------------------------------------- against the server


def test_completions_usage_concurrency_and_errors(fake_server: FakeServer) -> None:
    st = fake_server.state
    st.tokens_per_chunk = 2  # chunk counting would see 3 per request; usage says 6
    st.fail_indices = {2, 5}
    st.hold_until_inflight = 4
    cfg = sb.BenchConfig(base_url=fake_server.base_url, max_tokens=6, ignore_eos=True)
    [s] = asyncio.run(sb.run_benchmark(cfg, [4], num_requests=12, prompt_len=8, warmup_rounds=0))
    assert st.posts == 12 and st.max_inflight == 4
    assert (s.num_requests, s.completed, s.errors) == (12, 10, 2)
    assert s.first_errors[0].startswith("HTTP 500")
    assert s.token_source == "usage" and s.output_tokens == 60 and s.mean_output_tokens == 6
    assert s.finish_reasons == {"length": 10}
    assert s.ttft_ms_p50 <= s.e2e_s_p50 * 1e3
    assert s.output_tokens_per_s > 0 and s.requests_per_s > 0
    for body, path in zip(st.bodies, st.paths, strict=True):
        assert path == "/v1/completions"
        assert body["model"] == "fake-model"  # resolved from GET /v1/models
        assert body["stream"] is True and body["max_tokens"] == 6
        assert body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert len(body["prompt"].split()) == 8
    assert len({b["prompt"] for b in st.bodies}) == 12  # no prompt reused


def test_chat_chunk_counting_extra_body_and_warmup(fake_server: FakeServer) -> None:
    st = fake_server.state
    cfg = sb.BenchConfig(
        base_url=fake_server.base_url + "/v1/",
        model="m",
        endpoint="chat",
        max_tokens=5,
        include_usage=False,
        temperature=0.0,
        extra_body={"min_tokens": 5},
    )
    out = asyncio.run(
        sb.run_benchmark(cfg, [1, 3], num_requests=6, prompt="hi there", warmup_rounds=1)
    )
    assert [s.concurrency for s in out] == [1, 3]
    assert st.posts == (1 + 6) + (3 + 6)  # warm-up rounds x concurrency, then the measured ones
    assert st.max_inflight <= 3
    for s in out:
        assert s.errors == 0 and s.completed == 6
        assert s.token_source == "chunks" and s.output_tokens == 30  # role-only delta not counted
        assert s.finish_reasons == {"length": 6}
    for body in st.bodies:
        assert body["messages"] == [{"role": "user", "content": "hi there"}]
        assert body["model"] == "m" and body["temperature"] == 0.0 and body["min_tokens"] == 5
        assert "stream_options" not in body and "ignore_eos" not in body
    assert set(st.paths) == {"/v1/chat/completions"}


def test_one_request_itl_per_chunk(fake_server: FakeServer) -> None:
    cfg = sb.BenchConfig(base_url=fake_server.base_url, model="m", max_tokens=7)

    async def go() -> Any:
        import httpx

        async with httpx.AsyncClient() as client:
            return await sb.one_request(client, cfg, "m", "x")

    r = asyncio.run(go())
    assert r.ok and r.chunk_tokens == 7 and r.usage_tokens == 7 and len(r.itl_s) == 6
    assert r.ttft_s is not None and r.e2e_s is not None and r.ttft_s <= r.e2e_s
    assert all(gap >= 0 for gap in r.itl_s)


def test_connection_refused_counts_as_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = sb.BenchConfig(base_url=f"http://127.0.0.1:{port}", model="m", max_tokens=2)
    [s] = asyncio.run(sb.run_benchmark(cfg, [2], num_requests=3, warmup_rounds=0))
    assert s.errors == 3 and s.completed == 0 and "ConnectError" in s.first_errors[0]


def test_cli_writes_table_and_json(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    flags = "--concurrency 1,2 --num-requests 4 --max-tokens 3 --ignore-eos --warmup-rounds 0"
    flags += " --seed 9 --label fake"
    rc = sb.main(["--base-url", fake_server.base_url, "--json-out", str(out), *flags.split()])
    assert rc == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0].startswith("| conc |") and len(lines) == 4  # header, rule, 2 rows
    assert [row.split("|")[1].strip() for row in lines[2:]] == ["1", "2"]
    report = json.loads(out.read_text())
    assert report["label"] == "fake" and report["seed"] == 9
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    assert all(lv["output_tokens"] == 12 and lv["errors"] == 0 for lv in report["levels"])
    assert "api_key" not in report["config"]
