"""Prometheus collectors, one set per proxy process.

Names follow Prometheus conventions: `etagproxy_` prefix, `_total` for
counters (prometheus-client appends it), `_seconds` for durations. The
`route` label is always the route template (or "-" for unmatched requests),
never a raw path, so cardinality is bounded by the config.

Several workers (`run --workers N`): the admin port is shared with
SO_REUSEPORT like the proxy port, so a scrape lands on whichever worker the
kernel picks and every worker must answer for the whole pool. That is
prometheus-client's multiprocess mode: the supervisor points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before it forks, each worker
keeps its values in mmap'ed files there (its updates buffered and written
once a second, `_Buffered`), and `exposition()` sums the files of every
worker. Counters and histograms of workers that exited stay in the
sum, so totals never go backwards across a restart; the in-flight gauge
counts live workers only (the supervisor removes a dead worker's file).
The supervisor itself stays a small loop with no network I/O, rather than
owning the admin port and proxying probes to workers.
"""

from __future__ import annotations

import functools
import glob
import os
import platform
import re
from collections.abc import Iterator

import aiohttp
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from etagproxy.metric_values import (  # noqa: F401  (re-exported)
    FLUSH_S,
    LoopHistogram,
    LoopValue,
    buffer_shared_values,
    flush_shared,
)
from etagproxy.store.base import Cause

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# `*_created` series double the exposition for a timestamp that process
# start time already gives; the Prometheus text format does not need them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)


def multiprocess_enabled() -> bool:
    """Whether metric values live in shared files (a worker of a pool)."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


# prometheus-client's multiprocess values ask for the process id on every
# update, to notice a fork; `os.getpid()` is a system call each time (a
# dozen per write request). The id is kept here instead and refreshed in
# every forked child, which is all the check needs.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def process_id() -> int:
    """This process's id, without a system call."""
    return _pid


def enable_multiprocess(path: str) -> None:
    """Keep every metric created from now on in files under `path`.

    prometheus-client picks its value class when it is first imported, from
    the environment; a worker forked from a supervisor that imported it
    earlier switches here instead.
    """
    os.environ[MULTIPROC_ENV] = path
    if not getattr(_values.ValueClass, "_etagproxy", False):
        value_class = _values.MultiProcessValue(process_identifier=process_id)
        value_class._etagproxy = True  # type: ignore[attr-defined]
        _values.ValueClass = value_class


class InFlight:
    """Requests being handled by this process (`enter` / `leave` around
    each). A single process keeps a plain count that its gauge reads when
    scraped: an int update per request instead of a locked gauge update. A
    pool's workers also move the gauge, whose files the scrape sums."""

    __slots__ = ("now", "gauge", "_moved")

    def __init__(self, gauge: Gauge, *, multiprocess: bool) -> None:
        self.now = 0
        self.gauge = gauge
        self._moved = gauge if multiprocess else None
        if not multiprocess:
            gauge.set_function(lambda: self.now)

    def enter(self) -> None:
        self.now += 1
        if self._moved is not None:
            self._moved.inc()

    def leave(self) -> None:
        self.now -= 1
        if self._moved is not None:
            self._moved.dec()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = multiprocess_enabled()
        if registry is None:
            # In multiprocess mode the values are read back from the files,
            # so the collectors need no registry that anyone scrapes.
            registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
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
        self.store_latency = LoopHistogram(
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
        self.upstream_latency = LoopHistogram(
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
        self.verify_window = LoopHistogram(
            "etagproxy_verify_window_seconds",
            "On routes with a version from the upstream: from reading the version a"
            " write is checked against until the write's answer arrived, the time a"
            " write that bypasses the proxy could still be overwritten.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lease_wait = LoopHistogram(
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
        self.store_eviction_unsafe = Gauge(
            "etagproxy_store_eviction_unsafe",
            "1 when the store's maxmemory-policy (allkeys-*) can evict a write's lease.",
            registry=r,
            multiprocess_mode="max",
        )
        self.in_flight = InFlight(Gauge(
            "etagproxy_in_flight_requests",
            "Requests being handled right now.",
            registry=r,
            multiprocess_mode="livesum",
        ), multiprocess=self.multiprocess)
        self.config_reloads = Counter(
            "etagproxy_config_reloads",
            "Route reloads on SIGHUP, by result (applied or rejected).",
            ("result",),
            registry=r,
        )
        self.build_info = Gauge(
            "etagproxy_build_info",
            "1, labelled with the versions this process runs.",
            ("version", "python", "aiohttp"),
            registry=r,
            multiprocess_mode="max",
        )
        from etagproxy import __version__

        self.build_info.labels(__version__, platform.python_version(), aiohttp.__version__).set(1)
        if not self.multiprocess and r is not None:
            # process_* and python_info, as prometheus-client's default
            # registry has them; a pool's are added at exposition.
            r.register(PROCESS_COLLECTOR)
            r.register(PLATFORM_COLLECTOR)
        # Series that exist from the start read 0 instead of being absent,
        # so rate() and alerts work before the first event.
        for cause in Cause:
            self.tokens_minted.labels(cause.value)
        for result in ("applied", "rejected"):
            self.config_reloads.labels(result)

    def exposition(self) -> bytes:
        """The Prometheus text format; a pool's totals in multiprocess mode."""
        if self.multiprocess:
            flush_shared()
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(PoolProcesses(os.environ[MULTIPROC_ENV]))
            registry.register(PLATFORM_COLLECTOR)
            return generate_latest(registry)
        return generate_latest(self.registry)


# Live workers keep a `livesum` gauge file named by their pid; the
# supervisor removes a dead worker's (workers.py).
_LIVE_FILE = re.compile(r"gauge_livesum_(\d+)\.db$")


class PoolProcesses:
    """process_* for a pool of workers: CPU, memory and descriptors summed
    over the live workers, the earliest start time, the smallest fd limit.

    prometheus-client's ProcessCollector describes only the process that
    answers the scrape, which with SO_REUSEPORT is any worker; summed, the
    series mean the same with one worker or many."""

    _EARLIEST = frozenset({"process_start_time_seconds"})
    _SMALLEST = frozenset({"process_max_fds"})

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def pids(self) -> list[int]:
        found = (_LIVE_FILE.search(path) for path in glob.glob(os.path.join(self.directory, "gauge_livesum_*.db")))
        return sorted({int(m.group(1)) for m in found if m})

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, tuple[Metric, float]] = {}
        for pid in self.pids():
            for family in ProcessCollector(pid=functools.partial(int, pid), registry=None).collect():
                for sample in family.samples:
                    seen = totals.get(sample.name)
                    if seen is None:
                        totals[sample.name] = (family, sample.value)
                    elif sample.name in self._EARLIEST or sample.name in self._SMALLEST:
                        totals[sample.name] = (family, min(seen[1], sample.value))
                    else:
                        totals[sample.name] = (family, seen[1] + sample.value)
        for name, (family, total) in totals.items():
            doc = family.documentation + " (summed over the pool's live workers)" * (
                name not in self._EARLIEST and name not in self._SMALLEST
            )
            if family.type == "counter":
                yield CounterMetricFamily(family.name, doc, value=total)
            else:
                yield GaugeMetricFamily(name, doc, value=total)


def worker_restarts() -> Counter:
    """The supervisor's count of workers it had to start again.

    Only meaningful in multiprocess mode, where the supervisor's file is
    summed into every worker's exposition.
    """
    return Counter(
        "etagproxy_worker_restarts",
        "Workers that exited unexpectedly and were started again.",
        registry=None,
    )
