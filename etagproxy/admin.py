"""The admin listener (`admin_listen:`): probes, metrics and a status page.

Owns every endpoint of the admin port and nothing of the proxy port:

    /healthz    liveness                     /readyz   readiness (not draining, store PING)
    /metrics    Prometheus exposition        /         status page (HTML, no JavaScript)
    /routes     routes, effective settings   /config   effective config, password masked
    /inspect?url=/path   what the store holds for one URL, as `etagproxy inspect`

It reads the running `ProxyServer` (config, store, metrics, draining flag)
and changes nothing. The status page costs one store PING; its counters are
read from the same values /metrics shows (a pool's totals with --workers).
Every error is problem+json; the page and the JSON answers are no-store.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from etagproxy import __version__
from etagproxy.config.addresses import _format_address
from etagproxy.config.dump import dump_effective
from etagproxy.config.schema import RouteConfig
from etagproxy.inspect import format_rows, inspect_state
from etagproxy.metrics import CONTENT_TYPE, Metrics
from etagproxy.problems import problem
from etagproxy.store.base import StoreError

if TYPE_CHECKING:
    from etagproxy.config.schema import Config
    from etagproxy.store.base import VersionStore


class ProxyServer(Protocol):
    """What the admin port reads of the process it serves (app.ProxyServer),
    named here so that this module does not import app.py."""

    config: Config
    store: VersionStore | None
    metrics: Metrics
    draining: bool
    port: int
    admin_port: int

log = logging.getLogger("etagproxy")

NO_STORE = {"Cache-Control": "no-store"}

# Status page columns: requests by status class, then the answers the proxy
# gave itself because of a precondition (etagproxy_precondition_outcomes).
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
OUTCOMES = {"304": "not_modified", "409": "busy", "412": "precondition_failed", "428": "precondition_required"}


class Admin:
    """The admin port's application, bound to one running proxy process."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._runner: web.AppRunner | None = None
        self._started = time.monotonic()
        self._started_wall = time.time()

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> web.TCPSite:
        app = web.Application(middlewares=[_problems])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/", self.status_page)
        app.router.add_get("/routes", self.routes)
        app.router.add_get("/config", self.config)
        app.router.add_get("/inspect", self.inspect)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, reuse_port=reuse_port or None)
        await site.start()
        return site

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- probes and metrics ----------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the event loop runs and answers. Nothing external is
        checked, so a store outage never gets a healthy process restarted."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: not draining, and the store answers a PING in time."""
        # A SIGTERM delivered before this probe was sent may still sit in
        # the loop's signal pipe: its callback was queued in the same pass
        # as this request's bytes, behind this handler. Yield once so it
        # runs (and sets `draining`) first.
        await asyncio.sleep(0)
        if self.server.draining:
            return web.json_response({"status": "draining"}, status=503)
        try:
            await self._ping()
        except (StoreError, TimeoutError) as exc:
            detail = str(exc) or "no answer in time"
            return web.json_response({"status": "store unavailable", "detail": detail}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def _ping(self) -> None:
        store = self.server.store
        assert store is not None
        async with asyncio.timeout(max(self.server.config.timeouts.store, 0.05) * 5):
            await store.ping()

    # -- configuration and state -------------------------------------------------

    async def routes(self, request: web.Request) -> web.Response:
        """The routes with every setting's effective value (defaults merged)."""
        return web.json_response(dump_effective(self.server.config)["routes"], headers=NO_STORE)

    async def config(self, request: web.Request) -> web.Response:
        """The effective configuration, as logged at startup: password masked."""
        return web.json_response(dump_effective(self.server.config), headers=NO_STORE)

    async def inspect(self, request: web.Request) -> web.Response:
        """`etagproxy inspect` for one URL, against the running store: JSON,
        or the CLI's text when Accept prefers text/plain."""
        url = request.query.get("url", "")
        if not url.strip():
            return problem(400, "bad-inspect-url", "give the URL or path to inspect as ?url=/path")
        found = await inspect_state(self.server.config, url, store=self.server.store)
        vary = [("Vary", "Accept")]
        if found.problem == "invalid-url":
            return problem(400, "bad-inspect-url", found.message, headers=vary)
        if found.problem == "not-tracked":
            return problem(404, "not-tracked", found.message, headers=vary, inspect=dict(found.rows))
        if found.problem is not None:
            return problem(503, "store-unavailable", found.message, headers=vary, inspect=dict(found.rows))
        headers = {**NO_STORE, "Vary": "Accept"}
        if _prefers_text(request.headers.get("Accept", "")):
            return web.Response(text=format_rows(found.rows), headers=headers)
        return web.json_response(dict(found.rows), headers=headers)

    # -- the status page ---------------------------------------------------------

    async def status_page(self, request: web.Request) -> web.Response:
        server, config = self.server, self.server.config
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await self._ping()
            health = ("ok", f"PING ok in {(loop.time() - began) * 1000:.1f} ms")
        except (StoreError, TimeoutError) as exc:
            health = ("bad", f"PING failed after {(loop.time() - began) * 1000:.0f} ms: {exc or 'no answer in time'}")
        epoch = getattr(server.store, "epoch", "") or ""
        state = ("bad", "draining") if server.draining else ("ok", "serving")
        pool = "pool totals (--workers)" if server.metrics.multiprocess else "this process"
        facts: list[tuple[str, str, str]] = [
            ("version", __version__, ""),
            ("state", state[1], state[0]),
            ("uptime", f"{_duration(time.monotonic() - self._started)} (since {_stamp(self._started_wall)})", ""),
            ("listen", _format_address((config.listen[0], server.port)), ""),
            ("admin", _format_address(((config.admin_listen or ("", 0))[0], server.admin_port)), ""),
            ("upstream", config.upstream, ""),
            ("store", config.store.masked_url, ""),
            ("store health", health[1], health[0]),
        ]
        if config.store.kind != "memory":
            facts.append(("store epoch", epoch or "not seen yet (set by the first read or write)", ""))
        facts += [("routes", f"{len(config.routes)} from {config.source}", ""), ("counters", pool, "")]
        counts = route_counts(server.metrics)
        body = _page(facts, config.routes, counts)
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers=NO_STORE)


