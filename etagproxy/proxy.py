"""The request handler: read -> decide -> forward -> commit -> respond.

Three paths, chosen per request:

- plain:  unmatched, passthrough routes, OPTIONS/TRACE/CONNECT; streamed
          both ways, nothing evaluated, upstream validators untouched.
- read:   GET/HEAD on a tracked route. The key's version is observed *before*
          the request is forwarded and that token is attached to a 2xx
          response. Attaching the pre-request token is what keeps reads
          safe: if a write lands while the GET is in flight, the body may be
          newer than the token, which can only make a later If-Match fail
          (a spurious 412), never let a stale one pass. A read that starts
          while a write holds the key gets no ETag at all (DESIGN §1).
- write:  every other method on a tracked route: DESIGN §2. Body read first
          (bounded), BEGIN (preconditions + lease), one forward with a hard
          deadline, END shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from etagproxy import headers as hdr
from etagproxy.config import Bulk, Config, RouteConfig
from etagproxy.etag import EntityTag, make_etag, parse_tag_list
from etagproxy.derived import derive_token
from etagproxy.bodyvars import BulkError, bulk_values, fields_for, json_document
from etagproxy.guard import ClientBodyError, arrived_body, client_chunks
from etagproxy.httpdate import format_http_date
from etagproxy.metrics import Metrics
from etagproxy.outcome import validators_allowed, write_outcome
from etagproxy.preconditions import Conditionals, Decision, Representation, evaluate, write_condition
from etagproxy.problems import problem
from etagproxy.randomness import random_hex
from etagproxy.routes import Match, Router, TemplateError, compile_template, expand
from etagproxy.store.base import (
    BeginStatus,
    Cause,
    Observation,
    Outcome,
    Replay,
    StoreError,
    Version,
    VersionStore,
    WriteCondition,
    evaluate_write,
)
from etagproxy.target import Target, TargetError, canonicalize
from etagproxy.upstream import Upstream, UpstreamError, body_errors, map_body_error

log = logging.getLogger("etagproxy")

# Methods get their own metric label; any other token is counted as OTHER,
# so a client cannot grow the label set.
METRIC_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

READ_METHODS = frozenset({"GET", "HEAD"})
UNTRACKED_METHODS = frozenset({"OPTIONS", "TRACE", "CONNECT"})
CHUNK = 1 << 16
DRAIN_LIMIT = 1 << 16  # bodies up to this size are read to keep a connection
COALESCE = 1 << 16  # GET bodies up to this size (by Content-Length) are sent in one write
REPLAY_MAX = 1 << 20  # write responses up to this size are recorded for Idempotency-Key replays
BULK_METHODS = frozenset({"PUT", "PATCH", "DELETE"})  # on a bulk route, a JSON array body names members

# RFC 9110 §15.4.5: a 304 carries these fields when a 200 would have.
NOT_MODIFIED_FIELDS = ("Cache-Control", "Content-Location", "Date", "Expires", "Vary")

# Fields a tracked route never passes upstream: the proxy evaluated them.
# (`upstream_conditionals: true` forwards them as well.)
REQUEST_DROP_TRACKED = hdr.CONDITIONALS | {"expect"}
REQUEST_DROP_PLAIN = frozenset({"expect"})
# The `authorize: upstream` probe carries the caller's credentials, not its body.
AUTHORIZE_DROP = frozenset(
    {"content-type", "content-encoding", "content-language", "content-location",
     "content-range", "content-digest", "repr-digest", "digest", "idempotency-key"}
)
RESPONSE_DROP_TRACKED = frozenset({"etag", "last-modified"})

# What `short_circuit` remembers of a representation's 2xx (Date is the 304's own).
SELECTED_FIELDS = frozenset(name.lower() for name in NOT_MODIFIED_FIELDS) - {"date"}
SELECTED_MAX = 10_000


class BodyTooLarge(Exception):
    pass


class _HeldResponse(web.StreamResponse):
    """A relayed response whose body is at hand: its headers go out with the
    first piece of body, in one system call (a plain StreamResponse sends
    them on their own as soon as it is prepared)."""

    _send_headers_immediately = False


@dataclass(frozen=True, slots=True)
class Selected:
    """How a 2xx read selected one representation, kept per process so that
    `short_circuit` can answer 304 for it without the upstream.

    RFC 9111 §4.1: a response stands in for another request only if the
    request fields its `Vary` names match. RFC 9110 §15.4.5: the 304 carries
    the Cache-Control, Content-Location, Expires and Vary the 200 would.
    Another process (a replica on the same Redis) has no record and forwards.
    """

    qpart: str
    """The query part of the tag (the non-key parameters)."""
    vary: tuple[tuple[str, tuple[str, ...]], ...] | None
    """Each field `Vary` named (lower case) with the request's values; None for `Vary: *`."""
    fields: tuple[tuple[str, str], ...]
    """The 2xx's lines of SELECTED_FIELDS."""

    @classmethod
    def of(cls, qpart: str, request: CIMultiDictProxy[str], response: CIMultiDict[str]) -> Selected:
        names = sorted(
            {f.strip().lower() for line in response.getall("Vary", ()) for f in line.split(",") if f.strip()}
        )
        vary = None if "*" in names else tuple((n, tuple(request.getall(n, ()))) for n in names)
        fields = tuple((k, v) for k, v in response.items() if k.lower() in SELECTED_FIELDS)
        return cls(qpart, vary, fields)

    def selects(self, qpart: str, request: CIMultiDictProxy[str]) -> bool:
        """Whether `request` would select this representation again."""
        return (
            self.vary is not None
            and qpart == self.qpart
            and all(tuple(request.getall(n, ())) == values for n, values in self.vary)
        )


@dataclass(slots=True)
class Exchange:
    """What one request did; feeds the access log and metrics."""

    rid: str
    method: str
    start: float = field(default_factory=time.perf_counter)
    route: str = "-"
    key: str = ""
    status: int = 0
    upstream_status: int | None = None
    decision: str = ""
    store_ms: float = 0.0
    upstream_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str = ""
    creds: str | None = None
    """credential_hash of the request, computed at most once."""
    members: tuple[str, ...] = ()
    """Keys of the members a bulk write leased besides its own."""
    verified_at: float = 0.0
    """When the upstream's version was read for a write (perf_counter)."""
    upstream_validator: str | None = None
    """The validator the verify read found, to send on as If-Match
    (`version: {from: header, upstream_if_match: true}`)."""


