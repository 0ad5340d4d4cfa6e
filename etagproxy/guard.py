"""Hostile input at the connection: framing, abuse limits, slow clients.

Everything here runs before a request reaches its handler (`Proxy.handle`), at the
protocol level, so a refused request never touches the store or the upstream
and the connection it came on is closed behind the refusal.

Where each defence lives, and why there:

- aiohttp's own parsers (llhttp in C by default, the pure-Python parser
  with ``AIOHTTP_NO_EXTENSIONS=1``) already refuse most smuggling probes with
  400 and close: Content-Length together with Transfer-Encoding, duplicate,
  signed or list-valued Content-Length, ``chunked, identity``, obs-fold, bare
  LF, CR/NUL/CTL in values, malformed chunk sizes, over-long lines and too
  many fields. What they let through (measured on both parsers; the corpus in
  tests/security_corpus.py pins it) is refused by `check_request`, run on
  every parsed message inside `data_received`, before the message is handed
  to a handler:

  * a Transfer-Encoding other than exactly ``chunked`` (``gzip, chunked``;
    ``chunked, chunked`` on the Python parser; ``Chunked``),
  * Transfer-Encoding on HTTP/1.0 (RFC 9112 §6.1: a server MUST NOT assume
    it is chunked; reading it as chunked is how a 1.0 front end desyncs),
  * methods with lower-case letters (the Python parser upper-cases ``get``
    to ``GET``; llhttp refuses it: the two would disagree with a front end),
  * HTTP versions other than 1.0 and 1.1 (llhttp hands over 0.9 and 2.0),
  * CONNECT (llhttp switches the connection to tunnel mode),
  * ``Upgrade`` (WebSocket, h2c) unless the matched route allows it,
  * a missing, repeated or malformed ``Host`` (RFC 9112 §3.2),
  * ``Connection`` naming a field the proxy or upstream relies on,
  * an ``Expect`` other than ``100-continue`` (417, RFC 9110 §10.1.1),
  * a Content-Length too long to be a 63-bit number (the Python parser
    would wait for 10^22 bytes).

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

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from etagproxy import headers as hdr
from etagproxy.problems import CONTENT_TYPE, problem, problem_body

__all__ = [
    "ClientBodyError",
    "arrived_body",
    "Guard",
    "GuardedRequestHandler",
    "GuardedServer",
    "Refusal",
    "check_request",
    "client_chunks",
]

log = logging.getLogger("etagproxy.guard")

# RFC 9110 §5.6.2 tchar, without lower-case letters: methods are case
# sensitive (§9.1) and every registered one is upper case.
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")
_METHOD_BYTES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Z]+")
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field-vchar is VCHAR / obs-text, with SP/HTAB between.
# CR, LF and NUL MUST be refused or replaced; other CTLs are refused too.
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §3.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ].
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]"  # IPv6 / IPv4-in-IPv6 literal
    rb"|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]"  # IPvFuture
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"  # reg-name / IPv4, not empty
    rb"(?::[0-9]{0,5})?"
)
# 18 digits always fit in a signed 64-bit integer.
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
_VERSIONS = frozenset({(1, 0), (1, 1)})
# After an answer sent before the whole request body was read, aiohttp reads
# and discards the rest for this long before closing, so the client sees the
# answer rather than a reset (RFC 9112 §9.6). Its default, 10 s, is a free
# hold on a connection for a client that keeps trickling.
LINGER = 2.0
# What reading a request body raises when the client breaks its framing.
_PAYLOAD_ERRORS = (RequestPayloadError, HttpProcessingError)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: the problem+json the client gets."""

    status: int
    kind: str
    detail: str
    title: str = "Bad Request"
    close: bool = True
    """Close the connection behind the response (every framing refusal)."""
    retry_after: str | None = None

    def response(self) -> web.Response:
        headers: list[tuple[str, str]] = []
        if self.retry_after is not None:
            headers.append(("Retry-After", self.retry_after))
        if self.close:
            headers.append(("Connection", "close"))
        resp = problem(self.status, self.kind, self.detail, headers=headers, title=self.title)
        if self.close:
            resp.force_close()
        return resp

    def raw(self) -> bytes:
        """The same response as bytes, for when no request object exists."""
        body = problem_body(self.status, self.kind, self.detail, title=self.title)
        head = (
            f"HTTP/1.1 {self.status} {self.title}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body


def _bad(kind: str, detail: str) -> Refusal:
    return Refusal(400, kind, detail)


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


def check_request(
    method: str,
    target: str,
    version: tuple[int, int],
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    upgrade: bool = False,
    upgrade_allowed: Callable[[str, str, str | None], bool] = lambda m, t, h: False,
) -> Refusal | None:
    """The reason to refuse a parsed request, or None to let it through.

    Pure: it sees what the parser produced (`upgrade` is the parser's own
    upgrade flag) and asks `upgrade_allowed(method, target, host)` only for
    requests that ask to switch protocols.
    """
    if version not in _VERSIONS:
        # RFC 9110 §15.6.6.
        return Refusal(
            505, "http-version", "Only HTTP/1.0 and HTTP/1.1 are served here.",
            title="HTTP Version Not Supported",
        )
    if not _METHOD.fullmatch(method):
        # RFC 9110 §9.1: methods are case-sensitive tokens.
        return _bad("bad-method", "The method must be an upper-case token such as GET or PUT.")
    if method == "CONNECT":
        return _bad("bad-method", "CONNECT tunnels are not offered by this proxy.")
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[str] = []
    expect: list[bytes] = []
    wants_upgrade = upgrade
    for name, value in raw_headers:
        if not _FIELD_NAME.fullmatch(name):
            return _bad("bad-header", "A header field name is not a token.")
        if _FIELD_VALUE_BAD.search(value):
            return _bad("bad-header", "A header field value contains a control character.")
        low = name.lower()
        if low == b"host":
            hosts.append(value)
        elif low == b"content-length":
            lengths.append(value)
        elif low == b"transfer-encoding":
            codings.append(value)
        elif low == b"connection":
            connection.append(value.decode("latin-1"))
        elif low == b"expect":
            expect.append(value)
        elif low == b"upgrade":
            wants_upgrade = True
    # RFC 9112 §3.2: exactly one valid Host in HTTP/1.1, at most one in 1.0.
    if len(hosts) > 1:
        return _bad("bad-host", "The request has more than one Host header field.")
    if not hosts and version == (1, 1):
        return _bad("bad-host", "An HTTP/1.1 request must carry a Host header field.")
    if hosts and not _HOST.fullmatch(hosts[0].strip(b" \t")):
        return _bad("bad-host", "The Host header field is not a valid host[:port].")
    # RFC 9112 §6.1-§6.3: one unambiguous framing, or none.
    if codings and lengths:
        return _bad("bad-framing", "Content-Length and Transfer-Encoding must not both be sent.")
    if len(lengths) > 1:
        return _bad("bad-framing", "Content-Length must be sent at most once.")
    if lengths and not _CONTENT_LENGTH.fullmatch(lengths[0].strip(b" \t")):
        return _bad("bad-framing", "Content-Length must be a decimal number of at most 18 digits.")
    if codings:
        if version == (1, 0):
            return _bad("bad-framing", "Transfer-Encoding is not allowed on HTTP/1.0 requests.")
        if len(codings) > 1 or codings[0].strip(b" \t") != b"chunked":
            return _bad(
                "bad-framing", "The only Transfer-Encoding accepted is exactly 'chunked'."
            )
    if connection:
        try:
            hdr.check_connection(hdr.connection_tokens(connection))
        except hdr.HeaderError as exc:
            return _bad("bad-connection", str(exc))
    if expect and (len(expect) > 1 or expect[0].strip(b" \t").lower() != b"100-continue"):
        # RFC 9110 §10.1.1.
        return Refusal(
            417, "expectation-failed", "The only expectation supported is 100-continue.",
            title="Expectation Failed",
        )
    if wants_upgrade:
        host = hosts[0].decode("latin-1") if hosts else None
        if not upgrade_allowed(method, target, host):
            return _bad("upgrade-refused", "Protocol upgrades are not allowed on this path.")
    return None


class ClientBodyError(Exception):
    """A streamed request body stopped: the client went quiet or went away.

    Raised out of the body iterator, so the upstream exchange is torn down
    mid-body (the upstream never sees a truncated body as complete).
    """

    def __init__(self, kind: str, detail: str, status: int, title: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.refusal = Refusal(status, kind, detail, title=title)

    def response(self) -> web.Response:
        return self.refusal.response()


async def client_chunks(
    request: web.BaseRequest, size: int, idle: float
) -> AsyncIterator[bytes]:
    """The request body as it arrives, at most `idle` seconds between chunks.

    For bodies that are streamed rather than buffered, the whole-body
    deadline (`timeouts.body_read`) would cut off large uploads on a slow
    link; bounding each gap instead still frees the connection from a client
    that stops sending.
    """
    content = request.content
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await content.read(size)
        except TimeoutError:
            raise ClientBodyError(
                "body-timeout", "The request body stopped arriving.", 408, "Request Timeout"
            ) from None
        except (ConnectionError, *_PAYLOAD_ERRORS) as exc:
            raise ClientBodyError(
                "client-body", f"The request body could not be read: {type(exc).__name__}.",
                400, "Bad Request",
            ) from exc
        if not chunk:
            return
        yield chunk


def arrived_body(request: web.BaseRequest) -> bytes | None:
    """The whole request body if all of it has arrived already, else None.

    Small bodies usually come with their headers; reading them needs no
    deadline (and no timer).
    """
    content = request.content
    if not content.is_eof():
        return None
    try:
        return content.read_nowait()
    except (ConnectionError, *_PAYLOAD_ERRORS) as exc:
        raise ClientBodyError(
            "client-body", f"The request body could not be read: {type(exc).__name__}.",
            400, "Bad Request",
        ) from exc


def is_upgrade(msg: RawRequestMessage) -> bool:
    return msg.upgrade or any(name.lower() == b"upgrade" for name, _ in msg.raw_headers)


class StrictRequestParserPy(HttpRequestParserPy):
    """The pure-Python parser, refusing what llhttp refuses and it would not.

    It upper-cases the method before anyone sees it, so a lower-case method
    can only be caught in the raw request line.
    """

    __slots__ = ()

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        method = lines[0].split(b" ", 1)[0]
        if not _METHOD_BYTES.fullmatch(method):
            raise BadHttpMethod(method.decode("latin-1"))
        return super().parse_message(lines)


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
            refusal = request.get(_REFUSAL)
            if refusal is not None:
                return self.refuse(request, refusal)
            if self.in_flight >= self.max_in_flight:
                return self.refuse(request, TOO_MANY_REQUESTS)
            self.in_flight += 1
            try:
                resp = await handler(request)
            finally:
                self.in_flight -= 1
            if request.get(_LAST) or resp.headers.get("Connection", "").lower() == "close":
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
            request, _bad("bad-request", "The request is not valid HTTP/1.1: " + _reason(exc))
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
