"""Hostile input at the connection: framing, abuse limits, slow clients.

Everything here runs before a request reaches its handler (`Proxy.handle`), at the
protocol level, so a refused request never touches the store or the upstream
and the connection it came on is closed behind the refusal.

Where each defence lives, and why there:

- Framing: every parsed message is checked by `framing.check_request`
  inside `data_received`, before it is handed to a handler (framing.py
  lists what aiohttp's parsers let through and what is refused).
  A refused message and everything pipelined behind it are dropped from the
  queue and the connection reads nothing more: the refusal is the last
  response on it (``Connection: close``), so bytes a front end might have
  framed differently can never be read as a second request.

- Slow clients: a request's line and headers must arrive within
  ``timeouts.header_read`` of its first byte (or of the connection opening);
  aiohttp has no such limit of its own, only the keep-alive timer. Past it
  the client gets 408 and the connection is closed. Bodies are the proxy's
  business (`Forwarding.read_body` bounds the whole body of a write by
  ``timeouts.body_read``; streamed bodies are bounded per gap).

- Limits: ``limits.max_connections`` open connections per process; a
  connection over it gets 503 + ``Retry-After`` for its first request and is
  closed. ``limits.max_in_flight`` requests handled at once; a request over it
  gets 503 + ``Retry-After`` without being handled.

This module is bound to aiohttp's `RequestHandler` (it subclasses it and
reads its message queue); tests/test_security.py runs the corpus against
both parsers, so an aiohttp upgrade that changes that behaviour fails there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from etagproxy.framing import Refusal, StrictRequestParserPy, check_request, is_upgrade

__all__ = ["Guard", "GuardedRequestHandler", "GuardedServer", "LINGER"]

log = logging.getLogger("etagproxy.guard")

# After an answer sent before the whole request body was read, aiohttp reads
# and discards the rest for this long before closing, so the client sees the
# answer rather than a reset (RFC 9112 §9.6). Its default, 10 s, is a free
# hold on a connection for a client that keeps trickling.
LINGER = 2.0

HEADER_TIMEOUT = Refusal(
    408, "header-timeout", "The request line and headers did not arrive in time.",
    title="Request Timeout",
)
TOO_MANY_CONNECTIONS = Refusal(
    503, "too-many-connections",
    "The proxy has too many open connections. Retry after a moment.",
    title="Service Unavailable", retry_after="1",
)
TOO_MANY_REQUESTS = Refusal(
    503, "too-many-requests",
    "The proxy is handling too many requests. Retry after a moment.",
    title="Service Unavailable", close=False, retry_after="1",
)

# Keys a GuardedServer sets on a request that needs special treatment.
_REFUSAL: web.RequestKey[Refusal] = web.RequestKey("etagproxy.guard.refusal", Refusal)
_LAST: web.RequestKey[bool] = web.RequestKey("etagproxy.guard.last", bool)


class Guard:
    """Per-process state and settings shared by every guarded connection."""

    def __init__(
        self,
        *,
        header_read: float,
        max_connections: int,
        max_in_flight: int,
        upgrade_allowed: Callable[[str, str, str | None], bool] = lambda m, t, h: False,
        on_refusal: Callable[[web.BaseRequest, Refusal], None] | None = None,
    ) -> None:
        self.header_read = header_read
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.upgrade_allowed = upgrade_allowed
        self.on_refusal = on_refusal
        self.connections = 0
        self.in_flight = 0
        self.refused = 0
        self.header_timeouts = 0

    def check(self, msg: RawRequestMessage) -> Refusal | None:
        return check_request(
            msg.method, msg.path, (msg.version.major, msg.version.minor), msg.raw_headers,
            upgrade=msg.upgrade, upgrade_allowed=self.upgrade_allowed,
        )

    def refuse(self, request: web.BaseRequest, refusal: Refusal) -> web.Response:
        self.refused += 1
        if self.on_refusal is not None:
            self.on_refusal(request, refusal)
        return refusal.response()

    def wrap(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            # A GuardedServer puts state only on a request it refuses or
            # ends the connection with; the others need no key looked up
            # (a miss costs a KeyError inside Mapping.get).
            marked = len(request) > 0
            refusal = request.get(_REFUSAL) if marked else None
            if refusal is not None:
                return self.refuse(request, refusal)
            if self.in_flight >= self.max_in_flight:
                return self.refuse(request, TOO_MANY_REQUESTS)
            self.in_flight += 1
            try:
                resp = await handler(request)
            finally:
                self.in_flight -= 1
            if (marked and request.get(_LAST)) or resp.headers.get("Connection", "").lower() == "close":
                # A response that says close must close: aiohttp would
                # otherwise reuse the connection if the body happened to be
                # complete after its lingering read (at most LINGER seconds).
                resp.force_close()
                if resp.status == 408 or _awaiting_continue(request):
                    # Nothing to linger for: the client stalled (408), or it
                    # holds its body back for a 100 Continue that will not
                    # come (RFC 9110 §10.1.1).
                    await resp.prepare(request)
                    await resp.write_eof()
                    request.protocol.force_close()
            return resp

        return guarded


def _awaiting_continue(request: web.BaseRequest) -> bool:
    return (
        request.version >= (1, 1)
        and request.headers.get("Expect", "").lower() == "100-continue"
        and request.content.total_bytes == 0
        and not request.content.is_eof()
    )


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with the checks and timers above.

    States, per connection: waiting for (or reading) a request head, or
    reading a body. The header timer runs from the connection opening, and
    after that from the first byte of each new head, until a message is
    parsed; an idle keep-alive connection is left to aiohttp's keep-alive
    timer. A head pipelined behind a complete request in the same read is
    bounded by that keep-alive timer rather than by ``header_read`` (the
    parser does not say whether it holds a partial head).
    """

    __slots__ = ("_guard", "_header_timer", "_body", "_stopped", "_received",
                 "_counted", "_shed", "_refusal", "_last_message")

    def __init__(self, manager: web.Server, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        if type(self._parser) is HttpRequestParserPy:
            # Same state, stricter request line.
            self._parser.__class__ = StrictRequestParserPy
        self._guard = guard
        self._header_timer: Any = None
        self._body: StreamReader | None = None
        self._stopped = False
        self._received = False
        self._counted = False
        self._shed = False
        self._refusal: tuple[RawRequestMessage, Refusal] | None = None
        self._last_message: RawRequestMessage | None = None

    # -- connection life ------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        guard = self._guard
        guard.connections += 1
        self._counted = True
        if guard.connections > guard.max_connections:
            self._shed = True
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.connections -= 1
        self._cancel_header_timer()
        super().connection_lost(exc)

    # -- reading ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            # A refusal (or the last request) is queued: nothing behind it
            # is parsed, so nothing behind it can become a request.
            return
        if data:
            self._received = True
        before = len(self._messages)
        super().data_received(data)
        if len(self._messages) > before:
            self._cancel_header_timer()
            self._inspect(before)
        elif self._body is not None:
            if self._body.is_eof():
                self._body = None
        elif data:
            self._arm_header_timer()

    def _inspect(self, start: int) -> None:
        messages = self._messages
        for i in range(start, len(messages)):
            msg, payload = messages[i]
            if not isinstance(msg, RawRequestMessage):
                # aiohttp's parser refused it; its error response closes.
                self._stop(i)
                return
            refusal = TOO_MANY_CONNECTIONS if self._shed else self._guard.check(msg)
            if refusal is not None:
                self._refusal = (msg, refusal)
                # Its body is never read: no lingering read after the answer.
                messages[i] = (msg, EMPTY_PAYLOAD)
                self._stop(i)
                return
            if is_upgrade(msg):
                # Allowed by its route. The proxy does not tunnel, so the
                # request is answered like any other, and it is the last.
                self._last_message = msg
                self._stop(i)
                return
        payload = messages[-1][1]
        self._body = None if payload.is_eof() else payload

    def _stop(self, index: int) -> None:
        """Keep messages up to `index`; read nothing more on this connection."""
        messages = self._messages
        while len(messages) > index + 1:
            messages.pop()
        self._stopped = True
        self._message_tail = b""
        self._body = None
        self._cancel_header_timer()

    # -- header timer -------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self._guard.header_read > 0 and not self._stopped:
            self._header_timer = self._loop.call_later(
                self._guard.header_read, self._header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is None or self._stopped:
            return
        self._guard.header_timeouts += 1
        self._stopped = True
        if self._request_in_progress or self._messages:
            # A request is being answered: finish it, then close.
            self.close()
            return
        if self._received:
            self.transport.write(HEADER_TIMEOUT.raw())
            if self.transport.can_write_eof():
                # Half-close and drop whatever still arrives for a moment:
                # closing outright would answer a trickling client's next
                # bytes with a reset that can destroy the 408 in flight.
                self.transport.write_eof()
                self._header_timer = self._loop.call_later(LINGER, self.force_close)
                return
        self.force_close()

    # -- aiohttp's own refusals ------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Parser errors become problem+json, logged without a traceback.

        aiohttp logs each one with a full traceback at ERROR level, which
        lets anyone who can open a socket fill the log.
        """
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        log.info("refused unparseable request from %s: %s", request.remote, exc)
        return self._guard.refuse(
            request, Refusal(400, "bad-request", "The request is not valid HTTP/1.1: " + _reason(exc))
        )


def _reason(exc: HttpProcessingError) -> str:
    text = exc.message if isinstance(exc.message, str) else ""
    text = text.splitlines()[0] if text else type(exc).__name__
    # The message may quote attacker bytes; keep it short and printable.
    text = "".join(c if c.isprintable() else "?" for c in text)[:120]
    return text or type(exc).__name__


class GuardedServer(web.Server):
    """`web.Server` whose connections are `GuardedRequestHandler`s.

    `handler` is the request handler the guard wraps; `guard` holds the
    limits and the callbacks that log refusals and look routes up for
    `allow_upgrade`. Other keyword arguments go to aiohttp's
    `RequestHandler` as with `web.Server`.
    """

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        guard: Guard,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        kwargs.setdefault("lingering_time", LINGER)
        super().__init__(self.guard.wrap(handler), request_factory=self._guarded_request, **kwargs)

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, guard=self.guard, loop=self._loop, **self._kwargs)

    def _guarded_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: Any,
        task: Any,
    ) -> web.BaseRequest:
        refusal: Refusal | None = None
        if isinstance(protocol, GuardedRequestHandler):
            refused = protocol._refusal
            if refused is not None and refused[0] is message:
                refusal = refused[1]
                if message.version not in (HttpVersion10, HttpVersion11):
                    # The answer's status line copies the request's version;
                    # "HTTP/2.0 505" would be read by nobody.
                    message = message._replace(version=HttpVersion11)
        request = web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        if refusal is not None:
            request[_REFUSAL] = refusal
        elif isinstance(protocol, GuardedRequestHandler) and protocol._last_message is message:
            request[_LAST] = True
        return request