def credential_hash(headers: CIMultiDict[str] | object) -> str:
    """Who is asking, as far as the upstream's authorisation can tell."""
    get = headers.getall  # type: ignore[attr-defined]
    h = hashlib.blake2b(digest_size=16, person=b"etagproxy-cred")
    for value in get("Authorization", ()):
        h.update(b"a" + value.encode("latin-1", "replace") + b"\0")
    for value in get("Cookie", ()):
        h.update(b"c" + value.encode("latin-1", "replace") + b"\0")
    return h.hexdigest()


def _short_hash(data: str, size: int) -> str:
    return hashlib.blake2b(data.encode("utf-8", "surrogateescape"), digest_size=size).hexdigest()


def query_variant(target: Target, key_query: Collection[str]) -> str:
    """The part of a representation tag chosen by non-key query parameters.

    `key_query` holds the names in canonical encoded form (`Route.key_query`),
    the spelling `Target.params()` yields.
    """
    if not target.query:
        return ""
    extra = sorted(f"{n}={v}" for n, v in target.params() if n not in key_query)
    return "q" + _short_hash("&".join(extra), 4) if extra else ""


def representation_variant(
    qpart: str, up_headers: CIMultiDict[str] | object, plain_types: Collection[str] = ("application/json",),
) -> str:
    """`<variant>` of `"<token>-<variant>"`; '' for the plain representation.

    RFC 9110 §8.8.3.3: representations that differ (query, negotiated
    content type, content coding) must not share a strong validator.
    The content type counts only when the upstream says it negotiates on
    Accept (`Vary`), and not for the `plain_types` it serves by default
    (JSON for DRF and NetBox: no Accept, `*/*`, `application/json` all get
    the same bytes), so the default representation carries the plain tag a
    write returns; the content coding always counts.
    """
    get = up_headers.get  # type: ignore[attr-defined]
    getall = up_headers.getall  # type: ignore[attr-defined]
    parts = [qpart] if qpart else []
    # List fields may come as several lines (RFC 9110 §5.3).
    vary = ", ".join(getall("Vary", ()))
    if vary:
        fields = {f.strip().lower() for f in vary.split(",")}
        if "accept" in fields or "*" in fields:
            content_type = get("Content-Type", "")
            if content_type.partition(";")[0].strip().lower() not in plain_types:
                parts.append("t" + _short_hash(content_type, 3))
    coding = ", ".join(getall("Content-Encoding", ()))
    if coding:
        codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if codings:
            joined = ".".join(codings)
            parts.append("e" + (joined if joined.isalnum() or _tchars(joined) else _short_hash(joined, 3)))
    return "-".join(parts)


def _tchars(value: str) -> bool:
    return all(c.isalnum() or c in "._" for c in value)


