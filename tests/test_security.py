"""Hostile input end to end: raw sockets against a real proxy on loopback.

- the smuggling corpus (tests/security_corpus.py), under llhttp here and
  under the pure-Python parser in a subprocess;
- what the upstream receives: the canonical target, fresh framing;
- slow clients, connection and in-flight limits;
- who may learn the current token from a 412 or a 304;
- property tests over the header grammar (the two parsers never disagree on
  a request the guard lets through) and over target spellings.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiohttp.http_parser
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etagproxy.app import ProxyServer
from etagproxy.cli import main
from etagproxy.config import dump_effective, parse_config
from etagproxy.framing import StrictRequestParserPy, check_request
from etagproxy.guard import LINGER
from etagproxy.store import open_store
from etagproxy.store.base import StoreError
from tests.ports import free_port
from tests.proxy_fixtures import RecordingUpstream
from tests.security_corpus import ACCEPTED, REFUSED, SMUGGLED, Probe

ROOT = Path(__file__).resolve().parent.parent
PY_PARSER = aiohttp.http_parser.HttpRequestParser is HttpRequestParserPy

CORPUS_CONFIG = """
upstream: {upstream}
timeouts: {header_read: 5s}
routes:
  - path: /api/sites/{id}/
  - path: /ws/{rest:path}
    mode: passthrough
    allow_upgrade: true
