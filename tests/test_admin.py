"""The admin port's status page, /routes, /config and /inspect.

In-process proxies (`make_proxy`) in front of a recording upstream; the
browser test runs a headless Chromium against one and skips only when no
Chromium binary is installed (Debian package `chromium`).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from etagproxy.config.dump import dump_effective
from etagproxy.inspect import inspect_url
from etagproxy.store.memory import MemoryStore
from tests.metrics import metric, scrape
from tests.test_ops import logged, write_config
from tests.test_workers import fresh, scrape_pool

ADMIN = "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: {upstream}\n"

ROUTES = """\
routes:
  - path: /api/items/{id}/
    require_if_match: true
    invalidates: [/api/items/]
  - path: /api/items/
    methods: [GET, POST]
  - path: /api/tagged/{id}/
    version: {from: header, header: X-Revision}
  - path: /api/cached/{id}/
    short_circuit: true
  - path: "/q&a/<b>/{id}/"
  - path: /static/{rest:path}
    mode: passthrough
"""

TEMPLATES = ["/api/items/{id}/", "/api/items/", "/api/tagged/{id}/", "/api/cached/{id}/", "/q&a/<b>/{id}/", "/static/{rest:path}"]

SECRET = "s3cr3t-Pa55"


# -- helpers -------------------------------------------------------------------


class _Table(HTMLParser):
    """The status page's route rows: {template: {column: text}}, and the facts."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: list[str] = []
        self.rows: dict[str, dict[str, str]] = {}
        self.facts: dict[str, str] = {}
        self._route: str | None = None
        self._cells: list[str] = []
        self._text: list[str] | None = None
        self._dt = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self._route, self._cells = dict(attrs).get("data-route"), []
        elif tag in ("td", "th", "dt", "dd"):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self._text or [])
        if tag == "th":
            self.columns.append(text)
        elif tag == "td":
            self._cells.append(text)
        elif tag == "dt":
            self._dt = text
        elif tag == "dd":
            self.facts[self._dt] = text
        elif tag == "tr" and self._route is not None:
            self.rows[self._route] = dict(zip(self.columns, self._cells))
        if tag in ("td", "th", "dt", "dd"):
            self._text = None


async def fetch(url: str, **headers: str) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as r:
            return r.status, r.headers, await r.text()


