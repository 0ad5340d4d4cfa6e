"""Fuzz the full request path: raw bytes -> guard -> proxy -> upstream.

Hypothesis builds byte streams from the HTTP/1.1 request grammar (methods,
targets, versions, framing fields with hostile values, chunked bodies) and
then mutates them (flipped bytes, inserted CR/LF/NUL/SP/HTAB, duplicated or
cut lines, splits across reads). Each stream goes to a proxy on loopback
over a fresh connection; afterwards these must hold:

  - no 500 and no response that is not well-formed HTTP/1.x;
  - every request the upstream received is freshly framed: HTTP/1.1,
    origin-form, an upper-case method, exactly one of Content-Length or
    `Transfer-Encoding: chunked` (or neither, without a body), no Upgrade,
    TE, Trailer, Expect or Keep-Alive field, no chunk extensions;
  - the upstream got no more requests than the client got responses, and
    each of them is one llhttp and the guard accept from the stream, in
    order (nothing smuggled, nothing invented);
  - the proxy still answers a plain GET.

Loopback only, bounded: --seconds of wall time (default 60) or
--examples (default 20000), whichever comes first.

    python bench/security_fuzz.py [--seconds 60] [--python-parser]

--python-parser re-runs itself with AIOHTTP_NO_EXTENSIONS=1 (the parser is
chosen when aiohttp is imported); the reference split then uses the same
parser the proxy runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp.http_parser  # noqa: E402
from aiohttp.base_protocol import BaseProtocol  # noqa: E402
from aiohttp.http_exceptions import HttpProcessingError  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from etagproxy.app import ProxyServer  # noqa: E402
from etagproxy.config import parse_config  # noqa: E402
from etagproxy.framing import StrictRequestParserPy, check_request  # noqa: E402

CONFIG = """
listen: 127.0.0.1:0
upstream: http://127.0.0.1:{port}
timeouts: {{header_read: 300ms, body_read: 300ms, upstream: 2s}}
limits: {{max_body: 4KiB}}
routes:
  - path: /api/sites/{{id}}/
  - path: /ws/{{rest:path}}
    mode: passthrough
    allow_upgrade: true
