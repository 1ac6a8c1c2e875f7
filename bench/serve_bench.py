"""Load generator for OpenAI-compatible servers: streaming latency and throughput per concurrency.

Usage (from the repo root; needs only httpx):

    python bench/serve_bench.py --base-url http://127.0.0.1:8000 --endpoint completions \
        --concurrency 1,8,32 --max-tokens 128 --ignore-eos --json-out out.json

For each concurrency level C the generator keeps C streaming requests in flight (C workers pull
from a shared pool of ``--num-requests`` prompts) against ``/v1/completions`` or
``/v1/chat/completions`` and measures, per request, on the client's clock:

* TTFT: request sent -> first chunk carrying non-empty text;
* ITL: the gaps between consecutive text-carrying chunks (pooled over all requests of the level);
* TPOT: (E2E - TTFT) / (output tokens - 1), robust when a server packs several tokens per chunk;
* E2E: request sent -> stream finished.

Output tokens come from the server's usage (``stream_options.include_usage``, the final chunk) when
it reports one, else from counting text-carrying chunks (one token per chunk, which is what
llama.cpp, vLLM and llama-cpp-python stream); the table says which source it used. Aggregate output
tokens/s and requests/s divide the successful requests' totals by the level's wall time (first
request sent -> last request finished). Failed requests (HTTP status != 200, an ``error`` event, a
transport error, a stream that ends with neither ``[DONE]`` nor a finish_reason) are counted as
errors and left out of every latency and throughput figure.

Prompts: ``--prompt TEXT`` sends the same text every time (a server with prefix caching will then
skip most of the prefill); by default each request gets its own ``--prompt-len`` random words drawn
from a fixed list with ``--seed``, so runs are repeatable and prefixes are not shared.

``--ignore-eos`` sends the vLLM/llama.cpp-server extension ``"ignore_eos": true`` so every request
produces exactly ``--max-tokens`` tokens. Servers that lack it need another field; pass it with
``--extra-body`` (llama-cpp-python's server: ``--extra-body '{"min_tokens": 128}'``). The column
"tok/req" shows whether requests really ran to ``--max-tokens``.

Library use: ``run_benchmark(BenchConfig(...), levels)`` returns one ``LevelStats`` per level; the
unit tests drive it against an in-process fake server and check ``summarize`` directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

Endpoint = Literal["completions", "chat"]

# Common English words: with a GPT-2 style BPE most are one token with their leading space, so
# ``--prompt-len`` words is roughly that many prompt tokens.
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death "
    "experience effect class control care field development role effort rate heart drug show "
    "leader light voice wife police mind price report decision son view relationship town road "
    "arm difference value building action model season society tax director position player "
    "record paper space ground form event official matter center couple site project activity "
    "star table need court oil situation cost industry figure street image phone data picture "
    "practice piece land product doctor wall patient worker news test movie north love support "
    "technology step baby computer type attention film tree source organization hair window "
    "evidence population site river garden bridge mountain ocean summer winter autumn spring"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class BenchConfig:
    """What every request of a run looks like. ``base_url`` may end in ``/v1`` or not."""

    base_url: str
    model: str | None = None  # None: the first id listed by GET /v1/models
    endpoint: Endpoint = "completions"
    max_tokens: int = 128
    ignore_eos: bool = False
    include_usage: bool = True  # send stream_options.include_usage
    temperature: float | None = None  # None: the server's default
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"


@dataclass
class RequestResult:
    """One streamed request, timed on the client. Times are seconds; ``itl_s`` has one gap per
    text-carrying chunk after the first."""

    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_tokens: int = 0  # text-carrying chunks seen
    usage_tokens: int | None = None  # usage.completion_tokens, where the server sent usage
    finish_reason: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunk_tokens


@dataclass
class LevelStats:
    """The summary of one concurrency level (latencies in ms except E2E in s)."""

    concurrency: int
    num_requests: int
    completed: int
    errors: int
    duration_s: float
    output_tokens: int
    token_source: str  # "usage", "chunks" or "mixed"
    output_tokens_per_s: float
    requests_per_s: float
    mean_output_tokens: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    tpot_ms_p50: float
    e2e_s_p50: float
    e2e_s_p99: float
    finish_reasons: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    load_avg_before: tuple[float, float, float] | None = None
    load_avg_after: tuple[float, float, float] | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: Sequence[RequestResult], concurrency: int, duration_s: float) -> LevelStats:
    """Reduce one level's results to its statistics (pure; see the module docstring for the
    definitions)."""
    good = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in good)
    with_usage = sum(r.usage_tokens is not None for r in good)
    source = (
        "usage" if good and with_usage == len(good) else "chunks" if with_usage == 0 else "mixed"
    )
    ttft = [r.ttft_s * 1e3 for r in good if r.ttft_s is not None]
    itl = [gap * 1e3 for r in good for gap in r.itl_s]
    tpot = [
        (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) * 1e3
        for r in good
        if r.e2e_s is not None and r.ttft_s is not None and r.output_tokens > 1
    ]
    e2e = [r.e2e_s for r in good if r.e2e_s is not None]
    reasons: dict[str, int] = {}
    for r in good:
        key = r.finish_reason or "none"
        reasons[key] = reasons.get(key, 0) + 1
    return LevelStats(
        concurrency=concurrency,
        num_requests=len(results),
        completed=len(good),
        errors=len(bad),
        duration_s=duration_s,
        output_tokens=tokens,
        token_source=source,
        output_tokens_per_s=tokens / duration_s if duration_s > 0 else math.nan,
        requests_per_s=len(good) / duration_s if duration_s > 0 else math.nan,
        mean_output_tokens=tokens / len(good) if good else math.nan,
        ttft_ms_p50=percentile(ttft, 50),
        ttft_ms_p99=percentile(ttft, 99),
        itl_ms_p50=percentile(itl, 50),
        itl_ms_p99=percentile(itl, 99),
        tpot_ms_p50=percentile(tpot, 50),
        e2e_s_p50=percentile(e2e, 50),
        e2e_s_p99=percentile(e2e, 99),
        finish_reasons=reasons,
        first_errors=[r.error or "?" for r in bad[:3]],
    )


def make_prompts(n: int, prompt: str | None, prompt_len: int, seed: int) -> list[str]:
    """``n`` prompts: ``prompt`` n times, else n different strings of ``prompt_len`` random
    words (repeatable for a given seed)."""
    if prompt is not None:
        return [prompt] * n
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(prompt_len)) for _ in range(n)]


def _request_body(cfg: BenchConfig, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "stream": True}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    body.update(cfg.extra_body)
    return body


def _chunk_text(choice: dict[str, Any], endpoint: Endpoint) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def one_request(
    client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: str
) -> RequestResult:
    """Send one streaming request and time it; never raises for a server or transport fault."""
    path = "/chat/completions" if cfg.endpoint == "chat" else "/completions"
    body = _request_body(cfg, model, prompt)
    res = RequestResult(ok=False)
    done = False
    t0 = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", cfg.api_root + path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if event.get("error"):
                    res.error = f"error event: {json.dumps(event['error'])[:200]}"
                    return res
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.usage_tokens = int(usage["completion_tokens"])
                for choice in event.get("choices") or []:
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                    if not _chunk_text(choice, cfg.endpoint):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    res.chunk_tokens += 1
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    res.e2e_s = time.perf_counter() - t0
    if not done and res.finish_reason is None:
        res.error = "stream ended without [DONE] or finish_reason"
        return res
    res.ok = True
    return res


async def run_level(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    model: str,
    prompts: Sequence[str],
    concurrency: int,
) -> tuple[list[RequestResult], float]:
    """Run every prompt with at most ``concurrency`` in flight; returns results (in prompt order)
    and the wall time from the first send to the last finish."""
    results: list[RequestResult | None] = [None] * len(prompts)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1  # no await between the check and the claim: safe in one event loop
            results[i] = await one_request(client, cfg, model, prompts[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


async def resolve_model(client: httpx.AsyncClient, cfg: BenchConfig) -> str:
    if cfg.model:
        return cfg.model
    resp = await client.get(cfg.api_root + "/models")
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def default_num_requests(concurrency: int) -> int:
    return max(32, 4 * concurrency)


async def run_benchmark(
    cfg: BenchConfig,
    levels: Sequence[int],
    num_requests: int | None = None,
    prompt: str | None = None,
    prompt_len: int = 64,
    seed: int = 0,
    warmup_rounds: int = 1,
    log: Any = None,
) -> list[LevelStats]:
    """Run each concurrency level in turn. Before each level, ``warmup_rounds * concurrency``
    unmeasured requests at that concurrency let the server compile or allocate for that batch size.
    ``num_requests`` None: ``default_num_requests(concurrency)``."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels))
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    out: list[LevelStats] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, cfg)
        for level_index, c in enumerate(levels):
            n = num_requests or default_num_requests(c)
            # Distinct seeds per level and for warm-up, so no prompt repeats across the run.
            level_seed = seed + 1_000_003 * (level_index + 1)
            if warmup_rounds > 0:
                warm = make_prompts(warmup_rounds * c, prompt, prompt_len, level_seed + 7)
                await run_level(client, cfg, model, warm, c)
            prompts = make_prompts(n, prompt, prompt_len, level_seed)
            before = _loadavg()
            results, wall = await run_level(client, cfg, model, prompts, c)
            stats = summarize(results, c, wall)
            stats.load_avg_before, stats.load_avg_after = before, _loadavg()
            out.append(stats)
            if log is not None:
                print(
                    f"[serve_bench] c={c}: {stats.completed}/{n} ok, "
                    f"{stats.output_tokens_per_s:.1f} tok/s, {wall:.1f}s",
                    file=log,
                    flush=True,
                )
    return out


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(stats: Sequence[LevelStats]) -> str:
    head = (
        "| conc | reqs | err | out tok/s | req/s | tok/req | TTFT p50/p99 ms | ITL p50/p99 ms "
        "| TPOT p50 ms | E2E p50/p99 s | tokens from | load1 |"
    )
    rows = [head, "|" + "---|" * 12]
    for s in stats:
        load = "-" if s.load_avg_before is None else f"{s.load_avg_before[0]:.2f}"
        rows.append(
            f"| {s.concurrency} | {s.num_requests} | {s.errors} | {_fmt(s.output_tokens_per_s)} "
            f"| {_fmt(s.requests_per_s, 2)} | {_fmt(s.mean_output_tokens)} "
            f"| {_fmt(s.ttft_ms_p50)} / {_fmt(s.ttft_ms_p99)} "
            f"| {_fmt(s.itl_ms_p50)} / {_fmt(s.itl_ms_p99)} | {_fmt(s.tpot_ms_p50)} "
            f"| {_fmt(s.e2e_s_p50, 2)} / {_fmt(s.e2e_s_p99, 2)} | {s.token_source} | {load} |"
        )
    return "\n".join(rows)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """NaN (a statistic with no samples) becomes null: strict JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def _parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --concurrency {text!r}") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--concurrency needs positive integers, e.g. 1,8,32")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Streaming load generator for OpenAI-compatible servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root or .../v1")
    p.add_argument("--model", default=None, help="model id (default: first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--concurrency", type=_parse_levels, default=[1, 8, 32], help="e.g. 1,8,32")
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="measured requests per level (default: max(32, 4 x concurrency))",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="the same prompt text for every request")
    g.add_argument("--prompt-len", type=int, default=64, help="random words per prompt")
    p.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true')
    p.add_argument(
        "--no-usage",
        action="store_true",
        help="do not send stream_options.include_usage (count chunks instead)",
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help="JSON object merged into every request body",
    )
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--warmup-rounds", type=int, default=1, help="x concurrency unmeasured requests")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--label", default=None, help="a name for this run, kept in --json-out")
    p.add_argument("--json-out", default=None, help="write config + per-level stats here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not isinstance(args.extra_body, dict):
        print("--extra-body must be a JSON object", file=sys.stderr)
        return 2
    cfg = BenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        include_usage=not args.no_usage,
        temperature=args.temperature,
        api_key=args.api_key,
        extra_body=args.extra_body,
        timeout_s=args.timeout,
    )
    prompt_len = args.prompt_len if args.prompt is None else 0
    stats = asyncio.run(
        run_benchmark(
            cfg,
            args.concurrency,
            num_requests=args.num_requests,
            prompt=args.prompt,
            prompt_len=prompt_len,
            seed=args.seed,
            warmup_rounds=args.warmup_rounds,
            log=sys.stderr,
        )
    )
    print(markdown_table(stats))
    if args.json_out:
        cfg_json = asdict(cfg)
        cfg_json.pop("api_key", None)
        report = {
            "label": args.label,
            "config": cfg_json,
            "prompt": args.prompt,
            "prompt_len_words": prompt_len,
            "seed": args.seed,
            "warmup_rounds": args.warmup_rounds,
            "cpu_count": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "levels": [_json_safe(asdict(s)) for s in stats],
        }
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if any(s.errors for s in stats) else 0


if __name__ == "__main__":
    sys.exit(main())
