"""One upstream HTTP/1.1 connection: an asyncio protocol with httptools
(llhttp) parsing responses, and the response object the proxy streams.

`_Connection` frames a request it is given (upstream.py decides what and
where), reads the answer with flow control (reading pauses above
HIGH_WATER buffered bytes), handles HEAD, 1xx interim responses, chunked
and read-until-close bodies, and keeps one deadline per exchange. It owns
the errors every upstream failure is translated into; it knows nothing of
pooling, retries or routes.

Errors::

    UpstreamError                 502 unless said otherwise
    ├── UpstreamUnreachable       connect failed: the request was never sent
    ├── UpstreamTimeout           504: no complete answer within the deadline
    └── UpstreamBroken            reset/garbled after the request was sent
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
from collections.abc import AsyncIterator

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER = 1 << 18  # pause reading from the upstream above this many buffered bytes


class UpstreamError(Exception):
    status = 502
    kind = "upstream-error"
    sent = True
    """Whether the request may have reached the upstream (unknown outcome)."""


class UpstreamUnreachable(UpstreamError):
    kind = "upstream-unreachable"
    sent = False


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "upstream-timeout"


class UpstreamBroken(UpstreamError):
    kind = "upstream-broken"


class _Stale(Exception):
    """A reused connection died before any byte of the response arrived."""


class UpstreamResponse:
    """Status and headers of an upstream response; the body streams."""

    __slots__ = ("status", "reason", "raw_headers", "_headers", "_conn", "_head")

    def __init__(self, conn: _Connection, head: bool) -> None:
        self.status = conn.status
        self.reason = conn.reason
        self.raw_headers: list[tuple[bytes, bytes]] = conn.raw_headers
        self._headers: CIMultiDictProxy[str] | None = None
        self._conn = conn
        self._head = head

    @property
    def content_length(self) -> int | None:
        """The response's Content-Length, if it sent a valid one."""
        return self._conn.content_length

    @property
    def body_ready(self) -> bool:
        """Whether body bytes (or the end of the body) are here already."""
        return bool(self._conn.body) or self._conn.message_complete

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            md: CIMultiDict[str] = CIMultiDict(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers
            )
            self._headers = CIMultiDictProxy(md)
        return self._headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        conn = self._conn
        while True:
            chunk = await conn.read_chunk()
            if not chunk:
                return
            yield chunk

    async def read(self, limit: int | None = None) -> tuple[bytes, bool]:
        """Up to `limit` bytes of body (all if None) and whether that was all
        of it. With a limit, at most one chunk past it may be returned."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size <= limit:
            chunk = await self._conn.read_chunk()
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), False


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream origin."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._spare: httptools.HttpResponseParser | None = None
        """The parser of the last response, at a message boundary, for the next."""
        self._head = False
        self._framed = False
        self._got_bytes = False
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self.headers_complete = False
        self.message_complete = False
        self.keep_alive = False
        self._error: BaseException | None = None
        self.content_length: int | None = None
        self.idle: float | None = None
        """Longest wait for the next piece of body, once the deadline is off."""
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        # Both deadlines are enforced by one timer per connection (`_arm`),
        # re-armed lazily when it fires: a timer per request and another per
        # wait for body (`asyncio.timeout`) cost more than the parsing.
        self._deadline = math.inf
        """When the exchange must be over (`expect_by`); inf when unbounded."""
        self._idle_at = math.inf
        """When the current wait for more body gives up; inf when not waiting."""
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = math.inf

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            # Bytes nobody asked for: the connection is out of sync.
            self._fail(UpstreamBroken("unexpected data from upstream"))
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"malformed upstream response: {exc}"))

    def eof_received(self) -> bool:
        if self.headers_complete and not self.message_complete and not self._framed:
            # Body delimited by the connection closing (RFC 9112 §6.3 rule 8).
            self.keep_alive = False
            self.message_complete = True
            self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._parser is not None and not self.message_complete:
            if not self._got_bytes and self.reused:
                self._fail(_Stale())
            else:
                self._fail(UpstreamBroken("upstream closed the connection mid-response"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(self._error or UpstreamBroken("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ---------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # Interim response (100 Continue, 103 Early Hints): wait for the final one.
            self.raw_headers = []
            return
        self.status = code
        self.headers_complete = True
        for name, value in self.raw_headers:
            low = name.lower()
            if low == b"content-length":
                self._framed = True
                self.content_length = int(value) if value.strip().isdigit() else None
            elif low == b"transfer-encoding" and b"chunked" in value.lower():
                self._framed = True
        if self._head or code in (204, 304):
            self._framed = True
        self.keep_alive = self._parser.should_keep_alive()
        if self._head:
            # llhttp cannot be told the request was HEAD: the response has
            # no body whatever its headers say (RFC 9110 §9.3.2).
            self.message_complete = True
            self._parser = None
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_complete or self._parser is None:
            return  # end of an interim 1xx message, or of a HEAD response already done
        self.keep_alive = self._parser.should_keep_alive()
        self.message_complete = True
        self._wake()

    # -- helpers -----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self.loop.create_future()
        try:
            if self.idle is not None:
                self._idle_at = self.loop.time() + self.idle
                self._arm(self._idle_at)
            await self._waiter
        finally:
            self._waiter = None
            self._idle_at = math.inf

    def expect_by(self, deadline: float) -> None:
        """Fail the exchange with UpstreamTimeout at `deadline` (inf: never)."""
        self._deadline = deadline
        if deadline != math.inf:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._watch is not None:
            if self._watch_at <= when:
                return  # fires first and re-arms for whatever is due then
            self._watch.cancel()
        self._watch_at = when
        self._watch = self.loop.call_at(when, self._on_watch)

    def _on_watch(self) -> None:
        self._watch = None
        self._watch_at = math.inf
        if self.closed:
            return
        now = self.loop.time()
        if now >= self._deadline:
            self._fail(UpstreamTimeout("upstream did not answer in time"))
        elif now >= self._idle_at:
            self._fail(UpstreamTimeout("the upstream body stalled"))
        else:
            due = min(self._deadline, self._idle_at)
            if due != math.inf:
                self._arm(due)

    def begin(self, head: bool) -> None:
        # llhttp parses consecutive messages on one connection, so a parser
        # that finished a response takes the next one.
        self._parser = self._spare or httptools.HttpResponseParser(self)
        self._spare = None
        self._head = head
        self._framed = False
        self._got_bytes = False
        self.status = 0
        self.reason = ""
        self.raw_headers = []
        self.body.clear()
        self._buffered = 0
        self.headers_complete = False
        self.message_complete = False
        self.keep_alive = False
        self._error = None
        self.idle = None
        self.content_length = None

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise self._error or UpstreamBroken("upstream closed the connection")
        self.transport.write(data)
        if self._write_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    async def headers(self) -> None:
        while not self.headers_complete:
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamBroken("upstream closed the connection")
            await self._wait()

    async def read_chunk(self) -> bytes:
        while True:
            if self.body:
                # Everything buffered so far, as one piece: one write (one
                # system call) downstream instead of one per parser callback.
                body = self.body
                chunk = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self.message_complete:
                return b""
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamBroken("upstream closed the connection mid-body")
            await self._wait()

    @property
    def reusable(self) -> bool:
        return (
            self.message_complete
            and self.keep_alive
            and not self.body
            and not self.closed
            and self._error is None
        )

    def close(self) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.transport is not None:
            self.transport.close()


def _frame_head(method: str, target: str, headers: CIMultiDict[str], host: str) -> list[str]:
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    if "Host" not in headers:
        lines.append(f"Host: {host}\r\n")
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    return lines
