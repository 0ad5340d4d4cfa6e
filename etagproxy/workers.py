"""`run --workers N`: N proxy processes on one port, under one supervisor.

The supervisor forks N workers. Each runs `app.serve()` with SO_REUSEPORT
on the proxy and the admin port, so the kernel spreads connections across
them; all of them share the Redis store (memory:// is refused before this
module is reached). Metrics are pooled through prometheus-client's
multiprocess mode (see `metrics.py` for why the admin port is shared rather
than owned by the supervisor).

The supervisor does no network or store I/O of its own: it blocks the
signals it cares about and takes them one at a time with `sigtimedwait`,
so there is no handler re-entrancy to reason about.

    SIGTERM, SIGINT  forwarded to every worker as SIGTERM; each drains
                     within `timeouts.shutdown`. Exit 0 when all exit 0.
    SIGHUP           the supervisor checks the file; if it is valid it keeps
                     the new routes (for workers it starts later) and
                     forwards SIGHUP, on which each worker reloads. An
                     invalid file is logged and nobody changes routes.
    SIGCHLD          a worker that exits while the pool is not stopping is
                     started again; one that keeps dying young is started
                     with a growing delay (crash loop), reset once a worker
                     stays up.

A listen or admin port of 0 is resolved once, here, and held by an unlistened
socket, so every worker (and every restarted one) binds the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from etagproxy.config import Config, ConfigError, load_config
from etagproxy.metrics import buffer_shared_values, enable_multiprocess, worker_restarts

log = logging.getLogger("etagproxy")

SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})

MIN_UPTIME_S = 2.0
"""A worker that exits sooner than this counts towards a crash loop."""
MAX_BACKOFF_S = 8.0
GIVE_UP_AFTER = 5
"""When every worker has died young this many times in a row, the pool
cannot stay up (a port taken, a broken environment): stop and exit 1."""
STOP_MARGIN_S = 5.0
"""Beyond `timeouts.shutdown`, how long the supervisor waits before SIGKILL."""


def _hold_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """Resolve port 0 to a free port held by a bound, unlistened socket.

    Bound but not listening, it receives no connections, yet keeps the port
    out of anyone else's hands while workers join it with SO_REUSEPORT.
    """
    if port != 0:
        return port, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
    return int(sock.getsockname()[1]), sock


@dataclasses.dataclass
class _Slot:
    pid: int = 0
    started: float = 0.0
    fast_failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Starts, restarts and stops the workers of one pool."""

    def __init__(self, config: Config, *, workers: int, access_log: bool, log_format: str) -> None:
        self.config = config
        self.access_log = access_log
        self.log_format = log_format
        self.slots = [_Slot() for _ in range(workers)]
        self.stopping = False
        self._exit_code = 0
        self.restarts = worker_restarts()
        self._held: list[socket.socket] = []

    # -- workers ---------------------------------------------------------------

    def hold_ports(self) -> None:
        host, port = self.config.listen
        port, sock = _hold_port(host, port)
        self._held += [sock] if sock is not None else []
        admin = self.config.admin_listen
        if admin is not None:
            admin_port, sock = _hold_port(admin[0], admin[1])
            self._held += [sock] if sock is not None else []
            admin = (admin[0], admin_port)
        self.config = dataclasses.replace(self.config, listen=(host, port), admin_listen=admin)

    def release_ports(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()

    def _start(self, slot: _Slot) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Objects that exist now are never scanned by the workers' garbage
        # collector, so its bookkeeping writes do not unshare their pages.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child; the tests see it from outside
            os._exit(self._worker_main())
        slot.pid = pid
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d started", pid, extra={"fields": {"worker": pid}})

    def _worker_main(self) -> int:
        """The body of a forked worker; returns its exit status."""
        code = 1
        try:
            self.release_ports()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            from etagproxy.app import serve

            # Before the worker's metrics exist: its updates are buffered
            # and written to its shared file once a second (metrics.py).
            buffer_shared_values()
            code = asyncio.run(
                serve(
                    self.config,
                    access_log=self.access_log,
                    log_format=self.log_format,
                    reuse_port=True,
                )
            )
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return code

    def _reap(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            # Its in-flight gauge must stop counting; its counters stay.
            mark_process_dead(pid)
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            if self.stopping:
                slot.restart_at = None
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    self._exit_code = 1
                    log.warning("worker %d exited with %d while stopping", pid, code)
                continue
            self._schedule_restart(slot, pid, status)

    def _schedule_restart(self, slot: _Slot, pid: int, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {-code}" if code < 0 else f"status {code}"
        lived = time.monotonic() - slot.started
        slot.fast_failures = slot.fast_failures + 1 if lived < MIN_UPTIME_S else 0
        delay = 0.0 if slot.fast_failures == 0 else min(0.25 * 2 ** (slot.fast_failures - 1), MAX_BACKOFF_S)
        slot.restart_at = time.monotonic() + delay
        self.restarts.inc()
        log.warning(
            "worker %d exited (%s) after %.1fs; restarting in %.2fs", pid, how, lived, delay,
            extra={"fields": {"worker": pid, "exit": how, "restart_in_s": delay}},
        )

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid == 0 and slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)

    def _next_due(self) -> float | None:
        due = [s.restart_at for s in self.slots if s.pid == 0 and s.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    # -- signals -----------------------------------------------------------------

    def _reload(self) -> None:
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload rejected: %s", line, extra={"fields": {"problem": line}})
            log.error("reload rejected: every worker keeps its running routes")
            return
        self.config = dataclasses.replace(self.config, routes=new.routes, upstream=new.upstream)
        log.info("reload: %d routes; telling the workers", len(new.routes))
        self._signal_all(signal.SIGHUP)

    def _stop(self) -> int:
        self.stopping = True
        self._exit_code = 0
        # Forward first, log after: until a worker has the signal, its
        # /readyz still answers 200.
        self._signal_all(signal.SIGTERM)
        log.info("stopping: draining %d workers", sum(1 for s in self.slots if s.pid))
        deadline = time.monotonic() + self.config.timeouts.shutdown + STOP_MARGIN_S
        while any(s.pid for s in self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("workers still running after the shutdown budget; killing them")
                self._signal_all(signal.SIGKILL)
                self._exit_code = 1
                deadline = time.monotonic() + STOP_MARGIN_S
                continue
            info = signal.sigtimedwait(SIGNALS, left)
            if info is not None and info.si_signo == signal.SIGCHLD:
                self._reap()
        log.info("stopped")
        return self._exit_code

    def run(self) -> int:
        """Start the pool and supervise it until SIGTERM/SIGINT."""
        for slot in self.slots:
            self._start(slot)
        while True:
            due = self._next_due()
            info = signal.sigwaitinfo(SIGNALS) if due is None else signal.sigtimedwait(SIGNALS, due)
            if info is None:
                pass
            elif info.si_signo == signal.SIGCHLD:
                self._reap()
                if all(s.fast_failures >= GIVE_UP_AFTER for s in self.slots):
                    log.error("every worker keeps exiting at start; giving up")
                    self._stop()
                    return 1
            elif info.si_signo == signal.SIGHUP:
                self._reload()
            else:
                return self._stop()
            self._start_due()


def supervise(config: Config, args: argparse.Namespace) -> int:
    """Run `args.workers` workers of `config` until SIGTERM/SIGINT."""
    metrics_dir = tempfile.mkdtemp(prefix="etagproxy-metrics-")
    enable_multiprocess(metrics_dir)
    # What every worker runs, imported once here: the workers share these
    # pages with the supervisor (copy-on-write) instead of each holding a copy.
    import etagproxy.app  # noqa: F401
    supervisor = Supervisor(
        config,
        workers=args.workers,
        access_log=not args.no_access_log,
        log_format=args.log_format,
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        try:
            supervisor.hold_ports()
        except OSError as exc:
            print(f"etagproxy: cannot reserve the listen port: {exc}", file=sys.stderr)
            return 1
        host, port = supervisor.config.listen
        admin = supervisor.config.admin_listen
        log.info(
            "supervisor %d: %d workers on %s:%d", os.getpid(), args.workers, host, port,
            extra={"fields": {"workers": args.workers, "port": port, "admin_port": admin and admin[1]}},
        )
        return supervisor.run()
    finally:
        supervisor.release_ports()
        shutil.rmtree(metrics_dir, ignore_errors=True)
