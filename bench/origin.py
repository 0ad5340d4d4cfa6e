"""A small fast HTTP/1.1 origin, used when nginx is not installed.

It plays the same API as the nginx origin in `configs.py`: every GET under
`/api/` returns the one JSON document with a strong ETag (and 304 for a
matching `If-None-Match`), every PUT reads its body and answers a small 200,
and each response names its path in `X-Item`. It speaks just enough HTTP for
a benchmark -- keep-alive, Content-Length bodies, no chunked requests -- on
a bare asyncio Protocol (uvloop when installed), so it costs far less CPU
per request than the proxy it sits behind.

    python bench/origin.py --port 8000 --body item.json [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from email.utils import formatdate

_ETAG = b'"origin-1"'
_PUT_BODY = b'{"ok":true}\n'


class _Date:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self, loop: asyncio.AbstractEventLoop) -> bytes:
        now = int(loop.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(usegmt=True).encode()
        return self._value


class Origin(asyncio.Protocol):
    def __init__(self, body: bytes, date: _Date) -> None:
        self._body = body
        self._date = date
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._writes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        # One pass per complete request; the loop ends when the buffer holds
        # no complete request, so it is bounded by the bytes received.
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).split(b"\r\n")
            method, _, rest = head[0].partition(b" ")
            path = rest.rpartition(b" ")[0]
            headers: dict[bytes, bytes] = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self._reply(b"411 Length Required", path, b"", close=True)
                return
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self._buf) < end + 4 + length:
                return
            del self._buf[: end + 4 + length]
            close = headers.get(b"connection", b"").lower() == b"close"
            if method in (b"GET", b"HEAD"):
                if headers.get(b"if-none-match") == _ETAG:
                    self._reply(b"304 Not Modified", path, b"", close=close, etag=_ETAG, length=False)
                else:
                    body = self._body if method == b"GET" else b""
                    self._reply(b"200 OK", path, body, close=close, etag=_ETAG, size=len(self._body))
            elif method == b"PUT":
                # A new tag per write, as a versioning API would answer.
                self._writes += 1
                tag = b'"w%d-%d"' % (id(self), self._writes)
                self._reply(b"200 OK", path, _PUT_BODY, close=close, etag=tag)
            else:
                self._reply(b"405 Method Not Allowed", path, b"", close=close)
            if close:
                return

    def _reply(
        self,
        status: bytes,
        path: bytes,
        body: bytes,
        *,
        close: bool,
        etag: bytes = b"",
        length: bool = True,
        size: int | None = None,
    ) -> None:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        parts = [
            b"HTTP/1.1 ", status, b"\r\nServer: bench-origin\r\nDate: ", self._date.value(loop),
            b"\r\nContent-Type: application/json\r\nX-Item: ", path, b"\r\n",
        ]
        if etag:
            parts += [b"ETag: ", etag, b"\r\n"]
        if length:
            parts += [b"Content-Length: ", str(len(body) if size is None else size).encode(), b"\r\n"]
        if close:
            parts.append(b"Connection: close\r\n")
        parts += [b"\r\n", body]
        self._transport.write(b"".join(parts))
        if close:
            self._transport.close()


async def _serve(port: int, body: bytes, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    date = _Date()
    server = await loop.create_server(
        lambda: Origin(body, date), "127.0.0.1", port, reuse_port=reuse_port, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _run(port: int, body: bytes, reuse_port: bool) -> None:
    try:
        import uvloop

        uvloop.run(_serve(port, body, reuse_port))
    except ImportError:
        asyncio.run(_serve(port, body, reuse_port))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", required=True, help="file served for every GET")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with open(args.body, "rb") as f:
        body = f.read()
    if args.workers <= 1:
        _run(args.port, body, reuse_port=False)
        return 0
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            _run(args.port, body, reuse_port=True)
            os._exit(0)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
