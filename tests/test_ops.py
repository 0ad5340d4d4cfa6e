"""Operations against a running proxy: probes, metrics, logs, reload, drain,
and `etagproxy inspect`.

In-process proxies (the `make_proxy` fixture) cover the admin endpoints and
the access log; `etagproxy run` child processes cover what only a real
process shows: signals, the drain, stdout and stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from etagproxy import logs
from etagproxy.app import ProxyServer
from etagproxy.config import parse_config
from etagproxy.exchange import Exchange
from etagproxy.logs import AccessLog
from etagproxy.store.base import StoreError
from etagproxy.store.memory import MemoryStore
from tests.metrics import scrape, value
from tests.proxy_fixtures import RecordingUpstream

ROOT = Path(__file__).resolve().parent.parent

ROUTES = """\
routes:
  - path: /api/items/{id}/
    require_if_match: true
  - path: /api/open/{id}/
  - path: /static/{rest:path}
    mode: passthrough
"""

ADMIN = "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: {upstream}\n"


# -- helpers -------------------------------------------------------------------


async def logged(exchanges: list[Exchange], count: int, timeout: float = 5) -> None:
    """Until `count` requests finished in the handler (they are logged
    after their metrics are counted; a client can get a streamed response
    a moment before)."""
    deadline = time.monotonic() + timeout
    while len(exchanges) < count:
        assert time.monotonic() < deadline, f"{len(exchanges)} of {count} requests finished"
        await asyncio.sleep(0.001)


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.json()


class HeldUpstream:
    """Wraps a RecordingUpstream so that chosen requests wait for `release`."""

    def __init__(self, upstream: RecordingUpstream, hold: Callable[[web.BaseRequest], bool]) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self._hold = hold
        self._up = upstream
        upstream.respond = self.respond

    async def respond(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if self._hold(request):
            self.arrived.set()
            await self.release.wait()
        return await self._up.default(request, body)


def write_config(path: Path, upstream: str, extra: str = "", routes: str = ROUTES) -> Path:
    path.write_text(
        f"listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: {upstream}\n{extra}{routes}"
    )
    return path


# -- probes ----------------------------------------------------------------------


async def test_healthz_and_readyz_answer_while_serving(make_proxy, recording_upstream):
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url)
    assert proxy.server.admin_port not in (0, proxy.server.port)
    assert await get_json(proxy.admin_url + "/healthz") == (200, {"status": "ok"})
    assert await get_json(proxy.admin_url + "/readyz") == (200, {"status": "ready"})
    # The admin paths belong to the admin port only: on the proxy port they
    # are ordinary requests, forwarded upstream.
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
    assert [r.raw_path for r in recording_upstream.requests] == ["/healthz"]


class _FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.hang = False

    async def ping(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise StoreError("redis ping: unreachable: connection refused")


async def test_readyz_is_503_with_the_reason_while_the_store_does_not_answer(make_proxy, recording_upstream):
    store = _FailingStore()
    proxy = await make_proxy(
        ADMIN + "timeouts: {store: 20ms}\n" + ROUTES, upstream=recording_upstream.url, store=store
    )
    status, body = await get_json(proxy.admin_url + "/readyz")
    assert status == 503
    assert body["status"] == "store unavailable"
    assert "connection refused" in body["detail"]
    # Liveness does not depend on the store: a restart would not help.
    assert (await get_json(proxy.admin_url + "/healthz"))[0] == 200
    store.down, store.hang = False, True
    status, body = await get_json(proxy.admin_url + "/readyz")
    assert (status, body["status"]) == (503, "store unavailable")
    store.hang = False
    assert await get_json(proxy.admin_url + "/readyz") == (200, {"status": "ready"})


async def test_stop_fails_readiness_closes_the_listener_and_finishes_requests(make_proxy, recording_upstream):
    held = HeldUpstream(recording_upstream, lambda r: r.method == "PUT")
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        write = asyncio.ensure_future(s.put(proxy.url + "/api/open/1/", data=b'{"v": 1}'))
        await asyncio.wait_for(held.arrived.wait(), 5)
        stopping = asyncio.ensure_future(proxy.server.stop())
        await asyncio.sleep(0)  # let stop() begin: it fails readiness first
        assert await get_json(proxy.admin_url + "/readyz") == (503, {"status": "draining"})
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(proxy.url + "/api/open/2/")
        assert not stopping.done(), "stop() must wait for the write in flight"
        held.release.set()
        resp = await write
        assert resp.status == 200
        assert await resp.read() == b'{"v": 1}'
        assert "ETag" in resp.headers, "END ran: the write committed a new version"
        await asyncio.wait_for(stopping, 10)


# -- metrics -----------------------------------------------------------------------


async def test_metrics_count_requests_outcomes_tokens_and_latencies(make_proxy, recording_upstream):
    held = HeldUpstream(recording_upstream, lambda r: r.method == "PUT" and r.raw_path == "/api/open/2/")
    proxy = await make_proxy(
        ADMIN + "timeouts: {write_wait: 100ms, upstream: 5s}\n" + ROUTES, upstream=recording_upstream.url
    )
    base = proxy.url
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/api/items/1/") as r:
            assert r.status == 200
            tag = r.headers["ETag"]
        async with s.get(base + "/api/items/1/", headers={"If-None-Match": tag}) as r:
            assert r.status == 304
        async with s.put(base + "/api/items/1/", data=b"a") as r:
            assert r.status == 428
        async with s.put(base + "/api/items/1/", data=b"a", headers={"If-Match": '"stale"'}) as r:
            assert r.status == 412
        retry = {"If-Match": tag, "Idempotency-Key": "k-1"}
        async with s.put(base + "/api/items/1/", data=b"a", headers=retry) as r:
            assert r.status == 200
        async with s.put(base + "/api/items/1/", data=b"a", headers=retry) as r:
            assert (r.status, r.headers.get("Idempotency-Replayed")) == (200, "true")

        slow = asyncio.ensure_future(s.put(base + "/api/open/2/", data=b"b"))
        await asyncio.wait_for(held.arrived.wait(), 5)
        async with aiohttp.ClientSession() as other:
            async with other.put(base + "/api/open/2/", data=b"c") as r:
                assert r.status == 409
        _, during = await scrape(proxy.admin_url)
        assert value(during, "etagproxy_in_flight_requests") == 1
        held.release.set()
        assert (await slow).status == 200

        async def fail(request: web.BaseRequest, body: bytes) -> web.Response:
            return web.Response(status=500)

        recording_upstream.respond = fail
        async with s.put(base + "/api/open/3/", data=b"d") as r:
            assert r.status == 500
        async with s.get(base + "/elsewhere?x=1") as r:
            assert r.status == 500

    await logged(proxy.exchanges, 10)
    content_type, m = await scrape(proxy.admin_url)
    assert content_type.startswith("text/plain; version=0.0.4")

    items, opened = "/api/items/{id}/", "/api/open/{id}/"
    req = "etagproxy_requests_total"
    assert value(m, req, route=items, method="GET", status="200") == 1
    assert value(m, req, route=items, method="GET", status="304") == 1
    assert value(m, req, route=items, method="PUT", status="428") == 1
    assert value(m, req, route=items, method="PUT", status="412") == 1
    assert value(m, req, route=items, method="PUT", status="200") == 2
    assert value(m, req, route=opened, method="PUT", status="409") == 1
    assert value(m, req, route="-", method="GET", status="500") == 1
    routes = {lab["route"] for n, lab, _ in m if "route" in lab}
    assert routes == {items, opened, "-"}, "route labels are templates, never raw paths"

    out = "etagproxy_precondition_outcomes_total"
    assert value(m, out, route=items, outcome="not_modified") == 1
    assert value(m, out, route=items, outcome="precondition_required") == 1
    assert value(m, out, route=items, outcome="precondition_failed") == 1
    assert value(m, out, route=items, outcome="replayed") == 1
    assert value(m, out, route=opened, outcome="busy") == 1

    minted = "etagproxy_tokens_minted_total"
    assert value(m, minted, cause="first_sight") == 1
    assert value(m, minted, cause="write") == 2
    assert value(m, minted, cause="unknown_outcome") == 1
    assert value(m, minted, cause="epoch") == 0
    assert value(m, minted, cause="fingerprint") == 0

    # BEGIN ran for every write that got past 428: 412, the write, the
    # replayed retry, the held write, the busy one and the failed one.
    assert value(m, "etagproxy_store_seconds_count", op="begin") == 6
    assert value(m, "etagproxy_lease_wait_seconds_count") == 6
    assert value(m, "etagproxy_lease_wait_seconds_sum") >= 0.1, "the busy write waited write_wait"
    assert value(m, "etagproxy_lease_lost_total") == 0
    assert value(m, "etagproxy_upstream_seconds_count", route=items) == 3
    assert value(m, "etagproxy_upstream_seconds_count", route=opened) == 2
    assert value(m, "etagproxy_upstream_seconds_count", route="-") == 1
    assert value(m, "etagproxy_upstream_seconds_bucket", route=items, le="+Inf") == 3
    assert value(m, "etagproxy_in_flight_requests") == 0
    # The proxy's own series, and prometheus-client's process_* and python_info.
    for name, _, _ in m:
        assert name.startswith(("etagproxy_", "process_", "python_info")), name


@pytest.mark.redis
async def test_store_outage_and_epoch_change_on_a_redis_store(
    make_proxy, recording_upstream, redis_server, redis_store
):
    store = await redis_store(redis_server)
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url, store=store)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/open/1/") as r:
            first = r.headers["ETag"]
        redis_server.kill()
        status, body = await get_json(proxy.admin_url + "/readyz")
        assert (status, body["status"]) == (503, "store unavailable")
        assert (await get_json(proxy.admin_url + "/healthz"))[0] == 200
        redis_server.start()
        assert await get_json(proxy.admin_url + "/readyz") == (200, {"status": "ready"})
        async with s.get(proxy.url + "/api/open/1/") as r:
            assert r.headers["ETag"] != first, "the restarted server had no data: a first sight"
        # A restart from a snapshot: the same data under a new run_id.
        snapshot = redis_server.save_snapshot()
        async with s.get(proxy.url + "/api/open/1/") as r:
            before = r.headers["ETag"]
        redis_server.restart_from(snapshot)
        async with s.get(proxy.url + "/api/open/1/") as r:
            after = r.headers["ETag"]
    assert after != before, "a token restored from a snapshot never validates"
    await logged(proxy.exchanges, 4)
    _, m = await scrape(proxy.admin_url)
    assert value(m, "etagproxy_tokens_minted_total", cause="epoch") == 1
    assert value(m, "etagproxy_tokens_minted_total", cause="first_sight") == 2
    errors = [v for n, _, v in m if n == "etagproxy_store_errors_total"]
    assert sum(errors) == 0, "readiness pings are not request errors"


# -- access log ----------------------------------------------------------------------


async def _read_lines(fd: int, count: int, timeout: float = 5) -> list[str]:
    """Lines from a non-blocking pipe, waiting for readability, not a while."""
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + timeout
    while data.count(b"\n") < count:
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
        try:
            await asyncio.wait_for(ready.wait(), max(0.0, deadline - loop.time()))
        finally:
            loop.remove_reader(fd)
        data += os.read(fd, 1 << 20)
    return data.decode().splitlines()


async def test_access_log_writes_one_json_line_per_request(recording_upstream):
    r_fd, w_fd = os.pipe()
    os.set_blocking(r_fd, False)
    writer = AccessLog(w_fd, interval=0.05)
    config = parse_config(
        f"listen: 127.0.0.1:0\nupstream: {recording_upstream.url}\n" + ROUTES, filename="t.yaml"
    )
    server = ProxyServer(config, access_log=writer)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/api/items/1/", headers={"X-Request-ID": "req-1"}) as r:
                body = await r.read()
            async with s.put(base + "/api/items/1/", data=b"xyz", headers={"If-Match": '"old"'}) as r:
                rid_412 = r.headers["X-Request-ID"]
                problem_body = await r.read()
            async with s.get(base + "/static/app.js?v=1", headers={"User-Agent": "probe/1.0"}) as r:
                await r.read()
        # No flush call: the idle timer writes the lines.
        lines = await _read_lines(r_fd, 3)
    finally:
        await server.stop()
        writer.close()
        os.close(r_fd)
        os.close(w_fd)
    assert len(lines) == 3
    get, put, static = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", get["time"])
    assert get["request_id"] == "req-1"
    assert (get["method"], get["route"], get["key"]) == ("GET", "/api/items/{id}/", "/api/items/1/")
    assert (get["status"], get["upstream_status"]) == (200, 200)
    assert get["store_ms"] > 0 and get["upstream_ms"] > 0 and get["ms"] >= get["upstream_ms"]
    assert get["bytes_out"] == len(body) and get["bytes_in"] == 0
    assert get["pid"] == os.getpid()
    assert put["request_id"] == rid_412
    assert (put["status"], put["upstream_status"], put["decision"]) == (412, None, "precondition_failed")
    assert put["upstream_ms"] == 0 and put["store_ms"] > 0 and put["bytes_in"] == 3
    # The proxy's own answer counts too (it used to log 0).
    assert put["bytes_out"] == len(problem_body) > 0
    assert (get["level"], put["level"]) == ("info", "info")
    assert (get["client"], static["client"]) == ("127.0.0.1", "127.0.0.1")
    assert get["user_agent"].startswith("Python/") and static["user_agent"] == "probe/1.0"
    assert (get["path"], static["path"]) == ("/api/items/1/", "/static/app.js?v=1")
    assert (static["route"], static["key"], static["store_ms"]) == ("/static/{rest:path}", "", 0)
    expected = {
        "time", "request_id", "method", "route", "key", "status", "upstream_status", "decision",
        "store_ms", "upstream_ms", "ms", "bytes_in", "bytes_out", "pid", "level", "path", "client", "user_agent",
        "trace_id", "span_id",
    }
    assert set(get) == expected


def test_access_log_lines_escape_and_text_format_reads_well():
    ex = Exchange('a"b', "GET", route='/x/{id}/', key='/x/"\\\n/', status=502, error="upstream-unreachable")
    record = json.loads(logs.json_line(ex, 7))
    assert (record["request_id"], record["key"], record["error"]) == ('a"b', '/x/"\\\n/', "upstream-unreachable")
    assert record["upstream_status"] is None
    assert record["level"] == "error"
    text = logs.text_line(Exchange("r1", "PUT", route="/x/{id}/", key="/x/1/", status=412), 7)
    assert text.endswith("\n") and text.count("\n") == 1
    assert " [7] r1 - PUT - route=/x/{id}/ key=/x/1/ 412 upstream=- " in text


async def test_access_log_never_splits_a_line_across_pipe_writes(monkeypatch):
    r_fd, w_fd = os.pipe()
    writes: list[bytes] = []
    real_write = os.write

    def record(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", record)
    writer = AccessLog(w_fd, max_buffer=1 << 20)
    try:
        for i in range(150):  # about 40 KB: fits the pipe, nobody reads yet
            writer(Exchange(f"rid-{i}", "GET", route="/a/{id}/", key=f"/a/{i}/" + "x" * (i % 50), status=200))
        writer.close()
        os.set_blocking(r_fd, False)
        lines = os.read(r_fd, 1 << 20).decode().splitlines()
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert len(lines) == 150 and all(json.loads(line) for line in lines)
    assert len(writes) > 1
    # POSIX: a write of at most PIPE_BUF bytes to a pipe is atomic, so
    # workers sharing stdout never interleave inside a line.
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)


# -- the process: startup log, reload, drain -------------------------------------------


async def test_startup_logs_the_effective_config_with_secrets_masked(processes, tmp_path):
    conf = write_config(
        tmp_path / "c.yaml", "http://127.0.0.1:9", extra="store: redis://app:s3cr%40t@127.0.0.1:9/0\n"
    )
    proxy = await processes("--config", str(conf))
    effective, = await proxy.wait_for(lambda r: r.get("msg") == "effective config")
    listening, = await proxy.wait_listening()
    assert effective["config"]["store"]["url"] == "redis://app:***@127.0.0.1:9/0"
    assert effective["config"]["store"]["password"] == "***"
    assert effective["config"]["routes"][0]["path"] == "/api/items/{id}/"
    assert listening["port"] > 0 and listening["admin_port"] > 0
    proxy.proc.send_signal(signal.SIGTERM)
    assert await proxy.finish() == 0
    everything = "\n".join(proxy.stderr + proxy.stdout)
    assert "s3cr" not in everything
    assert all(json.loads(line) for line in proxy.stderr), "every stderr line is one JSON object"


async def test_text_log_format_is_for_people(processes, tmp_path, recording_upstream):
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url)
    proxy = await processes("--config", str(conf), "--log-format", "text")
    listening, = await proxy.wait_lines(lambda line: " INFO " in line and "listening on" in line)
    found = re.search(r"listening on 127\.0\.0\.1:(\d+) .* port=(\d+) admin_port=(\d+)", listening)
    assert found is not None, listening
    port = int(found.group(1))
    assert port == int(found.group(2))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/api/items/5/") as r:
            assert r.status == 200
    proxy.proc.send_signal(signal.SIGTERM)
    assert await proxy.finish() == 0
    assert not any(line.startswith("{") for line in proxy.stderr + proxy.stdout)
    access, = proxy.stdout
    assert " 127.0.0.1 GET /api/items/5/ route=/api/items/{id}/ key=/api/items/5/ 200 upstream=200 " in access


async def test_sighup_reloads_routes_and_keeps_them_when_the_file_is_bad(processes, tmp_path, recording_upstream):
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url)
    proxy = await processes("--config", str(conf))
    listening, = await proxy.wait_listening()
    url = f"http://127.0.0.1:{listening['port']}/api/items/1/"

    async def etag() -> str | None:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 200
                return r.headers.get("ETag")

    assert await etag() is not None
    write_config(conf, recording_upstream.url, routes="routes:\n  - path: /api/items/{id}/\n    mode: passthrough\n")
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.wait_for(lambda r: r.get("msg", "").startswith("routes reloaded"))
    assert await etag() is None, "the new file made the route passthrough"

    conf.write_text(conf.read_text() + "  - path: no-slash\n    colour: blue\n")
    proxy.proc.send_signal(signal.SIGHUP)
    problems = await proxy.wait_for(lambda r: "problem" in r, count=2)
    await proxy.wait_for(lambda r: r.get("msg", "").startswith("reload rejected: keeping"))
    assert {p["problem"].split(": ")[0] for p in problems} == {f"{conf}:7", f"{conf}:8"}
    assert await etag() is None, "the running (passthrough) routes stay"
    _, m = await scrape(f"http://127.0.0.1:{listening['admin_port']}")
    assert value(m, "etagproxy_config_reloads_total", result="applied") == 1
    assert value(m, "etagproxy_config_reloads_total", result="rejected") == 1
    proxy.proc.send_signal(signal.SIGTERM)
    assert await proxy.finish() == 0


async def test_sigterm_during_a_burst_loses_and_resets_no_request(processes, tmp_path):
    """50 reads and writes held at the upstream; SIGTERM once all arrived."""
    burst = 50
    arrived = 0
    all_arrived = asyncio.Event()
    release = asyncio.Event()

    async def handle(request: web.BaseRequest) -> web.Response:
        nonlocal arrived
        body = await request.read()
        arrived += 1
        if arrived == burst:
            all_arrived.set()
        await release.wait()
        if request.method == "GET":
            return web.json_response({"path": request.path})
        return web.Response(body=body, content_type="application/json")

    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    conf = write_config(
        tmp_path / "c.yaml", upstream, extra="timeouts: {shutdown: 10s, upstream: 20s}\n"
    )
    proxy = await processes("--config", str(conf))
    listening, = await proxy.wait_listening()
    base = f"http://127.0.0.1:{listening['port']}"
    admin = f"http://127.0.0.1:{listening['admin_port']}"

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[str, int, bytes, str | None]:
        if i % 2:
            path = f"/api/open/{i}/"
            async with s.put(base + path, data=json.dumps({"i": i}).encode()) as r:
                return path, r.status, await r.read(), r.headers.get("ETag")
        path = f"/api/items/{i}/"
        async with s.get(base + path) as r:
            return path, r.status, await r.read(), r.headers.get("ETag")

    try:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            calls = [asyncio.ensure_future(one(s, i)) for i in range(burst)]
            await asyncio.wait_for(all_arrived.wait(), 15)
            proxy.proc.send_signal(signal.SIGTERM)
            await proxy.wait_for(lambda r: r.get("msg", "").startswith("stopping"))
            assert await get_json(admin + "/readyz") == (503, {"status": "draining"})
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(base + "/api/items/999/")
            # Hold the burst a while into the drain: a proxy whose budget
            # were accidentally tiny (or zero) would cut it here.
            await asyncio.sleep(0.3)
            assert proxy.proc.returncode is None, "the drain waits for the burst"
            release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        release.set()
        await runner.cleanup()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], "no request lost or reset"
    for path, status, body, tag in results:  # type: ignore[misc]
        assert status == 200, (path, status, body)
        if path.startswith("/api/open/"):
            assert json.loads(body) == {"i": int(path.split("/")[3])}
            assert tag is not None, "the write's END committed during the drain"
        else:
            assert json.loads(body) == {"path": path}
    assert await proxy.finish() == 0
    access = [json.loads(line) for line in proxy.stdout]
    assert len(access) == burst and {a["status"] for a in access} == {200}


# -- inspect -----------------------------------------------------------------------


async def _inspect(conf: Path, url: str) -> tuple[int, dict[str, str], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etagproxy", "inspect", "--config", str(conf), url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    rows = {}
    for line in out.decode().splitlines():
        label, _, rest = line.partition(":")
        rows[label] = rest.strip()
    assert proc.returncode is not None
    return proc.returncode, rows, err.decode()


@pytest.mark.redis
async def test_inspect_shows_route_key_token_state_epoch_and_age(
    make_proxy, recording_upstream, redis_server, redis_store, tmp_path
):
    held = HeldUpstream(recording_upstream, lambda r: r.method == "PUT")
    store = await redis_store(redis_server)
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url, store=store)
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url, extra=f"store: {redis_server.url}\n")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/open/7/") as r:
            tag = r.headers["ETag"]

        code, rows, _ = await _inspect(conf, "http://api.example/api/open/x/../7/")
        assert code == 0
        assert (rows["route"], rows["key"], rows["state"]) == ("/api/open/{id}/", "/api/open/7/", "committed")
        assert rows["etag"] == tag and rows["token"] == tag.strip('"')
        assert rows["epoch"] == redis_server.run_id()
        assert re.fullmatch(r"\d+\.\ds \(minted \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", rows["age"])

        write = asyncio.ensure_future(s.put(proxy.url + "/api/open/7/", data=b"{}"))
        await asyncio.wait_for(held.arrived.wait(), 5)
        code, rows, _ = await _inspect(conf, "/api/open/7/")
        assert (code, rows["state"]) == (0, "pending")
        assert rows["owner"] and rows["lease"].startswith("expires in ")
        held.release.set()
        assert (await write).status == 200

    code, rows, err = await _inspect(conf, "/static/app.js")
    assert code == 1 and rows["route"] == "/static/{rest:path} (passthrough)"
    assert "not in a tracked route" in err


# -- the Server field ----------------------------------------------------------------


async def test_the_proxy_names_itself_without_versions_unless_told(make_proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        proxy = await make_proxy("upstream: {upstream}\n" + ROUTES, upstream=recording_upstream.url)
        async with s.put(proxy.url + "/api/items/1/", data="x", headers={"If-Match": '"stale"'}) as r:
            assert r.status == 412
            assert r.headers.getall("Server") == ["etagproxy"]
        named = await make_proxy(
            "upstream: {upstream}\nserver: 'api-gateway (internal)'\n" + ROUTES, upstream=recording_upstream.url
        )
        async with s.put(named.url + "/api/items/1/", data="x", headers={"If-Match": '"stale"'}) as r:
            assert r.headers.getall("Server") == ["api-gateway (internal)"]


async def test_a_watched_config_reloads_when_a_configmap_swaps_its_symlink(processes, tmp_path, recording_upstream):
    """The kubelet updates a mounted ConfigMap by writing a new directory and
    swapping the `..data` symlink; the file's path stays the same."""
    mount = tmp_path / "mount"
    first, second = mount / "..2026_01" / "c.yaml", mount / "..2026_02" / "c.yaml"
    first.parent.mkdir(parents=True)
    second.parent.mkdir(parents=True)
    write_config(first, recording_upstream.url, extra="watch_config: 50ms\n")
    write_config(
        second, recording_upstream.url, extra="watch_config: 50ms\n",
        routes="routes:\n  - path: /api/items/{id}/\n    mode: passthrough\n",
    )
    (mount / "..data").symlink_to(first.parent.name)
    (mount / "c.yaml").symlink_to("..data/c.yaml")
    proxy = await processes("--config", str(mount / "c.yaml"))
    listening, = await proxy.wait_listening()
    url = f"http://127.0.0.1:{listening['port']}/api/items/1/"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.headers.get("ETag") is not None
        swap = mount / "..data_tmp"
        swap.symlink_to(second.parent.name)
        swap.replace(mount / "..data")  # rename(2): atomic, as the kubelet does
        await proxy.wait_for(lambda r: r.get("msg", "").startswith("routes reloaded"))
        async with s.get(url) as r:
            assert r.headers.get("ETag") is None, "the new ConfigMap made the route passthrough"
    changed = [r for r in proxy.records() if r.get("msg", "").startswith("config file")]
    assert len(changed) == 1
    proxy.proc.send_signal(signal.SIGTERM)
    assert await proxy.finish() == 0


