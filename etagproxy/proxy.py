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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from etagproxy import headers as hdr
from etagproxy.config import Config, RouteConfig
from etagproxy.etag import EntityTag, make_etag, parse_tag_list
from etagproxy.httpdate import format_http_date
from etagproxy.metrics import Metrics
from etagproxy.preconditions import Conditionals, Decision, Representation, evaluate, write_condition
from etagproxy.problems import problem
from etagproxy.routes import Match, Router
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
)
from etagproxy.target import Target, TargetError, canonicalize
from etagproxy.upstream import Upstream, UpstreamError, body_errors, map_body_error

log = logging.getLogger("etagproxy")

READ_METHODS = frozenset({"GET", "HEAD"})
UNTRACKED_METHODS = frozenset({"OPTIONS", "TRACE", "CONNECT"})
CHUNK = 1 << 16
DRAIN_LIMIT = 1 << 16  # bodies up to this size are read to keep a connection

# RFC 9110 §15.4.5: a 304 carries these fields when a 200 would have.
NOT_MODIFIED_FIELDS = ("Cache-Control", "Content-Location", "Date", "Expires", "Vary")

# Fields a tracked route never passes upstream: the proxy evaluated them.
# (`upstream_conditionals: true` forwards them as well.)
REQUEST_DROP_TRACKED = hdr.CONDITIONALS | {"expect"}
REQUEST_DROP_PLAIN = frozenset({"expect"})
RESPONSE_DROP_TRACKED = frozenset({"etag", "last-modified"})


class BodyTooLarge(Exception):
    pass


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


def query_variant(target: Target, key_query: tuple[str, ...]) -> str:
    """The part of a representation tag chosen by non-key query parameters."""
    if not target.query:
        return ""
    extra = sorted(f"{n}={v}" for n, v in target.params() if n not in key_query)
    return "q" + _short_hash("&".join(extra), 4) if extra else ""