"""


# --- raw sockets ------------------------------------------------------------------


@dataclass
class Exchanged:
    statuses: list[int] = field(default_factory=list)
    heads: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    closed: bool = False


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response, skipping 1xx; Content-Length framed (all the proxy's own are)."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def exchange(port: int, data: bytes, *, expect: int | None = None, wait: float = 2.0) -> Exchanged:
    """Send `data`, read responses until the connection closes, `expect`
    responses arrived, or `wait` seconds pass."""
    out = Exchanged()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            while expect is None or len(out.statuses) < expect:
                status, headers, body = await read_response(reader)
                out.statuses.append(status)
                out.heads.append(headers)
                out.bodies.append(body)
            if expect is not None:
                return out
    except (asyncio.IncompleteReadError, ConnectionResetError):
        out.closed = True
    except TimeoutError:
        pass
    finally:
        writer.close()
    return out


# --- the corpus ---------------------------------------------------------------------


@pytest.fixture
async def corpus_proxy(make_proxy, recording_upstream):
    return await make_proxy(CORPUS_CONFIG, upstream=recording_upstream.url)


def test_corpus_runs_on_the_parser_asked_for() -> None:
    """The subprocess run below must really use the pure-Python parser."""
    assert PY_PARSER == bool(os.environ.get("AIOHTTP_NO_EXTENSIONS"))


@pytest.mark.parametrize("probe", REFUSED, ids=[p.id for p in REFUSED])
async def test_corpus_refused(probe: Probe, corpus_proxy, recording_upstream: RecordingUpstream) -> None:
    expected = probe.py if PY_PARSER else probe.c
    raw = probe.raw + SMUGGLED if probe.pipeline else probe.raw
    got = await exchange(port_of(corpus_proxy.url), raw, wait=2.0 if expected else 0.5)
    assert all("smuggled" not in r.raw_path for r in recording_upstream.requests), probe.why
    if expected is None:
        # Still reading what it takes for a body: no answer, no request.
        assert got.statuses == [] and not got.closed, probe.why
        return
    assert got.statuses == [expected], probe.why
    assert got.closed, f"{probe.id}: the connection must be closed after a refusal"
    assert got.heads[0]["connection"] == "close"
    assert got.heads[0]["content-type"] == "application/problem+json"
    assert json.loads(got.bodies[0])["status"] == expected
    assert recording_upstream.requests == [], probe.why


async def test_corpus_refusals_reach_the_access_log(corpus_proxy) -> None:
    by_id = {p.id: p for p in REFUSED}
    await exchange(port_of(corpus_proxy.url), by_id["cl-and-te"].raw)  # the parser refuses
    await exchange(port_of(corpus_proxy.url), by_id["te-gzip-chunked"].raw)  # the guard refuses
    seen = [(e.status, e.decision, e.error) for e in corpus_proxy.exchanges]
    assert seen == [(400, "refused", "bad-request"), (400, "refused", "bad-framing")]


async def test_corpus_upgrade_on_an_allowing_route_is_answered_and_closes(
    corpus_proxy, recording_upstream: RecordingUpstream
) -> None:
    raw = (
        b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    got = await exchange(port_of(corpus_proxy.url), raw + SMUGGLED)
    assert got.statuses == [200] and got.closed
    (seen,) = recording_upstream.requests
    assert seen.raw_path == "/ws/chat"
    assert seen.header("Upgrade") is None, "Upgrade is hop-by-hop: the proxy never tunnels"
    assert "upgrade" not in (seen.header("Connection") or "").lower()


def test_corpus_under_the_pure_python_parser() -> None:
    """The same corpus with AIOHTTP_NO_EXTENSIONS=1, in a fresh interpreter
    (the parser is chosen when aiohttp is imported)."""
    if PY_PARSER:
        pytest.skip("this run is the pure-Python one")
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "corpus",
         str(Path(__file__))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) > len(REFUSED) + len(ACCEPTED), tail


# --- what the upstream receives ---------------------------------------------------------


@dataclass
class RawRequest:
    head: bytes
    framing: bytes
    """The body as it crossed the wire (chunk lines included)."""
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def field(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.decode("latin-1").lower() == name.lower():
                out.append(value.strip().decode("latin-1"))
        return out


@dataclass
class RawUpstream:
    """An upstream that records the exact bytes of each request."""

    url: str = ""
    requests: list[RawRequest] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                seen = RawRequest(head[:-4], b"", b"")
                if seen.field("transfer-encoding"):
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        seen.framing += line
                        size = int(line.split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        seen.framing += data
                        seen.body += data[:-2]
                        if size == 0:
                            break
                elif seen.field("content-length"):
                    seen.body = seen.framing = await reader.readexactly(int(seen.field("content-length")[0]))
                self.requests.append(seen)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                if not seen.request_line.startswith("HEAD "):
                    writer.write(b"ok")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield up
    server.close()


@pytest.mark.parametrize("name", list(ACCEPTED))
async def test_corpus_accepted_reaches_the_upstream_framed_afresh(
    name: str, make_proxy, raw_upstream: RawUpstream
) -> None:
    proxy = await make_proxy(CORPUS_CONFIG, upstream=raw_upstream.url)
    got = await exchange(port_of(proxy.url), ACCEPTED[name], expect=1)
    assert got.statuses == [200]
    (seen,) = raw_upstream.requests
    method, target, version = seen.request_line.split(" ")
    assert version == "HTTP/1.1" and target in ("/p", "/api/sites/1/"), "origin-form, HTTP/1.1"
    assert seen.body == b"hello"
    lengths, codings = seen.field("content-length"), seen.field("transfer-encoding")
    if codings:
        assert lengths == [] and codings == ["chunked"]
        for line in seen.framing.split(b"\r\n")[::2][:-1]:
            assert line and all(c in b"0123456789abcdef" for c in line), f"chunk line {line!r}"
        assert seen.framing.endswith(b"\r\n0\r\n\r\n"), "no extensions, no trailers"
    else:
        assert lengths == ["5"], "one Content-Length, in canonical digits"
    for hop in ("upgrade", "te", "trailer", "expect", "keep-alive"):
        assert seen.field(hop) == [], hop
    assert seen.field("host") == (["x"] if b"Host: x" in ACCEPTED[name] else [raw_upstream.url[7:]])


# --- targets: one key per resource, the key's bytes go upstream ------------------------------

TARGETS = """
upstream: {upstream}
routes:
  - path: /api/sites/{id}/
    key_query: [format]
  - path: /api/files/{rest:path}
