"""What the admin port's /metrics says about the process itself: the build,
and the process and platform series, for one process and for a pool."""

from __future__ import annotations

import platform
import signal
from pathlib import Path

import aiohttp
import pytest

from etagproxy import __version__
from etagproxy.metrics import LoopValue, Metrics
from tests.metrics import scrape, value
from tests.test_ops import write_config
from tests.test_workers import start_pool

ROUTES = "routes:\n  - path: /api/items/{id}/\n"


async def test_build_info_and_process_series_in_one_process(make_proxy, recording_upstream):
    proxy = await make_proxy("admin_listen: 127.0.0.1:0\nupstream: {upstream}\n" + ROUTES, upstream=recording_upstream.url)
    _, samples = await scrape(proxy.admin_url)
    assert value(
        samples, "etagproxy_build_info",
        version=__version__, python=platform.python_version(), aiohttp=aiohttp.__version__,
    ) == 1
    assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "python_info", version=platform.python_version()) == 1


def test_one_process_counts_and_times_without_locks_and_the_scrape_shows_it():
    # (a histogram's bucket is found by bisection: LoopHistogram)
    m = Metrics()
    requests = m.requests.labels("/api/items/{id}/", "GET", "200")
    latency = m.store_latency.labels("observe")
    for _ in range(3):
        requests.inc()
        latency.observe(0.0004)
    latency.observe(7.0)
    latency.observe(0.0005)  # on a bound: counted in it (le)
    with pytest.raises(ValueError):
        m.store_latency.observe(0.1)  # the parent has no series of its own
    m.in_flight.enter()
    # Every series of a single process is a plain value (no lock per update).
    assert type(requests._value) is LoopValue  # noqa: SLF001
    assert all(type(b) is LoopValue for b in latency._buckets)  # noqa: SLF001
    text = m.exposition().decode()
    assert 'etagproxy_requests_total{method="GET",route="/api/items/{id}/",status="200"} 3.0' in text
    assert 'etagproxy_store_seconds_bucket{le="0.00025",op="observe"} 0.0' in text
    assert 'etagproxy_store_seconds_bucket{le="0.0005",op="observe"} 4.0' in text
    assert 'etagproxy_store_seconds_bucket{le="5.0",op="observe"} 4.0' in text
    assert 'etagproxy_store_seconds_bucket{le="10.0",op="observe"} 5.0' in text
    assert 'etagproxy_store_seconds_bucket{le="+Inf",op="observe"} 5.0' in text
    assert 'etagproxy_store_seconds_count{op="observe"} 5.0' in text
    assert 'etagproxy_store_seconds_sum{op="observe"} 7.0017' in text
    assert "etagproxy_in_flight_requests 1.0" in text


def _rss(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * 4096


@pytest.mark.redis
@pytest.mark.slow
async def test_a_pool_reports_its_workers_processes_summed(processes, recording_upstream, redis_server, tmp_path):
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url, extra=f"store: {redis_server.url}\n")
    pool, supervisor, pids = await start_pool(processes, conf)
    admin = f"http://127.0.0.1:{supervisor['admin_port']}"
    try:
        for _ in range(4):  # any worker answers, each for the whole pool
            _, samples = await scrape(admin)
            assert value(samples, "etagproxy_build_info", version=__version__) == 1
            rss = value(samples, "process_resident_memory_bytes")
            each = [_rss(pid) for pid in pids]
            # Summed over the workers: more than any one, about all of them.
            assert rss > max(each) and 0.8 * sum(each) < rss < 1.25 * sum(each), (rss, each)
            assert value(samples, "process_open_fds") > 3 * len(pids)
            assert value(samples, "python_info", version=platform.python_version()) == 1
    finally:
        pool.proc.send_signal(signal.SIGTERM)
        assert await pool.finish() == 0
