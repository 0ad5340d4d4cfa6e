"""The I/O both request paths share: the upstream exchange and the relay of
its answer, the client's body, store-call timing and metric children.

`Forwarding` holds the services a proxy process runs on (config, router,
store, upstream client, metrics); the read path (`reads.py`), the write
path (`writes.py`) and the dispatcher (`proxy.py`) each reach them through
one instance, so a reload that swaps config and router reaches all three.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from etagproxy import headers as hdr
from etagproxy.client_body import arrived_body, client_chunks
from etagproxy.config import Config, RouteConfig
from etagproxy.exchange import Exchange, credential_hash
from etagproxy.metrics import Metrics
from etagproxy.problems import problem
from etagproxy.routes import Match, Router
from etagproxy.store.base import Cause, StoreError, VersionStore
from etagproxy.target import Target
from etagproxy.upstream import Upstream, UpstreamError, body_errors, map_body_error

CHUNK = 1 << 16
COALESCE = 1 << 16  # GET bodies up to this size (by Content-Length) are sent in one write

# Fields a tracked route never passes upstream: the proxy evaluated them.
# (`upstream_conditionals: true` forwards them as well.)
REQUEST_DROP_TRACKED = hdr.CONDITIONALS | {"expect"}
RESPONSE_DROP_TRACKED = frozenset({"etag", "last-modified"})


class BodyTooLarge(Exception):
    pass


class _HeldResponse(web.StreamResponse):
    """A relayed response whose body is at hand: its headers go out with the
    first piece of body, in one system call (a plain StreamResponse sends
    them on their own as soon as it is prepared)."""

    _send_headers_immediately = False


class Forwarding:
    """The services of one proxy process, and the I/O on them."""

    def __init__(
        self, config: Config, router: Router, store: VersionStore, upstream: Upstream, metrics: Metrics
    ) -> None:
        self.config = config
        self.router = router
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.trusted = hdr.TrustedProxies(config.trusted_proxies)
        self.tasks: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: dict[tuple[int, tuple[object, ...]], Any] = {}
        self.spans: Any = None
        """otel.Spans when `tracing.otel` is on (read at start, not on reload)."""
        if config.tracing.otel:
            from etagproxy.otel import Spans

            self.spans = Spans()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once: `asyncio.get_running_loop()`
        (and `ensure_future`, which calls it) is a system call on 3.11."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run a background task and keep a reference until it is done."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def timed_store(self, ex: Exchange, op: str, coro: object) -> object:
        span = None if ex.span is None else self.spans.store(ex, op)
        t0 = time.perf_counter()
        try:
            return await coro  # type: ignore[misc]
        except StoreError as exc:
            self.metrics.store_errors.labels(op).inc()
            if span is not None:
                span.set_attribute("error.type", exc.__class__.__name__)
                span.set_status(self.spans.error_status(str(exc)))
            raise
        finally:
            dt = time.perf_counter() - t0
            ex.store_ms += dt * 1000
            self.labelled(self.metrics.store_latency, op).observe(dt)
            if span is not None:
                span.end()

    def labelled(self, metric: Any, *values: object) -> Any:
        """`metric.labels(*values)`, memoised: the label sets are bounded
        (route templates, methods, statuses) and `labels()` costs a few
        microseconds per call on the hot path."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*(str(v) for v in values))
        return child

    @staticmethod
    def creds(request: web.BaseRequest, ex: Exchange) -> str:
        if ex.creds is None:
            ex.creds = credential_hash(request.headers)
        return ex.creds

    def decided(self, ex: Exchange, outcome: str) -> None:
        """The proxy answered by itself because of a precondition: log it
        as the exchange's decision and count it (etagproxy_precondition_outcomes)."""
        ex.decision = outcome
        self.labelled(self.metrics.preconditions, ex.route, outcome).inc()

    def minted(self, cause: Cause | None) -> None:
        if cause is not None:
            self.labelled(self.metrics.tokens_minted, cause.value).inc()

    def upstream_headers(
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
            traceparent=f"00-{ex.trace_id}-{ex.span_id}-{ex.trace_flags}",
            tracestate=ex.tracestate,
        )
        if keep_framing and request.content_length is not None and "Content-Length" in out:
            # Framed afresh: the parsed number, never the client's spelling ("005").
            out["Content-Length"] = str(request.content_length)
        return out

    def client_body(self, request: web.BaseRequest, ex: Exchange) -> AsyncIterator[bytes] | None:
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

    async def relay(
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

    def upstream_failed(self, ex: Exchange, exc: UpstreamError) -> web.Response:
        ex.error = exc.kind
        self.metrics.upstream_errors.labels(exc.kind).inc()
        if exc.status == 504:
            detail = "The upstream did not answer in time. Re-read the resource before retrying a write."
        else:
            detail = "The upstream could not be reached or broke the connection."
        return problem(exc.status, exc.kind, detail)

    def send(
        self, match: Match | None, target: Target, method: str, headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None, *, whole: bool = False, ex: Exchange | None = None,
    ) -> object:
        base = match.route.config.upstream if match is not None else self.config.upstream
        url = self.upstream.url(base or self.config.upstream, target.raw)
        cm = self.upstream.request(
            method, url, headers, body, timeout=self.config.timeouts.upstream, whole=whole
        )
        if ex is not None and ex.span is not None:
            return self.spans.upstream(ex, method, url[0], headers, cm)
        return cm

    def upstream_timing(self, ex: Exchange, t0: float, status: int) -> None:
        dt = time.perf_counter() - t0
        ex.upstream_ms = dt * 1000
        ex.upstream_status = status
        self.labelled(self.metrics.upstream_latency, ex.route).observe(dt)

    async def record_reader(self, key: str, reader: str, cfg: RouteConfig) -> None:
        try:
            await self.store.record_reader(key, reader, int(cfg.short_circuit_ttl * 1000))
        except StoreError:
            self.metrics.store_errors.labels("record_reader").inc()

    async def read_body(self, request: web.BaseRequest, ex: Exchange) -> bytes:
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