async def page(admin_url: str) -> _Table:
    status, headers, text = await fetch(admin_url + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert "<script" not in text and "src=" not in text and "stylesheet" not in text, "no external assets"
    table = _Table()
    table.feed(text)
    return table


def assert_problem(status: int, headers: Any, text: str, expected: int) -> dict[str, Any]:
    assert status == expected, text
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["Cache-Control"] == "no-store"
    doc: dict[str, Any] = json.loads(text)
    assert doc["status"] == expected and doc["type"].startswith("https://etagproxy.dev/problems/")
    return doc


# -- the status page -------------------------------------------------------------


async def test_page_lists_every_route_and_its_counters_agree_with_metrics(make_proxy, recording_upstream):
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url)
    before = await page(proxy.admin_url)
    assert list(before.rows) == TEMPLATES
    items = before.rows["/api/items/{id}/"]
    assert (items["mode"], items["methods"], items["require_if_match"], items["invalidates"]) == (
        "track", "any", "yes", "/api/items/",
    )
    assert before.rows["/api/items/"]["methods"] == "GET, POST"
    tagged = before.rows["/api/tagged/{id}/"]
    assert (tagged["short_circuit"], tagged["version"]) == ("no", "header X-Revision")
    assert before.rows["/api/cached/{id}/"]["short_circuit"] == "yes"
    assert before.rows["/static/{rest:path}"]["mode"] == "passthrough"
    assert all(row[c] == "0" for row in before.rows.values() for c in ("total", "412", "428"))
    facts = before.facts
    assert facts["version"] == __import__("etagproxy").__version__
    assert facts["state"] == "serving" and facts["store"] == "memory://"
    assert facts["store health"].startswith("PING ok in ")
    assert facts["listen"] == f"127.0.0.1:{proxy.server.port}"
    assert facts["admin"] == f"127.0.0.1:{proxy.server.admin_port}"
    assert facts["upstream"] == recording_upstream.url
    _, _, raw = await fetch(proxy.admin_url + "/")
    assert "/q&amp;a/&lt;b&gt;/{id}/" in raw and "<b>" not in raw, "templates are escaped"

    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/items/1/") as r:
            tag = r.headers["ETag"]
        async with s.get(proxy.url + "/api/items/1/", headers={"If-None-Match": tag}) as r:
            assert r.status == 304
        async with s.put(proxy.url + "/api/items/1/", data=b"{}") as r:
            assert r.status == 428
        async with s.put(proxy.url + "/api/items/1/", data=b"{}", headers={"If-Match": '"stale"'}) as r:
            assert r.status == 412
        async with s.get(proxy.url + "/elsewhere") as r:
            assert r.status == 200
    await logged(proxy.exchanges, 5)

    after = await page(proxy.admin_url)
    _, m = await scrape(proxy.admin_url)
    row = after.rows["/api/items/{id}/"]
    route = "/api/items/{id}/"
    outcomes = "etagproxy_precondition_outcomes_total"
    assert row["412"] == "1" == str(int(metric(m, outcomes, route=route, outcome="precondition_failed")))
    assert row["428"] == "1" == str(int(metric(m, outcomes, route=route, outcome="precondition_required")))
    assert row["304"] == "1" == str(int(metric(m, outcomes, route=route, outcome="not_modified")))
    assert row["409"] == "0"
    assert row["total"] == "4" == str(int(metric(m, "etagproxy_requests_total", route=route)))
    assert (row["2xx"], row["3xx"], row["4xx"], row["5xx"]) == ("1", "1", "2", "0")
    assert after.rows["/api/items/"]["total"] == "0"
    assert "(no route: forwarded untouched)" in (await fetch(proxy.admin_url + "/"))[2]

    proxy.server.draining = True
    assert (await page(proxy.admin_url)).facts["state"] == "draining"
    proxy.server.draining = False


async def test_page_shows_a_store_that_does_not_answer(make_proxy, recording_upstream):
    class Down(MemoryStore):
        async def ping(self) -> None:
            from etagproxy.store.base import StoreError

            raise StoreError("redis ping: unreachable: connection refused")

    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url, store=Down())
    facts = (await page(proxy.admin_url)).facts
    assert facts["store health"].startswith("PING failed after ")
    assert "connection refused" in facts["store health"]


# -- /routes, /config -----------------------------------------------------------------


async def test_routes_and_config_are_the_effective_settings_with_the_password_masked(
    make_proxy, recording_upstream
):
    store_url = f"redis://user:{SECRET}@127.0.0.1:1/0"
    proxy = await make_proxy(
        ADMIN + f"store: {store_url}\n" + ROUTES, upstream=recording_upstream.url, store=MemoryStore()
    )
    status, headers, text = await fetch(proxy.admin_url + "/routes")
    assert (status, headers["Content-Type"], headers["Cache-Control"]) == (
        200, "application/json; charset=utf-8", "no-store",
    )
    routes = json.loads(text)
    assert routes == json.loads(json.dumps(dump_effective(proxy.server.config)["routes"]))
    assert [r["path"] for r in routes] == TEMPLATES
    first = routes[0]
    assert (first["mode"], first["require_if_match"], first["invalidates"], first["methods"]) == (
        "track", True, ["/api/items/"], None,
    )
    assert routes[1]["methods"] == ["GET", "POST"]
    assert routes[2]["version"]["header"] == "X-Revision" and routes[3]["short_circuit"] is True
    assert first["upstream"] == recording_upstream.url, "the top-level upstream filled in"

    status, headers, text = await fetch(proxy.admin_url + "/config")
    assert (status, headers["Cache-Control"]) == (200, "no-store")
    config = json.loads(text)
    assert set(config) >= {"upstream", "listen", "admin_listen", "store", "timeouts", "limits", "routes"}
    assert config["store"]["url"] == "redis://user:***@127.0.0.1:1/0"
    assert config["store"]["password"] == "***" and config["store"]["username"] == "user"
    assert config["timeouts"]["store"] == 0.2 and config["routes"] == routes

    for path in ("/", "/config", "/routes", "/inspect?url=/api/items/1/", "/inspect?url=/nowhere", "/nope"):
        _, _, body = await fetch(proxy.admin_url + path)
        assert SECRET not in body, path
    assert "redis://user:***@127.0.0.1:1/0" in (await fetch(proxy.admin_url + "/"))[2]


