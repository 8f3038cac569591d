"""Prometheus metrics, one registry per app (no module globals).

Requests by status, queue depth and running sequences (read from the engine on each
scrape), time to first token, time per output token, tokens in and out, images; and per
API key name: chat requests by status, 429s, tokens in and out, latency.

Cache figures come from ``engine.stats()`` on each scrape, each exported only when the
engine reports its key (an engine without a prefix cache has no prefix metrics):

counters ``qwen_vl_prefix_cache_queries_tokens_total`` (key ``prefix_cache_query_tokens``),
``qwen_vl_prefix_cache_hits_tokens_total`` (``prefix_cache_hit_tokens``),
``qwen_vl_image_cache_queries_total`` (``image_cache_queries``),
``qwen_vl_image_cache_hits_total`` (``image_cache_hits``),
``qwen_vl_encoder_cache_hits_total`` (``encoder_cache_hits``),
``qwen_vl_grammar_cache_hits_total`` / ``_misses_total`` (``grammar_cache_hits`` /
``grammar_cache_misses``), ``qwen_vl_prompts_rendered_total`` (``prompts_rendered``);
gauges ``qwen_vl_grammar_cache_bytes`` (``grammar_cache_bytes``),
``qwen_vl_kv_blocks_used`` (``kv_blocks_used``) and ``qwen_vl_kv_blocks_free``
(``kv_blocks_free``); and the batching engine's activity, counters
``qwen_vl_decode_steps_total`` (``decode_steps``) and ``qwen_vl_decode_rows_total``
(``decode_rows``: rows / steps is the mean decode batch): ``ENGINE_STATS``.

The engine's counters are totals since it started (never reset), as Prometheus counters
must be.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name without the _total suffix, stats key, kind, help)
ENGINE_STATS = (
    ("qwen_vl_queue_depth", "queue_depth", "gauge", "Requests waiting for a batch slot"),
    ("qwen_vl_running_sequences", "running_seqs", "gauge", "Sequences being decoded"),
    ("qwen_vl_prefix_cache_queries_tokens", "prefix_cache_query_tokens", "counter",
     "Prompt tokens looked up in the prefix cache"),
    ("qwen_vl_prefix_cache_hits_tokens", "prefix_cache_hit_tokens", "counter",
     "Prompt tokens served from the prefix cache"),
    ("qwen_vl_image_cache_queries", "image_cache_queries", "counter",
     "Images looked up in the preprocessed-pixel cache"),
    ("qwen_vl_image_cache_hits", "image_cache_hits", "counter",
     "Images whose preprocessed pixels came from the cache"),
    ("qwen_vl_encoder_cache_hits", "encoder_cache_hits", "counter",
     "Images whose vision-encoder output came from the cache"),
    ("qwen_vl_grammar_cache_hits", "grammar_cache_hits", "counter",
     "Grammars (schemas, tools) served from the compiled-grammar cache"),
    ("qwen_vl_grammar_cache_misses", "grammar_cache_misses", "counter",
     "Grammars compiled (not found in the cache)"),
    ("qwen_vl_grammar_cache_bytes", "grammar_cache_bytes", "gauge",
     "Bytes of compiled grammars kept (each at its serialised size or more)"),
    ("qwen_vl_prompts_rendered", "prompts_rendered", "counter",
     "Chat templates rendered (each prompt prepared for tokenisation)"),
    ("qwen_vl_kv_blocks_used", "kv_blocks_used", "gauge", "KV cache blocks in use"),
    ("qwen_vl_kv_blocks_free", "kv_blocks_free", "gauge", "KV cache blocks free"),
    ("qwen_vl_decode_steps", "decode_steps", "counter", "Batched decode steps taken"),
    ("qwen_vl_decode_rows", "decode_rows", "counter",
     "Rows decoded by batched decode steps (divided by the steps: the mean batch size)"),
)


_ALWAYS = ("queue_depth", "running_seqs")  # exported (0) before the engine is there


class _EngineStatsCollector:
    """Reads ``engine.stats()`` once per scrape and exports the keys it has."""

    def __init__(self, engine_stats):
        self.engine_stats = engine_stats

    def describe(self):
        return []  # no fixed set: the metrics depend on what the engine reports

    def collect(self):
        stats = self.engine_stats()
        for name, key, kind, doc in ENGINE_STATS:
            value = stats.get(key, 0 if key in _ALWAYS else None)
            if value is None:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc)
            family.add_metric([], float(value))
            yield family


class Metrics:
    def __init__(self, engine_stats):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qwen_vl_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwen_vl_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("qwen_vl_completion_tokens", "Tokens generated", registry=r)
        self.images = Counter("qwen_vl_images", "Images processed", registry=r)
        self.ttft = Histogram("qwen_vl_time_to_first_token_seconds", "Time to first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                              registry=r)
        self.tpot = Histogram("qwen_vl_time_per_output_token_seconds", "Time per output token",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1),
                              registry=r)
        self.engine_collector = _EngineStatsCollector(engine_stats)
        r.register(self.engine_collector)
        # per API key, labelled by the key's name (never the key)
        self.key_requests = Counter("qwen_vl_key_requests", "Chat requests by key and status",
                                    ["key", "status"], registry=r)
        self.key_rate_limited = Counter("qwen_vl_key_rate_limited",
                                        "Chat requests answered 429, by key", ["key"], registry=r)
        self.key_prompt_tokens = Counter("qwen_vl_key_prompt_tokens", "Prompt tokens by key",
                                         ["key"], registry=r)
        self.key_completion_tokens = Counter("qwen_vl_key_completion_tokens",
                                             "Completion tokens by key", ["key"], registry=r)
        self.key_latency = Histogram("qwen_vl_key_request_seconds",
                                     "Chat request latency (to the end of the response) by key",
                                     ["key"], buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                     registry=r)

    def observe(self, stats, elapsed: float):
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.completion_tokens)
        self.images.inc(stats.images)
        if stats.ttft is not None:
            self.ttft.observe(stats.ttft)
            if stats.completion_tokens > 1:
                self.tpot.observe((elapsed - stats.ttft) / (stats.completion_tokens - 1))

    def observe_key(self, key: str, status: int, stats, elapsed: float):
        self.key_requests.labels(key=key, status=str(status)).inc()
        if status == 429:
            self.key_rate_limited.labels(key=key).inc()
        self.key_prompt_tokens.labels(key=key).inc(stats.prompt_tokens)
        self.key_completion_tokens.labels(key=key).inc(stats.completion_tokens)
        self.key_latency.labels(key=key).observe(elapsed)

    def render(self) -> bytes:
        """This process's series; under the supervisor (``PROMETHEUS_MULTIPROC_DIR`` set)
        the sum over every API-server process, read from their shared files."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.engine_collector)
        return generate_latest(registry)
