"""The upstream client against scripted raw-socket servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from etagproxy.upstream import (
    Upstream,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tests.ports import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A TCP server whose every connection runs `script(reader, writer, n)`."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.base = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        low = head.lower()
        if b"content-length:" in low:
            n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(n)
        elif b"transfer-encoding: chunked" in low:
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += data[:-2]
        self.requests.append(head + body)
        return head + body


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[Scripted]]]:
    servers: list[Scripted] = []

    async def make(script: Script) -> Scripted:
        s = Scripted(script)
        await s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        assert s.server is not None
        s.server.close()
        await s.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[Upstream]:
    up = Upstream(connect_timeout=1.0)
    yield up
    await up.close()


async def fetch(client: Upstream, base: str, method: str = "GET", target: str = "/",
                body: object = None, headers: CIMultiDict[str] | None = None,
                timeout: float = 5.0) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    async with client.request(method, client.url(base, target), headers or CIMultiDict(), body,  # type: ignore[arg-type]
                              timeout=timeout) as resp:
        data, complete = await resp.read()
        assert complete
        return resp.status, resp.raw_headers, data


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def test_keep_alive_connections_are_reused(scripted, client):
    async def script(reader, writer, n):
        while True:
            await srv.read_request(reader)
            writer.write(ok(b"hello"))

    srv = await scripted(script)
    for _ in range(5):
        assert (await fetch(client, srv.base))[2] == b"hello"
    assert srv.connections == 1


async def test_target_and_headers_go_out_exactly_as_given(scripted, client):
    async def script(reader, writer, n):
        await srv.read_request(reader)
        writer.write(ok(b""))

    srv = await scripted(script)
    headers = CIMultiDict([("X-Mixed-Case", "A"), ("x-dup", "1"), ("x-dup", "2"), ("Host", "api.example")])
    await fetch(client, srv.base + "/prefix", "PUT", "/a%2Fb/%7Bx%7D?q=%20&z", b"body", headers)
    req = srv.requests[0]
    assert req.startswith(b"PUT /prefix/a%2Fb/%7Bx%7D?q=%20&z HTTP/1.1\r\n")
    assert b"X-Mixed-Case: A\r\nx-dup: 1\r\nx-dup: 2\r\nHost: api.example\r\n" in req
    assert b"Content-Length: 4\r\n" in req and req.endswith(b"\r\n\r\nbody")
    for added in (b"User-Agent", b"Accept", b"Accept-Encoding"):
        assert added not in req


async def test_streamed_bodies_are_chunked_unless_a_length_is_given(scripted, client):
    async def script(reader, writer, n):
        while True:
            await srv.read_request(reader)
            writer.write(ok(b""))

    srv = await scripted(script)

    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defg"

    await fetch(client, srv.base, "POST", "/", gen())
    await fetch(client, srv.base, "POST", "/", gen(), CIMultiDict([("Content-Length", "7")]))
    first, second = srv.requests
    assert b"Transfer-Encoding: chunked" in first and first.endswith(b"abcdefg")
    assert b"Transfer-Encoding" not in second and second.endswith(b"\r\n\r\nabcdefg")


async def test_chunked_and_close_delimited_responses(scripted, client):
    async def script(reader, writer, n):
        await srv.read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close")
            await writer.drain()

    srv = await scripted(script)
    assert (await fetch(client, srv.base))[2] == b"abcde"
    assert (await fetch(client, srv.base))[2] == b"until-close"


async def test_head_response_has_no_body_and_the_connection_stays_usable(scripted, client):
    async def script(reader, writer, n):
        while True:
            req = await srv.read_request(reader)
            if req.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(ok(b"after-head"))

    srv = await scripted(script)
    status, headers, body = await fetch(client, srv.base, "HEAD")
    assert status == 200 and body == b"" and (b"Content-Length", b"1000") in headers
    assert (await fetch(client, srv.base))[2] == b"after-head"
    assert srv.connections == 1


async def test_interim_1xx_responses_are_skipped(scripted, client):
    async def script(reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"final"))

    srv = await scripted(script)
    status, headers, body = await fetch(client, srv.base, "POST", "/", b"x")
    assert status == 200 and body == b"final"
    assert all(name != b"Link" for name, _ in headers)


async def test_a_stale_kept_alive_connection_is_retried_for_reads_only(scripted, client):
    """The upstream closes a reused connection right after reading the next
    request, without answering: a GET is retried on a fresh connection; a PUT
    may have been received, so it fails as `sent`."""

    async def script(reader, writer, n):
        await srv.read_request(reader)
        writer.write(ok(b"first"))
        await writer.drain()
        await srv.read_request(reader)  # the reuse: read it, then hang up

    srv = await scripted(script)
    assert (await fetch(client, srv.base))[2] == b"first"
    assert (await fetch(client, srv.base))[2] == b"first", "GET retried on a new connection"
    assert srv.connections == 2
    with pytest.raises(UpstreamBroken) as info:
        await fetch(client, srv.base, "PUT", "/", b"x")
    assert info.value.sent


async def test_truncated_and_garbled_responses_are_broken(scripted, client):
    async def script(reader, writer, n):
        await srv.read_request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            writer.write(b"HTTP/1.1 abc\r\n\r\n")
        await writer.drain()

    srv = await scripted(script)
    with pytest.raises(UpstreamBroken):
        await fetch(client, srv.base)
    with pytest.raises(UpstreamBroken):
        await fetch(client, srv.base)


async def test_a_finished_exchange_leaves_no_deadline_on_its_pooled_connection(scripted, client):
    async def script(reader, writer, n):
        while True:
            await srv.read_request(reader)
            writer.write(ok(b"hello"))

    srv = await scripted(script)
    assert (await fetch(client, srv.base, timeout=0.1))[2] == b"hello"
    await asyncio.sleep(0.25)  # idle in the pool past the first exchange's deadline
    assert (await fetch(client, srv.base, timeout=5.0))[2] == b"hello"
    assert srv.connections == 1, "the pooled connection outlived the old deadline"


async def test_the_deadline_covers_headers_and_body(scripted, client):
    stall = asyncio.Event()

    async def script(reader, writer, n):
        await srv.read_request(reader)
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
        await stall.wait()

    srv = await scripted(script)
    with pytest.raises(UpstreamTimeout):
        await fetch(client, srv.base, timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await fetch(client, srv.base, timeout=0.2)
    stall.set()


async def test_refused_connection_is_unreachable_and_not_sent(client):
    port = free_port()
    with pytest.raises(UpstreamUnreachable) as info:
        await fetch(client, f"http://127.0.0.1:{port}")
    assert not info.value.sent


async def test_large_bodies_stream_with_flow_control(scripted, client):
    size = 8 * 1024 * 1024
    block = b"z" * 65536

    async def script(reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    srv = await scripted(script)
    total = 0
    async with client.request("GET", client.url(srv.base, "/"), CIMultiDict(), None, timeout=10) as resp:
        async for chunk in resp.iter_chunks():
            total += len(chunk)
            # The client buffers only a bounded amount ahead of its reader.
            assert resp._conn._buffered <= 1 << 20
    assert total == size


async def test_an_abandoned_body_closes_the_connection(scripted, client):
    async def script(reader, writer, n):
        while True:
            await srv.read_request(reader)
            writer.write(ok(b"x" * 4_000_000))

    srv = await scripted(script)
    async with client.request("GET", client.url(srv.base, "/"), CIMultiDict(), None, timeout=5) as resp:
        await resp.read(10)
    assert (await fetch(client, srv.base))[2] == b"x" * 4_000_000
    assert srv.connections == 2


async def test_without_whole_the_deadline_bounds_each_gap_not_the_download(scripted, client):
    """A body that keeps flowing outlives `timeout`; one that stalls for
    longer than `timeout` between pieces is cut off."""
    go_on = asyncio.Event()

    async def script(reader, writer, n):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
        for _ in range(8):
            writer.write(b"x")
            await writer.drain()
            if n == 1:
                # Paced by the reader: each piece waits until the previous
                # one arrived, and the whole takes several `timeout`s.
                await asyncio.wait_for(go_on.wait(), 5)
                go_on.clear()
            else:
                await asyncio.Event().wait()  # stall forever after the first byte

    srv = await scripted(script)
    loop = asyncio.get_running_loop()
    got = b""
    start = loop.time()
    async with client.request("GET", client.url(srv.base, "/"), CIMultiDict(), None, timeout=0.2, whole=False) as resp:
        async for chunk in resp.iter_chunks():
            got += chunk
            await asyncio.sleep(0.05)  # a slow consumer: the download lasts longer than the deadline
            go_on.set()
    assert got == b"x" * 8
    assert loop.time() - start > 0.2
    with pytest.raises(UpstreamTimeout):
        async with client.request("GET", client.url(srv.base, "/"), CIMultiDict(), None, timeout=0.2, whole=False) as resp:
            await resp.read()


async def test_a_head_answered_with_content_length_0_keeps_the_connection(scripted, client):
    async def script(reader, writer, n):
        while True:
            req = await srv.read_request(reader)
            if req.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(ok(b"after"))

    srv = await scripted(script)
    assert (await fetch(client, srv.base, "HEAD"))[0] == 200
    assert (await fetch(client, srv.base))[2] == b"after"
    assert srv.connections == 1