# -- /inspect ----------------------------------------------------------------------------


async def test_inspect_on_memory_answers_as_the_cli_and_errors_are_problems(make_proxy, recording_upstream):
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url)
    url = proxy.admin_url + "/inspect?url=/api/items/x/../1/"
    status, headers, text = await fetch(url)
    assert (status, headers["Cache-Control"], headers["Vary"]) == (200, "no-store", "Accept")
    assert json.loads(text) == {
        "url": "/api/items/x/../1/",
        "target": "/api/items/1/",
        "route": "/api/items/{id}/",
        "key": "/api/items/1/",
        "store": "memory://",
        "state": "unknown: memory:// lives inside the running proxy process",
    }
    cli = io.StringIO()
    assert await inspect_url(proxy.server.config, "/api/items/x/../1/", out=cli) == 0
    for accept in ("text/plain", "text/plain, application/json;q=0.5", "text/*"):
        status, headers, text = await fetch(url, Accept=accept)
        assert (status, headers["Content-Type"]) == (200, "text/plain; charset=utf-8")
        assert text == cli.getvalue(), accept
    for accept in ("application/json", "*/*", "text/plain;q=0.1, application/json", "text/html"):
        assert json.loads((await fetch(url, Accept=accept))[2])["state"].startswith("unknown"), accept

    for query in ("", "?url=", "?other=1"):
        doc = assert_problem(*await fetch(proxy.admin_url + "/inspect" + query), 400)
        assert doc["type"].endswith("/bad-inspect-url") and "?url=" in doc["detail"]
    doc = assert_problem(*await fetch(proxy.admin_url + "/inspect?url=/a/%25zz"), 400)
    assert "percent-escape" in doc["detail"]
    doc = assert_problem(*await fetch(proxy.admin_url + "/inspect?url=/nowhere"), 404)
    assert doc["type"].endswith("/not-tracked") and doc["inspect"]["route"] == "-"
    doc = assert_problem(*await fetch(proxy.admin_url + "/inspect?url=/static/app.js"), 404)
    assert doc["inspect"]["route"] == "/static/{rest:path} (passthrough)"
    doc = assert_problem(*await fetch(proxy.admin_url + "/no/such/page"), 404)
    assert "/inspect?url=/path" in doc["detail"]
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.admin_url + "/routes") as r:
            assert_problem(r.status, r.headers, await r.text(), 405)
            assert "GET" in r.headers["Allow"]
    assert recording_upstream.requests == [], "nothing reached the proxy port"