async def test_a_reload_applies_server_via_and_trusted_proxies_and_names_what_needs_a_restart(
    make_proxy, recording_upstream
):
    base = "upstream: {upstream}\n" + ROUTES
    proxy = await make_proxy(base, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        headers = {"X-Forwarded-For": "203.0.113.7"}
        async with s.get(proxy.url + "/api/open/1/", headers=headers) as r:
            assert "etagproxy" in r.headers["Via"]
        assert "203.0.113.7" not in recording_upstream.requests[-1].header("X-Forwarded-For")

        new = parse_config(
            "listen: 127.0.0.1:0\n" + base.replace("{upstream}", recording_upstream.url)
            + "server: gateway\nvia: edge\ntrusted_proxies: [127.0.0.1]\nlimits: {max_body: 1KiB}\n",
            filename="new.yaml",
        )
        assert proxy.server.apply_routes(new) == ["limits"]
        async with s.get(proxy.url + "/api/open/1/", headers=headers) as r:
            assert r.headers["Via"].endswith("1.1 edge")
        forwarded = recording_upstream.requests[-1].header("X-Forwarded-For")
        assert forwarded is not None and forwarded.startswith("203.0.113.7"), "the new trusted proxy's header is kept"
        async with s.put(proxy.url + "/api/items/1/", data="x", headers={"If-Match": '"stale"'}) as r:
            assert r.status == 412 and r.headers["Server"] == "gateway"