"""

# Spellings of one resource: (as sent by the client, as the upstream must get it).
SAME_RESOURCE = [
    ("/api/sites/~1/", "/api/sites/~1/"),
    ("/api/sites/%7e1/", "/api/sites/~1/"),
    ("/api/sites/%7E1/", "/api/sites/~1/"),
    ("//api///sites//~1/", "/api/sites/~1/"),
    ("/api/sites/x/%2e%2e/~1/", "/api/sites/~1/"),
    ("/api/sites/x/%2E./~1/", "/api/sites/~1/"),
    ("/api/sites/./~1/", "/api/sites/~1/"),
    ("/api/%73ites/~%31/", "/api/sites/~1/"),
    ("http://x/api/sites/~1/", "/api/sites/~1/"),
    ("HTTP://X:80/api/sites/~1/", "/api/sites/~1/"),
]
ESCAPE_CASE = [("/api/sites/a%3ab/", "/api/sites/a%3Ab/"), ("/api/sites/a%3Ab/", "/api/sites/a%3Ab/")]
QUERY_ORDER = [
    ("/api/sites/1/?format=json&page=2", "/api/sites/1/?format=json&page=2"),
    ("/api/sites/1/?page=2&format=json", "/api/sites/1/?page=2&format=json"),
    ("/api/sites/1/?page=%32&format=%6Ason", "/api/sites/1/?page=2&format=json"),
]
# Different resources, each a single spelling; no two may share a tag.
DISTINCT = [
    ("/api/files/a%2Fb", "/api/files/a%2Fb"),
    ("/api/files/a/b", "/api/files/a/b"),
    ("/api/files/a%252Fb", "/api/files/a%252Fb"),
    ("/api/files/a%25b", "/api/files/a%25b"),
    ("/api/sites/1/?format=xml", "/api/sites/1/?format=xml"),
]
REFUSED_TARGETS = [
    "/api/sites/%C0%AE%C0%AE/",  # overlong UTF-8 for ".."
    "/api/sites/..%2F/",  # a dot segment behind %2F
    "/api/files/a%00b",
    "/api/files/a\\b",
    "/api/files/a%5Cb",
    "/api/files/a#frag",
    "/api/files/%zz",
    "/../../etc/passwd",
    "/api/%2e%2e/%2e%2e/%2e%2e/x",
    "http://evil.example/api/sites/1/",
    "http://x@x/api/sites/1/",
    "*",
]


async def get_raw(port: int, target: str) -> Exchanged:
    return await exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), expect=1)


async def test_spellings_of_one_resource_share_one_tag_and_go_upstream_canonical(
    make_proxy, recording_upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(TARGETS, upstream=recording_upstream.url)
    port = port_of(proxy.url)
    tags: dict[str, set[str]] = {}
    for group, pairs in (("same", SAME_RESOURCE), ("case", ESCAPE_CASE), ("query", QUERY_ORDER)):
        for sent, canonical in pairs:
            got = await get_raw(port, sent)
            assert got.statuses == [200], sent
            assert recording_upstream.requests[-1].raw_path == canonical, sent
            tags.setdefault(group, set()).add(got.heads[0]["etag"])
    for group, found in tags.items():
        assert len(found) == 1, f"{group}: one resource, one tag: {found}"
    distinct = set()
    for sent, canonical in DISTINCT:
        got = await get_raw(port, sent)
        assert recording_upstream.requests[-1].raw_path == canonical, sent
        distinct.add(got.heads[0]["etag"])
    all_tags = distinct | {t for found in tags.values() for t in found}
    assert len(all_tags) == len(DISTINCT) + len(tags), "two resources never share a tag"


@pytest.mark.parametrize("target", REFUSED_TARGETS)
async def test_unsafe_targets_are_400_and_never_forwarded(
    target: str, make_proxy, recording_upstream: RecordingUpstream
) -> None:
    proxy = await make_proxy(TARGETS, upstream=recording_upstream.url)
    raw = b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    got = await exchange(port_of(proxy.url), raw, expect=1)
    assert got.statuses == [400]
    assert got.heads[0]["content-type"] == "application/problem+json"
    assert recording_upstream.requests == []


_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


@st.composite
def spelling(draw: st.DrawFn) -> tuple[str, str]:
    """A random spelling of a random resource under /api/sites/{id}/, and its canonical form."""
    ident = draw(st.text(alphabet=_UNRESERVED + "é:@", min_size=1, max_size=6).filter(
        lambda s: s not in (".", "..")))
    canonical_id = "".join(c if c in _UNRESERVED + ":@" else "%C3%A9" for c in ident)
    out = []
    for char in ident:
        if char == "é":
            out.append(draw(st.sampled_from(["%C3%A9", "%c3%a9", "%C3%a9"])))
        elif char in _UNRESERVED and draw(st.booleans()):
            # Only unreserved characters mean the same encoded (RFC 3986 §2.3);
            # ":" and "@" stay as sent.
            code = f"{ord(char):02X}"
            out.append("%" + draw(st.sampled_from([code, code.lower()])))
        else:
            out.append(char)
    segments = ["api", "sites", "".join(out)]
    path = ""
    for seg in segments:
        path += "/" * draw(st.integers(1, 3)) + seg
        if draw(st.booleans()):
            path += draw(st.sampled_from(["/.", "/%2e", "/x/..", "/y/%2E%2e", "/z/.."]))
    path += "/"
    return path, f"/api/sites/{canonical_id}/"


@dataclass
class Site:
    """A proxy and its upstream, with a repr short enough for Hypothesis reports."""

    port: int
    upstream: RecordingUpstream

    def __repr__(self) -> str:
        return f"Site(port={self.port})"


@pytest.fixture
async def targets_site(make_proxy, recording_upstream) -> Site:
    proxy = await make_proxy(TARGETS, upstream=recording_upstream.url)
    return Site(port_of(proxy.url), recording_upstream)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spellings=st.lists(spelling(), min_size=1, max_size=3))
async def test_property_any_spelling_gets_the_canonical_tag(
    spellings: list[tuple[str, str]], targets_site: Site
) -> None:
    """The proxy (and its store) is shared by all examples: tags must agree
    across them too."""
    port = targets_site.port
    for sent, canonical in spellings:
        got = await get_raw(port, sent)
        assert got.statuses == [200], sent
        assert targets_site.upstream.requests[-1].raw_path == canonical, sent
        again = await get_raw(port, canonical)
        assert again.heads[0]["etag"] == got.heads[0]["etag"], (sent, canonical)


# --- the header grammar: the two parsers agree on whatever the guard lets through -----------

_PARSER_C = getattr(aiohttp.http_parser, "HttpRequestParserC", None)
Parsed = tuple[str, str, tuple[int, int], tuple[tuple[bytes, bytes], ...], bool, bytes, bool]


def parse_all(parser_cls: type, data: bytes, loop: asyncio.AbstractEventLoop) -> list[Parsed]:
    """The requests `data` splits into, up to the first the guard refuses.

    Fed in one read, as the worst case: an error anywhere refuses them all.
    """
    parser = parser_cls(BaseProtocol(loop), loop, 2**16, max_line_size=8190, max_field_size=8190,
                        max_headers=100)
    try:
        messages, _, _ = parser.feed_data(data)
    except aiohttp.http_exceptions.HttpProcessingError:
        return []
    out: list[Parsed] = []
    for msg, payload in messages:
        assert isinstance(msg, RawRequestMessage)
        if check_request(msg.method, msg.path, (msg.version.major, msg.version.minor),
                         msg.raw_headers, upgrade=msg.upgrade) is not None:
            break
        body = payload.read_nowait(-1) if payload.is_eof() or payload._buffer else b""
        out.append((msg.method, msg.path, (msg.version.major, msg.version.minor),
                    tuple(msg.raw_headers), msg.chunked, body, payload.is_eof()))
    return out


_FIELD_VALUES = {
    b"Host": [b"x", b"x:80", b"[::1]:8080", b"x y", b"", b"a@b", b"x, y"],
    b"Content-Length": [b"5", b"05", b"0", b"+5", b"-5", b"5, 5", b"5 5", b"0x5", b"99999999999999999999"],
    b"Transfer-Encoding": [b"chunked", b"Chunked", b"gzip, chunked", b"chunked, identity",
                           b"identity", b"chunked, chunked", b"\tchunked", b"", b"\x0bchunked"],
    b"Connection": [b"close", b"keep-alive", b"upgrade", b"Content-Length", b"x-foo"],
    b"Upgrade": [b"h2c", b"websocket"],
    b"Expect": [b"100-continue", b"100-Continue", b"nope"],
    b"X-Any": [b"plain", b"caf\xe9", b"a\tb", b"a\x00b", b"a\x0bb", b"a\x7fb", b"a\rb"],
}


@st.composite
def raw_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"get", b"Post", b"DELETE", b"PURGE"]))
    target = draw(st.sampled_from([b"/p", b"/p?a=1", b"http://x/p", b"//p", b"/p#f"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    names = draw(st.lists(st.sampled_from(list(_FIELD_VALUES)), max_size=5))
    lines = [method + b" " + target + b" " + version]
    for name in names:
        spelled = draw(st.sampled_from([name, name.lower(), name.upper(), name + b" "]))
        value = draw(st.sampled_from(_FIELD_VALUES[name]))
        lines.append(spelled + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value)
    sep = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    # (Chunked trailers are left out: aiohttp's llhttp wrapper hands trailer
    # fields to the *next* request on the connection as headers, where the
    # pure-Python parser drops them. Both cut the bytes into the same
    # requests; see docs/SECURITY.md, residual risks.)
    body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n",
                                 b"5;e=1\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n"]))
    return sep.join(lines) + sep + sep + body + SMUGGLED


@pytest.mark.skipif(_PARSER_C is None, reason="llhttp is not loaded (AIOHTTP_NO_EXTENSIONS)")
@settings(max_examples=400, deadline=None)
@given(data=raw_request())
def test_property_parsers_agree_on_every_request_the_guard_accepts(data: bytes) -> None:
    """No desync: wherever both parsers (llhttp, and the pure-Python one as
    the guard configures it) hand over requests the guard accepts, they cut
    the bytes into the same requests, with the same framing and body."""
    loop = asyncio.new_event_loop()
    try:
        c = parse_all(_PARSER_C, data, loop)
        py = parse_all(StrictRequestParserPy, data, loop)
    finally:
        loop.close()
    for a, b in zip(c, py):
        assert a == b


def test_guard_refusals_are_pinned_on_a_few_exact_cases() -> None:
    """check_request on its own: the cases no parser refuses before it."""
    h = [(b"Host", b"x")]
    assert check_request("GET", "/", (1, 1), h) is None
    assert check_request("POST", "/", (1, 1), [*h, (b"Transfer-Encoding", b"chunked")]) is None
    assert check_request("POST", "/", (1, 1), [*h, (b"Transfer-Encoding", b"gzip, chunked")]).status == 400
    assert check_request("POST", "/", (1, 0), [(b"Transfer-Encoding", b"chunked")]).status == 400
    assert check_request("GET", "/", (1, 0), []) is None, "HTTP/1.0 needs no Host"
    assert check_request("GET", "/", (2, 0), h).status == 505
    assert check_request("get", "/", (1, 1), h).status == 400
    assert check_request("GET", "/", (1, 1), [*h, (b"Expect", b"100-continue")]) is None
    assert check_request("GET", "/", (1, 1), [*h, (b"Expect", b"x")]).status == 417
    assert check_request("GET", "/", (1, 1), [*h, (b"Upgrade", b"h2c")]).status == 400
    allowed = check_request(
        "GET", "/ws", (1, 1), [*h, (b"Upgrade", b"h2c")], upgrade_allowed=lambda m, t, host: t == "/ws"
    )
    assert allowed is None
    for host in (b"x:8080", b"[::1]", b"[::1]:80", b"10.0.0.1", b"a-b.c_d~e"):
        assert check_request("GET", "/", (1, 1), [(b"Host", host)]) is None, host
    for host in (b"", b"a b", b"a@b", b"a/b", b"[::1", b"x:80:80"):
        assert check_request("GET", "/", (1, 1), [(b"Host", host)]).status == 400, host


# --- Expect: 100-continue and max_body ---------------------------------------------------------

LIMITED = """
upstream: {upstream}
limits: {max_body: 1KiB}
routes:
  - path: /api/sites/{id}/
