"""Prometheus collectors, one registry per proxy instance.

Names follow Prometheus conventions: `etagproxy_` prefix, `_total` for
counters, `_seconds` for durations. The `route` label is always the route
template (or "-" for unmatched requests), never a raw path, so cardinality
is bounded by the config.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "etagproxy_requests",
            "Requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self.preconditions = Counter(
            "etagproxy_precondition_outcomes",
            "Requests the proxy answered itself because of a precondition "
            "(not_modified, precondition_failed, precondition_required, busy, replayed).",
            ("route", "outcome"),
            registry=r,
        )
        self.tokens_minted = Counter(
            "etagproxy_tokens_minted",
            "Version tokens minted, by cause.",
            ("cause",),
            registry=r,
        )
        self.store_latency = Histogram(
            "etagproxy_store_seconds",
            "Latency of version store operations.",
            ("op",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "etagproxy_store_errors",
            "Store operations that failed or timed out.",
            ("op",),
            registry=r,
        )
        self.upstream_latency = Histogram(
            "etagproxy_upstream_seconds",
            "Time until the upstream's response headers arrived.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "etagproxy_upstream_errors",
            "Upstream exchanges that failed, by kind.",
            ("kind",),
            registry=r,
        )
        self.lease_wait = Histogram(
            "etagproxy_lease_wait_seconds",
            "Time writes waited behind another write to the same resource.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lease_lost = Counter(
            "etagproxy_lease_lost",
            "Writes whose lease ran out before END (no ETag was sent).",
            registry=r,
        )
        self.in_flight = Gauge(
            "etagproxy_in_flight_requests",
            "Requests being handled right now.",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
