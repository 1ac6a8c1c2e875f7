"""Soak and burst tests for a running xlaserve (not in CI; docs/RELIABILITY.md).

Soak: ``--minutes`` of Poisson arrivals at ``--rate`` requests/s (set it to ~70% of the capacity
bench/serve_bench.py measured), a mix of streamed completions and chat completions with random
prompt and output lengths; ``--disconnect`` of them (default 5%) hang up mid-stream and
``--malformed`` (default 1%) are bad requests that must get a 4xx. At the end it prints:

- answers by status, and the unexpected ones (any 5xx; a 4xx for a good request; a 2xx for a
  malformed one; a stream that ends without ``[DONE]`` when nobody cut it);
- the server's RSS (``process_resident_memory_bytes`` from /metrics) after a warm-up and at the
  end, and its growth;
- p50/p99 TTFT and ITL over the first and the last tenth of the run (by arrival) and the drift;
- ``kv_leak_detected_total``, and running/waiting/used pages once the server is idle again.

Burst (``--burst N``, N = 10 x the server's admission limit, which it logs at startup as
"Admission: at most ... requests"): N small completions sent at once; prints how many got 200
and 503, the time from sending to each 503 (min/p50/p99/max), and the RSS before and after.

    python -m bench.soak --url http://127.0.0.1:8000 --minutes 30 --rate 4
    python -m bench.soak --url http://127.0.0.1:8000 --burst 1600
    python -m bench.soak --url http://127.0.0.1:8000 --flood 1000 --minutes 1

Flood (``--flood RATE``): RATE long requests/s for ``--minutes``; the server fills up at once and
refuses the rest. Prints answers by status and the RSS before and after (it must stay flat).
Burst and flood times are the client's (connection set-up included); the server's own time per
503 is in its access log.

Exit status: 1 if anything unexpected happened (soak: an unexpected answer, a leak, a server not
idle at the end), else 0. ``--json-out`` writes the report as JSON too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part",
         "child", "eye", "woman", "place", "work", "week", "case", "point", "government",
         "company", "number", "group", "problem", "fact"]

# Bad requests: each must be answered 4xx in OpenAI shape (never 5xx, never 2xx).
MALFORMED: tuple[tuple[str, bytes], ...] = (
    ("/v1/completions", b'{"prompt":'),
    ("/v1/completions", b"[]"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "ten"}'),
    ("/v1/completions", b'{"prompt": "hi", "temperature": -1}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    # (Not an unknown role: like vLLM, any role string reaches the chat template.)
    ("/v1/chat/completions", b'{"messages": [{"role": "", "content": "x"}]}'),
    ("/v1/chat/completions", b'{"messages": "hi", "max_tokens": 5}'),
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 3}'),
)


@dataclass
class Result:
    kind: str  # "stream", "chat", "malformed"
    start: float  # seconds since the run began
    status: int = 0
    done: bool = False  # a stream's [DONE] arrived
    cut: bool = False  # the client hung up on purpose
    error: str | None = None  # transport error or an error event in a stream
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def unexpected(self) -> bool:
        if self.kind == "malformed":
            return not 400 <= self.status < 500
        if self.status == 503:  # refused by admission control: expected when overloaded
            return False
        if self.status != 200 or self.error is not None:
            return True
        return not self.cut and not self.done


def _prompt(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


async def _stream(client: httpx.AsyncClient, res: Result, path: str, body: dict[str, Any],
                  cut_after: int | None, t0: float) -> None:
    sent = time.monotonic()
    last: float | None = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return
            async for line in _sse_lines(r):
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    res.done = True
                    break
                payload = json.loads(line[6:])
                if "error" in payload:
                    res.error = str(payload["error"].get("message"))
                    continue
                now = time.monotonic()
                if last is None:
                    res.ttft = now - sent
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
                if cut_after is not None and chunks >= cut_after:
                    res.cut = True
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"


async def _sse_lines(r: httpx.Response) -> Any:
    """An event stream's lines, split where SSE splits them (LF, after an optional CR) and
    nowhere else: httpx's ``aiter_lines`` also splits at U+2028 and the like, which may sit
    raw inside a JSON string."""
    buf = b""
    async for chunk in r.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8")


async def _malformed(client: httpx.AsyncClient, res: Result, path: str, raw: bytes) -> None:
    try:
        r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
        res.status = r.status_code
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"


def _metrics(client: httpx.Client) -> dict[str, float]:
    """The unlabelled values of /metrics by sample name (labels dropped; first sample wins)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, float(s.value))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    vs = sorted(values)
    return vs[min(len(vs) - 1, int(q * len(vs)))]


