"""Assemble and run one proxy process: listeners, store, upstream, admin.

`ProxyServer.start()` opens the store and the upstream pool, then listens
(the admin port's endpoints live in admin.py);
`stop()` shuts down in the order aiohttp's BaseRunner.cleanup and uvicorn's
Server.shutdown use: fail readiness, stop listening, drain in-flight
requests within the budget, then close the upstream pool and the store.
The admin listener closes last, so `/readyz` answers 503 "draining" for as
long as the drain lasts.

`serve()` is one proxy process's life: start, signals (SIGINT/SIGTERM
drain, SIGHUP reload), stop. The CLI runs it for one process, and each
worker of the supervisor (workers.py) runs it after the fork.

`reload()` (SIGHUP) swaps the routes for the ones in the config file, or
keeps the running ones if the file has problems.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from aiohttp import web, web_response

from etagproxy.admin import Admin
from etagproxy.config import Config, ConfigError, load_config
from etagproxy.exchange import Exchange
from etagproxy.guard import GuardedServer
from etagproxy.logs import AccessLog
from etagproxy.metrics import FLUSH_S, Metrics, flush_shared
from etagproxy.proxy import Proxy
from etagproxy.routes import Router
from etagproxy.store import open_store
from etagproxy.store.base import StoreError, VersionStore
from etagproxy.upstream import Upstream

log = logging.getLogger("etagproxy")

# What SIGHUP applies. Routes carry the top-level upstream (resolved at
# load) and `defaults:` (merged at load), so those change with them; every
# other setting is bound to sockets, pools or the store and needs a restart.
# Settings a reload applies in place; the others are logged as needing a
# restart (they size pools, timers and listeners made at start).
RELOADED = frozenset({"routes", "upstream", "server", "via", "trusted_proxies"})
# What identifies the file's content without reading it: a ConfigMap update
# swaps a symlink (new inode), an editor rewrites in place (new mtime/size).
_FileStamp = tuple[str, int, int, int]


def _stamp(path: str) -> _FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size

_IGNORED_ON_RELOAD = ("source",)


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
        self._admin: Admin | None = None
        self._watch: asyncio.Future[None] | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        cfg = self.config
        # aiohttp adds `Server: Python/3.x aiohttp/3.y` to every answer that
        # has none and has no setting for it, only this module global, read
        # as each response is prepared: one value per process.
        web_response.SERVER_SOFTWARE = cfg.server
        self.store = self._given_store or open_store(cfg.store, timeout_s=cfg.timeouts.store)
        await self._check_store()
        self.upstream = Upstream(connect_timeout=cfg.timeouts.connect)
        self.proxy = Proxy(
            cfg, Router(cfg.routes), self.store, self.upstream, self.metrics, self._access_log
        )
        # Framing checks, header-read timeout, connection and in-flight
        # limits run before a request reaches Proxy.handle (guard.py).
        server = GuardedServer(
            self.proxy.handle,
            guard=self.proxy.guard(),
            handler_cancellation=False,
            access_log=None,
            keepalive_timeout=cfg.timeouts.keepalive,
            max_line_size=cfg.limits.max_header_size,
            max_field_size=cfg.limits.max_header_size,
            max_headers=cfg.limits.max_headers,
            auto_decompress=False,
        )
        # aiohttp's shutdown waits `shutdown_timeout` for handlers, then
        # marks the request cancelled (which only a handler still reading
        # the body notices) and waits `shutdown_timeout` again before it
        # cancels them: a drain takes up to twice the value. Half the
        # budget each keeps a request cut by the drain within the budget.
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.timeouts.shutdown / 2
        )
        await self._runner.setup()
        host, port = cfg.listen
        site = web.TCPSite(
            self._runner, host or None, port, reuse_port=self._reuse_port or None, backlog=1024
        )
        await site.start()
        self.port = _bound_port(site)
        if cfg.admin_listen is not None:
            self._admin = Admin(self)
            admin_site = await self._admin.start(*cfg.admin_listen, reuse_port=self._reuse_port)
            self.admin_port = _bound_port(admin_site)
        if cfg.watch_config > 0 and cfg.source != "<config>":
            self._watch = asyncio.ensure_future(self._watch_config(cfg.watch_config))
        if self.metrics.multiprocess:
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        """A pool's worker: write its buffered metric updates, and again in
        FLUSH_S (metrics.py, `_Buffered`)."""
        flush_shared()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_S, self._flush_metrics)

    async def _check_store(self) -> None:
        """Say at start what the store's server settings mean for safety.

        Redis older than 7.0 cannot run the scripts (they carry script
        flags): an error, and every store call will fail closed (503).
        `maxmemory-policy allkeys-*` can evict the lease of a write in
        flight (a key without a TTL), and a second write to the resource
        could then start beside it: a warning and the gauge
        etagproxy_store_eviction_unsafe. `volatile-*` evicts only keys with a
        TTL (committed versions, reader and replay records; an evicted
        version is re-minted, so no old tag validates), and `noeviction`
        refuses new versions when full (503 store-full). A store that does
        not answer yet is not checked."""
        assert self.store is not None
        try:
            async with asyncio.timeout(max(self.config.timeouts.store, 0.05) * 5):
                settings = await self.store.server_settings()
        except (StoreError, TimeoutError):
            return
        version = settings.get("redis_version")
        if version is not None and _major(version) < 7:
            log.error(
                "store runs Redis %s; etagproxy needs Redis 7.0 or later (script flags), "
                "so every request that needs the store will fail", version,
                extra={"fields": {"redis_version": version}},
            )
        policy = settings.get("maxmemory_policy")
        if policy is None:
            return
        unsafe = policy.startswith("allkeys-")
        self.metrics.store_eviction_unsafe.set(1 if unsafe else 0)
        if unsafe:
            log.warning(
                "store maxmemory-policy %s can evict the lease of a write in flight and let a second "
                "write to the same resource start; set volatile-lru, volatile-lfu, volatile-ttl or noeviction",
                policy, extra={"fields": {"maxmemory_policy": policy}},
            )
        elif policy == "noeviction":
            log.info(
                "store maxmemory-policy noeviction: a full store refuses new versions (503 store-full)",
                extra={"fields": {"maxmemory_policy": policy}},
            )

    # -- reload ----------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply its routes (SIGHUP).

        A file with problems is rejected as a whole: each problem is logged
        and the running routes stay. Returns whether the new routes apply.
        """
        path = self.config.source
        try:
            new = load_config(path)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("rejected").inc()
            for line in exc.problems:
                log.error("reload rejected: %s", line, extra={"fields": {"problem": line}})
            log.error("reload rejected: keeping the %d running routes", len(self.config.routes))
            return False
        try:
            self.apply_routes(new)
        except ValueError as exc:  # TemplateError: a route the router cannot compile
            self.metrics.config_reloads.labels("rejected").inc()
            log.error("reload rejected: %s; keeping the running routes", exc)
            return False
        self.metrics.config_reloads.labels("applied").inc()
        return True

    def apply_routes(self, new: Config) -> list[str]:
        """Serve `new`'s routes from the next request on; returns the names of
        other changed settings, which are ignored until a restart."""
        router = Router(new.routes)  # compile before swapping: a failure keeps the old one
        ignored = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in RELOADED
            and f.name not in _IGNORED_ON_RELOAD
            and not _same_setting(getattr(new, f.name), getattr(self.config, f.name))
        ]
        self.config = dataclasses.replace(
            self.config, routes=new.routes, upstream=new.upstream, server=new.server, via=new.via,
            trusted_proxies=new.trusted_proxies,
        )
        web_response.SERVER_SOFTWARE = new.server
        if self.proxy is not None:
            # Each request reads `router` once when it matches; requests in
            # flight finish with the route they matched.
            self.proxy.use_routes(self.config, router)
        log.info(
            "routes reloaded from %s: %d routes", new.source, len(new.routes),
            extra={"fields": {"routes": len(new.routes)}},
        )
        if ignored:
            log.warning(
                "reload: %s changed in %s; these apply only after a restart",
                ", ".join(ignored), new.source, extra={"fields": {"restart_needed": ignored}},
            )
        return ignored

    # -- shutdown --------------------------------------------------------------

    async def _watch_config(self, every: float) -> None:
        """Reload when the config file changes (`watch_config`). A file that
        disappears for a moment (an atomic swap) is waited for, not reloaded."""
        path = self.config.source
        seen = _stamp(path)
        while True:
            await asyncio.sleep(every)  # a poll interval, not a guess at an event
            now = _stamp(path)
            if now is not None and now != seen:
                seen = now
                log.info("config file %s changed: reloading", path)
                self.reload()

    async def stop(self) -> None:
        """Drain and close; safe to call twice.

        One budget (`timeouts.shutdown`) covers both the requests in flight
        and the END calls they left running in the background.
        """
        self.draining = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeouts.shutdown
        if self._runner is not None:
            runner, self._runner = self._runner, None
            # Stops listening, then waits for in-flight handlers up to the
            # shutdown budget, then closes idle keep-alive connections.
            await runner.cleanup()
        if self.proxy is not None and self.proxy.tasks:
            await asyncio.wait(set(self.proxy.tasks), timeout=max(0.0, deadline - loop.time()))
        if self.proxy is not None and self.proxy.io.spans is not None:
            self.proxy.io.spans.flush()
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None
        if self.store is not None and self._given_store is None:
            await self.store.close()
        if self._admin is not None:
            admin, self._admin = self._admin, None
            await admin.close()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
            flush_shared()  # the last counts of a worker that stops