"""


async def test_expect_100_continue_is_answered_before_the_body(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(LIMITED, upstream=recording_upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        writer.write(b"PUT /api/sites/1/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        assert recording_upstream.requests == []
        writer.write(b"hello")
        status, headers, _ = await asyncio.wait_for(read_response(reader), 2)
        assert status == 200 and "etag" in headers
        assert recording_upstream.requests[0].body == b"hello"
        assert recording_upstream.requests[0].header("Expect") is None
    finally:
        writer.close()


async def test_declared_body_over_max_body_is_413_without_100_continue(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(LIMITED, upstream=recording_upstream.url)
    got = await exchange(
        port_of(proxy.url),
        b"PUT /api/sites/1/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
    )
    assert got.statuses == [413], "no 100 Continue first: the client need not send the body"
    assert got.closed
    assert recording_upstream.requests == []


async def test_chunked_body_over_max_body_is_413_as_it_arrives(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(LIMITED, upstream=recording_upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        writer.write(b"PUT /api/sites/1/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"200\r\n" + b"x" * 512 + b"\r\n"
        writer.write(chunk * 3)  # 1.5 KiB, and the body is not finished
        status, headers, _ = await asyncio.wait_for(read_response(reader), 2)
        assert status == 413 and headers["connection"] == "close"
        # Closed once the lingering read (guard.LINGER) is over.
        assert await asyncio.wait_for(reader.read(), 2 * LINGER) == b"", "closed after the 413"
    finally:
        writer.close()
    assert recording_upstream.requests == []


# --- slow clients -------------------------------------------------------------------------------

SLOW = """
upstream: {upstream}
timeouts: {header_read: 300ms, body_read: 300ms, write_wait: 3s, keepalive: 30s}
routes:
  - path: /api/sites/{id}/