# -- counters --------------------------------------------------------------------


def _samples(metrics: Metrics) -> Iterator[Sample]:
    """The request and outcome samples, as /metrics shows them: in a pool,
    parsed from the exposition that sums every worker's files."""
    families: Iterable[Any]
    if metrics.multiprocess:
        families = text_string_to_metric_families(metrics.exposition().decode())
    else:
        families = [*metrics.requests.collect(), *metrics.preconditions.collect()]
    for family in families:
        yield from family.samples


def route_counts(metrics: Metrics) -> dict[str, dict[str, float]]:
    """Per route template ("-" for unmatched requests): "total", requests
    by status class ("2xx"...), and the 304/409/412/428 the proxy answered."""
    counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_outcome = {outcome: code for code, outcome in OUTCOMES.items()}
    for sample in _samples(metrics):
        route = sample.labels.get("route")
        if route is None:
            continue
        if sample.name == "etagproxy_requests_total":
            counts[route]["total"] += sample.value
            counts[route][sample.labels.get("status", "?")[:1] + "xx"] += sample.value
        elif sample.name == "etagproxy_precondition_outcomes_total":
            code = by_outcome.get(sample.labels.get("outcome", ""))
            if code is not None:
                counts[route][code] += sample.value
    return counts


# -- rendering ---------------------------------------------------------------------


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px 32px;color:#1d232b;background:#f6f7f9}
h1{font-size:20px;margin:0 0 16px}h1 small{color:#667;font-weight:normal;font-size:14px}
h2{font-size:16px;margin:24px 0 8px}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;margin:0;background:#fff;
padding:12px 16px;border:1px solid #d9dde3;border-radius:6px}
dt{color:#556;font-weight:600}dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace}
table{border-collapse:collapse;background:#fff;border:1px solid #d9dde3;width:100%}
th,td{padding:5px 8px;border-bottom:1px solid #e6e9ee;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:12px;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.z{color:#aab}
code{font-family:ui-monospace,Menlo,Consolas,monospace}
.ok{color:#116b2f}.bad{color:#a4161a;font-weight:600}
tr.unmatched td{color:#667;font-style:italic}
footer{margin-top:20px;color:#667}a{color:#0b57a4}
form{display:inline}input{font:inherit;padding:2px 6px}
"""

_COLUMNS = ("path", "mode", "methods", "require_if_match", "short_circuit", "version", "invalidates")


def _page(facts: list[tuple[str, str, str]], routes: Iterable[RouteConfig], counts: dict[str, dict[str, float]]) -> str:
    e = html.escape
    dl = "".join(
        f"<dt>{e(label)}</dt><dd" + (f' class="{cls}"' if cls else "") + f">{e(value)}</dd>"
        for label, value, cls in facts
    )
    numbers = ("total", *STATUS_CLASSES, *OUTCOMES)
    head = "".join(f"<th>{e(c)}</th>" for c in (*_COLUMNS, *numbers))
    rows = []
    for route in routes:
        cells = (
            f"<code>{e(route.path)}</code>",
            e(route.mode),
            e(", ".join(sorted(route.methods))) if route.methods else "any",
            _yes(route.require_if_match),
            _yes(route.short_circuit),
            e(_version_source(route)),
            "<br>".join(f"<code>{e(t)}</code>" for t in route.invalidates) or "-",
        )
        rows.append(_row(f' data-route="{e(route.path)}"', cells, counts.get(route.path, {}), numbers))
    if "-" in counts:
        cells = ("(no route: forwarded untouched)", "passthrough", "any", "-", "-", "-", "-")
        rows.append(_row(' class="unmatched"', cells, counts["-"], numbers))
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta http-equiv=refresh content=5><title>etagproxy status</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>etagproxy <small>status of this proxy process; refreshes every 5 s</small></h1>"
        f"<dl>{dl}</dl><h2>Routes</h2>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<footer>JSON: <a href=/routes>/routes</a> · <a href=/config>/config</a> · "
        "<a href=/metrics>/metrics</a> · <a href=/readyz>/readyz</a> · "
        "<form action=/inspect method=get><label>inspect <input name=url placeholder=/path size=28></label>"
        "</form></footer></body></html>"
    )


def _row(attrs: str, cells: Iterable[str], count: dict[str, float], numbers: Iterable[str]) -> str:
    numeric = "".join(
        f"<td class=\"n{' z' if not count.get(n) else ''}\">{int(count.get(n, 0))}</td>" for n in numbers
    )
    return f"<tr{attrs}>{''.join(f'<td>{c}</td>' for c in cells)}{numeric}</tr>"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _version_source(route: RouteConfig) -> str:
    source = route.version
    if source is None:
        return "token"
    if source.source == "field":
        return "field " + ", ".join(source.fields)
    if source.source == "header":
        return f"header {source.header}" + (" (If-Match upstream)" if source.upstream_if_match else "")
    return "body hash"


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{s:02d}"


def _stamp(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


# -- errors and negotiation ------------------------------------------------------------


@web.middleware
async def _problems(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error of the admin port as problem+json: unknown paths (404),
    other methods (405), and whatever a handler raised (500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = [("Allow", exc.headers["Allow"])] if "Allow" in exc.headers else []
        kind = {404: "admin-not-found", 405: "admin-method-not-allowed"}.get(exc.status, "admin-error")
        detail = f"{request.method} {request.path}: {exc.reason}; the admin port serves " + ", ".join(_PATHS)
        return problem(exc.status, kind, detail, headers=allow)
    except Exception:
        log.exception("admin endpoint %s failed", request.path)
        return problem(500, "internal-error", "the admin endpoint failed; the proxy's log has the details")


_PATHS = ("/", "/healthz", "/readyz", "/metrics", "/routes", "/config", "/inspect?url=/path")


def _prefers_text(accept: str) -> bool:
    """Whether Accept ranks text/plain above application/json (RFC 9110
    §12.5.1: the most specific range gives each type its weight)."""

    def weight(media: str) -> float:
        kind = media.split("/")[0] + "/*"
        best, rank = 0.0, -1
        for part in accept.split(","):
            name, *params = (p.strip() for p in part.split(";"))
            name = name.lower()
            level = {media: 2, kind: 1, "*/*": 0}.get(name, -1)
            if level > rank:
                q = next((p[2:] for p in params if p.lower().startswith("q=")), "1")
                try:
                    best, rank = float(q), level
                except ValueError:
                    continue
        return best

    return bool(accept.strip()) and weight("text/plain") > weight("application/json")
