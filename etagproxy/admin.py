"""The admin listener (`admin_listen:`): probes and metrics of one process.

Owns every endpoint of the admin port and nothing of the proxy port:
/healthz (liveness), /readyz (readiness: not draining, the store answers a
PING) and /metrics (the Prometheus exposition). It reads the running
`ProxyServer` (config, store, metrics, draining flag) and changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from etagproxy.metrics import CONTENT_TYPE
from etagproxy.store.base import StoreError

if TYPE_CHECKING:
    from etagproxy.app import ProxyServer


class Admin:
    """The admin port's application, bound to one running proxy process."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> web.TCPSite:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, reuse_port=reuse_port or None)
        await site.start()
        return site

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the event loop runs and answers. Nothing external is
        checked, so a store outage never gets a healthy process restarted."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: not draining, and the store answers a PING in time."""
        # A SIGTERM delivered before this probe was sent may still sit in
        # the loop's signal pipe: its callback was queued in the same pass
        # as this request's bytes, behind this handler. Yield once so it
        # runs (and sets `draining`) first.
        await asyncio.sleep(0)
        if self.server.draining:
            return web.json_response({"status": "draining"}, status=503)
        try:
            await self._ping()
        except (StoreError, TimeoutError) as exc:
            detail = str(exc) or "no answer in time"
            return web.json_response({"status": "store unavailable", "detail": detail}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def _ping(self) -> None:
        store = self.server.store
        assert store is not None
        async with asyncio.timeout(max(self.server.config.timeouts.store, 0.05) * 5):
            await store.ping()