"""


async def test_a_head_not_finished_within_header_read_gets_408_and_is_closed(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(SLOW, upstream=recording_upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    start = time.monotonic()
    try:
        writer.write(b"GET /api/sites/1/ HTTP/1.1\r\nHost: x\r\n")
        answer = asyncio.ensure_future(read_response(reader))
        # Trickle until answered: activity does not extend the deadline.
        for _ in range(40):
            done, _ = await asyncio.wait([answer], timeout=0.05)
            if done:
                break
            writer.write(b"X-Slow: 1\r\n")
        status, headers, _ = await asyncio.wait_for(answer, 2)
        elapsed = time.monotonic() - start
        assert status == 408 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()
    assert 0.3 <= elapsed < 1.0, "cut at header_read, not at the keep-alive timeout"
    assert recording_upstream.requests == []


async def test_a_silent_connection_is_closed_after_header_read(make_proxy) -> None:
    proxy = await make_proxy(SLOW)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        assert await asyncio.wait_for(reader.read(), 2) == b"", "closed without a response"
    finally:
        writer.close()


async def test_an_idle_keep_alive_connection_is_not_cut_at_header_read(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(SLOW, upstream=recording_upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        for _ in range(2):
            writer.write(b"GET /api/sites/1/ HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await asyncio.wait_for(read_response(reader), 2)
            assert status == 200
            await asyncio.sleep(0.6)  # twice header_read, well inside keepalive
    finally:
        writer.close()


async def test_a_slow_body_never_holds_the_write_slot(make_proxy, recording_upstream) -> None:
    """DESIGN §2.1: the body is read before BEGIN. A writer stuck mid-body must
    not make another writer of the same resource wait (write_wait is 3 s)."""
    proxy = await make_proxy(SLOW.replace("300ms, body_read: 300ms", "300ms, body_read: 5s"),
                             upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            tag = r.headers["ETag"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        writer.write(b"PUT /api/sites/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                     b"If-Match: " + tag.encode() + b"\r\n\r\nhello")
        await writer.drain()
        start = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.put(proxy.url + "/api/sites/1/", data=b"fast", headers={"If-Match": tag}) as r:
                assert r.status == 200
        assert time.monotonic() - start < 1.0
        writer.write(b"world")
        status, _, _ = await asyncio.wait_for(read_response(reader), 2)
        assert status == 412, "its tag was spent by the fast writer"
    finally:
        writer.close()
    assert [r.body for r in recording_upstream.writes()] == [b"fast"]


async def test_a_write_body_not_sent_within_body_read_is_408(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(SLOW, upstream=recording_upstream.url)
    got = await exchange(
        port_of(proxy.url),
        b"PUT /api/sites/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello",
    )
    assert got.statuses == [408] and got.closed
    assert recording_upstream.requests == []


async def test_a_streamed_body_that_stops_is_cut_and_never_completes_upstream(
    make_proxy, raw_upstream: RawUpstream
) -> None:
    proxy = await make_proxy(SLOW, upstream=raw_upstream.url)
    got = await exchange(
        port_of(proxy.url),
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    assert got.statuses == [408] and got.closed
    assert got.heads[0]["content-type"] == "application/problem+json"
    assert raw_upstream.requests == [], "the upstream never saw the body end"


# --- limits ---------------------------------------------------------------------------------------


async def test_connections_over_max_connections_get_503(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(
        "upstream: {upstream}\nlimits: {max_connections: 2}\n", upstream=recording_upstream.url
    )
    port = port_of(proxy.url)
    held = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 2))[0] == 200
        held.append(writer)
    try:
        got = await exchange(port, b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.statuses == [503] and got.closed
        assert got.heads[0]["retry-after"] == "1"
        assert len(recording_upstream.requests) == 2
    finally:
        held.pop().close()
    for _ in range(50):  # the proxy sees the close on its next loop turn
        got = await exchange(port, b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n", expect=1)
        if got.statuses == [200]:
            break
        await asyncio.sleep(0.01)
    assert got.statuses == [200]
    for writer in held:
        writer.close()


async def test_requests_over_max_in_flight_get_503(make_proxy, recording_upstream) -> None:
    gate = asyncio.Event()
    arrived = asyncio.Semaphore(0)

    async def respond(request: web.BaseRequest, body: bytes) -> web.Response:
        arrived.release()
        await gate.wait()
        return web.Response(text="ok")

    recording_upstream.respond = respond
    proxy = await make_proxy(
        "upstream: {upstream}\nlimits: {max_in_flight: 2}\n", upstream=recording_upstream.url
    )
    async with aiohttp.ClientSession() as s:
        held = [asyncio.ensure_future(s.get(proxy.url + f"/p{i}")) for i in range(2)]
        for _ in range(2):
            await asyncio.wait_for(arrived.acquire(), 2)
        async with s.get(proxy.url + "/p3") as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
        gate.set()
        for fut in held:
            resp = await fut
            assert resp.status == 200
            resp.release()
        async with s.get(proxy.url + "/p4") as r:
            assert r.status == 200
    assert sorted(r.raw_path for r in recording_upstream.requests) == ["/p0", "/p1", "/p4"]


# --- who may learn the current token ---------------------------------------------------------

AUTHZ = """
upstream: {upstream}
routes:
  - path: /open/{id}
    etag_in_412: true
  - path: /closed/{id}
  - path: /sc/{id}
    short_circuit: true
  - path: /guarded/{id}
    authorize: upstream
    etag_in_412: true