"""
SEND_WAIT = 0.6  # seconds to wait for responses: past header_read and body_read


# -- the upstream: records exact bytes -----------------------------------------------------


@dataclass
class Seen:
    line: str
    fields: list[tuple[str, str]]
    framing: bytes
    body: bytes


@dataclass
class Upstream:
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    open: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].decode("latin-1").split("\r\n")
                fields = [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:])]
                got = Seen(lines[0], fields, b"", b"")
                names = [k for k, _ in fields]
                if "transfer-encoding" in names:
                    while True:
                        size_line = await reader.readuntil(b"\r\n")
                        got.framing += size_line
                        size = int(size_line.split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        got.framing += data
                        got.body += data[:-2]
                        if size == 0:
                            break
                elif "content-length" in names:
                    got.body = got.framing = await reader.readexactly(int(dict(fields)["content-length"]))
                self.seen.append(got)
                body = b"" if lines[0].startswith("HEAD ") else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()


# -- what a stream should become ------------------------------------------------------------------


def reference_split(data: bytes) -> list[tuple[str, str, bytes]]:
    """(method, target, body) of the requests llhttp and the guard accept, in order.

    Fed a byte at a time: the proxy may get the stream in any number of
    reads, and a request completed in an earlier read than a parse error is
    served; this gives the longest such sequence.
    """
    cls = getattr(aiohttp.http_parser, "HttpRequestParserC", None) or StrictRequestParserPy
    loop = asyncio.new_event_loop()
    try:
        parser = cls(BaseProtocol(loop), loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=100)
        messages = []
        for i in range(len(data)):
            try:
                got, upgraded, _ = parser.feed_data(data[i:i + 1])
            except HttpProcessingError:
                break
            messages.extend(got)
            if upgraded:
                break
        out = []
        for msg, payload in messages:
            if check_request(msg.method, msg.path, (msg.version.major, msg.version.minor), msg.raw_headers,
                             upgrade=msg.upgrade, upgrade_allowed=lambda m, t, h: t.startswith("/ws/")) is not None:
                break
            out.append((msg.method, msg.path, payload.read_nowait(-1) if payload.is_eof() else b"?"))
            if msg.upgrade or any(k.lower() == b"upgrade" for k, _ in msg.raw_headers):
                break  # the last request on its connection
        return out
    finally:
        loop.close()


# -- the grammar --------------------------------------------------------------------------------

# Each field: values a client may send, then values a smuggler would.
FIELDS = {
    b"Host": ([b"x", b"x:80", b"[::1]"], [b"x y", b"", b"a@b"]),
    b"Content-Length": ([b"5", b"0"], [b"005", b"+5", b"5, 5", b"-1", b"99999999999999999999", b"4097"]),
    b"Transfer-Encoding": ([b"chunked", b"\tchunked"],
                          [b"Chunked", b"gzip, chunked", b"chunked, identity", b"identity", b"chunked\x0b"]),
    b"Connection": ([b"close", b"keep-alive", b"x-foo"], [b"upgrade", b"Host", b"Authorization", b"If-Match"]),
    b"Upgrade": ([b"websocket"], [b"h2c"]),
    b"Expect": ([b"100-continue"], [b"nope"]),
    b"If-Match": ([b'"x"', b"*"], [b'W/"x"', b'"']),
    b"X-Fuzz": ([b"plain", b"caf\xe9", b"a\tb"], [b"a\x00b", b"a\rb", b"a\x7fb"]),
}
BODIES = ([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"5;e\r\nhello\r\n0\r\nT: 1\r\n\r\n"],
          [b"ffffffffffffffffff\r\nx", b"5\nhello\n0\n\n", b"5\r\nhelloXX"])


def pick(draw: st.DrawFn, choices: tuple[list[bytes], list[bytes]]) -> bytes:
    """Mostly what a client sends; one time in ten what a smuggler sends."""
    benign, hostile = choices
    # (Hypothesis favours small draws: 0..8 is the client, 9 the smuggler)
    return draw(st.sampled_from(hostile if draw(st.integers(0, 9)) == 9 else benign))


@st.composite
def one_request(draw: st.DrawFn) -> bytes:
    # (no HEAD: this client could not tell which pipelined answer has no body)
    method = pick(draw, ([b"GET", b"PUT", b"POST", b"DELETE", b"OPTIONS"], [b"get", b"CONNECT", b"Put"]))
    target = pick(draw, ([b"/p", b"/api/sites/1/", b"/api/sites/%2e%2e/1/", b"/ws/a", b"http://x/p",
                          b"//p?b=1&a=2"], [b"*", b"http://evil/p", b"/a\\b", b"/a%00", b"/%C0%AE"]))
    version = pick(draw, ([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.1 ", b"HTTP/0.9"]))
    lines = [method + b" " + target + b" " + version]
    if draw(st.integers(0, 9)) != 9:
        lines.append(b"Host: x")
    for name in draw(st.lists(st.sampled_from(list(FIELDS)), max_size=4)):
        spelled = pick(draw, ([name, name.lower()], [name + b" "]))
        lines.append(spelled + b": " + pick(draw, FIELDS[name]))
    sep = pick(draw, ([b"\r\n"], [b"\n"]))
    return sep.join(lines) + sep + sep + pick(draw, BODIES)


@st.composite
def stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(one_request(), min_size=1, max_size=3)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "flip", "cut"]))
        if how == "insert":
            data = data[:at] + draw(st.sampled_from([b"\r", b"\n", b"\x00", b" ", b"\t", b"\r\n"])) + data[at:]
        elif how == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
        else:
            data = data[:at]
    splits = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=2)))
    return data, splits


# -- running it ----------------------------------------------------------------------------------


class Harness:
    """A proxy and an upstream on a private event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream = Upstream()
        self.run(self._start())

    def run(self, coro: object, timeout: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self.up_server = await asyncio.start_server(self.upstream.serve, "127.0.0.1", 0)
        self.upstream.port = self.up_server.sockets[0].getsockname()[1]
        self.proxy = ProxyServer(parse_config(CONFIG.format(port=self.upstream.port)))
        await self.proxy.start()

    async def _stop(self) -> None:
        await self.proxy.stop()
        self.up_server.close()
        for writer in list(self.upstream.open):
            writer.close()  # its serve() sees the end of the stream and returns
        for _ in range(100):
            if not self.upstream.open:
                break
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def send(self, data: bytes, splits: list[int]) -> list[tuple[int, bytes]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        responses: list[tuple[int, bytes]] = []
        try:
            last = 0
            for at in [*splits, len(data)]:
                writer.write(data[last:at])
                last = at
                await asyncio.sleep(0)
            async with asyncio.timeout(SEND_WAIT):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    status_line = head.split(b"\r\n", 1)[0]
                    # (aiohttp answers what it cannot parse as HTTP/1.0)
                    assert status_line[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), status_line
                    status = int(status_line.split(b" ")[1])
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    if status >= 200:
                        await reader.readexactly(length)
                        responses.append((status, head))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
        return responses

    async def healthy(self) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            return head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()


def check_upstream_request(got: Seen) -> None:
    method, target, version = got.line.split(" ")
    assert version == "HTTP/1.1" and target.startswith("/"), got.line
    assert method == method.upper(), got.line
    names = [k for k, _ in got.fields]
    for hop in ("upgrade", "te", "trailer", "expect", "keep-alive", "proxy-connection"):
        assert hop not in names, (hop, got)
    lengths = [v for k, v in got.fields if k == "content-length"]
    codings = [v for k, v in got.fields if k == "transfer-encoding"]
    assert not (lengths and codings), got
    assert len(lengths) <= 1 and len(codings) <= 1, got
    if lengths:
        assert lengths[0].isdigit() and str(int(lengths[0])) == lengths[0], got
    if codings:
        assert codings == ["chunked"], got
        assert b";" not in got.framing and got.framing.endswith(b"0\r\n\r\n"), got
    for _, value in got.fields:
        assert not any(c in value for c in "\r\n\x00"), got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--python-parser", action="store_true")
    args = p.parse_args()
    if args.python_parser and not os.environ.get("AIOHTTP_NO_EXTENSIONS"):
        env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
        argv = [sys.executable, __file__, "--seconds", str(args.seconds), "--examples", str(args.examples)]
        os.execve(sys.executable, argv, env)
    parser_name = aiohttp.http_parser.HttpRequestParser.__module__
    harness = Harness()
    deadline = time.monotonic() + args.seconds
    counts = {"examples": 0, "responses": 0, "upstream_requests": 0, "refused": 0}

    def one(case: tuple[bytes, list[int]]) -> None:
        data, splits = case
        before = len(harness.upstream.seen)
        responses = harness.run(harness.send(data, splits))
        assert isinstance(responses, list)
        time.sleep(0.01)  # let the upstream finish recording what it got
        forwarded = harness.upstream.seen[before:]
        counts["examples"] += 1
        counts["responses"] += len(responses)
        counts["upstream_requests"] += len(forwarded)
        counts["refused"] += sum(1 for status, _ in responses if status in (400, 408, 413, 417, 505))
        assert all(status != 500 for status, _ in responses), (data, responses)
        assert len(forwarded) <= len(responses) + 1, (data, responses, forwarded)
        for got in forwarded:
            check_upstream_request(got)
        expected = iter([(m, body) for m, _, body in reference_split(data)])
        # What was forwarded is, in order, a part of what llhttp and the guard
        # accept (the proxy still answers some itself: bad target, 413, 408).
        for got in forwarded:
            method = got.line.split(" ")[0]
            assert any(m == method and body in (got.body, b"?") for m, body in expected), (data, forwarded)
        assert harness.run(harness.healthy()), data

    # Batches, so the wall-clock budget ends the run between two of them.
    batch = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    fuzz = batch(given(case=stream())(one))
    start = time.monotonic()
    try:
        while time.monotonic() < deadline and counts["examples"] < args.examples:
            fuzz()
    finally:
        harness.close()
    counts["seconds"] = round(time.monotonic() - start, 1)  # type: ignore[assignment]
    print(f"parser {parser_name}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
