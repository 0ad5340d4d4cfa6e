"""The request handler: match the route, pick a path.

Three paths, chosen per request:

- plain:  unmatched, passthrough routes, OPTIONS/TRACE/CONNECT; streamed
          both ways, nothing evaluated, upstream validators untouched
          (here).
- read:   GET/HEAD on a tracked route (`reads.py`).
- write:  every other method on a tracked route (`writes.py`).

The pure decisions they take are functions of their own modules:
`preconditions.py` (RFC 9110 §13.2.2), `variants.py` (which
representation a tag names), `outcome.py` (what an upstream status says
about a write), `derived.py` (versions from the upstream's answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from etagproxy import headers as hdr
from etagproxy import tracing
from etagproxy.client_body import ClientBodyError
from etagproxy.config import Config, RouteConfig
from etagproxy.exchange import Exchange
from etagproxy.forwarding import RESPONSE_DROP_TRACKED, Forwarding
from etagproxy.framing import Refusal
from etagproxy.guard import Guard
from etagproxy.metrics import Metrics
from etagproxy.problems import problem
from etagproxy.reads import Reads
from etagproxy.routes import Match, Router
from etagproxy.shortcircuit import ShortCircuit
from etagproxy.store.base import VersionStore
from etagproxy.target import Target, TargetError, canonicalize
from etagproxy.upstream import Upstream, UpstreamError
from etagproxy.writes import Writes

log = logging.getLogger("etagproxy")

# Methods get their own metric label; any other token is counted as OTHER,
# so a client cannot grow the label set.
METRIC_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
READ_METHODS = frozenset({"GET", "HEAD"})
UNTRACKED_METHODS = frozenset({"OPTIONS", "TRACE", "CONNECT"})
REQUEST_DROP_PLAIN = frozenset({"expect"})
# Refused requests are counted by method; an attacker chooses the method,
# so it never becomes a label value of its own.
REFUSAL_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class Proxy:
    """The aiohttp handler (`handle`) of one proxy process."""

    def __init__(
        self,
        config: Config,
        router: Router,
        store: VersionStore,
        upstream: Upstream,
        metrics: Metrics,
        on_exchange: Callable[[Exchange], None] | None = None,
    ) -> None:
        self.io = Forwarding(config, router, store, upstream, metrics)
        self.reads = Reads(self.io)
        self.writes = Writes(self.io)
        self.on_exchange = on_exchange

    @property
    def config(self) -> Config:
        return self.io.config

    @property
    def router(self) -> Router:
        return self.io.router

    @property
    def metrics(self) -> Metrics:
        return self.io.metrics

    @property
    def tasks(self) -> set[asyncio.Task[object]]:
        """Background store calls (END, reader records) still running."""
        return self.io.tasks

    def guard(self) -> Guard:
        """The framing guard in front of `handle`: the configured limits, and
        callbacks that look routes up for `allow_upgrade` and record what it
        refuses."""
        cfg = self.config
        return Guard(
            header_read=cfg.timeouts.header_read,
            max_connections=cfg.limits.max_connections,
            max_in_flight=cfg.limits.max_in_flight,
            upgrade_allowed=self._allows_upgrade,
            on_refusal=self._record_refusal,
        )

    def _allows_upgrade(self, method: str, target: str, host: str | None) -> bool:
        """Looks the route up at request time: routes can be reloaded."""
        if not any(r.allow_upgrade for r in self.config.routes):
            return False
        try:
            canonical = canonicalize(target, host=host)
        except TargetError:
            return False
        match = self.router.match(method, canonical)
        return match is not None and match.route.config.allow_upgrade

    def _record_refusal(self, request: web.BaseRequest, refusal: Refusal) -> None:
        """Refusals show in the access log and request metrics like any answer."""
        method = request.method if request.method in REFUSAL_METHODS else "OTHER"
        ex = Exchange(hdr.new_request_id(), method, request.raw_path, request.remote or "",
                      request.headers.get("User-Agent", ""))
        self._trace(request, ex)
        ex.status = refusal.status
        ex.error = refusal.kind
        ex.decision = "refused"
        self.metrics.requests.labels("-", method, str(refusal.status)).inc()
        if self.on_exchange is not None:
            self.on_exchange(ex)

    def use_routes(self, config: Config, router: Router) -> None:
        """Serve `router`'s routes from the next request on (a reload);
        requests in flight finish with the route they matched."""
        if config.trusted_proxies != self.io.config.trusted_proxies:
            self.io.trusted = hdr.TrustedProxies(config.trusted_proxies)
        if config.via != self.io.config.via:
            # Remembered 304s carry the old pseudonym: forget them.
            self.reads.short_circuit = ShortCircuit(config.via)
        self.io.config = config
        self.io.router = router

    def _trace(self, request: web.BaseRequest, ex: Exchange) -> None:
        """The request's place in a W3C trace (`tracing.py`)."""
        h = request.headers
        # A request aiohttp could not parse carries a plain dict of headers.
        getall = getattr(h, "getall", None)
        ex.trace_id, ex.parent_id, ex.trace_flags, ex.tracestate, ex.span_id = tracing.incoming(
            getall("traceparent", None) if getall else None, getall("tracestate", None) if getall else None,
            sampled=self.io.config.tracing.sampled,
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        h = request.headers
        ex = Exchange(
            hdr.request_id(h.get("X-Request-ID")), request.method, request.raw_path,
            request.remote or "", h.get("User-Agent", ""),
        )
        spans = self.io.spans
        self._trace(request, ex)
        if spans is not None:
            spans.server(ex)
        metrics = self.io.metrics
        metrics.in_flight.enter()
        try:
            resp = await self._dispatch(request, ex)
        except TargetError as exc:
            resp = problem(400, "bad-target", str(exc))
        except hdr.HeaderError as exc:
            resp = problem(400, "bad-header", str(exc))
        except ClientBodyError as exc:
            ex.error = exc.kind
            resp = exc.response()
        except Exception:
            log.exception("request %s failed", ex.rid)
            ex.error = "internal"
            resp = problem(500, "internal-error", "The proxy failed to handle this request.")
        finally:
            metrics.in_flight.leave()
        ex.status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-ID"] = ex.rid
            if isinstance(resp, web.Response) and isinstance(resp.body, bytes) and request.method != "HEAD":
                # The proxy's own answer (a problem, a 304): relayed bodies
                # are counted as they go out.
                ex.bytes_out = len(resp.body)
        method = ex.method if ex.method in METRIC_METHODS else "OTHER"
        self.io.labelled(metrics.requests, ex.route, method, resp.status).inc()
        if ex.span is not None:
            spans.finish(ex)
        if self.on_exchange is not None:
            self.on_exchange(ex)
        return resp

    def _dispatch(self, request: web.BaseRequest, ex: Exchange) -> Awaitable[web.StreamResponse]:
        """The path's coroutine, for `handle` to await: one coroutine layer
        less per request. A refusal of the target or headers raises here."""
        named = hdr.connection_tokens(request.headers.getall("Connection", ()))
        hdr.check_connection(named)
        target = canonicalize(request.raw_path, host=request.headers.get("Host"))
        if ex.span is not None:
            ex.span.set_attribute("url.path", target.path)  # type: ignore[attr-defined]
        match = self.io.router.match(request.method, target)
        if match is None:
            return self._plain(request, ex, target, None, named)
        ex.route = match.route.template
        cfg: RouteConfig = match.route.config
        if cfg.mode != "track" or request.method in UNTRACKED_METHODS:
            return self._plain(request, ex, target, match, named)
        ex.key = match.key
        if request.method in READ_METHODS:
            if cfg.version is not None:
                return self.reads.read_derived(request, ex, target, match, named)
            return self.reads.read(request, ex, target, match, named)
        return self.writes.write(request, ex, target, match, named)

    async def _plain(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match | None,
        named: frozenset[str],
    ) -> web.StreamResponse:
        tracked = match is not None and match.route.config.mode == "track"
        headers = self.io.upstream_headers(
            request, ex, REQUEST_DROP_PLAIN | named, keep_framing=True
        )
        t0 = time.perf_counter()
        try:
            async with self.io.send(match, target, request.method, headers, self.io.client_body(request, ex), ex=ex) as up:  # type: ignore[attr-defined]
                self.io.upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(
                    up.raw_headers,
                    drop=RESPONSE_DROP_TRACKED if tracked else frozenset(),
                    via=self.io.config.via,
                    rid=ex.rid,
                )
                return await self.io.relay(request, ex, up, out)
        except UpstreamError as exc:
            return self.io.upstream_failed(ex, exc)
