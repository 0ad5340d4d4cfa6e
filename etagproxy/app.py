"""Assemble and run one proxy process: listeners, store, upstream, admin.

`ProxyServer.start()` opens the store and the upstream pool, then listens;
`stop()` shuts down in the order aiohttp's BaseRunner.cleanup and uvicorn's
Server.shutdown use: fail readiness, stop listening, drain in-flight
requests within the budget, then close the upstream pool and the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Callable

from aiohttp import web

from etagproxy.config import Config
from etagproxy.metrics import Metrics
from etagproxy.proxy import Exchange, Proxy
from etagproxy.routes import Router
from etagproxy.store import open_store
from etagproxy.store.base import StoreError, VersionStore
from etagproxy.upstream import Upstream

log = logging.getLogger("etagproxy")


def access_line(ex: Exchange) -> str:
    """One JSON access-log line."""
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "request_id": ex.rid,
            "method": ex.method,
            "route": ex.route,
            "key": ex.key,
            "status": ex.status,
            "upstream_status": ex.upstream_status,
            "decision": ex.decision,
            "store_ms": round(ex.store_ms, 3),
            "upstream_ms": round(ex.upstream_ms, 3),
            "ms": round((time.perf_counter() - ex.start) * 1000, 3),
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            **({"error": ex.error} if ex.error else {}),
        },
        separators=(",", ":"),
    )


def stdout_access_log(ex: Exchange) -> None:
    sys.stdout.write(access_line(ex) + "\n")


class ProxyServer:
    """One proxy process (one worker)."""

    def __init__(
        self,
        config: Config,
        *,
        store: VersionStore | None = None,
        access_log: Callable[[Exchange], None] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self._given_store = store
        self._access_log = access_log
        self._reuse_port = reuse_port
        self.draining = False
        self.metrics = Metrics()
        self.store: VersionStore | None = None
        self.upstream: Upstream | None = None
        self.proxy: Proxy | None = None
        self._runner: web.ServerRunner | None = None
        self._admin: web.AppRunner | None = None
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        cfg = self.config
        self.store = self._given_store or open_store(cfg.store, timeout_s=cfg.timeouts.store)
        self.upstream = Upstream(connect_timeout=cfg.timeouts.connect)
        self.proxy = Proxy(
            cfg, Router(cfg.routes), self.store, self.upstream, self.metrics, self._access_log
        )
        server = web.Server(
            self.proxy.handle,
            handler_cancellation=False,
            access_log=None,
            keepalive_timeout=cfg.timeouts.keepalive,
            max_line_size=cfg.limits.max_header_size,
            max_field_size=cfg.limits.max_header_size,
            max_headers=cfg.limits.max_headers,
            auto_decompress=False,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.timeouts.shutdown
        )
        await self._runner.setup()
        host, port = cfg.listen
        site = web.TCPSite(
            self._runner, host or None, port, reuse_port=self._reuse_port or None, backlog=1024
        )
        await site.start()
        self.port = _bound_port(site)
        if cfg.admin_listen is not None:
            await self._start_admin(*cfg.admin_listen)

    async def _start_admin(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._admin = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._admin.setup()
        site = web.TCPSite(self._admin, host or None, port, reuse_port=self._reuse_port or None)
        await site.start()
        self.admin_port = _bound_port(site)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        assert self.store is not None
        try:
            async with asyncio.timeout(max(self.config.timeouts.store, 0.05) * 5):
                await self.store.ping()
        except (StoreError, TimeoutError) as exc:
            return web.json_response({"status": "store unavailable", "detail": str(exc)}, status=503)
        return web.json_response({"status": "ready"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def stop(self) -> None:
        """Drain and close; safe to call twice."""
        self.draining = True
        if self._runner is not None:
            runner, self._runner = self._runner, None
            # Stops listening, then waits for in-flight handlers up to the
            # shutdown budget, then closes idle keep-alive connections.
            await runner.cleanup()
        if self.proxy is not None and self.proxy.tasks:
            await asyncio.wait(set(self.proxy.tasks), timeout=self.config.timeouts.shutdown)
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None
        if self.store is not None and self._given_store is None:
            await self.store.close()
        if self._admin is not None:
            admin, self._admin = self._admin, None
            await admin.cleanup()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio.Server here
    assert server is not None
    for sock in server.sockets:  # type: ignore[attr-defined]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1])
    raise RuntimeError("listener has no TCP socket")
