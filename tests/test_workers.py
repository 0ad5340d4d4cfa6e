"""`etagproxy run --workers N`: one port, one Redis store, pooled metrics,
a supervisor that restarts crashed workers and forwards signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from etagproxy.metrics import FLUSH_S
from tests.metrics import scrape, value
from tests.proxy_processes import ProxyProcess
from tests.test_ops import write_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKERS = 3


async def start_pool(processes: Any, conf: Path) -> tuple[ProxyProcess, dict[str, Any], set[int]]:
    """Start a pool; returns it, the supervisor's record and the worker pids."""
    pool: ProxyProcess = await processes("--config", str(conf), "--workers", str(WORKERS))
    supervisor, = await pool.wait_for(lambda r: r.get("msg", "").startswith("supervisor"))
    listening = await pool.wait_listening(count=WORKERS)
    pids = {r["pid"] for r in listening}
    assert len(pids) == WORKERS and pool.proc.pid not in pids
    assert {r["port"] for r in listening} == {supervisor["port"]}, "every worker on the one port"
    return pool, supervisor, pids


async def scrape_pool(admin: str, name: str, expected: float, **labels: str) -> list[Any]:
    """Scrape until `name` reads `expected`: each worker writes its counts to
    the pool's files once a second (metrics.FLUSH_S), so a scrape that lands
    on another worker sees them that much later. Bounded at 5 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5 * FLUSH_S
    while True:
        _, m = await scrape(admin)
        if value(m, name, **labels) == expected or loop.time() > deadline:
            return m
        await asyncio.sleep(0.1)  # polling another process's flush: no event to await


async def fresh(method: str, url: str, **kw: Any) -> tuple[int, str | None, bytes]:
    """One request on a new connection, so the kernel picks the worker anew."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.request(method, url, **kw) as r:
            return r.status, r.headers.get("ETag"), await r.read()


async def test_workers_share_the_port_the_store_and_the_metrics(
    processes, recording_upstream, redis_server, tmp_path
):
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url, extra=f"store: {redis_server.url}\n")
    pool, supervisor, pids = await start_pool(processes, conf)
    base = f"http://127.0.0.1:{supervisor['port']}"
    admin = f"http://127.0.0.1:{supervisor['admin_port']}"

    # Read, write with that tag, read again: each on a new connection, so
    # the three steps usually land on different workers. They agree on
    # every token only through the shared store.
    rounds = 15
    status, tag, _ = await fresh("GET", base + "/api/items/1/")
    assert status == 200 and tag
    for i in range(rounds):
        status, new_tag, _ = await fresh("PUT", base + "/api/items/1/", data=str(i), headers={"If-Match": tag})
        assert status == 200 and new_tag and new_tag != tag
        status, _, _ = await fresh("PUT", base + "/api/items/1/", data="late", headers={"If-Match": tag})
        assert status == 412, "the old tag is stale on every worker"
        status, read_tag, body = await fresh("GET", base + "/api/items/1/")
        assert (status, read_tag, body) == (200, new_tag, str(i).encode())
        tag = new_tag
    sent = 1 + 3 * rounds
    await pool.wait_access(sent)

    # Each scrape lands on some worker; every one answers for the pool, once
    # the workers have written their counts (within FLUSH_S).
    # A worker writes all its counts at once, after its last request: when
    # the total is whole, so is every other series.
    await scrape_pool(admin, "etagproxy_requests_total", sent)
    for _ in range(6):
        _, m = await scrape(admin)
        assert value(m, "etagproxy_requests_total") == sent
        assert value(m, "etagproxy_precondition_outcomes_total", outcome="precondition_failed") == rounds
        assert value(m, "etagproxy_tokens_minted_total", cause="write") == rounds
        assert value(m, "etagproxy_in_flight_requests") == 0
        assert value(m, "etagproxy_worker_restarts_total") == 0

    pool.proc.send_signal(signal.SIGTERM)
    assert await pool.finish() == 0
    served_by = {json.loads(line)["pid"] for line in pool.stdout}
    assert len(pool.stdout) == sent
    assert len(served_by) > 1 and served_by <= pids, "the kernel spread connections across workers"


