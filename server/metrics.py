"""Prometheus metrics: pool and scheduler state read at scrape time, plus latency
histograms and finish counters updated as requests end."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvpool import TIERS
from scheduler import Scheduler

disable_created_metrics()  # no *_created series: they only add noise to scrapes

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _StateCollector:
    def __init__(self, scheduler: Scheduler):
        self._sched = scheduler

    def collect(self):
        pool, sched = self._sched.pool.stats(), self._sched
        c = CounterMetricFamily("blockserve_prefix_cache_queries_tokens",
                                "Prompt tokens looked up in the prefix cache")
        c.add_metric([], pool.queried_tokens)
        yield c
        c = CounterMetricFamily("blockserve_prefix_cache_hits_tokens",
                                "Prompt tokens served from the prefix cache")
        c.add_metric([], pool.hit_tokens)
        yield c
        g = GaugeMetricFamily("blockserve_kv_blocks", "KV blocks by state", labels=["state"])
        g.add_metric(["pinned"], pool.blocks_pinned)
        g.add_metric(["cached"], pool.blocks_cached)
        per_block = pool.bytes_stored / pool.blocks_stored if pool.blocks_stored else 0
        free = (pool.budget_bytes - pool.bytes_stored) / per_block if per_block else 0
        g.add_metric(["free"], max(int(free), 0))
        yield g
        g = GaugeMetricFamily("blockserve_kv_cache_bytes", "Bytes of cached KV blocks")
        g.add_metric([], pool.bytes_stored)
        yield g
        g = GaugeMetricFamily("blockserve_kv_cache_budget_bytes", "Byte budget of the pool")
        g.add_metric([], pool.budget_bytes)
        yield g
        c = CounterMetricFamily("blockserve_kv_evictions", "Evicted blocks by tier",
                                labels=["tier"])
        for tier in TIERS:
            c.add_metric([str(tier)], pool.evictions[tier])
        yield c
        g = GaugeMetricFamily("blockserve_requests_running", "Requests being generated")
        g.add_metric([], sched.num_running)
        yield g
        g = GaugeMetricFamily("blockserve_requests_waiting", "Requests in the queue")
        g.add_metric([], sched.num_waiting)
        yield g
        c = CounterMetricFamily("blockserve_requests", "Finished requests by finish reason",
                                labels=["finish_reason"])
        for reason, n in sorted(sched.stats.finished.items()):
            c.add_metric([reason], n)
        yield c
        c = CounterMetricFamily("blockserve_prompt_tokens_computed",
                                "Prompt tokens actually prefilled")
        c.add_metric([], sched.stats.prefill_tokens)
        yield c
        c = CounterMetricFamily("blockserve_inflight_shares",
                                "Requests that waited for another request's blocks")
        c.add_metric([], sched.stats.inflight_shares)
        yield c


class Metrics:
    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(scheduler))
        self.ttft = Histogram("blockserve_time_to_first_token_seconds",
                              "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=self.registry)
        self.e2e = Histogram("blockserve_e2e_request_latency_seconds",
                             "End-to-end request latency", buckets=_LATENCY_BUCKETS,
                             registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
