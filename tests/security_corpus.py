"""Request-smuggling and hostile-framing probes, as raw bytes.

Each `Probe` says what the proxy must answer with llhttp (aiohttp's C
parser, the default) and with the pure-Python parser
(``AIOHTTP_NO_EXTENSIONS=1``). A refused probe must get exactly that one
response, on a connection that is then closed, and nothing may reach the
upstream; `SMUGGLED` is pipelined behind every refused probe to show that
nothing after a refusal is read as a request.

Where the two parsers differ the difference is stated and harmless: the
upstream is always sent a freshly framed request, so a divergence can only
matter between the proxy and a front end, and none of them lets a second
request through.
"""

from __future__ import annotations

from dataclasses import dataclass

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def req(*lines: bytes, body: bytes = b"", sep: bytes = b"\r\n") -> bytes:
    return sep.join(lines) + sep + sep + body


@dataclass(frozen=True)
class Probe:
    id: str
    raw: bytes
    c: int | None
    """Status with llhttp."""
    py: int | None
    """Status with the pure-Python parser; None: no answer yet (body still being read)."""
    why: str
    pipeline: bool = True
    """Send `SMUGGLED` right behind it."""


def probe(
    id: str, raw: bytes, status: int, why: str, *, py: int | None | str = "same",
    pipeline: bool = True,
) -> Probe:
    return Probe(id, raw, status, status if py == "same" else py, why, pipeline)  # type: ignore[arg-type]


POST = b"POST /p HTTP/1.1"
HOST = b"Host: x"
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

