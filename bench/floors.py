"""Floor servers: the least a Python server on uvloop spends per request.

They are measuring sticks for `bench/cpu_floor.py`, not products: no
routing, no validation of what clients send, no error handling beyond an
answer. Three of them:

- `fixed304`: aiohttp's low-level `web.Server` answering every request that
  carries If-None-Match with a fixed 304 (else a small 200 with the same
  ETag). The cost of the HTTP server alone.
- `aiohttp`: aiohttp's low-level `web.Server` doing the store and upstream
  work etagproxy does, for three requests:
  * `GET /api/sc/...` with If-None-Match: one pipelined HMGET of the
    resource's version (the read etagproxy makes, through its RespClient),
    compare, answer 304 (no upstream);
  * `GET /api/...`: the same read, forward to the origin through etagproxy's
    upstream client, answer with the ETag attached;
  * `PUT` with If-Match: etagproxy's BEGIN script (check + lease), forward,
    its END script (new token), answer with the new ETag (412 when BEGIN
    says the tag is not current).
- `httptools`: the same forwarder on a bare asyncio.Protocol parsed by
  httptools, writing its answers by hand.
- `features`: that httptools server calling etagproxy's own modules for
  each answer (`floor_features.py`): what a data plane on httptools would
  cost at least, with the proxy's per-request work kept.

A version the store does not have yet is minted with the real OBSERVE
script (and confirmed after a 2xx, as etagproxy does), so the keys, scripts
and replies are etagproxy's own and each floor can be checked like the
proxy: a replaced tag gets 412.

    python bench/floors.py fixed304 --port P
    python bench/floors.py aiohttp|httptools --port P --upstream http://127.0.0.1:O --redis 127.0.0.1:R
    python bench/floors.py features --port P --config etagproxy.yaml
    ... --processes N    N copies on the port, as `etagproxy run --workers N`
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import traceback
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httptools  # noqa: E402
import uvloop  # noqa: E402
from aiohttp import web  # noqa: E402
from multidict import CIMultiDict  # noqa: E402

from etagproxy.store.base import new_token  # noqa: E402
from etagproxy.store.redis_scripts import BEGIN, CONFIRM, END, OBSERVE, redis_key  # noqa: E402
from etagproxy.store.resp import RespClient  # noqa: E402
from etagproxy.upstream import Upstream  # noqa: E402

TTL_MS = 7 * 24 * 3600 * 1000
LEASE_MS = 5000
# Not sent on upstream (the upstream client frames its own) nor relayed back.
_HOP = frozenset({"host", "connection", "keep-alive", "content-length", "transfer-encoding",
                  "if-match", "if-none-match", "date", "server", "etag"})
Answer = tuple[int, list[tuple[str, str]], bytes]
LAYERS = ("server", "guard", "route", "store", "all")
"""Where the features floor may stop each request (`floor_features.py`, `--upto`)."""


class Forwarder:
    """The store and upstream work of one request, whatever server parsed it."""

    def __init__(self, upstream: str, redis: str, prefix: str) -> None:
        host, _, port = redis.rpartition(":")
        self.store = RespClient(host, int(port), timeout=1.0)
        self.upstream = Upstream(connect_timeout=1.0)
        self.base = upstream
        self.prefix = prefix

    async def version(self, rkey: str) -> tuple[str, bool]:
        """(token, exists): one HMGET when committed in this epoch, else OBSERVE."""
        (reply,), run_id = await self.store.pipeline([("HMGET", rkey, "s", "e", "t", "x")])
        state, epoch, token, exists = reply
        if state == b"c" and epoch == run_id:
            return token.decode(), exists == b"1"
        obs = await self.store.evalsha(OBSERVE, [rkey], [new_token(), TTL_MS], epoch=True)
        return obs[0].decode(), obs[2] in (1, b"1")

    async def forward(self, method: str, path: str, headers: CIMultiDict[str], body: bytes | None) -> Answer:
        out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP)
        url = self.upstream.url(self.base, path)
        async with self.upstream.request(method, url, out, body, timeout=5.0) as resp:
            data, _ = await resp.read()
            relayed = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers
                       if k.decode("latin-1").lower() not in _HOP]
            return resp.status, relayed, data

    async def handle(self, method: str, path: str, headers: CIMultiDict[str], body: bytes | None) -> Answer:
        rkey = redis_key(self.prefix, path)
        if method == "GET":
            token, exists = await self.version(rkey)
            tag = f'"{token}"'
            if path.startswith("/api/sc/") and headers.get("If-None-Match") == tag:
                return 304, [("ETag", tag)], b""
            status, relayed, data = await self.forward(method, path, headers, None)
            if status < 300 and not exists:
                await self.store.evalsha(CONFIRM, [rkey], [token], epoch=True)
            return status, [*relayed, ("ETag", tag)], data
        if method != "PUT":
            return 405, [], b""
        owner = new_token()
        given = headers.get("If-Match", "").strip('"')
        tokens = [given] if given else []
        args = [owner, LEASE_MS, new_token(), TTL_MS, new_token(), "L" if tokens else "", "", "",
                len(tokens), "", "", *tokens]
        begun = await self.store.evalsha(BEGIN, [rkey], args, epoch=True)
        if begun[0] == b"failed":
            return 412, [], b""
        if begun[0] != b"ok":
            return 503, [], b""
        status, relayed, data = await self.forward(method, path, headers, body or b"")
        outcome = "success" if status < 300 else "rejected"
        ended = await self.store.evalsha(END, [rkey], [owner, outcome, 1, new_token(), TTL_MS], epoch=True)
        tag = [("ETag", f'"{ended[0].decode()}"')] if ended and status < 300 else []
        return status, [*relayed, *tag], data


# -- aiohttp's low-level server ---------------------------------------------------


def aiohttp_fixed304() -> web.Server:
    tag = '"fixed"'

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if "If-None-Match" in request.headers:
            return web.Response(status=304, headers={"ETag": tag})
        return web.Response(body=b"{}\n", headers={"ETag": tag})

    return web.Server(handler, access_log=None)


def aiohttp_forwarder(fwd: Forwarder) -> web.Server:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read() if request.can_read_body else None
        status, headers, data = await fwd.handle(request.method, request.raw_path, request.headers, body)
        return web.Response(status=status, headers=CIMultiDict(headers), body=data if status != 304 else None)

    return web.Server(handler, access_log=None)


# -- a bare asyncio.Protocol with httptools ---------------------------------------


class _Date:
    """The Date header, formatted at most once a second."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.second = -1
        self.value = b""

    def get(self) -> bytes:
        now = int(self.loop.time())
        if now != self.second:
            self.second, self.value = now, formatdate(usegmt=True).encode()
        return self.value


