"""Prometheus metrics: pool and scheduler state read at scrape time, plus latency
histograms and finish counters updated as requests end."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from blockserve.kvpool import TIERS
from blockserve.scheduler import Scheduler

disable_created_metrics()  # no *_created series: they only add noise to scrapes

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _StateCollector:
    def __init__(self, scheduler: Scheduler):
        self._sched = scheduler

    def collect(self):
        pool, sched = self._sched.pool.stats(), self._sched
        per_block = pool.bytes_stored / pool.blocks_stored if pool.blocks_stored else 0
        free = (pool.budget_bytes - pool.bytes_stored) / per_block if per_block else 0
        families = [
            (CounterMetricFamily, "blockserve_prefix_cache_queries_tokens",
             "Prompt tokens looked up in the prefix cache", None,
             {(): pool.queried_tokens}),
            (CounterMetricFamily, "blockserve_prefix_cache_hits_tokens",
             "Prompt tokens served from the prefix cache", None, {(): pool.hit_tokens}),
            (GaugeMetricFamily, "blockserve_kv_blocks", "KV blocks by state", "state",
             {("pinned",): pool.blocks_pinned, ("cached",): pool.blocks_cached,
              ("free",): max(int(free), 0)}),
            (GaugeMetricFamily, "blockserve_kv_cache_bytes", "Bytes of cached KV blocks",
             None, {(): pool.bytes_stored}),
            (GaugeMetricFamily, "blockserve_kv_cache_budget_bytes", "Byte budget of the pool",
             None, {(): pool.budget_bytes}),
            (CounterMetricFamily, "blockserve_kv_evictions", "Evicted blocks by tier", "tier",
             {(str(t),): pool.evictions[t] for t in TIERS}),
            (GaugeMetricFamily, "blockserve_requests_running", "Requests being generated",
             None, {(): sched.num_running}),
            (GaugeMetricFamily, "blockserve_requests_waiting", "Requests in the queue", None,
             {(): sched.num_waiting}),
            (CounterMetricFamily, "blockserve_requests", "Finished requests by finish reason",
             "finish_reason", {(r,): n for r, n in sorted(sched.stats.finished.items())}),
            (CounterMetricFamily, "blockserve_prompt_tokens_computed",
             "Prompt tokens actually prefilled", None, {(): sched.stats.prefill_tokens}),
            (CounterMetricFamily, "blockserve_inflight_shares",
             "Requests that waited for another request's blocks", None,
             {(): sched.stats.inflight_shares}),
        ]
        memory = sched.memory_report()
        if memory is not None:
            families += [
                (GaugeMetricFamily, "blockserve_memory_bytes",
                 "The memory limit and what each part holds: weights, runtime, the "
                 "activation reserve and the largest step's peak (measured), K/V (running "
                 "and its limit, the prefix cache and its budget), the process's resident "
                 "set and MLX's own counters", "part",
                 {(part,): value for part, value in memory.items()}),
                (CounterMetricFamily, "blockserve_preemptions",
                 "Sequences parked into the prefix cache to keep the memory limit", None,
                 {(): sched.stats.preemptions}),
                (CounterMetricFamily, "blockserve_memory_pressure_refusals",
                 "Requests refused (503) while the process was over its memory limit",
                 None, {(): sched.stats.pressure_refusals}),
            ]
        drafts = getattr(sched.generator, "draft_stats", None)
        if drafts is not None:
            families += [
                (CounterMetricFamily, "blockserve_spec_decode_drafts",
                 "Speculative verify steps that carried a prompt-lookup draft", None,
                 {(): drafts.steps}),
                (CounterMetricFamily, "blockserve_spec_decode_draft_tokens",
                 "Draft tokens proposed", None, {(): drafts.drafted}),
                (CounterMetricFamily, "blockserve_spec_decode_accepted_tokens",
                 "Draft tokens accepted (mean accepted length: 1 + accepted / drafts)",
                 None, {(): drafts.accepted}),
            ]
        times = getattr(sched.generator, "step_times", None)
        if times is not None:
            families += [
                (CounterMetricFamily, "blockserve_engine_steps", "Engine steps (forwards)",
                 None, {(): times.steps}),
                (CounterMetricFamily, "blockserve_engine_step_seconds",
                 "Engine thread time by phase: draft, build, eval, emit (the runner), "
                 "engine (per-token bookkeeping), events (handing them to the loop)",
                 "phase", {(k,): v for k, v in sorted(dict(times.seconds).items())}),
            ]
        disk = sched.prefix.disk_stats()
        if disk is not None:
            families += [
                (CounterMetricFamily, "blockserve_disk_cache_tokens",
                 "Prompt tokens looked up on the disk tier, by result (hit: loaded into "
                 "RAM; miss: in neither RAM nor disk)", "result",
                 {("hit",): disk.hit_tokens, ("miss",): disk.miss_tokens}),
                (CounterMetricFamily, "blockserve_disk_cache_bytes_read",
                 "Bytes of block files read", None, {(): disk.bytes_read}),
                (CounterMetricFamily, "blockserve_disk_cache_bytes_written",
                 "Bytes of block files written", None, {(): disk.bytes_written}),
                (CounterMetricFamily, "blockserve_disk_cache_load_seconds",
                 "Time spent loading blocks from disk (loader threads)", None,
                 {(): disk.load_seconds}),
                (CounterMetricFamily, "blockserve_disk_cache_dropped_writes",
                 "Blocks not written because the writer was behind", None,
                 {(): disk.dropped_writes}),
                (CounterMetricFamily, "blockserve_disk_cache_damaged_files",
                 "Block files that failed verification (deleted, served as misses)", None,
                 {(): disk.damaged_files}),
                (GaugeMetricFamily, "blockserve_disk_cache_files", "Block files on disk",
                 None, {(): disk.files}),
                (GaugeMetricFamily, "blockserve_disk_cache_used_bytes",
                 "Bytes of block files on disk", None, {(): disk.bytes_used}),
                (GaugeMetricFamily, "blockserve_disk_cache_budget_bytes",
                 "Byte budget of the disk tier", None, {(): disk.budget_bytes}),
            ]
        for family, name, doc, label, values in families:
            m = family(name, doc, labels=[label] if label else None)
            for labels, value in values.items():
                m.add_metric(list(labels), value)
            yield m


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
        self.structured = Counter("blockserve_structured_requests",
                                  "Requests (choices) generated under a grammar, by format "
                                  "(json, regex, choice, tools)", ["format"],
                                  registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