REFUSED: list[Probe] = [
    # -- Content-Length / Transfer-Encoding ambiguity (RFC 9112 §6.1-§6.3)
    probe("cl-and-te", req(POST, HOST, b"Content-Length: 5", b"Transfer-Encoding: chunked",
                           body=b"0\r\n\r\n" + SMUGGLED), 400, "CL.TE desync"),
    probe("te-and-cl", req(POST, HOST, b"Transfer-Encoding: chunked", b"Content-Length: 5",
                           body=b"0\r\n\r\n"), 400, "TE.CL desync"),
    probe("cl-te-hides-request", req(b"POST /api/sites/1/ HTTP/1.1", HOST, b"Content-Length: 4",
                                     b"Transfer-Encoding: chunked",
                                     body=b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"), 400,
          "the classic PortSwigger CL.TE probe on a tracked route"),
    probe("cl-twice-same", req(POST, HOST, b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
          400, "duplicate Content-Length, even equal"),
    probe("cl-twice-different", req(POST, HOST, b"Content-Length: 5", b"Content-Length: 6",
                                    body=b"hello!"), 400, "conflicting Content-Length"),
    probe("cl-list", req(POST, HOST, b"Content-Length: 5, 5", body=b"hello"), 400, "list-valued"),
    probe("cl-plus", req(POST, HOST, b"Content-Length: +5", body=b"hello"), 400, "signed"),
    probe("cl-minus", req(POST, HOST, b"Content-Length: -5", body=b"hello"), 400, "negative"),
    probe("cl-hex", req(POST, HOST, b"Content-Length: 0x5", body=b"hello"), 400, "hex"),
    probe("cl-inner-space", req(POST, HOST, b"Content-Length: 1 2", body=b"hello"), 400, "two numbers"),
    probe("cl-overflow", req(POST, HOST, b"Content-Length: 99999999999999999999999", body=b"hello"),
          400, "wraps in 64 bits; the Python parser alone would wait for it"),
    probe("te-gzip-chunked", req(POST, HOST, b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
          400, "a coding before chunked: both parsers accept it, the guard does not"),
    probe("te-chunked-identity", req(POST, HOST, b"Transfer-Encoding: chunked, identity",
                                     body=CHUNKED_BODY), 400, "chunked not last"),
    probe("te-identity", req(POST, HOST, b"Transfer-Encoding: identity", body=b"hello"), 400,
          "obsolete coding"),
    probe("te-twice", req(POST, HOST, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                          body=CHUNKED_BODY), 400, "two field lines"),
    probe("te-chunked-chunked", req(POST, HOST, b"Transfer-Encoding: chunked, chunked",
                                    body=CHUNKED_BODY), 400, "the Python parser accepts it"),
    probe("te-capitalised", req(POST, HOST, b"Transfer-Encoding: Chunked", body=CHUNKED_BODY), 400,
          "not exactly 'chunked': a front end matching bytes would not see chunked"),
    probe("te-xchunked", req(POST, HOST, b"Transfer-Encoding: xchunked", body=CHUNKED_BODY), 400,
          "unknown coding"),
    probe("te-vertical-tab", req(POST, HOST, b"Transfer-Encoding: \x0bchunked", body=CHUNKED_BODY),
          400, "VT is not whitespace in HTTP"),
    probe("te-space-before-colon", req(POST, HOST, b"Transfer-Encoding : chunked", body=CHUNKED_BODY),
          400, "RFC 9112 §5.1: no whitespace between name and colon"),
    probe("te-empty", req(POST, HOST, b"Transfer-Encoding: ", body=CHUNKED_BODY), 400, "empty coding"),
    probe("te-on-http10", req(b"POST /p HTTP/1.0", HOST, b"Transfer-Encoding: chunked",
                              body=CHUNKED_BODY), 400,
          "both parsers read it as chunked; a 1.0 front end would not (RFC 9112 §6.1)"),
    probe("te-obs-fold", req(POST, HOST, b"Transfer-Encoding:", b" chunked", body=CHUNKED_BODY), 400,
          "folded framing header"),
    # -- chunked body syntax
    probe("chunk-size-0x", req(POST, HOST, b"Transfer-Encoding: chunked",
                               body=b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "hex prefix"),
    probe("chunk-size-negative", req(POST, HOST, b"Transfer-Encoding: chunked",
                                     body=b"-5\r\nhello\r\n0\r\n\r\n"), 400, "negative"),
    probe("chunk-size-space", req(POST, HOST, b"Transfer-Encoding: chunked",
                                  body=b"5 \r\nhello\r\n0\r\n\r\n"), 400, "whitespace"),
    probe("chunk-size-overflow", req(POST, HOST, b"Transfer-Encoding: chunked",
                                     body=b"ffffffffffffffffff5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
          400, "llhttp refuses; the Python parser reads a huge chunk, so what follows is chunk data"
          " and never a request", py=None),
    probe("chunk-bare-lf", req(POST, HOST, b"Transfer-Encoding: chunked", body=b"5\nhello\n0\n\n"),
          400, "bare LF in chunked framing"),
    probe("chunk-missing-crlf", req(POST, HOST, b"Transfer-Encoding: chunked",
                                    body=b"5\r\nhelloXX0\r\n\r\n"), 400, "data longer than its size"),
    probe("chunk-ext-lf", req(POST, HOST, b"Transfer-Encoding: chunked",
                              body=b"5;a\nb\r\nhello\r\n0\r\n\r\n"), 400, "LF inside an extension"),
    # -- line syntax
    probe("obs-fold", req(b"GET /p HTTP/1.1", HOST, b"X-Foo: a", b" b"), 400, "RFC 9112 §5.2"),
    probe("leading-whitespace-field", req(b"GET /p HTTP/1.1", b" Host: x"), 400,
          "whitespace before the first field"),
    probe("bare-lf-everywhere", req(b"GET /p HTTP/1.1", HOST, sep=b"\n"), 400, "LF line ends"),
    probe("bare-lf-one-field", b"GET /p HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", 400, "one bare LF"),
    probe("bare-lf-end", b"GET /p HTTP/1.1\r\nHost: x\r\n\n", 400, "head ended by LF"),
    probe("cr-in-value", req(b"GET /p HTTP/1.1", HOST, b"X-A: a\rb"), 400, "bare CR"),
    probe("nul-in-value", req(b"GET /p HTTP/1.1", HOST, b"X-A: a\x00b"), 400, "NUL"),
    probe("ctl-in-value", req(b"GET /p HTTP/1.1", HOST, b"X-A: a\x01b"), 400, "control character"),
    probe("del-in-value", req(b"GET /p HTTP/1.1", HOST, b"X-A: a\x7fb"), 400, "DEL"),
    probe("bad-field-name", req(b"GET /p HTTP/1.1", HOST, b"X(A): 1"), 400, "not a token"),
    probe("empty-field-name", req(b"GET /p HTTP/1.1", HOST, b": 1"), 400, "empty name"),
    probe("long-field-line", req(b"GET /p HTTP/1.1", HOST, b"X-A: " + b"a" * 9000), 400,
          "over limits.max_header_size"),
    probe("long-request-line", req(b"GET /" + b"a" * 9000 + b" HTTP/1.1", HOST), 400,
          "over limits.max_header_size"),
    probe("too-many-fields", req(b"GET /p HTTP/1.1", HOST, *[b"X-%d: 1" % i for i in range(150)]),
          400, "over limits.max_headers"),
    probe("nul-in-target", req(b"GET /p\x00b HTTP/1.1", HOST), 400, "NUL in the target"),
    probe("tab-in-request-line", b"GET\t/p HTTP/1.1\r\nHost: x\r\n\r\n", 400, "HTAB separator"),
    probe("lower-case-version", req(b"GET /p http/1.1", HOST), 400, "version is case-sensitive"),
    probe("garbage-version", req(b"GET /p HTTP/1.1x", HOST), 400, "trailing garbage"),
    # -- methods and versions
    probe("lower-case-method", req(b"get /p HTTP/1.1", HOST), 400,
          "llhttp refuses; the Python parser would upper-case it to GET"),
    probe("mixed-case-method", req(b"Get /p HTTP/1.1", HOST), 400, "as above"),
    probe("lower-case-method-cl-te", req(b"post /p HTTP/1.1", HOST, b"Content-Length: 5",
                                         b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400,
          "the two combined"),
    probe("connect", req(b"CONNECT evil:443 HTTP/1.1", b"Host: evil:443"), 400,
          "llhttp switches the connection to tunnel mode"),
    # (alone: with a request behind them llhttp fails the whole read, 400)
    probe("http2-version", req(b"GET /p HTTP/2.0", HOST), 505, "llhttp hands it over as 2.0",
          pipeline=False),
    probe("http09", b"GET /p\r\n\r\n", 505, "llhttp hands it over as 0.9", py=400,
          pipeline=False),
    probe("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "prior-knowledge h2c"),
    # -- Host (RFC 9112 §3.2)
    probe("no-host", req(b"GET /p HTTP/1.1"), 400, "HTTP/1.1 without Host"),
    probe("two-hosts", req(b"GET /p HTTP/1.1", HOST, b"Host: y"), 400, "two Host lines"),
    probe("host-with-space", req(b"GET /p HTTP/1.1", b"Host: x y"), 400, "both parsers accept it"),
    probe("host-empty", req(b"GET /p HTTP/1.1", b"Host: "), 400, "empty host"),
    probe("host-userinfo", req(b"GET /p HTTP/1.1", b"Host: a@b"), 400, "userinfo in Host"),
    probe("host-two-on-http10", req(b"GET /p HTTP/1.0", HOST, b"Host: y"), 400, "also on 1.0"),
    # -- Upgrade (h2c and WebSocket smuggling)
    probe("upgrade-websocket", req(b"GET /p HTTP/1.1", HOST, b"Connection: Upgrade",
                                   b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
                                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="), 400,
          "the route does not allow upgrades"),
    probe("upgrade-h2c", req(b"GET /p HTTP/1.1", HOST, b"Connection: Upgrade, HTTP2-Settings",
                             b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"), 400,
          "h2c smuggling"),
    probe("upgrade-without-connection", req(b"GET /p HTTP/1.1", HOST, b"Upgrade: h2c"), 400,
          "Upgrade alone is refused too"),
    probe("upgrade-h2c-tracked", req(b"GET /api/sites/1/ HTTP/1.1", HOST, b"Connection: Upgrade",
                                     b"Upgrade: h2c"), 400, "tracked route without allow_upgrade"),
    # -- Connection stripping protected fields (RFC 9110 §7.6.1)
    *[
        probe(f"connection-strips-{name.lower()}",
              req(b"GET /p HTTP/1.1", HOST, b"Authorization: Basic eDp5", b"If-Match: \"t\"",
                  b"Connection: close, " + name.encode()), 400,
              "a hop-by-hop option must not remove what the proxy relies on")
        for name in ("Host", "Authorization", "Content-Length", "Transfer-Encoding", "If-Match",
                     "If-None-Match", "X-Forwarded-For", "X-Forwarded-Host")
    ],
    # -- Expect (RFC 9110 §10.1.1)
    probe("expect-unknown", req(POST, HOST, b"Expect: something", b"Content-Length: 5", body=b"hello"),
          417, "only 100-continue is known"),
]

# Probes the proxy accepts, with what the upstream must see (checked on the
# raw bytes it receives: freshly framed, nothing of the client's framing).
ACCEPTED: dict[str, bytes] = {
    "content-length": req(POST, HOST, b"Content-Length: 5", body=b"hello"),
    "content-length-leading-zeros": req(POST, HOST, b"Content-Length: 005", body=b"hello"),
    "chunked-extensions-trailer": req(POST, HOST, b"Transfer-Encoding: chunked",
                                      body=b"2;ext=1\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: t\r\n\r\n"),
    "chunked-tab-ows": req(POST, HOST, b"Transfer-Encoding:\tchunked ", body=CHUNKED_BODY),
    "get-with-body": req(b"GET /p HTTP/1.1", HOST, b"Content-Length: 5", body=b"hello"),
    "http10-without-host": req(b"POST /p HTTP/1.0", b"Content-Length: 5", body=b"hello"),
    "tracked-write-chunked": req(b"PUT /api/sites/1/ HTTP/1.1", HOST, b"Transfer-Encoding: chunked",
                                 body=CHUNKED_BODY),
    "absolute-form-same-host": req(b"POST http://x/p HTTP/1.1", HOST, b"Content-Length: 5",
                                   body=b"hello"),
}