"""
ALICE = {"Authorization": "Bearer alice"}
MALLORY = {"Authorization": "Bearer mallory"}


BOB = {"Authorization": "Bearer bob"}


def only_alice(recording_upstream: RecordingUpstream, *, also: tuple[str, ...] = ()) -> None:
    """An upstream that lets Alice (and `also`, and nobody else) read or write."""

    async def respond(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.headers.get("Authorization") not in (ALICE["Authorization"], *also):
            return web.Response(status=403, text="no", headers={"WWW-Authenticate": "Bearer"})
        return await recording_upstream.default(request, body)

    recording_upstream.respond = respond


async def test_412_carries_the_current_etag_only_for_credentials_seen_succeeding(
    make_proxy, recording_upstream
) -> None:
    only_alice(recording_upstream)
    proxy = await make_proxy(AUTHZ, upstream=recording_upstream.url)
    stale = {"If-Match": '"stale"'}
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/open/1", headers=MALLORY) as r:
            assert r.status == 403 and "ETag" not in r.headers
        async with s.put(proxy.url + "/open/1", data=b"x", headers={**MALLORY, **stale}) as r:
            assert r.status == 412
            assert "ETag" not in r.headers
            assert "current_etag" not in await r.json(content_type=None)
        async with s.put(proxy.url + "/open/1", data=b"x", headers=stale) as r:
            assert r.status == 412 and "ETag" not in r.headers, "no credentials at all"
        async with s.get(proxy.url + "/open/1", headers=ALICE) as r:
            tag = r.headers["ETag"]
        async with s.put(proxy.url + "/open/1", data=b"x", headers={**ALICE, **stale}) as r:
            assert r.status == 412
            assert r.headers["ETag"] == tag
            assert (await r.json(content_type=None))["current_etag"] == tag
        async with s.put(proxy.url + "/open/1", data=b"x", headers={**MALLORY, **stale}) as r:
            assert "ETag" not in r.headers, "Alice's read does not vouch for Mallory"
        # Without etag_in_412 nobody gets it, whoever they are.
        async with s.get(proxy.url + "/closed/1", headers=ALICE) as r:
            assert r.status == 200
        async with s.put(proxy.url + "/closed/1", data=b"x", headers={**ALICE, **stale}) as r:
            assert r.status == 412 and "ETag" not in r.headers
    assert recording_upstream.writes() == []


async def test_a_successful_write_counts_as_seen(make_proxy, recording_upstream) -> None:
    proxy = await make_proxy(AUTHZ, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.put(proxy.url + "/open/2", data=b"v1", headers=ALICE) as r:
            assert r.status == 200
            tag = r.headers["ETag"]
        async with s.put(proxy.url + "/open/2", data=b"v2", headers={**ALICE, "If-Match": '"old"'}) as r:
            assert r.status == 412 and r.headers["ETag"] == tag


async def test_short_circuit_answers_only_credentials_it_has_seen(make_proxy, recording_upstream) -> None:
    only_alice(recording_upstream)
    proxy = await make_proxy(AUTHZ, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/sc/1", headers=ALICE) as r:
            tag = r.headers["ETag"]
        await asyncio.sleep(0.05)  # the reader record is written in the background
        before = len(recording_upstream.requests)
        async with s.get(proxy.url + "/sc/1", headers={**ALICE, "If-None-Match": tag}) as r:
            assert r.status == 304 and r.headers["ETag"] == tag
        assert len(recording_upstream.requests) == before, "answered from the store"
        async with s.get(proxy.url + "/sc/1", headers={**MALLORY, "If-None-Match": tag}) as r:
            assert r.status == 403, "forwarded: the upstream refuses Mallory"
            assert "ETag" not in r.headers
        assert len(recording_upstream.requests) == before + 1
        async with s.get(proxy.url + "/sc/1", headers={"If-None-Match": tag}) as r:
            assert r.status == 403
        assert len(recording_upstream.requests) == before + 2


async def test_authorize_upstream_relays_a_refusal_before_any_412(make_proxy, recording_upstream) -> None:
    only_alice(recording_upstream, also=(BOB["Authorization"],))
    proxy = await make_proxy(AUTHZ, upstream=recording_upstream.url)
    stale = {"If-Match": '"stale"', "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/guarded/1", headers=BOB) as r:
            current = r.headers["ETag"]
        async with s.put(proxy.url + "/guarded/1", data=b"x", headers={**MALLORY, **stale}) as r:
            assert r.status == 403, "RFC 9110 §13.2.1: the refusal wins over the precondition"
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert "ETag" not in r.headers
        probe = recording_upstream.requests[-1]
        assert probe.method == "HEAD" and probe.raw_path == "/guarded/1"
        assert probe.header("Authorization") == MALLORY["Authorization"]
        for hidden in ("If-Match", "Content-Type", "Content-Length"):
            assert probe.header(hidden) is None, hidden
        # Alice never read it: the upstream's 2xx to her probe is what vouches.
        async with s.put(proxy.url + "/guarded/1", data=b"x", headers={**ALICE, **stale}) as r:
            assert r.status == 412
            assert r.headers["ETag"] == current
    assert recording_upstream.writes() == []


async def test_authorize_falls_back_to_get_when_head_is_not_served(make_proxy, recording_upstream) -> None:
    async def respond(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(status=405)
        if request.method == "GET" and request.raw_path == "/guarded/gone":
            return web.Response(status=404, text="no such thing")
        return await recording_upstream.default(request, body)

    recording_upstream.respond = respond
    proxy = await make_proxy(AUTHZ, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.put(proxy.url + "/guarded/gone", data=b"x", headers={"If-Match": '"x"'}) as r:
            assert r.status == 404
            assert await r.text() == "no such thing"
    assert [r.method for r in recording_upstream.requests] == ["HEAD", "GET"]


# --- secrets ------------------------------------------------------------------------------------


async def test_store_password_never_shows_in_errors_readyz_inspect_or_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "s3cr3t-Pa55"
    url = f"redis://user:{secret}@127.0.0.1:{free_port()}/0"
    config = parse_config(f"listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\nstore: {url}\n")
    assert secret not in repr(config) and secret not in json.dumps(dump_effective(config))
    store = open_store(config.store, timeout_s=0.2)
    try:
        with pytest.raises(StoreError) as info:
            await store.ping()
        assert secret not in str(info.value) and secret not in repr(info.value)
    finally:
        await store.close()
    server = ProxyServer(config)
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.admin_port}/readyz") as r:
                assert r.status == 503
                assert secret not in await r.text()
    finally:
        await server.stop()
    good = tmp_path / "good.yaml"
    good.write_text(f"upstream: http://127.0.0.1:9\nstore: {url}\nroutes:\n  - path: /a/{{id}}\n")
    assert await asyncio.to_thread(main, ["inspect", "--config", str(good), "/a/1"]) == 1, "store unreachable"
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"upstream: http://127.0.0.1:9\nstore: {url.replace('redis://', 'redis+nope://')}\n")
    assert main(["check-config", str(bad)]) != 0
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert "***" in out.out + out.err
