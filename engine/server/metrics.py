"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can coexist):
request gauges, KV-cache use, prefix-cache hit rate, latency histograms, token counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine.async_engine import StepStats

# Seconds; vLLM's buckets, which span a fast GPU decode step to a slow CPU prefill.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0)  # fmt: skip


class ServerMetrics:
    """All metrics of one app; `observe(stats)` is the engine's stats listener (thread-safe)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.num_running = Gauge(
            "hal_num_requests_running", "Requests with a sequence running", labels, registry=r
        )
        self.num_waiting = Gauge(
            "hal_num_requests_waiting", "Requests waiting or preempted", labels, registry=r
        )
        self.kv_usage = Gauge(
            "hal_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", labels,
            registry=r,
        )  # fmt: skip
        self.kv_used_blocks = Gauge(
            "hal_kv_cache_used_blocks", "KV-cache blocks in use", labels, registry=r
        )
        self.kv_usable_blocks = Gauge(
            "hal_kv_cache_usable_blocks", "KV-cache blocks in the pool", labels, registry=r
        )
        self.prefix_hit_rate = Gauge(
            "hal_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since start",
            labels,
            registry=r,
        )
        self.spec_drafts = Gauge(
            "hal_spec_decode_draft_tokens",
            "Speculative decoding: draft tokens scheduled, since start",
            labels,
            registry=r,
        )
        self.spec_accepted = Gauge(
            "hal_spec_decode_accepted_tokens",
            "Speculative decoding: draft tokens the model accepted, since start",
            labels,
            registry=r,
        )
        self.ttft = Histogram(
            "hal_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "hal_inter_token_latency_seconds",
            "Time between a request's consecutive engine steps that produced tokens",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "hal_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "hal_prompt_tokens", "Prompt tokens of accepted requests", labels, registry=r
        )
        self.generation_tokens = Counter(
            "hal_generation_tokens", "Generated tokens", labels, registry=r
        )
        self.finished = Counter(
            "hal_request_success",
            "Finished sequences by finish reason",
            labels + ["finished_reason"],
            registry=r,
        )
        self.http_errors = Counter(
            "hal_http_errors", "Error responses by status code", labels + ["status"], registry=r
        )
        self.model_name = model_name

    def observe(self, stats: StepStats) -> None:
        m = self.model_name
        self.num_running.labels(m).set(stats.num_running)
        self.num_waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        self.kv_used_blocks.labels(m).set(stats.num_used_blocks)
        self.kv_usable_blocks.labels(m).set(stats.num_usable_blocks)
        self.prefix_hit_rate.labels(m).set(stats.prefix_cache_hit_rate)
        self.spec_drafts.labels(m).set(stats.spec_draft_tokens)
        self.spec_accepted.labels(m).set(stats.spec_accepted_tokens)
        if stats.num_prompt_tokens:
            self.prompt_tokens.labels(m).inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.labels(m).inc(stats.num_generation_tokens)
        for t in stats.time_to_first_token:
            self.ttft.labels(m).observe(t)
        for t in stats.inter_token_latency:
            self.itl.labels(m).observe(t)
        for t in stats.e2e_latency:
            self.e2e.labels(m).observe(t)
        for reason in stats.finish_reasons:
            self.finished.labels(m, reason).inc()

    def count_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