class Proxy:
    """Holds what the handler needs; `handle` is the aiohttp handler."""

    def __init__(
        self,
        config: Config,
        router: Router,
        store: VersionStore,
        upstream: Upstream,
        metrics: Metrics,
        on_exchange: Callable[[Exchange], None] | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.on_exchange = on_exchange
        self.trusted = hdr.TrustedProxies(config.trusted_proxies)
        self.tasks: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: dict[tuple[int, tuple[object, ...]], Any] = {}
        self.selected: OrderedDict[tuple[str, str], Selected] = OrderedDict()
        t = config.timeouts
        # The lease outlives the upstream deadline by the time BEGIN's answer
        # and END's request can take (DESIGN §2.3: strictly shorter).
        # With min_replicas, BEGIN's answer can take min_replicas_timeout more.
        self.lease_ms = int(
            (t.upstream + 2 * t.store + config.store.min_replicas_timeout * (config.store.min_replicas > 0) + 1.0)
            * 1000
        )
        self.wait_ms = int(t.write_wait * 1000)
        self.retry_after = str(max(1, int(t.write_wait + 0.999)))

    # -- plumbing ------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once: `asyncio.get_running_loop()`
        (and `ensure_future`, which calls it) is a system call on 3.11."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def spawn(self, coro: object) -> None:
        """Run a background task and keep a reference until it is done."""
        task = self.loop.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _timed_store(self, ex: Exchange, op: str, coro: object) -> object:
        t0 = time.perf_counter()
        try:
            return await coro  # type: ignore[misc]
        except StoreError:
            self.metrics.store_errors.labels(op).inc()
            raise
        finally:
            dt = time.perf_counter() - t0
            ex.store_ms += dt * 1000
            self._labelled(self.metrics.store_latency, op).observe(dt)

    def _labelled(self, metric: Any, *values: object) -> Any:
        """`metric.labels(*values)`, memoised: the label sets are bounded
        (route templates, methods, statuses) and `labels()` costs a few
        microseconds per call on the hot path."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*(str(v) for v in values))
        return child

    @staticmethod
    def _creds(request: web.BaseRequest, ex: Exchange) -> str:
        if ex.creds is None:
            ex.creds = credential_hash(request.headers)
        return ex.creds

    def _minted(self, cause: Cause | None) -> None:
        if cause is not None:
            self.metrics.tokens_minted.labels(cause.value).inc()

    # -- entry point -----------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ex = Exchange(hdr.request_id(request.headers.get("X-Request-ID")), request.method)
        self.metrics.in_flight.inc()
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
            self.metrics.in_flight.dec()
        ex.status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-ID"] = ex.rid
        method = ex.method if ex.method in METRIC_METHODS else "OTHER"
        self._labelled(self.metrics.requests, ex.route, method, resp.status).inc()
        if self.on_exchange is not None:
            self.on_exchange(ex)
        return resp

    async def _dispatch(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
        named = hdr.connection_tokens(request.headers.getall("Connection", ()))
        hdr.check_connection(named)
        target = canonicalize(request.raw_path, host=request.headers.get("Host"))
        match = self.router.match(request.method, target)
        if match is None:
            return await self._plain(request, ex, target, None, named)
        ex.route = match.route.template
        cfg: RouteConfig = match.route.config
        if cfg.mode != "track" or request.method in UNTRACKED_METHODS:
            return await self._plain(request, ex, target, match, named)
        ex.key = match.key
        if request.method in READ_METHODS:
            if cfg.version is not None:
                return await self._read_derived(request, ex, target, match, named)
            return await self._read(request, ex, target, match, named)
        return await self._write(request, ex, target, match, named)

    # -- forwarding helpers ----------------------------------------------------

    def _upstream_headers(
        self, request: web.BaseRequest, ex: Exchange, drop: frozenset[str], *, keep_framing: bool
    ) -> CIMultiDict[str]:
        peer = request.remote
        out = hdr.upstream_request_headers(
            request.raw_headers,
            drop=drop,
            peer=peer,
            trusted=peer in self.trusted,
            proto="https" if request.secure else "http",
            via=self.config.via,
            rid=ex.rid,
            keep_framing=keep_framing,
        )
        if keep_framing and request.content_length is not None and "Content-Length" in out:
            # Framed afresh: the parsed number, never the client's spelling ("005").
            out["Content-Length"] = str(request.content_length)
        return out

    def _client_body(self, request: web.BaseRequest, ex: Exchange) -> AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None

        async def gen() -> AsyncIterator[bytes]:
            await self._continue(request)
            async for chunk in client_chunks(request, CHUNK, self.config.timeouts.body_read):
                ex.bytes_in += len(chunk)
                yield chunk

        return gen()

    async def _continue(self, request: web.BaseRequest) -> None:
        """Answer `Expect: 100-continue` once the proxy wants the body."""
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            if request.writer is not None:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # type: ignore[attr-defined]

    async def _relay(
        self,
        request: web.BaseRequest,
        ex: Exchange,
        up: object,
        headers: CIMultiDict[str],
        *,
        body: bytes | None = None,
        more: bool = False,
    ) -> web.StreamResponse:
        """Send the upstream's status, `headers` and body: streamed, or
        `body` if it was read already (`more`: only its start was read)."""
        status = up.status  # type: ignore[attr-defined]
        length = up.content_length  # type: ignore[attr-defined]
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        if body is None and not no_body and length is not None and length <= COALESCE and request.method == "GET":
            # A small body is read whole and sent with the headers: one
            # write to the client instead of one per piece that arrives. A
            # body that breaks now is a 502 rather than a truncated 2xx
            # (reads only: a write's 2xx means it landed).
            body, complete = await up.read(length)  # type: ignore[attr-defined]
            more = not complete
        held = body is not None or up.body_ready  # type: ignore[attr-defined]
        resp = (_HeldResponse if held else web.StreamResponse)(
            status=status, reason=up.reason, headers=headers  # type: ignore[attr-defined]
        )
        if body is not None and not more:
            resp.content_length = len(body)
        elif length is not None:
            resp.content_length = length
        await resp.prepare(request)
        if no_body and body is None:
            await resp.write_eof()
            return resp
        try:
            if body is not None and request.method != "HEAD":
                await resp.write(body)
                ex.bytes_out += len(body)
            if body is None or more:
                async for chunk in up.iter_chunks():  # type: ignore[attr-defined]
                    await resp.write(chunk)
                    ex.bytes_out += len(chunk)
            await resp.write_eof()
        except body_errors() as exc:
            # Headers are gone already: the only honest signal left is to
            # cut the connection so the client sees a truncated message.
            ex.error = map_body_error(exc).kind
            self.metrics.upstream_errors.labels(ex.error).inc()
            if request.transport is not None:
                request.transport.abort()
        except ConnectionResetError:
            ex.error = "client-gone"
        return resp

    def _upstream_failed(self, ex: Exchange, exc: UpstreamError) -> web.Response:
        ex.error = exc.kind
        self.metrics.upstream_errors.labels(exc.kind).inc()
        if exc.status == 504:
            detail = "The upstream did not answer in time. Re-read the resource before retrying a write."
        else:
            detail = "The upstream could not be reached or broke the connection."
        return problem(exc.status, exc.kind, detail)

    def _send(
        self, match: Match | None, target: Target, method: str, headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None, *, whole: bool = False,
    ) -> object:
        base = match.route.config.upstream if match is not None else self.config.upstream
        url = self.upstream.url(base or self.config.upstream, target.raw)
        return self.upstream.request(
            method, url, headers, body, timeout=self.config.timeouts.upstream, whole=whole
        )

    # -- plain -------------------------------------------------------------------

    async def _plain(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match | None,
        named: frozenset[str],
    ) -> web.StreamResponse:
        tracked = match is not None and match.route.config.mode == "track"
        headers = self._upstream_headers(
            request, ex, REQUEST_DROP_PLAIN | named, keep_framing=True
        )
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, self._client_body(request, ex)) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(
                    up.raw_headers,
                    drop=RESPONSE_DROP_TRACKED if tracked else frozenset(),
                    via=self.config.via,
                    rid=ex.rid,
                )
                return await self._relay(request, ex, up, out)
        except UpstreamError as exc:
            return self._upstream_failed(ex, exc)

    def _upstream_timing(self, ex: Exchange, t0: float, status: int) -> None:
        dt = time.perf_counter() - t0
        ex.upstream_ms = dt * 1000
        ex.upstream_status = status
        self._labelled(self.metrics.upstream_latency, ex.route).observe(dt)

    # -- read ----------------------------------------------------------------------

    async def _read(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        cond = Conditionals.from_headers(request.headers)
        # Credentials that get a 2xx are remembered for short_circuit and for
        # etag_in_412: the proxy only tells the current token to them. A
        # `public` route tells it to anyone, so it needs no record.
        reader = (
            self._creds(request, ex) if (cfg.short_circuit or cfg.etag_in_412) and not cfg.public else None
        )
        obs: Observation | None
        try:
            obs = await self._timed_store(ex, "observe", self.store.observe(match.key, reader=reader))  # type: ignore[assignment]
        except StoreError:
            obs = None
        if obs is not None:
            self._minted(obs.minted)
        qpart = query_variant(target, match.route.key_query)
        if obs is not None and cfg.short_circuit and not obs.pending and cond.if_none_match:
            early = self._short_circuit(request, ex, cfg, cond, obs, qpart, reader)
            if early is not None:
                return early

        headers = self._read_headers(request, ex, cfg, cond, named)
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, self._client_body(request, ex)) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid
                )
                if obs is None or obs.pending or not 200 <= up.status < 300:
                    ex.decision = "pending" if obs is not None and obs.pending else ""
                    return await self._relay(request, ex, up, out)
                version: Version | None = obs.version
                body: bytes | None = None
                more = False
                # Only the full representation without extra parameters or a
                # content coding is hashed: the others differ in bytes by
                # nature (and gzip output need not be stable), and one digest
                # per key would flip between them, minting on every read.
                coding = out.get("Content-Encoding", "identity").strip().lower()
                if (
                    cfg.fingerprint and request.method == "GET" and up.status == 200
                    and not qpart and coding == "identity"
                ):
                    body, complete, version = await self._fingerprint(ex, match, up, version)
                    more = not complete
                    if version is None:
                        ex.decision = "moved"
                        return await self._relay(request, ex, up, out, body=body, more=more)
                assert version is not None
                variant = representation_variant(qpart, out, cfg.plain_types)
                if cfg.computed:
                    # The tag also names the bytes: content computed from
                    # other resources changes without a write here.
                    if body is None and request.method == "GET":
                        body, complete = await up.read(self.config.limits.fingerprint_max)  # type: ignore[attr-defined]
                        more = not complete
                    if body is None or more:
                        ex.decision = "computed_unhashed"
                        return await self._relay(request, ex, up, out, body=body, more=more)
                    digest = "h" + hashlib.blake2b(body, digest_size=8).hexdigest()
                    variant = f"{variant}-{digest}" if variant else digest
                if not version.exists:
                    try:
                        await self._timed_store(ex, "confirm", self.store.confirm(match.key, version.token))
                    except StoreError:
                        pass
                if reader is not None and not obs.reader_seen:
                    # (Once seen, the record stands until its TTL; the next
                    # read after that records it again.)
                    self.spawn(self._record_reader(match.key, reader, cfg))
                tag = make_etag(version.token, variant)
                if cfg.short_circuit:
                    self._remember(ex.key, tag, Selected.of(qpart, request.headers, out))
                # A computed representation changes at times the version
                # does not record, so it gets no date to be compared with.
                last_modified = version.minted_ms // 1000 if cfg.last_modified and not cfg.computed else None
                return await self._answer_read(
                    request, ex, up, out, cond, Representation(version.token, tag, last_modified), body, more
                )
        except UpstreamError as exc:
            return self._upstream_failed(ex, exc)

    def _read_headers(
        self, request: web.BaseRequest, ex: Exchange, cfg: RouteConfig, cond: Conditionals,
        named: frozenset[str],
    ) -> CIMultiDict[str]:
        """The request headers a read forwards."""
        drop = named if cfg.upstream_conditionals else (REQUEST_DROP_TRACKED | named)
        if not cfg.upstream_conditionals and cond.range is not None and cond.if_range is not None:
            # If-Range is evaluated here after the fact; without it the
            # upstream must not answer a partial response.
            drop = drop | {"range"}
        return self._upstream_headers(request, ex, drop, keep_framing=True)

    async def _answer_read(
        self, request: web.BaseRequest, ex: Exchange, up: object, out: CIMultiDict[str],
        cond: Conditionals, rep: Representation, body: bytes | None, more: bool,
    ) -> web.StreamResponse:
        """Evaluate the read's preconditions against `rep` (§13.2.2) and answer
        304, 412, or the upstream's 2xx with the validators."""
        decision = evaluate(request.method, cond, rep)
        if decision is not Decision.PROCEED and body is None and request.method == "GET":
            # The body is not sent; reading a small one to its end keeps the
            # upstream connection reusable.
            await up.read(DRAIN_LIMIT)  # type: ignore[attr-defined]
        tag = rep.etag
        if decision is Decision.NOT_MODIFIED and tag is not None:
            ex.decision = "not_modified"
            self.metrics.preconditions.labels(ex.route, "not_modified").inc()
            return self._not_modified(ex, tag, out, None)
        if decision is Decision.PRECONDITION_FAILED:
            ex.decision = "precondition_failed"
            self.metrics.preconditions.labels(ex.route, "precondition_failed").inc()
            return problem(
                412, "precondition-failed",
                "The resource has changed since the version named in the precondition. "
                "Re-read it and retry with the new ETag.",
            )
        if tag is not None:
            out["ETag"] = str(tag)
        if rep.last_modified is not None:
            out["Last-Modified"] = format_http_date(rep.last_modified)
        return await self._relay(request, ex, up, out, body=body, more=more)

    async def _read_derived(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        """A read on a route whose version comes from the upstream's answer:
        the tag names exactly the version in this body, so no store and no
        pending-write check is needed; a body that does not name its version
        goes out without a tag."""
        cfg: RouteConfig = match.route.config
        source = cfg.version
        assert source is not None
        cond = Conditionals.from_headers(request.headers)
        qpart = query_variant(target, match.route.key_query)
        headers = self._read_headers(request, ex, cfg, cond, named)
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, self._client_body(request, ex)) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid
                )
                if not 200 <= up.status < 300:
                    return await self._relay(request, ex, up, out)
                body: bytes | None = None
                more = False
                if source.needs_body and request.method == "GET":
                    body, complete = await up.read(self.config.limits.fingerprint_max)  # type: ignore[attr-defined]
                    more = not complete
                token = None if more else derive_token(source, match.key, up.headers, body)  # type: ignore[attr-defined]
                if token is None:
                    ex.decision = "unversioned"
                    return await self._relay(request, ex, up, out, body=body, more=more)
                variant = representation_variant(qpart, out, cfg.plain_types)
                tag = make_etag(token, variant)
                return await self._answer_read(
                    request, ex, up, out, cond, Representation(token, tag, None), body, more
                )
        except UpstreamError as exc:
            return self._upstream_failed(ex, exc)

    def _short_circuit(
        self, request: web.BaseRequest, ex: Exchange, cfg: RouteConfig, cond: Conditionals,
        obs: Observation, qpart: str, reader: str | None,
    ) -> web.StreamResponse | None:
        """Answer 304 from the store when it is safe to skip the upstream."""
        if not (cfg.public or obs.reader_seen):
            return None
        if cond.if_match is not None or cond.if_unmodified_since is not None:
            return None
        tags = parse_tag_list(cond.if_none_match)
        if tags is None or tags.any or tags.malformed:
            return None
        token = obs.version.token
        for tag in tags.tags:
            # The version must be current, and this request must select the
            # representation the tag was given to (weak comparison, §13.1.2).
            seen = self.selected.get((ex.key, tag.opaque)) if tag.token == token else None
            if seen is None or not seen.selects(qpart, request.headers):
                continue
            ex.decision = "short_circuit"
            self.metrics.preconditions.labels(ex.route, "not_modified").inc()
            headers: CIMultiDict[str] = CIMultiDict(seen.fields)
            headers["Via"] = f"1.1 {self.config.via}"
            headers["X-Request-ID"] = ex.rid
            return self._not_modified(ex, EntityTag(tag.opaque), headers, obs.version)
        return None

    def _remember(self, key: str, tag: EntityTag, selected: Selected) -> None:
        """Keep how `tag` was selected, for `_short_circuit` (bounded, LRU)."""
        self.selected[(key, tag.opaque)] = selected
        self.selected.move_to_end((key, tag.opaque))
        if len(self.selected) > SELECTED_MAX:
            self.selected.popitem(last=False)

    def _not_modified(
        self, ex: Exchange, tag: EntityTag, upstream_headers: CIMultiDict[str], version: Version | None
    ) -> web.Response:
        resp = web.Response(status=304)
        for name in NOT_MODIFIED_FIELDS:
            for value in upstream_headers.getall(name, ()):
                resp.headers.add(name, value)
        resp.headers["ETag"] = str(tag)
        resp.headers["Via"] = upstream_headers.get("Via", f"1.1 {self.config.via}")
        resp.headers["X-Request-ID"] = ex.rid
        return resp

    async def _fingerprint(
        self, ex: Exchange, match: Match, up: object, version: Version
    ) -> tuple[bytes | None, bool, Version | None]:
        """Hash a bounded body; a changed hash means a write bypassed us.

        Returns what was read of the body, whether that is all of it (a
        larger body is not fingerprinted and streams on), and the version.
        """
        limit = self.config.limits.fingerprint_max
        length = up.content_length  # type: ignore[attr-defined]
        if length is not None and length > limit:
            return None, False, version
        body, complete = await up.read(limit)  # type: ignore[attr-defined]
        if not complete or len(body) > limit:
            return body, False, version
        digest = hashlib.blake2b(body, digest_size=16).hexdigest()
        try:
            moved = await self._timed_store(ex, "fingerprint", self.store.fingerprint(match.key, version.token, digest))
        except StoreError:
            return body, True, None
        if moved is not None and moved.token != version.token:  # type: ignore[attr-defined]
            # A write bypassed the proxy. Which body is the newer one cannot
            # be told from here (reads finish out of order): this read goes
            # out without ETag, the next one gets the new token.
            self._minted(Cause.FINGERPRINT)
            return body, True, None
        return body, True, moved  # type: ignore[return-value]

    async def _record_reader(self, key: str, reader: str, cfg: RouteConfig) -> None:
        try:
            await self.store.record_reader(key, reader, int(cfg.short_circuit_ttl * 1000))
        except StoreError:
            self.metrics.store_errors.labels("record_reader").inc()

    # -- write -----------------------------------------------------------------------

    async def _read_body(self, request: web.BaseRequest, ex: Exchange) -> bytes:
        limit = self.config.limits.max_body
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge
        if not request.body_exists:
            return b""
        await self._continue(request)
        whole = arrived_body(request)
        if whole is not None:
            if len(whole) > limit:
                raise BodyTooLarge
            ex.bytes_in = len(whole)
            return whole
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.config.timeouts.body_read):
            # client_chunks turns a client that hangs up mid-body into a
            # ClientBodyError (400), not an internal error.
            async for chunk in client_chunks(request, CHUNK, self.config.timeouts.body_read):
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
        ex.bytes_in = size
        return b"".join(chunks)

    async def _write(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        cond = Conditionals.from_headers(request.headers)
        wcond = write_condition(cond)
        # With a version from the upstream there is no modification date:
        # only If-Match and If-None-Match can be checked (§13.1.4).
        checked = (
            wcond.has_precondition if cfg.version is None
            else wcond.if_match is not None or wcond.if_none_match is not None
        )
        if cfg.require_if_match and not checked:
            ex.decision = "precondition_required"
            self.metrics.preconditions.labels(ex.route, "precondition_required").inc()
            return problem(
                428, "precondition-required",
                "This resource requires a conditional write. GET it, then repeat the request "
                "with `If-Match: <the ETag you received>`.",
            )
        # DESIGN §2.1: the whole body before anything else, so a slow client
        # never holds the resource.
        try:
            body = await self._read_body(request, ex)
        except BodyTooLarge:
            return problem(
                413, "body-too-large",
                f"The request body exceeds the limit of {self.config.limits.max_body} bytes.",
                headers=(("Connection", "close"),),
            )
        except TimeoutError:
            return problem(
                408, "body-timeout", "The request body did not arrive in time.",
                headers=(("Connection", "close"),),
            )
        members: list[str] = []
        if cfg.bulk is not None and request.method in BULK_METHODS:
            try:
                members = self._bulk_members(match, cfg.bulk, body)
            except BulkError as exc:
                return problem(exc.status, "bulk-members", str(exc))
        drop = named if cfg.upstream_conditionals else (REQUEST_DROP_TRACKED | named)
        headers = self._upstream_headers(request, ex, drop, keep_framing=False)
        # Unique per write: the request id may come from the client.
        owner = random_hex(12)
        try:
            # A version from the upstream is checked against the upstream
            # below; the store's lease still serialises the proxy's writes.
            stored = wcond if cfg.version is None else WriteCondition()
            begun = await self._timed_store(
                ex, "begin", self.store.begin(match.key, stored, owner, self.lease_ms, self.wait_ms)
            )
        except StoreError:
            if cfg.on_store_error == "fail_open":
                ex.decision = "store_unavailable_open"
                try:
                    return await self._forward_unchecked(request, ex, target, match, headers, body)
                finally:
                    # The write went through unchecked: once the store
                    # answers again, every token it may have outdated must go
                    # (after the forward, so no reader pairs a new token with
                    # an old body).
                    self.spawn(self._release_unanswered(
                        match.key, owner, Outcome.UNKNOWN,
                        [match.key, *members, *self.router.invalidation_keys(match, self._fields(match, body))],
                    ))
            # BEGIN may have run even though its answer never came: give the
            # lease back (nothing was forwarded) rather than leave the key
            # locked until its deadline.
            self.spawn(self._release_unanswered(match.key, owner))
            ex.decision = "store_unavailable"
            return problem(
                503, "store-unavailable",
                "The version store is unavailable, so the write was not forwarded. Retry later.",
                headers=(("Retry-After", "1"),),
            )
        except asyncio.CancelledError:
            # Shut down mid-BEGIN: it may have taken the lease; give it back.
            self.spawn(self._release_unanswered(match.key, owner))
            raise
        self.metrics.lease_wait.observe(begun.waited_ms / 1000)  # type: ignore[attr-defined]
        if begun.status is BeginStatus.BUSY:  # type: ignore[attr-defined]
            ex.decision = "busy"
            self.metrics.preconditions.labels(ex.route, "busy").inc()
            return problem(
                409, "write-in-progress",
                "Another write to this resource is in progress. Retry after a moment.",
                headers=(("Retry-After", self.retry_after),),
            )
        if begun.status is BeginStatus.PRECONDITION_FAILED:  # type: ignore[attr-defined]
            return await self._precondition_failed(request, ex, target, match, cond, body, begun.current)  # type: ignore[attr-defined]
        if members:
            refused = await self._lease_members(ex, match.key, owner, members)
            if refused is not None:
                return refused
        if cfg.version is not None and checked:
            try:
                refused = await self._verify(request, ex, target, match, wcond)
            except UpstreamError as exc:
                refused = self._upstream_failed(ex, exc)
            except BaseException:
                await self._end(ex, match.key, owner, Outcome.REJECTED)
                raise
            if refused is not None:
                await self._end(ex, match.key, owner, Outcome.REJECTED)
                return refused
            if ex.upstream_validator is not None:
                # The upstream re-checks the version under its own lock.
                headers["If-Match"] = ex.upstream_validator
        return await self._forward_write(request, ex, target, match, headers, body, owner, cond)

    async def _verify(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match, wcond: WriteCondition
    ) -> web.StreamResponse | None:
        """Check the write's preconditions against the version the upstream
        holds now, under the write's lease: GET the resource with the
        caller's credentials and derive its version. None: forward the write.

        A non-2xx answer is relayed (§13.2.1: preconditions are ignored when
        the request without them would fail), except a 404/410 when the
        write may create (PUT/PATCH with `If-None-Match: *` passes, If-Match
        gets 412). The window in which a write bypassing the proxy can still
        be overwritten runs from the end of this read to the upstream
        applying the write (`etagproxy_verify_window_seconds`).
        """
        source = match.route.config.version
        assert source is not None
        headers = self._probe_headers(request, ex)
        current: Version | None = None
        async with self._send(match, target, "GET", headers, None) as up:  # type: ignore[attr-defined]
            out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid)
            if 200 <= up.status < 300:
                body, complete = await up.read(self.config.limits.fingerprint_max)
                token = derive_token(source, match.key, up.headers, body) if complete else None
                if token is None:
                    ex.decision = "version_unavailable"
                    return problem(
                        502, "version-unavailable",
                        "The upstream's representation does not name its version, so the "
                        "precondition cannot be checked; the write was not forwarded.",
                    )
                current = Version(token, 0)
                if source.upstream_if_match:
                    ex.upstream_validator = up.headers.get(source.header)
            elif up.status in (404, 410) and request.method != "DELETE":
                current = None
            else:
                ex.decision = "authorize_refused"
                ex.upstream_status = up.status
                return await self._relay(request, ex, up, out)
        ex.verified_at = time.perf_counter()
        return None if evaluate_write(wcond, current) else self._write_refused(ex)

    def _write_refused(
        self, ex: Exchange, headers: Sequence[tuple[str, str]] = (), **extra: object
    ) -> web.Response:
        """412 for a write whose precondition failed; nothing was forwarded."""
        ex.decision = "precondition_failed"
        self.metrics.preconditions.labels(ex.route, "precondition_failed").inc()
        return problem(
            412, "precondition-failed",
            "The resource has changed since the version named in the precondition; "
            "the write was not applied. Re-read it and retry with the new ETag.",
            headers=headers, **extra,
        )

    def _bulk_members(self, match: Match, bulk: Bulk, body: bytes) -> list[str]:
        """Keys of the members a bulk body names, sorted (so two bulk writes
        lease shared members in one order); [] when the body is no array."""
        values = bulk_values(json_document(body), bulk.field, bulk.max_members)
        if not values:
            return []
        name = compile_template(bulk.member).names[0]
        keys: set[str] = set()
        for value in values:
            try:
                found = self.router.key_for(canonicalize(expand(bulk.member, {name: value})))
            except (TemplateError, TargetError):
                raise BulkError(f"{bulk.field} {value!r} does not name a member.") from None
            if found is None or not found.route.tracked:
                raise BulkError(f"{bulk.field} {value!r} does not name a tracked member.")
            if found.key != match.key:
                keys.add(found.key)
        return sorted(keys)

    async def _lease_members(
        self, ex: Exchange, key: str, owner: str, members: list[str]
    ) -> web.StreamResponse | None:
        """Lease every member of a bulk write under the write's owner, after
        its own key: no member write interleaves with it, and END versions
        each member by the outcome, as a member write would. None when all
        are held; otherwise everything taken is given back and the answer is
        409 (a member is being written) or 503 (the store failed)."""
        taken: list[str] = []
        failure: web.StreamResponse | None = None
        for member in members:
            try:
                begun = await self._timed_store(
                    ex, "begin", self.store.begin(member, WriteCondition(), owner, self.lease_ms, self.wait_ms)
                )
            except StoreError:
                self.spawn(self._release_unanswered(member, owner))
                failure = problem(
                    503, "store-unavailable",
                    "The version store is unavailable, so the write was not forwarded. Retry later.",
                    headers=(("Retry-After", "1"),),
                )
                break
            if begun.status is not BeginStatus.OK:  # type: ignore[attr-defined]
                ex.decision = "busy"
                self.metrics.preconditions.labels(ex.route, "busy").inc()
                failure = problem(
                    409, "write-in-progress",
                    "Another write to a member named in this bulk request is in progress. "
                    "Retry after a moment.",
                    headers=(("Retry-After", self.retry_after),),
                )
                break
            taken.append(member)
        if failure is None:
            ex.members = tuple(members)
            return None
        ex.members = tuple(taken)
        await self._end(ex, key, owner, Outcome.REJECTED)
        return failure

    @staticmethod
    def _fields(match: Match, body: bytes, response: bytes | None = None) -> dict[str, str]:
        """Values of `{body.x}` / `{response.x}` in the route's templates."""
        route = match.route
        documents: dict[str, object] = {}
        if route.reads_request:
            documents["body"] = json_document(body)
        if response is not None and route.reads_response:
            documents["response"] = json_document(response)
        return fields_for(route.body_names, documents) if documents else {}

    async def _release_unanswered(
        self, key: str, owner: str, outcome: Outcome = Outcome.REJECTED, mint: list[str] | None = None
    ) -> None:
        """END(`outcome`) for a BEGIN whose reply was lost, then mint new
        tokens for `mint`. The store may run BEGIN and END out of order
        (different connections), so END is tried a few times over 1.5 s; it
        touches the key only if `owner` holds it."""
        delay = 0.05
        for _ in range(5):
            try:
                result = await self.store.end(key, owner, outcome)
                if not result.lease_lost:
                    break
            except StoreError:
                pass
            await asyncio.sleep(delay)  # backoff between retries, not a guess at an event
            delay *= 2
        if mint:
            for _ in range(5):
                try:
                    await self.store.invalidate(mint)
                    return
                except StoreError:
                    await asyncio.sleep(delay)
                    delay *= 2

    def _replay_fingerprint(
        self, request: web.BaseRequest, ex: Exchange, cond: Conditionals, body: bytes
    ) -> str:
        h = hashlib.blake2b(digest_size=16, person=b"etagproxy-rply")
        h.update((request.method + "\0" + (cond.if_match or "") + "\0").encode("latin-1", "replace"))
        h.update(self._creds(request, ex).encode() + b"\0")
        h.update(body)
        return h.hexdigest()

    @staticmethod
    def _idempotency_key(request: web.BaseRequest) -> str | None:
        value = request.headers.get("Idempotency-Key")
        if not value or len(value) > 255:
            return None
        return hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16).hexdigest()

    async def _precondition_failed(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        cond: Conditionals, body: bytes, current: Version | None,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        idem = self._idempotency_key(request) if cfg.replay_ttl > 0 else None
        if idem is not None:
            try:
                record = await self._timed_store(ex, "get_replay", self.store.get_replay(match.key, idem))
            except StoreError:
                record = None
            if isinstance(record, Replay) and record.fingerprint == self._replay_fingerprint(request, ex, cond, body):
                ex.decision = "replayed"
                self.metrics.preconditions.labels(ex.route, "replayed").inc()
                resp = web.Response(status=record.status, body=record.body)
                for name, value in record.headers:
                    resp.headers.add(name, value)
                resp.headers["X-Request-ID"] = ex.rid
                resp.headers["Idempotency-Replayed"] = "true"
                return resp
        authorized = False
        # A DELETE of a resource the proxy knows no current version of
        # (deleted, or never seen): RFC 9110 §13.2.1 ignores preconditions
        # when the request without them would not get a 2xx, so a repeat
        # DELETE gets the upstream's 404, not a 412. The DELETE itself is
        # never forwarded; a HEAD/GET probe asks whether the resource is
        # there. Other methods keep their 412: a PUT or PATCH to a missing
        # resource may create it, which the probe cannot tell.
        gone = request.method == "DELETE" and (current is None or not current.exists)
        if cfg.authorize == "upstream" or gone:
            try:
                refused = await self._authorize(request, ex, target, match)
            except UpstreamError as exc:
                return self._upstream_failed(ex, exc)
            if refused is not None:
                return refused
            authorized = True
        extra: dict[str, object] = {}
        headers: list[tuple[str, str]] = []
        if (
            cfg.etag_in_412 and current is not None and current.exists
            and (cfg.public or authorized or await self._reader_seen(ex, match.key, request))
        ):
            tag = str(make_etag(current.token))
            headers.append(("ETag", tag))
            extra["current_etag"] = tag
        return self._write_refused(ex, headers, **extra)

    async def _reader_seen(self, ex: Exchange, key: str, request: web.BaseRequest) -> bool:
        """Whether these credentials got a 2xx on `key` lately: only they may
        learn its current token from a 412."""
        try:
            obs = await self._timed_store(
                ex, "observe", self.store.observe(key, reader=self._creds(request, ex))
            )
        except StoreError:
            return False
        return bool(obs.reader_seen)  # type: ignore[attr-defined]

    def _probe_headers(self, request: web.BaseRequest, ex: Exchange) -> CIMultiDict[str]:
        """Headers of a GET/HEAD the proxy sends on the caller's behalf:
        their credentials, nothing of the write's body or preconditions."""
        named = hdr.connection_tokens(request.headers.getall("Connection", ()))
        return self._upstream_headers(request, ex, REQUEST_DROP_TRACKED | AUTHORIZE_DROP | named, keep_framing=False)

    async def _authorize(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match
    ) -> web.StreamResponse | None:
        """`authorize: upstream`: ask the upstream before answering 412.

        RFC 9110 §13.2.1: preconditions are ignored when the request without
        them would have failed (or redirected) before any processing, so a
        caller the upstream refuses must get the upstream's status, not a
        412 that says the resource exists and has moved on. HEAD with the
        caller's credentials (GET when the upstream does not do HEAD); a
        non-2xx is relayed, None means go on with the 412.
        """
        headers = self._probe_headers(request, ex)
        for method in ("HEAD", "GET"):
            async with self._send(match, target, method, headers, None) as up:  # type: ignore[attr-defined]
                if method == "HEAD" and up.status in (405, 501):
                    continue
                if 200 <= up.status < 300:
                    return None
                ex.decision = "authorize_refused"
                ex.upstream_status = up.status
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid
                )
                if method == "HEAD":
                    return web.Response(status=up.status, reason=up.reason, headers=out)
                return await self._relay(request, ex, up, out)
        return None

    async def _forward_unchecked(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes,
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, body, whole=True) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid)
                return await self._relay(request, ex, up, out)
        except UpstreamError as exc:
            return self._upstream_failed(ex, exc)

    async def _end(
        self, ex: Exchange, key: str, owner: str, outcome: Outcome, *, exists: bool = True
    ) -> Version | None:
        """END, shielded: a client that hangs up must not leave a lease behind.
        A bulk write's members (`ex.members`) end with the same outcome."""
        task = self.loop.create_task(self._end_all(ex, key, owner, outcome, exists))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            result = await asyncio.shield(task)
        except StoreError:
            return None
        if result.lease_lost:  # type: ignore[attr-defined]
            self.metrics.lease_lost.inc()
            ex.decision = "lease_lost"
            return None
        if outcome is not Outcome.REJECTED:
            self._minted(Cause.WRITE if outcome is Outcome.SUCCESS else Cause.UNKNOWN_OUTCOME)
        return result.committed  # type: ignore[attr-defined,no-any-return]

    async def _end_all(self, ex: Exchange, key: str, owner: str, outcome: Outcome, exists: bool) -> object:
        members, ex.members = ex.members, ()
        if members:
            results = await asyncio.gather(
                *(self.store.end(m, owner, outcome, exists=exists) for m in members), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) or result.lease_lost:
                    self.metrics.lease_lost.inc()
                elif outcome is not Outcome.REJECTED:
                    self._minted(Cause.WRITE if outcome is Outcome.SUCCESS else Cause.UNKNOWN_OUTCOME)
        return await self._timed_store(ex, "end", self.store.end(key, owner, outcome, exists=exists))

    async def _forward_write(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes, owner: str, cond: Conditionals,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        ended = False
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, body, whole=True) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                if ex.verified_at:
                    self.metrics.verify_window.observe(time.perf_counter() - ex.verified_at)
                status = up.status
                outcome = write_outcome(status)
                validated = validators_allowed(status)
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid
                )
                resp_body: bytes | None = None
                replay = None
                idem = self._idempotency_key(request) if cfg.replay_ttl > 0 else None
                more = False
                # The response's JSON names resources: the one a 201 created
                # (`created`), related ones (`{response.x}` in invalidates).
                names = match.route.reads_response or (
                    status == 201 and cfg.created is not None and "Location" not in up.headers  # type: ignore[attr-defined]
                ) or (cfg.version is not None and cfg.version.needs_body)
                if validated and (idem is not None or names) and request.method != "HEAD":
                    try:
                        # Recorded for replay only if small; a larger body
                        # streams on unrecorded.
                        resp_body, complete = await up.read(REPLAY_MAX)
                        more = not complete
                    except body_errors() as exc:
                        # 2xx headers arrived: the change was applied.
                        resp_body = None
                        ex.error = map_body_error(exc).kind
                # A DELETE that may or may not have landed leaves the resource
                # "existing": `If-None-Match: *` then refuses a create (412)
                # rather than risk overwriting a resource that is still there.
                exists = not (request.method == "DELETE" and outcome is Outcome.SUCCESS)
                ended = True
                committed = await self._end(ex, match.key, owner, outcome, exists=exists)
                ex.decision = ex.decision or outcome.value
                fields = self._fields(match, body, None if more else resp_body)
                if outcome is not Outcome.REJECTED:
                    # The write landed, or may have: so may what it invalidates.
                    await self._invalidate(ex, match, fields)
                if validated and committed is not None:
                    if cfg.short_circuit or cfg.etag_in_412:
                        # A 2xx write is a success of these credentials too.
                        self.spawn(self._record_reader(match.key, self._creds(request, ex), cfg))
                    # A deleted resource has no validator (RFC 9110 §8.8).
                    if cfg.version is not None:
                        shown = None
                        # The write's answer names the new version when it
                        # is the resource's representation (not a 201's).
                        token = None if request.method == "DELETE" or status == 201 or more else derive_token(
                            cfg.version, match.key, up.headers, resp_body  # type: ignore[attr-defined]
                        )
                        if token is not None and cfg.etag_on_write:
                            out["ETag"] = str(make_etag(token))
                    else:
                        shown = None if request.method == "DELETE" else await self._response_version(
                            ex, match, up, committed, target, request.headers.get("Host"), fields
                        )
                    if shown is not None and cfg.etag_on_write:
                        version, dated = shown
                        out["ETag"] = str(make_etag(version.token))
                        if dated:
                            out["Last-Modified"] = format_http_date(version.minted_ms // 1000)
                    if idem is not None and resp_body is not None and not more:
                        replay = Replay(
                            self._replay_fingerprint(request, ex, cond, body),
                            status,
                            tuple((k, v) for k, v in out.items() if k.lower() not in ("x-request-id",)),
                            resp_body,
                        )
                        await self._store_replay(ex, match.key, idem, replay, cfg)
                return await self._relay(request, ex, up, out, body=resp_body, more=more)
        except UpstreamError as exc:
            if not ended:
                ended = True
                await self._end(ex, match.key, owner, Outcome.UNKNOWN if exc.sent else Outcome.REJECTED)
                if exc.sent:
                    await self._invalidate(ex, match, self._fields(match, body))
            return self._upstream_failed(ex, exc)
        finally:
            if not ended:
                # Cancelled or crashed between BEGIN and END: the outcome is
                # unknown, so the token must move on.
                await self._end(ex, match.key, owner, Outcome.UNKNOWN)

    async def _store_replay(
        self, ex: Exchange, key: str, idem: str, record: Replay, cfg: RouteConfig
    ) -> None:
        """Record a 2xx for safe retries, before the client can see it (a
        retry after a lost response must find it). Separate from END because
        the record carries the ETag END minted; only consulted after a
        precondition already failed, so it need not be atomic with END."""
        try:
            await self._timed_store(
                ex, "put_replay", self.store.put_replay(key, idem, record, int(cfg.replay_ttl * 1000))
            )
        except StoreError:
            pass

    async def _invalidate(self, ex: Exchange, match: Match, fields: dict[str, str] | None = None) -> None:
        """New tokens for the keys the route's `invalidates` templates name."""
        keys = self.router.invalidation_keys(match, fields)
        if keys:
            try:
                await self._timed_store(ex, "invalidate", self.store.invalidate(keys))
                for _ in keys:
                    self._minted(Cause.INVALIDATED)
            except StoreError:
                pass

    async def _response_version(
        self, ex: Exchange, match: Match, up: object, committed: Version, target: Target,
        host: str | None, fields: dict[str, str],
    ) -> tuple[Version, bool] | None:
        """The version whose validators a 2xx write response carries, and
        whether its route sends Last-Modified; None for no validators.

        RFC 9110 §15.3.2: a 201's validators describe the created resource.
        When `Location` names another resource it gets a new token here if
        the proxy tracks it; otherwise the response carries none, since the
        target's token would be read as the created resource's.
        """
        if up.status != 201:  # type: ignore[attr-defined]
            return committed, match.route.config.last_modified
        location = up.headers.get("Location")  # type: ignore[attr-defined]
        if location:
            created = self._location_match(location, target, host)
        else:
            # DRF and NetBox send no Location: the route's `created` template
            # names the resource from the response body, or nothing does,
            # and the target's token must not pass for its validator.
            created = self._created_match(match, fields)
        if created is None:
            return None
        if created.key == match.key:
            return committed, match.route.config.last_modified
        owner = random_hex(12)
        try:
            begun = await self._timed_store(
                ex, "begin", self.store.begin(created.key, WriteCondition(), owner, self.lease_ms, 0)
            )
        except StoreError:
            # The created key may be leased without our knowing: release it
            # as an unknown outcome, which mints (the resource is new).
            self.spawn(self._release_unanswered(created.key, owner, Outcome.UNKNOWN))
            return None
        if begun.status is not BeginStatus.OK:  # type: ignore[attr-defined]
            return None
        version = await self._end(ex, created.key, owner, Outcome.SUCCESS)
        return None if version is None else (version, created.route.config.last_modified)

    def _created_match(self, match: Match, fields: dict[str, str]) -> Match | None:
        """The tracked resource the route's `created` template names."""
        template = match.route.config.created
        if template is None:
            return None
        try:
            found = self.router.key_for(canonicalize(expand(template, {**match.params, **fields})))
        except (TemplateError, TargetError):
            return None
        return found if found is not None and found.route.tracked else None

    def _location_match(self, location: str, target: Target, host: str | None) -> Match | None:
        """The tracked route a `Location` value falls in, if any.

        RFC 9110 §10.2.2: the value is a URI-reference resolved against the
        target URI. An absolute one counts on the upstream's origin or on
        the authority the client addressed (`Host` is forwarded as sent, and
        an API builds its links from it).
        """
        try:
            url = URL(target.raw).join(URL(location))
        except ValueError:
            return None
        if url.is_absolute():
            upstream = URL(self.config.upstream)
            addressed = host is not None and (url.raw_authority or "").lower() == host.lower()
            if url.origin() != upstream.origin() and not addressed:
                return None
        raw = url.raw_path + (("?" + url.raw_query_string) if url.raw_query_string else "")
        try:
            target = canonicalize(raw or "/")
        except TargetError:
            return None
        found = self.router.key_for(target)
        if found is None or found.route.config.mode != "track":
            return None
        return found