@pytest.mark.redis
async def test_inspect_and_page_on_redis_show_the_live_state_and_the_epoch(
    make_proxy, recording_upstream, redis_server, redis_store
):
    store = await redis_store(redis_server)
    proxy = await make_proxy(
        ADMIN + f"store: {redis_server.url}\n" + ROUTES, upstream=recording_upstream.url, store=store
    )
    assert (await page(proxy.admin_url)).facts["store epoch"].startswith("not seen yet")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/items/7/") as r:
            tag = r.headers["ETag"]
    status, _, text = await fetch(proxy.admin_url + "/inspect?url=http://api.example/api/items/7/")
    assert status == 200
    got = json.loads(text)
    assert (got["route"], got["key"], got["state"]) == ("/api/items/{id}/", "/api/items/7/", "committed")
    assert got["etag"] == tag and got["epoch"] == redis_server.run_id() == got["run_id"]
    # The CLI opens its own store from the same config and prints the same lines.
    cli = io.StringIO()
    assert await inspect_url(proxy.server.config, "http://api.example/api/items/7/", out=cli) == 0
    _, _, text = await fetch(proxy.admin_url + "/inspect?url=http://api.example/api/items/7/", Accept="text/plain")
    def steady(text: str) -> list[str]:  # the lines that do not tick with the clock
        return [line for line in text.splitlines() if not line.startswith(("age:", "ttl_ms:"))]

    assert steady(text) == steady(cli.getvalue())
    facts = (await page(proxy.admin_url)).facts
    assert facts["store epoch"] == redis_server.run_id()
    assert facts["store health"].startswith("PING ok in ")
    assert facts["store"] == redis_server.url

    redis_server.kill()
    try:
        facts = (await page(proxy.admin_url)).facts
        assert facts["store health"].startswith("PING failed")
        doc = assert_problem(*await fetch(proxy.admin_url + "/inspect?url=/api/items/7/"), 503)
        assert doc["type"].endswith("/store-unavailable") and doc["inspect"]["key"] == "/api/items/7/"
    finally:
        redis_server.start()


@pytest.mark.redis
@pytest.mark.slow
async def test_a_pool_of_workers_shows_the_pool_totals_on_every_worker(
    processes, recording_upstream, redis_server, tmp_path
):
    store = f"store: {redis_server.url}\n"
    conf = write_config(tmp_path / "c.yaml", recording_upstream.url, extra=store, routes=ROUTES)
    pool = await processes("--config", str(conf), "--workers", "2")
    listening = await pool.wait_listening(count=2)
    base = f"http://127.0.0.1:{listening[0]['port']}"
    admin = f"http://127.0.0.1:{listening[0]['admin_port']}"
    rounds = 6
    for _ in range(rounds):  # each on a new connection: spread over the workers
        assert (await fresh("PUT", base + "/api/items/1/", data="x"))[0] == 428
        assert (await fresh("PUT", base + "/api/items/1/", data="x", headers={"If-Match": '"stale"'}))[0] == 412
    await pool.wait_access(2 * rounds)
    route = "/api/items/{id}/"
    # Once every worker has written its counts (within metrics.FLUSH_S),
    # every one of them shows the pool's totals.
    await scrape_pool(admin, "etagproxy_requests_total", 2 * rounds, route=route)
    for _ in range(4):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(admin + "/") as r:
                table = _Table()
                table.feed(await r.text())
        _, m = await scrape(admin)
        row = table.rows[route]
        assert table.facts["counters"] == "pool totals (--workers)"
        assert (row["428"], row["412"], row["total"]) == (str(rounds), str(rounds), str(2 * rounds))
        assert metric(m, "etagproxy_precondition_outcomes_total", route=route, outcome="precondition_failed") == rounds
        assert metric(m, "etagproxy_requests_total", route=route) == 2 * rounds


# -- in a browser ---------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


async def _run(*args: str, timeout: float = 90) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (which must come first)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_the_page_renders_in_a_headless_chromium(make_proxy, recording_upstream, tmp_path: Path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian package: chromium)")
    proxy = await make_proxy(ADMIN + ROUTES, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.put(proxy.url + "/api/items/1/", data=b"{}") as r:
            assert r.status == 428
    await logged(proxy.exchanges, 1)
    common = (
        binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    )
    shot = tmp_path / "status.png"
    await _run(*common, f"--screenshot={shot}", "--window-size=1280,900", proxy.admin_url + "/")
    data = shot.read_bytes()
    assert png_size(data) == (1280, 900)
    assert len(data) > 5000, "a rendered page, not a blank image"
    dom = (await _run(*common, "--dump-dom", proxy.admin_url + "/")).decode()
    table = _Table()
    table.feed(dom)
    assert list(table.rows) == TEMPLATES, "every route row is in the DOM the browser built"
    assert table.rows["/api/items/{id}/"]["428"] == "1"
    assert table.facts["state"] == "serving"
