"""Load and preemption on the real server (minutes on CPU: ``-m slow``).

- 200 concurrent streams, 50 of them cut by their clients at random points: the other 150
  complete with ``[DONE]`` and usage equal to the tokens they received; running, waiting and
  used pages are back to 0 within 2 s; ``requests_aborted_total`` is up by exactly 50.
- A KV pool far too small for the load: every request completes, the engine preempted, and each
  greedy output equals the same request's output when it ran alone; clients that hang up while
  their requests are running, preempted or queued leave no page behind.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.server_utils import ServerProcess
from tests.reliability.conftest import Streams, assert_idle_and_no_leaks, m, rel_server

pytestmark = pytest.mark.slow

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "wizards", "quietly", "hex"]


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("load")
    s = rel_server(tmp, "--max-num-seqs", "32", "--max-queued-requests", "200",
                   "--max-num-batched-tokens", "256", "--token-buckets", "32,256").start(900)
    yield s
    assert s.stop() == 0


async def one_stream(client: httpx.AsyncClient, body: dict[str, object],
                     cut_after: int | None) -> dict[str, object]:
    """A streamed completion; ``cut_after``: hang up after that many chunks."""
    chunks: list[dict[str, object]] = []
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[6:]))
            if cut_after is not None and len(chunks) >= cut_after:
                return {"cut": True, "chunks": chunks}
    return {"cut": False, "chunks": chunks, "done": done}


def test_200_streams_50_cut(loaded: ServerProcess) -> None:
    rng = random.Random(14)
    aborted = m(loaded, "requests_aborted_total")
    cut = set(rng.sample(range(200), 50))
    jobs = []
    for i in range(200):
        body = {"prompt": prompt(rng, rng.randint(20, 200)), "temperature": 0, "stream": True,
                "return_token_ids": True, "stream_options": {"include_usage": True}}
        if i in cut:  # long enough that the client always hangs up first
            body.update(max_tokens=200, ignore_eos=True)
            jobs.append((body, rng.randint(1, 20)))
        else:
            body.update(max_tokens=rng.randint(8, 48))
            jobs.append((body, None))

    async def run() -> list[dict[str, object]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=loaded.base_url, timeout=600,
                                     limits=limits) as client:
            return await asyncio.gather(*(one_stream(client, b, c) for b, c in jobs))

    results = asyncio.run(run())
    for res in results:
        if res["cut"]:
            continue
        chunks = res["chunks"]
        assert isinstance(chunks, list) and res["done"]
        usage = chunks[-1]["usage"]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert choices[-1]["finish_reason"] in ("stop", "length")
        assert sum(len(c["token_ids"]) for c in choices) == usage["completion_tokens"]
    assert sum(1 for r in results if r["cut"]) == 50
    assert_idle_and_no_leaks(loaded)
    assert m(loaded, "requests_aborted_total") == aborted + 50


def test_preemption_keeps_greedy_outputs(tmp_path: Path) -> None:
    """8 requests of ~130 tokens each need ~72 pages of 16 tokens; the pool has 24."""
    server = rel_server(tmp_path, "--max-num-seqs", "8", "--num-kv-pages", "25",
                        "--no-enable-prefix-caching").start(900)
    try:
        rng = random.Random(24)
        bodies = [{"prompt": prompt(rng, 30), "max_tokens": 100, "ignore_eos": True,
                   "temperature": 0} for _ in range(8)]
        with httpx.Client(base_url=server.base_url, timeout=600) as client:
            solo = [client.post("/v1/completions", json=b).json()["choices"][0]["text"]
                    for b in bodies]
        assert m(server, "num_preemptions_total") == 0

        async def together() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=b)
                                              for b in bodies))

        answers = asyncio.run(together())
        assert all(r.status_code == 200 for r in answers)
        assert m(server, "num_preemptions_total") > 0
        assert [r.json()["choices"][0]["text"] for r in answers] == solo
        assert all(r.json()["usage"]["completion_tokens"] == 100 for r in answers)
        assert_idle_and_no_leaks(server)

        # clients hanging up while their requests are running, preempted or queued
        preempted, aborted = m(server, "num_preemptions_total"), m(server, "requests_aborted_total")
        streams = Streams(server, 8, max_tokens=200)
        deadline = time.monotonic() + 300
        while m(server, "num_preemptions_total") == preempted:
            assert time.monotonic() < deadline, "no preemption under the streams"
            time.sleep(0.05)
        streams.close()
        assert_idle_and_no_leaks(server)
        assert m(server, "requests_aborted_total") == aborted + 8
    finally:
        assert server.stop() == 0
