"""Prometheus metrics, in a registry of the app's own (two apps in one process never mix).

Load gauges keep vLLM's names, since inference gateways and routers read exactly those;
everything else is `textmill:`. Engine numbers are read from AsyncEngine.stats() when
Prometheus scrapes (a custom collector), so the engine loop never waits on metrics.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from textmill.api.access_log import RequestTrace

if TYPE_CHECKING:
    from textmill.api.serving import ServingContext

# vLLM's buckets, so that dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
_ENDPOINTS = frozenset({"/v1/completions", "/v1/models", "/health", "/metrics"})


class Metrics:
    def __init__(self, serving: Callable[[], ServingContext | None], in_flight: Callable[[], int], admitted: Callable[[], int]):
        """`serving` returns the ServingContext (None while loading)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("textmill:http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, from arrival.",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("textmill:inter_token_latency_seconds", "Time between tokens of one sequence.",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("textmill:e2e_request_latency_seconds", "Completion requests, arrival to last byte.",
                             ["status"], buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(serving, in_flight, admitted))

    def observe_request(self, trace: RequestTrace) -> None:
        endpoint = trace.path if trace.path in _ENDPOINTS else "other"
        self.requests.labels(endpoint, str(trace.status)).inc()
        if endpoint == "/v1/completions" and trace.duration_s is not None:
            self.e2e.labels(str(trace.status)).observe(trace.duration_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TokenTimer:
    """Per completion: the time to its first token, then the gaps between each candidate's tokens."""

    def __init__(self, metrics: Metrics, trace: RequestTrace, model_name: str):
        self._ttft = metrics.ttft.labels(model_name)
        self._itl = metrics.itl.labels(model_name)
        self._trace = trace
        self._seen: dict[Any, tuple[int, float]] = {}  # key -> (tokens so far, when the last came)

    def observe(self, key: Any, num_output_tokens: int) -> None:
        """`num_output_tokens`: the candidate's generated tokens so far (held-back ones too)."""
        count, last = self._seen.get(key, (0, None))
        new = num_output_tokens - count
        if new <= 0:
            return
        now = time.monotonic()
        ttft = self._trace.first_token(now)
        if ttft is not None:
            self._ttft.observe(ttft)
        if last is not None:
            for _ in range(new):  # tokens released together share the gap
                self._itl.observe((now - last) / new)
        self._seen[key] = (num_output_tokens, now)


class _EngineCollector:
    def __init__(self, serving: Callable[[], ServingContext | None], in_flight: Callable[[], int], admitted: Callable[[], int]):
        self._serving = serving
        self._in_flight = in_flight
        self._admitted = admitted

    def describe(self):
        return []  # families depend on whether the model is loaded; collect() says at scrape time

    def collect(self):
        yield GaugeMetricFamily("textmill:http_requests_in_flight", "HTTP requests being served.",
                                value=self._in_flight())
        yield GaugeMetricFamily("textmill:admitted_sequences",
                                "Candidate sequences admitted (running or waiting), as the 429 bound counts them.",
                                value=self._admitted())
        ctx = self._serving()
        stats = ctx.engine.stats() if ctx is not None else None
        if stats is None:
            return
        yield from _engine_families(stats, ctx.model_name, ctx.kv_cache_blocks)
        if getattr(ctx, "grammars", None) is not None:
            yield from _grammar_families(ctx.grammars.stats(), ctx.model_name)


def _engine_families(stats, model: str, num_blocks: int):
    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], value)
        return family

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], value)
        return family

    yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
    yield gauge("vllm:num_requests_running", "Requests in the running batch.", stats.num_running)
    yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = 100%).", stats.kv_cache_usage)
    yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                  stats.prefix_cache_queries)
    yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
    rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
    yield gauge("textmill:prefix_cache_hit_rate", "Prefix-cache hits over queries, since start.", rate)
    yield gauge("textmill:kv_cache_blocks_in_use", "KV-cache blocks held by requests.",
                round(stats.kv_cache_usage * num_blocks))
    yield gauge("textmill:kv_cache_blocks", "KV-cache blocks in the pool.", num_blocks)
    yield counter("textmill:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total)
    yield counter("textmill:generation_tokens", "Tokens generated.", stats.generation_tokens_total)
    yield counter("textmill:num_preemptions", "Requests preempted for lack of KV blocks.",
                  stats.num_preemptions_total)
    yield counter("textmill:requests_finished", "Engine requests (candidates) finished.",
                  stats.num_requests_finished)
    yield counter("textmill:step_failures", "Engine steps that failed (their requests got errors).",
                  stats.num_step_failures)
    # vLLM's speculative-decoding counters: guessed tokens from the request's own text here.
    yield counter("vllm:spec_decode_num_drafts", "Request steps that checked guessed tokens.", stats.num_drafts)
    yield counter("vllm:spec_decode_num_draft_tokens", "Tokens guessed.", stats.num_draft_tokens)
    yield counter("vllm:spec_decode_num_accepted_tokens", "Guessed tokens that sampling confirmed.",
                  stats.num_accepted_tokens)


def _grammar_families(stats, model: str):
    """Structured outputs (textmill.structured.GrammarStats): each constrained request compiles
    its grammar once in the API (a cache hit when the text was seen before); refused
    constraints (400s) are failures."""
    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], value)
        return family

    yield counter("textmill:structured_output_requests", "Completion requests with an output constraint.",
                  stats.requests)
    yield counter("textmill:grammar_compiles", "Grammars compiled (constraint texts not in the cache).",
                  stats.compiles)
    yield counter("textmill:grammar_compile_seconds", "Time spent compiling grammars.", stats.compile_seconds)
    yield counter("textmill:grammar_cache_hits", "Constraints found compiled in the cache.", stats.cache_hits)
    yield counter("textmill:grammar_compile_failures", "Constraints the grammar backend refused (400s).",
                  stats.failures)
