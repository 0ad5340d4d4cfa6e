"""The upstream HTTP/1.1 client: a small keep-alive pool on asyncio protocols.

Why not aiohttp's ClientSession: on the proxy's hot path it costs roughly
two thirds of the per-request CPU (measured; see docs/PERFORMANCE.md), most
of it in features a proxy must switch off anyway (cookie jar, redirects,
decompression, URL re-quoting, auto headers). This client does only what a
reverse proxy needs, with httptools (llhttp) parsing responses:

- requests go out exactly as given: the canonical target is not re-quoted,
  headers keep their order and spelling, bodies are framed afresh
  (Content-Length for a buffered body, the client's Content-Length or
  chunked encoding for a streamed one);
- responses stream with flow control (reading pauses while the consumer
  is behind); HEAD, 1xx interim responses, chunked and read-until-close
  bodies are handled;
- idle connections are reused LIFO; one found dead is discarded before use.
  A request that failed on a reused connection before any response byte
  arrived is retried once on a fresh connection, but only when it is
  idempotent and its body is replayable: everything else may have reached
  the upstream and is reported as such (`sent = True`);
- one deadline per exchange (connect + send + response, body included).

The pool, the origin and the retry rule live here; one connection's
protocol, the response object and the errors (UpstreamError and its kinds)
in upstream_conn.py, re-exported here as the module's public surface.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import AsyncIterable
from urllib.parse import urlsplit

from multidict import CIMultiDict

from etagproxy.upstream_conn import (
    UpstreamBroken,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
    _Connection,
    _frame_head,
    _Stale,
)

# PUT and DELETE are idempotent by definition (RFC 9110 §9.2.2) but a retry
# of a write would still be a second write as far as the version store is
# concerned; only reads are retried.
RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

IDLE_TTL = 30.0  # seconds an idle pooled connection is trusted


class Origin:
    """scheme://host:port plus an optional path prefix, parsed once."""

    __slots__ = ("scheme", "host", "port", "prefix", "host_header", "ssl")

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {base!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        default = 443 if parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None

    def __repr__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.prefix}"