class HttptoolsForwarder(asyncio.Protocol):
    """One client connection: parse with httptools, answer requests in order.

    `_message` is what a parsed request is queued as and `_answer` turns it
    into (status, header lines, body): the hooks `floor_features.py`
    overrides to run etagproxy's work on the same server."""

    def __init__(self, fwd: Forwarder | None, date: _Date) -> None:
        self.fwd = fwd
        self.date = date
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[tuple[Any, ...], bool]] = deque()
        self.busy = False
        self._url = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", CIMultiDict(), []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.pending.append((self._message(), self.parser.should_keep_alive()))
        if not self.busy:
            self.busy = True
            asyncio.ensure_future(self._answer_all())

    def _message(self) -> tuple[Any, ...]:
        body = b"".join(self._body) if self._body else None
        return self.parser.get_method().decode(), self._url.decode("latin-1"), self._headers, body

    async def _answer(self, message: tuple[Any, ...]) -> Answer:
        assert self.fwd is not None
        return await self.fwd.handle(*message)

    async def _answer_all(self) -> None:
        while self.pending:  # bounded by the requests received
            message, keep = self.pending.popleft()
            status, hdrs, data = await self._answer(message)
            if self.transport is None:
                return
            parts = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, HTTPStatus(status).phrase.encode(), self.date.get())]
            parts += [f"{k}: {v}\r\n".encode("latin-1") for k, v in hdrs]
            if status != 304:
                parts.append(b"Content-Length: %d\r\n" % len(data))
            if not keep:
                parts.append(b"Connection: close\r\n")
            parts += [b"\r\n", data if status != 304 else b""]
            self.transport.write(b"".join(parts))
            if not keep:
                self.transport.close()
                return
        self.busy = False


# -- running ---------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    if args.kind == "fixed304":
        factory: object = aiohttp_fixed304()
    elif args.kind == "features":
        from floor_features import Features, FeaturesProtocol

        features, date = Features(args.config, args.upto), _Date(loop)
        # As a proxy worker does: what start-up built stays out of the
        # collector's passes.
        gc.collect()
        gc.freeze()
        factory = lambda: FeaturesProtocol(features, date)  # noqa: E731
    else:
        fwd = Forwarder(args.upstream, args.redis, args.prefix)
        if args.kind == "aiohttp":
            factory = aiohttp_forwarder(fwd)
        else:
            date = _Date(loop)
            factory = lambda: HttptoolsForwarder(fwd, date)  # noqa: E731
    server = await loop.create_server(factory, "127.0.0.1", args.port, backlog=4096,  # type: ignore[arg-type]
                                      reuse_port=args.processes > 1)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("fixed304", "aiohttp", "httptools", "features"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", default="", help="origin base URL (forwarders)")
    p.add_argument("--redis", default="", help="host:port of redis-server (forwarders)")
    p.add_argument("--prefix", default="bench-floor:", help="store key prefix")
    p.add_argument("--config", default="", help="etagproxy config file (features: upstream, store, routes)")
    p.add_argument("--upto", default="all", choices=LAYERS,
                   help="features: stop each request after this layer of etagproxy's work and answer as fixed304")
    p.add_argument("--processes", type=int, default=1, help="copies serving the port (SO_REUSEPORT)")
    args = p.parse_args()
    if args.processes < 1:
        p.error("--processes must be at least 1")
    if args.kind == "features":
        if not args.config:
            p.error("features needs --config")
    elif args.kind != "fixed304" and not (args.upstream and args.redis):
        p.error("the forwarders need --upstream and --redis")
    if args.processes == 1:
        uvloop.run(serve(args))
        return 0
    return pool(args)


def pool(args: argparse.Namespace) -> int:
    """`--processes N`: N copies on one port (SO_REUSEPORT), as `etagproxy
    run --workers N` runs; SIGTERM or SIGINT is passed on to each."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
    pids = []
    for _ in range(args.processes):
        pid = os.fork()
        if pid == 0:  # the copy: its own loop, store and upstream connections
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
                uvloop.run(serve(args))
                code = 0
            except BaseException:  # os._exit below would lose it otherwise
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    # Until told to stop or until a copy dies: either ends the pool.
    signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    code = 0
    for pid in pids:
        code |= os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return 1 if code else 0


if __name__ == "__main__":
    sys.exit(main())