def representation_variant(qpart: str, up_headers: CIMultiDict[str] | object) -> str:
    """`<variant>` of `"<token>-<variant>"`; '' for the plain representation.

    RFC 9110 §8.8.3.3: representations that differ (query, negotiated
    content type, content coding) must not share a strong validator.
    The content type counts only when the upstream says it negotiates on
    Accept (`Vary`); the content coding always counts.
    """
    get = up_headers.get  # type: ignore[attr-defined]
    parts = [qpart] if qpart else []
    vary = get("Vary")
    if vary:
        fields = {f.strip().lower() for f in vary.split(",")}
        if "accept" in fields or "*" in fields:
            parts.append("t" + _short_hash(get("Content-Type", ""), 3))
    coding = get("Content-Encoding")
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
        t = config.timeouts
        # The lease outlives the upstream deadline by the time BEGIN's answer
        # and END's request can take (DESIGN §2.3: strictly shorter).
        self.lease_ms = int((t.upstream + 2 * t.store + 1.0) * 1000)
        self.wait_ms = int(t.write_wait * 1000)
        self.retry_after = str(max(1, int(t.write_wait + 0.999)))

    # -- plumbing ------------------------------------------------------------

    def spawn(self, coro: object) -> None:
        """Run a background task and keep a reference until it is done."""
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
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
            self.metrics.store_latency.labels(op).observe(dt)

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
        except Exception:
            log.exception("request %s failed", ex.rid)
            ex.error = "internal"
            resp = problem(500, "internal-error", "The proxy failed to handle this request.")
        finally:
            self.metrics.in_flight.dec()
        ex.status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-ID"] = ex.rid
        self.metrics.requests.labels(ex.route, ex.method, str(resp.status)).inc()
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
            return await self._read(request, ex, target, match, named)
        return await self._write(request, ex, target, match, named)

    # -- forwarding helpers ----------------------------------------------------

    def _upstream_headers(
        self, request: web.BaseRequest, ex: Exchange, drop: frozenset[str], *, keep_framing: bool
    ) -> CIMultiDict[str]:
        peer = request.remote
        return hdr.upstream_request_headers(
            request.raw_headers,
            drop=drop,
            peer=peer,
            trusted=peer in self.trusted,
            proto="https" if request.secure else "http",
            via=self.config.via,
            rid=ex.rid,
            keep_framing=keep_framing,
        )

    def _client_body(self, request: web.BaseRequest, ex: Exchange) -> AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None

        async def gen() -> AsyncIterator[bytes]:
            await self._continue(request)
            async for chunk in request.content.iter_chunked(CHUNK):
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
        resp = web.StreamResponse(status=status, reason=up.reason, headers=headers)  # type: ignore[attr-defined]
        length = up.headers.get("Content-Length")  # type: ignore[attr-defined]
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        if body is not None and not more:
            resp.content_length = len(body)
        elif length is not None and length.isdigit():
            resp.content_length = int(length)
        elif no_body:
            pass
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
        body: bytes | AsyncIterator[bytes] | None,
    ) -> object:
        base = match.route.config.upstream if match is not None else self.config.upstream
        url = self.upstream.url(base or self.config.upstream, target.raw)
        return self.upstream.request(method, url, headers, body, timeout=self.config.timeouts.upstream)

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
        self.metrics.upstream_latency.labels(ex.route).observe(dt)

    # -- read ----------------------------------------------------------------------

    async def _read(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        cond = Conditionals.from_headers(request.headers)
        reader = credential_hash(request.headers) if cfg.short_circuit else None
        obs: Observation | None
        try:
            obs = await self._timed_store(ex, "observe", self.store.observe(match.key, reader=reader))  # type: ignore[assignment]
        except StoreError:
            obs = None
        if obs is not None:
            self._minted(obs.minted)
        qpart = query_variant(target, cfg.key_query)
        if obs is not None and cfg.short_circuit and not obs.pending and cond.if_none_match:
            early = self._short_circuit(request, ex, cfg, cond, obs, qpart, reader)
            if early is not None:
                return early

        drop = named if cfg.upstream_conditionals else (REQUEST_DROP_TRACKED | named)
        if not cfg.upstream_conditionals and cond.range is not None and cond.if_range is not None:
            # If-Range is evaluated here after the fact; without it the
            # upstream must not answer a partial response.
            drop = drop | {"range"}
        headers = self._upstream_headers(request, ex, drop, keep_framing=True)
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
                if cfg.fingerprint and request.method == "GET":
                    body, complete, version = await self._fingerprint(ex, match, up, version)
                    more = not complete
                    if version is None:
                        ex.decision = "moved"
                        return await self._relay(request, ex, up, out, body=body, more=more)
                assert version is not None
                if not version.exists:
                    try:
                        await self._timed_store(ex, "confirm", self.store.confirm(match.key, version.token))
                    except StoreError:
                        pass
                if reader is not None:
                    self.spawn(self._record_reader(match.key, reader, cfg))
                tag = make_etag(version.token, representation_variant(qpart, up.headers))
                last_modified = version.minted_ms // 1000 if cfg.last_modified else None
                decision = evaluate(
                    request.method, cond, Representation(version.token, tag, last_modified)
                )
                if decision is not Decision.PROCEED and body is None and request.method == "GET":
                    # The body is not sent; reading a small one to its end
                    # keeps the upstream connection reusable.
                    await up.read(DRAIN_LIMIT)  # type: ignore[attr-defined]
                if decision is Decision.NOT_MODIFIED:
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
                out["ETag"] = str(tag)
                if last_modified is not None:
                    out["Last-Modified"] = format_http_date(last_modified)
                return await self._relay(request, ex, up, out, body=body, more=more)
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
        accept_enc = request.headers.get("Accept-Encoding", "").lower()
        token = obs.version.token
        for tag in tags.tags:
            if tag.token != token:
                continue
            parts = tag.opaque[len(token) + 1:].split("-") if len(tag.opaque) > len(token) else []
            q = next((p for p in parts if p.startswith("q")), "")
            enc = next((p[1:] for p in parts if p.startswith("e")), "")
            if q != qpart or (enc and any(c not in accept_enc for c in enc.split("."))):
                continue
            ex.decision = "short_circuit"
            self.metrics.preconditions.labels(ex.route, "not_modified").inc()
            headers: CIMultiDict[str] = CIMultiDict()
            headers["Via"] = f"1.1 {self.config.via}"
            headers["X-Request-ID"] = ex.rid
            return self._not_modified(ex, tag, headers, obs.version)
        return None

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
        length = up.headers.get("Content-Length")  # type: ignore[attr-defined]
        if length is not None and length.isdigit() and int(length) > limit:
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
            self._minted(Cause.FINGERPRINT)
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
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.config.timeouts.body_read):
            async for chunk in request.content.iter_chunked(CHUNK):
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
        if cfg.require_if_match and not wcond.has_precondition:
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
        drop = named if cfg.upstream_conditionals else (REQUEST_DROP_TRACKED | named)
        headers = self._upstream_headers(request, ex, drop, keep_framing=False)
        owner = ex.rid + "." + hashlib.blake2b(str(time.perf_counter_ns()).encode(), digest_size=4).hexdigest()
        try:
            begun = await self._timed_store(
                ex, "begin", self.store.begin(match.key, wcond, owner, self.lease_ms, self.wait_ms)
            )
        except StoreError:
            if cfg.on_store_error == "fail_open":
                ex.decision = "store_unavailable_open"
                return await self._forward_unchecked(request, ex, target, match, headers, body)
            ex.decision = "store_unavailable"
            return problem(
                503, "store-unavailable",
                "The version store is unavailable, so the write was not forwarded. Retry later.",
                headers=(("Retry-After", "1"),),
            )
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
            return await self._precondition_failed(request, ex, match, cond, body, begun.current)  # type: ignore[attr-defined]
        return await self._forward_write(request, ex, target, match, headers, body, owner, cond)

    def _replay_fingerprint(self, request: web.BaseRequest, cond: Conditionals, body: bytes) -> str:
        h = hashlib.blake2b(digest_size=16, person=b"etagproxy-rply")
        h.update((request.method + "\0" + (cond.if_match or "") + "\0").encode("latin-1", "replace"))
        h.update(credential_hash(request.headers).encode() + b"\0")
        h.update(body)
        return h.hexdigest()

    @staticmethod
    def _idempotency_key(request: web.BaseRequest) -> str | None:
        value = request.headers.get("Idempotency-Key")
        if not value or len(value) > 255:
            return None
        return hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16).hexdigest()

    async def _precondition_failed(
        self, request: web.BaseRequest, ex: Exchange, match: Match, cond: Conditionals,
        body: bytes, current: Version | None,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        idem = self._idempotency_key(request) if cfg.replay_ttl > 0 else None
        if idem is not None:
            try:
                record = await self._timed_store(ex, "get_replay", self.store.get_replay(match.key, idem))
            except StoreError:
                record = None
            if isinstance(record, Replay) and record.fingerprint == self._replay_fingerprint(request, cond, body):
                ex.decision = "replayed"
                self.metrics.preconditions.labels(ex.route, "replayed").inc()
                resp = web.Response(status=record.status, body=record.body)
                for name, value in record.headers:
                    resp.headers.add(name, value)
                resp.headers["X-Request-ID"] = ex.rid
                resp.headers["Idempotency-Replayed"] = "true"
                return resp
        ex.decision = "precondition_failed"
        self.metrics.preconditions.labels(ex.route, "precondition_failed").inc()
        extra: dict[str, object] = {}
        headers: list[tuple[str, str]] = []
        if cfg.etag_in_412 and current is not None and current.exists:
            tag = str(make_etag(current.token))
            headers.append(("ETag", tag))
            extra["current_etag"] = tag
        return problem(
            412, "precondition-failed",
            "The resource has changed since the version named in the precondition; "
            "the write was not applied. Re-read it and retry with the new ETag.",
            headers=headers, **extra,
        )

    async def _forward_unchecked(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes,
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, body) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid)
                return await self._relay(request, ex, up, out)
        except UpstreamError as exc:
            return self._upstream_failed(ex, exc)

    async def _end(
        self, ex: Exchange, key: str, owner: str, outcome: Outcome, *, exists: bool = True
    ) -> Version | None:
        """END, shielded: a client that hangs up must not leave a lease behind."""
        task = asyncio.ensure_future(
            self._timed_store(ex, "end", self.store.end(key, owner, outcome, exists=exists))
        )
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

    async def _forward_write(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes, owner: str, cond: Conditionals,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        ended = False
        t0 = time.perf_counter()
        try:
            async with self._send(match, target, request.method, headers, body) as up:  # type: ignore[attr-defined]
                self._upstream_timing(ex, t0, up.status)
                status = up.status
                if 200 <= status < 300:
                    outcome = Outcome.SUCCESS
                elif status >= 500:
                    outcome = Outcome.UNKNOWN
                else:
                    outcome = Outcome.REJECTED
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.config.via, rid=ex.rid
                )
                resp_body: bytes | None = None
                replay = None
                idem = self._idempotency_key(request) if cfg.replay_ttl > 0 else None
                if outcome is Outcome.SUCCESS and idem is not None and request.method != "HEAD":
                    try:
                        resp_body, _ = await up.read()
                    except body_errors() as exc:
                        # 2xx headers arrived: the change was applied.
                        resp_body = None
                        ex.error = map_body_error(exc).kind
                exists = request.method != "DELETE"
                ended = True
                committed = await self._end(ex, match.key, owner, outcome, exists=exists)
                ex.decision = ex.decision or outcome.value
                if outcome is Outcome.SUCCESS and committed is not None:
                    await self._after_success(ex, match, up, out)
                    tag = str(make_etag(committed.token))
                    if cfg.etag_on_write and "ETag" not in out:
                        out["ETag"] = tag
                    if cfg.last_modified and "ETag" in out:
                        out["Last-Modified"] = format_http_date(committed.minted_ms // 1000)
                    if idem is not None and resp_body is not None:
                        replay = Replay(
                            self._replay_fingerprint(request, cond, body),
                            status,
                            tuple((k, v) for k, v in out.items() if k.lower() not in ("x-request-id",)),
                            resp_body,
                        )
                        await self._store_replay(ex, match.key, idem, replay, cfg)
                return await self._relay(request, ex, up, out, body=resp_body)
        except UpstreamError as exc:
            if not ended:
                ended = True
                await self._end(ex, match.key, owner, Outcome.UNKNOWN if exc.sent else Outcome.REJECTED)
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

    async def _after_success(self, ex: Exchange, match: Match, up: object, out: CIMultiDict[str]) -> None:
        """Invalidate related keys; give a 201's new resource its token."""
        keys = self.router.invalidation_keys(match)
        if keys:
            try:
                await self._timed_store(ex, "invalidate", self.store.invalidate(keys))
                for _ in keys:
                    self._minted(Cause.INVALIDATED)
            except StoreError:
                pass
        if up.status == 201:  # type: ignore[attr-defined]
            location = up.headers.get("Location")  # type: ignore[attr-defined]
            created = self._location_match(location) if location else None
            if created is not None and created.key != match.key:
                owner = ex.rid + ".created"
                try:
                    begun = await self._timed_store(
                        ex, "begin", self.store.begin(created.key, WriteCondition(), owner, self.lease_ms, 0)
                    )
                    if begun.status is BeginStatus.OK:  # type: ignore[attr-defined]
                        version = await self._end(ex, created.key, owner, Outcome.SUCCESS)
                        if version is not None:
                            out["ETag"] = str(make_etag(version.token))
                except StoreError:
                    pass

    def _location_match(self, location: str) -> Match | None:
        """The tracked route a `Location` value falls in, if any."""
        try:
            url = URL(location)
        except ValueError:
            return None
        if url.is_absolute():
            upstream = URL(self.config.upstream)
            # Only the upstream's own origin (or a relative reference) counts.
            if url.origin() != upstream.origin():
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