class Upstream:
    """Keep-alive connection pools, one per origin."""

    def __init__(self, *, connect_timeout: float, max_idle: int = 512) -> None:
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._origins: dict[str, Origin] = {}
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._closed = False

    def origin(self, base: str) -> Origin:
        found = self._origins.get(base)
        if found is None:
            found = self._origins[base] = Origin(base)
        return found

    def url(self, base: str, target: str) -> tuple[Origin, str]:
        """Where to send `target` (already canonical; never re-quoted)."""
        origin = self.origin(base)
        return origin, origin.prefix + target

    async def _connect(self, origin: Origin, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = min(self._connect_timeout, max(deadline - loop.time(), 0))
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), origin.host, origin.port, ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except TimeoutError as exc:
            if loop.time() >= deadline:
                raise UpstreamTimeout("connecting to the upstream took too long") from exc
            raise UpstreamUnreachable(f"connect to {origin!r} timed out") from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {origin!r}: {exc.strerror or exc}") from exc
        return conn

    def _checkout(self, origin: Origin) -> _Connection | None:
        pool = self._idle.get((origin.host, origin.port, origin.ssl is not None))
        now = time.monotonic()
        while pool:
            conn = pool.pop()
            if not conn.closed and now - conn.idle_since < IDLE_TTL:
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        if self._closed or not conn.reusable:
            conn.close()
            return
        pool = self._idle.setdefault((origin.host, origin.port, origin.ssl is not None), [])
        if len(pool) >= self._max_idle:
            conn.close()
            return
        # Idle, it has no parser: bytes that arrive now are out of sync.
        conn._spare, conn._parser = conn._parser, None
        conn.reused = True
        conn.idle_since = time.monotonic()
        pool.append(conn)

    async def _send(
        self,
        conn: _Connection,
        method: str,
        target: str,
        origin: Origin,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> None:
        conn.begin(method == "HEAD")
        head = _frame_head(method, target, headers, origin.host_header)
        if body is None or isinstance(body, bytes):
            if body or method not in ("GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"):
                head.append(f"Content-Length: {len(body or b'')}\r\n")
            head.append("\r\n")
            await conn.write("".join(head).encode("latin-1") + (body or b""))
            return
        chunked = "Content-Length" not in headers
        if chunked:
            head.append("Transfer-Encoding: chunked\r\n")
        head.append("\r\n")
        await conn.write("".join(head).encode("latin-1"))
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                await conn.write(chunk)
        if chunked:
            await conn.write(b"0\r\n\r\n")

    def request(
        self,
        method: str,
        url: tuple[Origin, str],
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        timeout: float,
        whole: bool = True,
    ) -> _Request:
        """Send one request; `async with` it for its response once the
        headers are in.

        `timeout` bounds the exchange up to the response headers; with
        `whole` it bounds the body too (writes: the lease must outlast the
        exchange), else it bounds each wait for the next piece of body, so a
        long download that keeps flowing is not cut off. When it passes the
        connection is aborted and the reader gets UpstreamTimeout.
        """
        return _Request(self, method, url, headers, body, timeout, whole)

    async def _open(
        self,
        method: str,
        url: tuple[Origin, str],
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        timeout: float,
        whole: bool,
    ) -> _Connection:
        """A connection with the request sent and the response's headers in."""
        origin, target = url
        pooled = self._checkout(origin)
        # The loop's clock, from a pooled connection if there is one:
        # `asyncio.get_running_loop()` is a system call (getpid) on 3.11.
        loop = pooled.loop if pooled is not None else asyncio.get_running_loop()
        deadline = loop.time() + timeout
        replayable = method in RETRYABLE and (body is None or isinstance(body, bytes))
        conn: _Connection | None = None
        try:
            for attempt in (0, 1):
                conn = pooled if attempt == 0 else None
                if conn is None:
                    conn = await self._connect(origin, deadline)
                conn.expect_by(deadline)
                try:
                    await self._send(conn, method, target, origin, headers, body)
                    await conn.headers()
                    break
                except _Stale:
                    conn.close()
                    if attempt == 0 and replayable:
                        continue
                    raise UpstreamBroken("upstream closed a kept-alive connection") from None
                except UpstreamBroken:
                    if conn.reused and not conn._got_bytes and attempt == 0 and replayable:
                        conn.close()
                        continue
                    raise
            assert conn is not None
            if not whole:
                conn.expect_by(math.inf)
                conn.idle = timeout
            return conn
        except BaseException:
            # Failed or cancelled: the connection is in an unknown state and
            # is never reused.
            if conn is not None:
                conn.close()
            raise

    async def close(self) -> None:
        self._closed = True
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()


class _Request:
    """`Upstream.request`'s context manager: the response while the block
    runs; afterwards the connection goes back to the pool, or is closed if
    the block raised (or was cancelled), since its state is then unknown.
    A class rather than `contextlib.asynccontextmanager`: no generator to
    drive on the way in and out of every upstream exchange."""

    __slots__ = ("upstream", "method", "url", "headers", "body", "timeout", "whole", "conn")

    def __init__(
        self, upstream: Upstream, method: str, url: tuple[Origin, str], headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None, timeout: float, whole: bool,
    ) -> None:
        self.upstream, self.method, self.url, self.headers = upstream, method, url, headers
        self.body, self.timeout, self.whole = body, timeout, whole
        self.conn: _Connection | None = None

    async def __aenter__(self) -> UpstreamResponse:
        conn = self.conn = await self.upstream._open(
            self.method, self.url, self.headers, self.body, self.timeout, self.whole
        )
        return UpstreamResponse(conn, self.method == "HEAD")

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn = self.conn
        assert conn is not None
        if exc_type is not None:
            # The consumer raised (or was cancelled): the connection is in
            # an unknown state and is never reused.
            conn.close()
            return
        conn.expect_by(math.inf)
        self.upstream._release(self.url[0], conn)


def body_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the upstream body broke mid-stream."""
    return (UpstreamError,)


def map_body_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    return UpstreamBroken(str(exc) or type(exc).__name__)


__all__ = [
    "Origin",
    "Upstream",
    "UpstreamResponse",
    "UpstreamError",
    "UpstreamUnreachable",
    "UpstreamTimeout",
    "UpstreamBroken",
    "map_body_error",
    "body_errors",
]
