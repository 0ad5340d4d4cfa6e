"""HTTP/1.1 framing rules for a request head, as pure checks (RFC 9112).

`check_request` judges one parsed message; `Refusal` is the problem+json a
refused request gets; `StrictRequestParserPy` is the pure-Python parser made
as strict as llhttp. Nothing here does I/O or knows a connection: guard.py
applies these checks at the protocol level.

aiohttp's own parsers (llhttp in C by default, the pure-Python parser
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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage

from etagproxy import headers as hdr
from etagproxy.problems import CONTENT_TYPE, problem, problem_body

__all__ = ["Refusal", "StrictRequestParserPy", "check_request", "is_upgrade"]

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


# Field lines that passed the two checks above, exactly as the parser gave
# them, with their lower-cased name: clients repeat the same lines (Host,
# User-Agent, Accept, the tag they were given) on every request, and a line
# seen before needs neither regular expression again. 2.5 % of a
# store-answered 304's instructions (bench/instructions.py). Bounded in
# entries and in the size of each line (name and value, each kept twice at
# most: under 1 MB); lines whose name looks like it carries a credential
# are never kept. A client sending new lines only empties it now and then.
PASSED_MAX = 1024
PASSED_LINE_MAX = 256
_PASSED: dict[tuple[bytes, bytes], bytes] = {}
_PRIVATE = re.compile(rb"auth|cookie|token|key|secret|session|passw|credential|signature")


def _bad(kind: str, detail: str) -> Refusal:
    return Refusal(400, kind, detail)


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

    Pure but for remembering the field lines that passed (`_PASSED`, which
    only saves work): it sees what the parser produced (`upgrade` is the
    parser's own upgrade flag) and asks `upgrade_allowed(method, target,
    host)` only for requests that ask to switch protocols.
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
    passed = _PASSED
    for line in raw_headers:
        name, value = line
        low = passed.get(line)  # type: ignore[call-overload]
        if low is None:
            if not _FIELD_NAME.fullmatch(name):
                return _bad("bad-header", "A header field name is not a token.")
            if _FIELD_VALUE_BAD.search(value):
                return _bad("bad-header", "A header field value contains a control character.")
            low = name.lower()
            if len(name) + len(value) <= PASSED_LINE_MAX and not _PRIVATE.search(low):
                if len(passed) >= PASSED_MAX:
                    passed.clear()
                passed[line] = low
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


def is_upgrade(msg: RawRequestMessage) -> bool:
    """Whether a message `check_request` let through asks to switch protocols.

    Both parsers build `headers` from the same field lines as `raw_headers`,
    and the names of a message let through are tokens (ASCII), whose
    case-insensitive lookup there is one C call instead of a loop."""
    return msg.upgrade or "Upgrade" in msg.headers


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