def _same_setting(new: object, running: object) -> bool:
    """Whether a reloaded value matches the running one. An address with
    port 0 ("any free port") is met by whatever port was bound for it."""
    if isinstance(new, tuple) and isinstance(running, tuple) and len(new) == len(running) == 2:
        if new[1] == 0 and isinstance(new[0], str):
            return bool(new[0] == running[0])
    return new == running


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio.Server here
    assert server is not None
    for sock in server.sockets:  # type: ignore[attr-defined]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1])
    raise RuntimeError("listener has no TCP socket")


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


async def serve(
    config: Config,
    *,
    access_log: bool = True,
    log_format: str = "json",
    reuse_port: bool = False,
    ready: asyncio.Event | None = None,
) -> int:
    """Run one proxy until SIGINT/SIGTERM, then drain and return 0.

    SIGHUP reloads the routes from the config file (`ProxyServer.reload`).
    """
    writer = AccessLog(fmt=log_format) if access_log else None
    server = ProxyServer(config, access_log=writer, reuse_port=reuse_port)
    stop = asyncio.Event()

    def on_stop() -> None:
        # Readiness fails with the signal itself, before the loop gets
        # around to the drain.
        server.draining = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await server.start()
    except OSError as exc:
        print(f"etagproxy: cannot listen on {config.listen[0]}:{config.listen[1]}: {exc}", file=sys.stderr)
        await server.stop()
        return 1
    # What exists now lives as long as the process: keep it out of the
    # collector's passes, which then only walk what requests allocate.
    gc.collect()
    gc.freeze()
    log.info(
        "listening on %s:%d (store %s, %d routes)",
        config.listen[0], server.port, config.store.masked_url, len(config.routes),
        extra={"fields": {"port": server.port, "admin_port": server.admin_port or None}},
    )
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: draining in-flight requests (budget %.1fs)", config.timeouts.shutdown)
    await server.stop()
    if writer is not None:
        writer.close()
    log.info("stopped")
    return 0
