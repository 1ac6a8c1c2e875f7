"""Prometheus metrics for ``GET /metrics``, named like vLLM's with the prefix ``xlaserve:``.

Two sources:
- engine state (running/waiting requests, KV usage, prefix-cache and token counters, steps,
  recompiles), read from ``EngineClient.stats()`` at scrape time by a custom collector, so the
  numbers are never stale and the engine needs no prometheus dependency;
- per-request observations the HTTP layer makes (``RequestMetrics``): time to first token,
  inter-token latency, end-to-end latency, and finished requests by finish reason.

Plus the process's own ``process_*`` metrics (resident memory, CPU seconds, open files). Each
``ServerMetrics`` has its own ``CollectorRegistry`` (no process-global state; tests can
build several apps in one process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "xlaserve:"

# No ``*_created`` timestamp series next to every counter and histogram (as vLLM).
disable_created_metrics()

# Buckets as vLLM's (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)


class _EngineCollector(Collector):
    """Reads ``stats()`` on every scrape; yields nothing until the engine is ready."""

    def __init__(self, stats: Callable[[], Any | None], labels: dict[str, str]) -> None:
        self._stats = stats
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        if s is None:
            return
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> Metric:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(PREFIX + name, doc, labels=names)
            c.add_metric(values, value)
            return c

        total = max(int(getattr(s, "kv_pages_total", 0)), 1)
        yield gauge("num_requests_running", "Requests in the engine's running batch.",
                    s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (0..1).",
                    s.kv_pages_used / total)
        yield gauge("kv_cache_pages_used", "KV-cache pages in use.", s.kv_pages_used)
        yield gauge("kv_cache_pages_total", "KV-cache pages in the pool.", s.kv_pages_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted for lack of KV pages.",
                      s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("engine_steps", "Engine steps executed.", s.num_steps)
        yield counter("num_recompiles", "XLA compilations after warmup.", s.num_recompiles)
        yield gauge("grammar_cache_size", "Compiled structured-output grammars (and refused "
                    "ones) held in the grammar cache.", getattr(s, "num_cached_grammars", 0))
        yield gauge("kv_cache_pages_cached", "Unreferenced KV-cache pages holding a cached "
                    "prefix (evictable).", s.kv_pages_cached)
        yield counter("requests_aborted", "Engine requests aborted before they finished "
                      "(client disconnects, shutdown).", s.num_aborted)
        yield counter("engine_failed_steps", "Engine steps that ran out of memory (their "
                      "requests failed).", s.num_failed_steps)
        yield counter("kv_leak_detected", "Idle self-checks where free + cached + held KV "
                      "pages did not add up to the pool (must stay 0).",
                      s.kv_leaks_detected)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], Any | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}
        self.labels = labels
        names = list(labels)
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from request arrival to its first output token.", names,
                              buckets=TTFT_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between consecutive outputs of a request.", names,
                             buckets=ITL_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from request arrival to its last output.", names,
                             buckets=E2E_BUCKETS, registry=r).labels(**labels)
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt tokens per engine request.", names,
            buckets=TOKEN_BUCKETS, registry=r).labels(**labels)
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens", "Generated tokens per engine request.", names,
            buckets=TOKEN_BUCKETS, registry=r).labels(**labels)
        self._success = Counter(PREFIX + "request_success", "Finished engine requests.",
                                [*names, "finished_reason"], registry=r)
        self.http_in_flight = Gauge(PREFIX + "http_requests_in_flight",
                                    "Generation requests the HTTP layer is serving.", names,
                                    registry=r).labels(**labels)
        self._rejected = Counter(PREFIX + "requests_rejected",
                                 "Requests refused with 503 server_overloaded, by the limit "
                                 "they hit (requests, prompt_tokens).", [*names, "reason"],
                                 registry=r)
        r.register(_EngineCollector(stats, labels))
        # process_resident_memory_bytes and friends (Linux /proc): the soak test's RSS.
        ProcessCollector(registry=r)

    def success(self, reason: str) -> None:
        self._success.labels(**self.labels, finished_reason=reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(**self.labels, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Timings of one engine request; ``output()`` per yielded output, ``finish()`` once."""

    def __init__(self, metrics: ServerMetrics, arrival: float, num_prompt_tokens: int) -> None:
        self.m = metrics
        self.arrival = arrival
        self.last: float | None = None
        self.num_prompt_tokens = num_prompt_tokens
        self.done = False

    def output(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now

    def finish(self, reason: str, num_generated: int) -> None:
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.monotonic() - self.arrival)
        self.m.request_prompt_tokens.observe(self.num_prompt_tokens)
        self.m.request_generation_tokens.observe(num_generated)
        self.m.success(reason)
