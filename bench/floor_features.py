"""The `features` floor: etagproxy's own per-request work on the httptools server.

What a data plane on httptools would cost at least, measured rather than
estimated: the bare asyncio.Protocol of `floors.py` (httptools parses,
answers are written by hand), calling etagproxy's real modules for the work
each answer of `bench/cpu_floor.py` takes, in the order `proxy.py`,
`reads.py` and `writes.py` take it:

- every request: the framing checks (`framing.check_request`, what the
  guard runs on each parsed message), the in-flight limit, the request id
  and trace context, `Connection` options, target canonicalization, route
  matching, the in-flight count and the request counter;
- a read: the preconditions parsed, the store's observe (the real
  `RedisStore`, its lean HMGET path) timed into its histogram, the short
  circuit's own decision (`ShortCircuit.answer`, which builds its 304 as an
  aiohttp `Response`: its header lines are copied out here), or the forward
  (upstream request headers, the real `Upstream` client through
  `Forwarding.send`, response header rewriting, representation variant,
  `make_etag`, the remembered selection, §13.2.2 evaluation);
- a write: `write_condition`, the whole body, BEGIN through the real store
  (`RedisStore.begin`), the forward, `write_outcome`, END through
  `Leases.end` (shielded task), `AfterWrite.invalidate` and
  `response_version`, and the new validators.

`--upto LAYER` stops each request after one layer of that work and
answers as the fixed-304 floor does (`server`: nothing but parse and answer; `guard`: the
framing checks, limit, request id and trace context; `route`: the
`Connection` options, canonical target, route match and in-flight count;
`store`: the store's observe), so a run shows what each layer adds.

Left out, because no answer of the benchmark takes them: error handling
(every failure is a bare 500 here), problem+json bodies, 412 refusal
checks, replay, bulk, the access log (the proxy runs with
`--no-access-log` in the benchmark too), the header-read timer and the
connection limit.

    python bench/floors.py features --port P --config etagproxy.yaml [--upto LAYER]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from floors import LAYERS, Answer, HttptoolsForwarder, _Date
from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy import headers as hdr
from etagproxy import tracing
from etagproxy.after_write import AfterWrite, route_fields
from etagproxy.config import load_config
from etagproxy.etag import make_etag
from etagproxy.exchange import Exchange
from etagproxy.forwarding import REQUEST_DROP_TRACKED, RESPONSE_DROP_TRACKED, Forwarding
from etagproxy.framing import check_request
from etagproxy.httpdate import format_http_date
from etagproxy.leases import Leases
from etagproxy.metrics import Metrics
from etagproxy.outcome import validators_allowed, write_outcome
from etagproxy.preconditions import Conditionals, Decision, Representation, evaluate, write_condition
from etagproxy.randomness import random_hex
from etagproxy.routes import Router
from etagproxy.shortcircuit import ShortCircuit
from etagproxy.store import open_store
from etagproxy.store.base import BeginStatus, StoreError
from etagproxy.target import canonicalize
from etagproxy.upstream import Upstream
from etagproxy.variants import Selected, query_variant, representation_variant


def _fixed(headers: CIMultiDictProxy[str]) -> Answer:
    """What the fixed-304 floor answers: 304 to If-None-Match, else a small 200."""
    if "If-None-Match" in headers:
        return 304, [("ETag", '"fixed"')], b""
    return 200, [("ETag", '"fixed"')], b"{}\n"


def _no_upgrade(method: str, target: str, host: str | None) -> bool:
    return False


class Features:
    """The services of one proxy process, built from its config file as
    `app.ProxyServer.start` builds them."""

    def __init__(self, config_path: str, upto: str = "all") -> None:
        self.upto = LAYERS.index(upto)
        cfg = self.config = load_config(config_path)
        self.metrics = Metrics()
        self.store = open_store(cfg.store, timeout_s=cfg.timeouts.store)
        self.upstream = Upstream(connect_timeout=cfg.timeouts.connect)
        self.io = Forwarding(cfg, Router(cfg.routes), self.store, self.upstream, self.metrics)
        self.short = ShortCircuit(cfg.via)
        self.leases = Leases(self.io)
        self.after = AfterWrite(self.io, self.leases)
        self.in_flight = 0

    async def handle(
        self, method: str, raw_path: str, version: tuple[int, int], raw: list[tuple[bytes, bytes]],
        headers: CIMultiDictProxy[str], body: bytes | None, remote: str,
    ) -> Answer:
        upto = self.upto
        if upto == 0:
            return _fixed(headers)
        if check_request(method, raw_path, version, raw, upgrade=False, upgrade_allowed=_no_upgrade) is not None:
            return 400, [], b""
        if self.in_flight >= self.config.limits.max_in_flight:
            return 503, [], b""
        self.in_flight += 1
        io = self.io
        ex = Exchange(hdr.request_id(headers.get("X-Request-ID")), method, raw_path, remote,
                      headers.get("User-Agent", ""))
        ex.trace_id, ex.parent_id, ex.trace_flags, ex.tracestate, ex.span_id = tracing.incoming(
            headers.getall("traceparent", None), headers.getall("tracestate", None),
            sampled=self.config.tracing.sampled,
        )
        if upto == 1:
            self.in_flight -= 1
            return _fixed(headers)
        io.metrics.in_flight.enter()
        try:
            named = hdr.connection_tokens(headers.getall("Connection", ()))
            hdr.check_connection(named)
            target = canonicalize(raw_path, host=headers.get("Host"))
            match = io.router.match(method, target)
            if upto == 2:
                answer = _fixed(headers)
            elif match is None:
                answer: Answer = (404, [], b"")
            else:
                ex.route = match.route.template
                ex.key = match.key
                if method == "GET":
                    answer = await self._read(method, raw, headers, remote, ex, target, match, named)
                else:
                    answer = await self._write(method, raw, headers, body or b"", remote, ex, target, match, named)
        except (StoreError, OSError):
            answer = (500, [], b"")
        finally:
            io.metrics.in_flight.leave()
            self.in_flight -= 1
        ex.status = answer[0]
        io.labelled(io.metrics.requests, ex.route, method, answer[0]).inc()
        return answer

    def _upstream_headers(self, raw: list[tuple[bytes, bytes]], remote: str, ex: Exchange,
                          drop: frozenset[str]) -> CIMultiDict[str]:
        """`Forwarding.upstream_headers` without the aiohttp request."""
        return hdr.upstream_request_headers(
            raw, drop=drop, peer=remote, trusted=remote in self.io.trusted, proto="http",
            via=self.config.via, rid=ex.rid, keep_framing=False,
            traceparent=f"00-{ex.trace_id}-{ex.span_id}-{ex.trace_flags}", tracestate=ex.tracestate,
        )

    async def _read(self, method: str, raw: list[tuple[bytes, bytes]], headers: CIMultiDictProxy[str],
                    remote: str, ex: Exchange, target: object, match: object, named: frozenset[str]) -> Answer:
        io = self.io
        cfg = match.route.config  # type: ignore[attr-defined]
        cond = Conditionals.from_headers(headers)
        obs = await io.timed_store(ex, "observe", io.store.observe(match.key, reader=None))  # type: ignore[attr-defined]
        if self.upto == 3:
            return _fixed(headers)
        io.minted(obs.minted)  # type: ignore[attr-defined]
        qpart = query_variant(target, match.route.key_query)  # type: ignore[arg-type,attr-defined]
        if cfg.short_circuit and not obs.pending and cond.if_none_match:  # type: ignore[attr-defined]
            early = self.short.answer(headers, ex, cfg, cond, obs, qpart)  # type: ignore[arg-type]
            if early is not None:
                io.labelled(io.metrics.preconditions, ex.route, "not_modified").inc()
                return 304, list(early.headers.items()), b""
        up_headers = self._upstream_headers(raw, remote, ex, REQUEST_DROP_TRACKED | named)
        t0 = time.perf_counter()
        async with io.send(match, target, method, up_headers, None, ex=ex) as up:  # type: ignore[arg-type,attr-defined]
            io.upstream_timing(ex, t0, up.status)
            out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid)
            data, _ = await up.read(1 << 20)
            version = obs.version  # type: ignore[attr-defined]
            variant = representation_variant(qpart, out, cfg.plain_types)
            if not version.exists:
                await io.timed_store(ex, "confirm", io.store.confirm(match.key, version.token))  # type: ignore[attr-defined]
            tag = make_etag(version.token, variant)
            if cfg.short_circuit:
                self.short.remember(ex.key, tag, Selected.of(qpart, headers, out))
            last_modified = version.minted_ms // 1000 if cfg.last_modified and not cfg.computed else None
            decision = evaluate(method, cond, Representation(version.token, tag, last_modified))
            if decision is Decision.NOT_MODIFIED:
                io.decided(ex, "not_modified")
                return 304, [("ETag", str(tag))], b""
            out["ETag"] = str(tag)
            if last_modified is not None:
                out["Last-Modified"] = format_http_date(last_modified)
            return up.status, list(out.items()), data

    async def _write(self, method: str, raw: list[tuple[bytes, bytes]], headers: CIMultiDictProxy[str],
                     body: bytes, remote: str, ex: Exchange, target: object, match: object,
                     named: frozenset[str]) -> Answer:
        io = self.io
        cfg = match.route.config  # type: ignore[attr-defined]
        cond = Conditionals.from_headers(headers)
        wcond = write_condition(cond)
        if cfg.require_if_match and not wcond.has_precondition:
            return 428, [], b""
        ex.bytes_in = len(body)
        up_headers = self._upstream_headers(raw, remote, ex, REQUEST_DROP_TRACKED | named)
        owner = random_hex(12)
        begun = await io.timed_store(
            ex, "begin", io.store.begin(match.key, wcond, owner, self.leases.lease_ms, self.leases.wait_ms)  # type: ignore[attr-defined]
        )
        io.metrics.lease_wait.observe(begun.waited_ms / 1000)  # type: ignore[attr-defined]
        if begun.status is BeginStatus.BUSY:  # type: ignore[attr-defined]
            return 409, [], b""
        if begun.status is BeginStatus.PRECONDITION_FAILED:  # type: ignore[attr-defined]
            io.decided(ex, "precondition_failed")
            return 412, [], b""
        t0 = time.perf_counter()
        async with io.send(match, target, method, up_headers, body, whole=True, ex=ex) as up:  # type: ignore[arg-type,attr-defined]
            io.upstream_timing(ex, t0, up.status)
            status = up.status
            outcome = write_outcome(status)
            out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid)
            data, _ = await up.read(1 << 20)
            committed = await self.leases.end(ex, match.key, owner, outcome)  # type: ignore[attr-defined]
            ex.decision = ex.decision or outcome.value
            fields = route_fields(match, body, None)  # type: ignore[arg-type]
            await self.after.invalidate(ex, match, fields)  # type: ignore[arg-type]
            if validators_allowed(status) and committed is not None:
                shown = await self.after.response_version(
                    ex, match, up, committed, target, headers.get("Host"), fields  # type: ignore[arg-type]
                )
                if shown is not None and cfg.etag_on_write:
                    version, dated = shown
                    out["ETag"] = str(make_etag(version.token))
                    if dated:
                        out["Last-Modified"] = format_http_date(version.minted_ms // 1000)
            return status, list(out.items()), data


class FeaturesProtocol(HttptoolsForwarder):
    """The httptools floor's connection, answering through `Features`. A
    request is queued with its raw header lines (the framing checks and
    the header rewriting read those) and its peer address."""

    def __init__(self, features: Features, date: _Date) -> None:
        super().__init__(None, date)
        self.features = features
        self.remote = ""
        self._raw: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""

    def on_message_begin(self) -> None:
        self._url, self._raw, self._body = b"", [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def _message(self) -> tuple[Any, ...]:
        major, _, minor = self.parser.get_http_version().partition(".")
        headers = CIMultiDictProxy(CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw))
        body = b"".join(self._body) if self._body else None
        return self.parser.get_method().decode(), self._url.decode("latin-1"), (int(major), int(minor)), \
            self._raw, headers, body

    async def _answer(self, message: tuple[Any, ...]) -> Answer:
        status, lines, data = await self.features.handle(*message, self.remote)
        # The server writes its own Date (the proxy would relay the upstream's).
        return status, [(k, v) for k, v in lines if k.lower() != "date"], data
