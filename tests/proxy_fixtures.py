"""Real servers on loopback: a recording upstream and proxies in front of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from etagproxy.app import ProxyServer
from etagproxy.config import parse_config
from etagproxy.exchange import Exchange

__all__ = ["Recorded", "RecordingUpstream", "recording_upstream", "make_proxy", "ProxyHandle"]


@dataclass
class Recorded:
    method: str
    raw_path: str
    raw_headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.raw_headers:
            if k.lower() == name.lower():
                return v
        return None

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.raw_headers if k.lower() == name.lower()]


Handler = Callable[[web.BaseRequest, bytes], Awaitable[web.StreamResponse]]


@dataclass
class RecordingUpstream:
    """A loopback HTTP server that records every request it gets.

    `respond` decides the answer; the default is a small JSON document per
    path with a counter, and writes store the body per path (last writer
    wins, like a legacy API).
    """

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    docs: dict[str, bytes] = field(default_factory=dict)
    respond: Handler | None = None

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method not in ("GET", "HEAD", "OPTIONS")]

    async def default(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        path = request.raw_path
        if request.method in ("GET", "HEAD"):
            doc = self.docs.get(path.split("?")[0])
            if doc is None:
                doc = json.dumps({"path": path, "value": 0}).encode()
            return web.Response(body=doc, content_type="application/json")
        if request.method == "DELETE":
            self.docs.pop(path, None)
            return web.Response(status=204)
        self.docs[path.split("?")[0]] = body
        return web.Response(body=body or b"{}", content_type="application/json")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.content.read()  # no client_max_size: bodies of any size
        self.requests.append(
            Recorded(
                request.method,
                request.raw_path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                body,
            )
        )
        if self.respond is not None:
            return await self.respond(request, body)
        return await self.default(request, body)


@pytest.fixture
async def recording_upstream() -> AsyncIterator[RecordingUpstream]:
    up = RecordingUpstream()
    server = web.Server(up.handle, access_log=None, auto_decompress=False)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    up.url = f"http://127.0.0.1:{port}"
    yield up
    await runner.cleanup()


class Exchanges(list[Exchange]):
    """The proxy's access-log records; `logged` is set on each new one."""

    def __init__(self) -> None:
        super().__init__()
        self.logged = asyncio.Event()

    def append(self, ex: Exchange) -> None:
        super().append(ex)
        self.logged.set()


@dataclass
class ProxyHandle:
    server: ProxyServer
    url: str
    exchanges: Exchanges

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    """`await make_proxy(yaml_text, upstream=url, store=None)` starts a proxy on
    a free loopback port; `{upstream}` in the text is replaced by `upstream`."""
    started: list[ProxyServer] = []

    async def factory(text: str, *, upstream: str = "http://127.0.0.1:9", store: Any = None) -> ProxyHandle:
        text = text.replace("{upstream}", upstream)
        if "listen:" not in text:
            text = "listen: 127.0.0.1:0\n" + text
        config = parse_config(text, filename="test.yaml")
        exchanges = Exchanges()
        server = ProxyServer(config, store=store, access_log=exchanges.append)
        await server.start()
        started.append(server)
        return ProxyHandle(server, f"http://127.0.0.1:{server.port}", exchanges)

    yield factory
    for server in reversed(started):
        await server.stop()