async def test_supervisor_restarts_a_crashed_worker_and_forwards_signals(
    processes, recording_upstream, redis_server, tmp_path
):
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url, extra=f"store: {redis_server.url}\n")
    pool, supervisor, pids = await start_pool(processes, conf)
    base = f"http://127.0.0.1:{supervisor['port']}"
    admin = f"http://127.0.0.1:{supervisor['admin_port']}"
    for _ in range(6):
        assert (await fresh("GET", base + "/api/open/1/"))[0] == 200
    await pool.wait_access(6)  # flushed: a SIGKILL loses a worker's unwritten log buffer
    # And the counts written: a SIGKILL also loses a worker's last FLUSH_S of them.
    m = await scrape_pool(admin, "etagproxy_requests_total", 6)
    assert value(m, "etagproxy_requests_total") == 6

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    restarted = await pool.wait_listening(count=WORKERS + 1)
    new_pid = restarted[-1]["pid"]
    assert new_pid not in pids
    crash, = await pool.wait_for(lambda r: r.get("worker") == victim and "exit" in r)
    assert crash["exit"] == "signal 9"
    pids = pids - {victim} | {new_pid}

    for _ in range(6):
        assert (await fresh("GET", base + "/api/open/1/"))[0] == 200
    await pool.wait_access(12)
    m = await scrape_pool(admin, "etagproxy_requests_total", 12)
    assert value(m, "etagproxy_worker_restarts_total") == 1
    # The dead worker's counts stay in the totals.
    assert value(m, "etagproxy_requests_total") == 12

    # SIGHUP: the supervisor checks the file, then every worker reloads.
    write_config(conf, recording_upstream.url, extra=f"store: {redis_server.url}\n",
                 routes="routes:\n  - path: /api/open/{id}/\n    mode: passthrough\n")
    pool.proc.send_signal(signal.SIGHUP)
    reloaded = await pool.wait_for(lambda r: r.get("msg", "").startswith("routes reloaded"), count=WORKERS)
    assert {r["pid"] for r in reloaded} == pids
    for _ in range(6):
        status, tag, _ = await fresh("GET", base + "/api/open/1/")
        assert (status, tag) == (200, None), "every worker serves the new routes"

    # A bad file: nobody changes routes, nothing is forwarded.
    conf.write_text(conf.read_text() + "  - path: nope\n")
    pool.proc.send_signal(signal.SIGHUP)
    await pool.wait_for(lambda r: r.get("msg", "") == "reload rejected: every worker keeps its running routes")

    pool.proc.send_signal(signal.SIGTERM)
    assert await pool.finish() == 0
    stopped = {r["pid"] for r in await pool.wait_for(lambda r: r.get("msg") == "stopped", count=WORKERS + 1)}
    assert stopped == pids | {pool.proc.pid}
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    rejected = [r for r in pool.records() if r.get("msg", "").startswith("reload rejected") and r["pid"] in pids]
    assert rejected == []



def test_pooled_metric_values_cost_no_system_call_and_stay_apart_after_fork(tmp_path: Path) -> None:
    """prometheus-client checks the process id on every update of a pooled
    value; etagproxy answers it from a cached id (no system call), which a
    fork refreshes, so a forked worker still writes its own file."""
    script = f"""
import os
import etagproxy.metrics as metrics
metrics.enable_multiprocess({str(tmp_path)!r})
m = metrics.Metrics()
m.requests.labels("/r", "GET", "200").inc()
pid = os.fork()
if pid == 0:
    m.requests.labels("/r", "GET", "200").inc()
    os._exit(0)
os.waitpid(pid, 0)
metrics._pid = 4242  # the id the values ask for is the cached one
m.requests.labels("/r", "GET", "200").inc()
print(os.getpid(), pid)
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    parent, child = (int(x) for x in done.stdout.split())
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("counter_"))
    assert files == sorted(f"counter_{n}.db" for n in (parent, child, 4242)), files


def test_a_workers_updates_reach_its_shared_file_when_flushed(tmp_path: Path) -> None:
    """A pool's worker buffers its updates (no lock and file write each):
    the shared file has them after `flush_shared`, and the worker's own
    scrape writes them first; a gauge's `set` writes through."""
    script = f"""
import json
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
import etagproxy.metrics as metrics

def shared(name):
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path={str(tmp_path)!r})
    return sum(s.value for f in registry.collect() for s in f.samples if s.name == name)

metrics.enable_multiprocess({str(tmp_path)!r})
metrics.buffer_shared_values()
m = metrics.Metrics()
for _ in range(3):
    m.requests.labels("/r", "GET", "200").inc()
m.store_latency.labels("observe").observe(0.0004)
out = {{"before": shared("etagproxy_requests_total"), "own": m.requests.labels("/r", "GET", "200")._value.get()}}
metrics.flush_shared()
out["flushed"] = shared("etagproxy_requests_total")
out["histogram"] = shared("etagproxy_store_seconds_count")
m.requests.labels("/r", "GET", "200").inc()
out["scraped"] = "etagproxy_requests_total{{method=\\"GET\\",route=\\"/r\\",status=\\"200\\"}} 4.0" in m.exposition().decode()
m.store_eviction_unsafe.set(1)
out["set"] = shared("etagproxy_store_eviction_unsafe")
print(json.dumps(out))
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"before": 0, "own": 3.0, "flushed": 3.0, "histogram": 1.0, "scraped": True, "set": 1.0}, out