def _drift(first: float | None, last: float | None) -> float | None:
    if first is None or last is None or first == 0:
        return None
    return (last - first) / first


def _latency(results: list[Result]) -> dict[str, float | None]:
    ttft = [r.ttft for r in results if r.ttft is not None and not r.cut]
    itl = [x for r in results if not r.cut for x in r.itl]
    return {"ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99),
            "itl_p50": _pct(itl, 0.5), "itl_p99": _pct(itl, 0.99)}


def _wait_idle(client: httpx.Client, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    keys = ("xlaserve:num_requests_running", "xlaserve:num_requests_waiting",
            "xlaserve:kv_cache_pages_used")
    while True:
        m = _metrics(client)
        state = {k.split(":")[1]: m.get(k, 0.0) for k in keys}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


async def soak(url: str, minutes: float, rate: float, disconnect: float, malformed: float,
               max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    duration = minutes * 60
    sync = httpx.Client(base_url=url, timeout=30)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        # warm-up: a few requests so that the first RSS sample is not the cold process
        await asyncio.gather(*(_stream(client, Result("stream", 0), "/v1/completions", {
            "prompt": "warm up", "max_tokens": 8, "stream": True}, None, 0) for _ in range(4)))
        rss_start = _metrics(sync).get("process_resident_memory_bytes", 0.0)
        t0 = time.monotonic()
        next_at = t0
        while (now := time.monotonic()) - t0 < duration:
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.5))
                continue
            next_at += rng.expovariate(rate)
            start = now - t0
            if rng.random() < malformed:
                path, raw = rng.choice(MALFORMED)
                res = Result("malformed", start)
                tasks.append(asyncio.create_task(_malformed(client, res, path, raw)))
            else:
                cut = rng.randint(1, max(1, max_tokens // 2)) if rng.random() < disconnect \
                    else None
                n_out = rng.randint(max(1, max_tokens // 4), max_tokens)
                if rng.random() < 0.5:
                    res = Result("stream", start)
                    body: dict[str, Any] = {"prompt": _prompt(rng, 8, 200),
                                            "max_tokens": n_out, "stream": True}
                    path = "/v1/completions"
                else:
                    res = Result("chat", start)
                    body = {"messages": [{"role": "user", "content": _prompt(rng, 8, 120)}],
                            "max_tokens": n_out, "stream": True}
                    path = "/v1/chat/completions"
                if cut is not None:
                    body["ignore_eos"] = True  # long enough to be cut
                tasks.append(asyncio.create_task(_stream(client, res, path, body, cut, t0)))
            results.append(res)
        await asyncio.gather(*tasks)
    idle = _wait_idle(sync, 10.0)
    end = _metrics(sync)
    rss_end = end.get("process_resident_memory_bytes", 0.0)
    span = duration / 10
    first = _latency([r for r in results if r.start < span])
    last = _latency([r for r in results if r.start >= duration - span])
    unexpected = [r for r in results if r.unexpected]
    report: dict[str, Any] = {
        "mode": "soak", "minutes": minutes, "rate": rate, "requests": len(results),
        "by_status": dict(Counter(str(r.status or "transport error") for r in results)),
        "cut_on_purpose": sum(r.cut for r in results),
        "malformed": sum(r.kind == "malformed" for r in results),
        "unexpected": len(unexpected),
        "unexpected_examples": [asdict(r) for r in unexpected[:5]],
        "rss_start_mb": rss_start / 2**20, "rss_end_mb": rss_end / 2**20,
        "rss_growth": _drift(rss_start, rss_end),
        "first_tenth": first, "last_tenth": last,
        "drift": {k: _drift(first[k], last[k]) for k in first},
        "kv_leak_detected_total": end.get("xlaserve:kv_leak_detected_total", 0.0),
        "idle_at_end": idle,
    }
    sync.close()
    return report


async def burst(url: str, count: int, rate: float = 0.0, minutes: float = 0.0
                ) -> dict[str, Any]:
    """``count`` requests at once; or, with ``rate``, that many per second for ``minutes``
    (each asks for 256 tokens, so the server stays full and refuses the rest)."""
    sync = httpx.Client(base_url=url, timeout=300)
    for _ in range(4):  # warm-up, so that the first RSS sample is not the cold process
        sync.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 8})
    rss_before = _metrics(sync).get("process_resident_memory_bytes", 0.0)
    times: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()  # requests without an HTTP answer, by exception
    body = {"prompt": "Hello", "max_tokens": 256 if rate else 16, "ignore_eos": bool(rate)}
    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
               "Connection: close\r\n\r\n").encode() + payload

    async def one() -> None:
        # Raw sockets, not httpx: 1,600 httpx requests at once cost the client seconds of CPU on
        # these 2 cores, which the times below would then include.
        sent = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status_line = await reader.readline()
            code = int(status_line.split()[1])
            if code == 503:
                times.append(time.monotonic() - sent)
            await reader.read()  # the rest, until the server closes (a 200 must not be cut)
            writer.close()
        except (OSError, IndexError, ValueError) as e:
            statuses[0] += 1
            errors[f"{type(e).__name__}: {e}"[:120]] += 1
            return
        statuses[code] += 1

    if not rate:
        await asyncio.gather(*(one() for _ in range(count)))
    else:
        tasks: list[asyncio.Task[None]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < minutes * 60:
            due = int((time.monotonic() - t0) * rate) + 1
            tasks.extend(asyncio.create_task(one()) for _ in range(due - len(tasks)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        count = len(tasks)
    idle = _wait_idle(sync, 10.0)
    end = _metrics(sync)
    sync.close()
    rss_after = end.get("process_resident_memory_bytes", 0.0)
    return {"mode": "flood" if rate else "burst", "requests": count, "by_status": dict(statuses),
            "no_answer": dict(errors),
            "time_to_503_s": {"min": min(times, default=None),
                              "p50": statistics.median(times) if times else None,
                              "p99": _pct(times, 0.99), "max": max(times, default=None)},
            "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
            "kv_leak_detected_total": end.get("xlaserve:kv_leak_detected_total", 0.0),
            "idle_at_end": idle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    p.add_argument("--disconnect", type=float, default=0.05)
    p.add_argument("--malformed", type=float, default=0.01)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burst", type=int, default=0,
                   help="burst mode: send this many requests at once instead of a soak")
    p.add_argument("--flood", type=float, default=0.0,
                   help="flood mode: this many long requests per second for --minutes")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.burst or a.flood:
        report = asyncio.run(burst(a.url, a.burst, a.flood, a.minutes))
        bad = report["kv_leak_detected_total"] > 0 or any(report["idle_at_end"].values())
    else:
        report = asyncio.run(soak(a.url, a.minutes, a.rate, a.disconnect, a.malformed,
                                  a.max_tokens, a.seed))
        bad = report["unexpected"] > 0 or report["kv_leak_detected_total"] > 0 or \
            any(report["idle_at_end"].values())
    print(json.dumps(report, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
