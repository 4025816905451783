"""Prometheus metrics of the head, named in vLLM's style with a `slurmserve:` prefix."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

disable_created_metrics()   # no `_created` series: scrapers don't need them and they double the output

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0, 300.0)


# Load field (runtime/protocol.py) -> its per-instance gauge: name, help.
_LOAD_GAUGES = {
    "running": ("slurmserve:instance_num_requests_running", "Running requests per instance (heartbeat)"),
    "waiting": ("slurmserve:instance_num_requests_waiting", "Waiting requests per instance (heartbeat)"),
    "kv_usage": ("slurmserve:instance_kv_cache_usage_perc", "KV-cache usage per instance, 0..1 (heartbeat)"),
    "external_kv_tokens": ("slurmserve:instance_prompt_tokens_external_total",
                           "Prompt tokens whose KV an instance received from another instance (heartbeat)"),
    "prefix_cache_queries": ("slurmserve:instance_prefix_cache_queries_total",
                             "Prompt tokens an instance looked up in its prefix cache, since start (heartbeat)"),
    "prefix_cache_hits": ("slurmserve:instance_prefix_cache_hits_total",
                          "Prompt tokens an instance found in its prefix cache, since start (heartbeat)"),
}


class HeadMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("slurmserve:requests", "Finished HTTP requests by finish reason",
                                ["finish_reason"], registry=r)
        self.http_errors = Counter("slurmserve:http_errors", "Requests rejected with an error",
                                   ["status"], registry=r)
        self.prompt_tokens = Counter("slurmserve:prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("slurmserve:prompt_cached_tokens",
                                     "Prompt tokens served from a KV cache", registry=r)
        self.generation_tokens = Counter("slurmserve:generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("slurmserve:num_requests_running", "Requests in flight at the head",
                             registry=r)
        self.ttft = Histogram("slurmserve:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("slurmserve:e2e_request_latency_seconds", "End-to-end latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.instance_up = Gauge("slurmserve:instance_up", "1 while an engine instance is in rotation",
                                 ["instance", "role"], registry=r)
        # The engine's own figures, copied from each heartbeat (totals too: the head only mirrors them).
        self.instance_load = {field: Gauge(name, doc, ["instance", "role"], registry=r)
                              for field, (name, doc) in _LOAD_GAUGES.items()}
        self.disagg = Counter("slurmserve:disagg_requests", "Disaggregated requests by path",
                              ["path"], registry=r)
        self.kv_events = Counter("slurmserve:kv_events", "KV events received from engines",
                                 ["type", "instance"], registry=r)
        self.kv_event_gaps = Counter("slurmserve:kv_event_gaps", "KV-event sequence gaps",
                                     ["instance"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
