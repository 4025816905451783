"""Prometheus metrics of the head, named in vLLM's style with a `slurmserve:` prefix."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()   # no `_created` series: scrapers don't need them and they double the output

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0, 300.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.5, 1.0, 2.5)


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


class LatencyHistogram:
    """A histogram kept as plain numbers (the head updates it from its one event-loop thread)."""

    __slots__ = ("name", "doc", "bounds", "counts", "sum")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...] = _LATENCY_BUCKETS):
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)    # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1   # `le` buckets: bound >= value
        self.sum += seconds

    def family(self) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            cumulative.append((bound, total))
        return HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=self.sum)


class RequestSnapshot(msgspec.Struct, array_like=True):
    """A front-end process's request metrics, summed by the router process when /metrics is read
    (router/frontend_hub.py): every counter, gauge and histogram of RequestMetrics, and the HTTP
    errors by status."""
    finished: dict[str, int]
    tokens: tuple[int, int, int]          # prompt, cached, generated
    running: int
    histograms: list[tuple[list[int], float]]   # ttft, e2e, tpot: bucket counts and sum
    errors: dict[str, int]


class RequestMetrics(Collector):
    """What every request updates: counters, the in-flight gauge and the latency histograms, kept
    as plain numbers and made into metric families only when /metrics is read. (prometheus_client's
    own metric objects take a lock and check their labels on every update: about a tenth of the
    head's CPU for a short request.)"""

    def __init__(self):
        self.finished: Tally[str] = Tally()     # finish reason -> requests
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0
        self.running = 0
        self.ttft = LatencyHistogram("slurmserve:time_to_first_token_seconds", "Time to first token")
        self.e2e = LatencyHistogram("slurmserve:e2e_request_latency_seconds", "End-to-end latency")
        # vLLM's per-request TPOT: (last token - first token) / (output tokens - 1), for answers of 2+ tokens
        self.tpot = LatencyHistogram("slurmserve:request_time_per_output_token_seconds",
                                     "Time per output token after the first, per request", _TPOT_BUCKETS)

    def count(self, finish: str, prompt: int = 0, cached: int = 0, generated: int = 0) -> None:
        self.finished[finish] += 1
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.generation_tokens += generated

    def histograms(self) -> tuple[LatencyHistogram, ...]:
        return self.ttft, self.e2e, self.tpot

    def snapshot(self, errors: dict[str, int]) -> RequestSnapshot:
        return RequestSnapshot(dict(self.finished), (self.prompt_tokens, self.cached_tokens, self.generation_tokens),
                               self.running, [(list(h.counts), h.sum) for h in self.histograms()], errors)

    def add(self, snap: RequestSnapshot) -> None:
        self.finished.update(snap.finished)
        prompt, cached, generated = snap.tokens
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.generation_tokens += generated
        self.running += snap.running
        for h, (counts, total) in zip(self.histograms(), snap.histograms):
            h.counts = [a + b for a, b in zip(h.counts, counts)]
            h.sum += total

    def collect(self):
        requests = CounterMetricFamily("slurmserve:requests", "Finished requests by finish reason "
                                       "(each choice of an n > 1 request, as vLLM counts them)",
                                       labels=["finish_reason"])
        for reason, n in sorted(self.finished.items()):
            requests.add_metric([reason], n)
        yield requests
        yield CounterMetricFamily("slurmserve:prompt_tokens", "Prompt tokens", value=self.prompt_tokens)
        yield CounterMetricFamily("slurmserve:prompt_cached_tokens", "Prompt tokens served from a KV cache",
                                  value=self.cached_tokens)
        yield CounterMetricFamily("slurmserve:generation_tokens", "Generated tokens",
                                  value=self.generation_tokens)
        yield GaugeMetricFamily("slurmserve:num_requests_running", "Requests in flight at the head",
                                value=self.running)
        yield self.ttft.family()
        yield self.e2e.family()
        yield self.tpot.family()


class KVEventCounts(Collector):
    """KV events received, by event type and instance: a tally bumped per event (a busy fleet
    sends thousands a second), made into a counter family when /metrics is read."""

    def __init__(self):
        self.tally: Tally[tuple[type, int]] = Tally()    # (event class, instance) -> events

    def collect(self):
        family = CounterMetricFamily("slurmserve:kv_events", "KV events received from engines",
                                     labels=["type", "instance"])
        for (cls, instance), n in sorted(self.tally.items(), key=lambda kv: (kv[0][0].__name__, kv[0][1])):
            family.add_metric([cls.__name__, str(instance)], n)
        yield family


class ErrorCounts(Collector):
    """HTTP errors by status, summed over front-end processes."""

    def __init__(self, tally: Tally[str]):
        self.tally = tally

    def collect(self):
        family = CounterMetricFamily(_ERRORS[0], _ERRORS[1], labels=["status"])
        for status, n in sorted(self.tally.items()):
            family.add_metric([status], n)
        yield family


class Families(Collector):
    """Everything another registry holds, as part of this one."""

    def __init__(self, source: CollectorRegistry):
        self.source = source

    def collect(self):
        yield from self.source.collect()


_ERRORS = ("slurmserve:http_errors", "Requests rejected with an error")


class HeadMetrics:
    """The head's metrics in two parts: what answering requests updates (`requests`, `http_errors`:
    per front-end process, summed when there are several) and the fleet's (instances, KV events,
    disaggregation, migrations: the router's alone). `registry` holds both."""

    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        self.requests = RequestMetrics()
        r.register(self.requests)
        self.http_errors = Counter(*_ERRORS, ["status"], registry=r)
        self.fleet = CollectorRegistry()
        r.register(Families(self.fleet))
        r = self.fleet
        self.instance_up = Gauge("slurmserve:instance_up", "1 while an engine instance is in rotation",
                                 ["instance", "role"], registry=r)
        # The engine's own figures, copied from each heartbeat (totals too: the head only mirrors them).
        self.instance_load = {field: Gauge(name, doc, ["instance", "role"], registry=r)
                              for field, (name, doc) in _LOAD_GAUGES.items()}
        self.disagg = Counter("slurmserve:disagg_requests", "Disaggregated requests by path",
                              ["path"], registry=r)
        self.migrations = Counter("slurmserve:request_migrations", "Times a request went on on another "
                                  "instance after its own died or hung mid-request", registry=r)
        self.kv_events = KVEventCounts()
        r.register(self.kv_events)
        self.kv_event_gaps = Counter("slurmserve:kv_event_gaps", "KV-event sequence gaps",
                                     ["instance"], registry=r)

    def instance_down(self, index: int, role: str) -> None:
        """An instance left rotation: its gauges would otherwise keep their last heartbeat's values."""
        self.instance_up.labels(index, role).set(0)
        for gauge in self.instance_load.values():
            gauge.labels(index, role).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> RequestSnapshot:
        """This process's request metrics, for the router process to sum."""
        errors = {s.labels["status"]: int(s.value) for metric in self.http_errors.collect()
                  for s in metric.samples if s.name.endswith("_total")}
        return self.requests.snapshot(errors)

    def render_merged(self, snapshots: list[RequestSnapshot]) -> bytes:
        """/metrics of a head with several front-end processes: their request metrics summed, and
        this (the router) process's fleet metrics."""
        total, errors = RequestMetrics(), Tally()
        for snap in snapshots:
            total.add(snap)
            errors.update(snap.errors)
        r = CollectorRegistry()
        r.register(total)
        r.register(ErrorCounts(errors))
        r.register(Families(self.fleet))
        return generate_latest(r)
