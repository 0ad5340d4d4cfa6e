"""etagproxy as separate processes, started the way a user starts it.

`python -m etagproxy run ...` in the repository root, one child per
replica (or per supervisor with --workers). Its stderr (the operational log,
JSON lines by default) and stdout (the access log) are read continuously into
lists, so a busy process never blocks on a full pipe, and every wait is for a
log line (an event), never for a while. Processes are signalled only through
their own pid (and a supervisor's logged worker pids).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.metrics import Sample, scrape
from tests.ports import free_port

__all__ = ["ProxyProcess", "StartProxies", "counter_config", "processes", "proxies", "start_proxy"]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"listening on \S*?:(\d+)")
T = TypeVar("T")


def counter_config(
    upstream: str, store: str, *, admin_port: int, upstream_timeout: str = "500ms",
    write_wait: str = "2s", route_extra: str = "",
) -> str:
    """One tracked route over the counter API; writes need If-Match.

    Short deadlines keep fault runs quick: the lease is upstream + 2 * store
    + 1 s (writes.lease_ms), 1.9 s with the defaults here.
    `route_extra`: more YAML lines of the route, indented by four.
    """
    return (
        "listen: 127.0.0.1:0\n"
        f"admin_listen: 127.0.0.1:{admin_port}\n"
        f"upstream: {upstream}\n"
        f"store: {store}\n"
        f"timeouts: {{upstream: {upstream_timeout}, store: 200ms, write_wait: {write_wait},"
        " connect: 1s, shutdown: 2s}\n"
        "routes:\n"
        "  - path: /counters/{id}\n"
        "    require_if_match: true\n"
        + route_extra
    )


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@dataclass
class ProxyProcess:
    """One `etagproxy run` child. `url` and `admin_url` are set by `start_proxy`."""

    proc: asyncio.subprocess.Process
    url: str = ""
    admin_url: str = ""
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    paused: bool = False
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _tick: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        """`python -m etagproxy run *args`; ETAGPROXY_* variables of the test
        run are not inherited, `env` is added on top."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ETAGPROXY_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "etagproxy", "run", *args,
            cwd=REPO, env={**inherited, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        handle = cls(proc)
        handle._readers = [
            asyncio.ensure_future(handle._read(proc.stdout, handle.stdout)),
            asyncio.ensure_future(handle._read(proc.stderr, handle.stderr)),
        ]
        return handle

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._wake()
        self._wake()

    def _wake(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def _until(self, found: Callable[[], T | None], timeout: float, what: str) -> T:
        """`found()` once it is not None, re-checked on every line read."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            tick = self._tick
            result = found()
            if result is not None:
                return result
            tail = "\n".join(self.stderr[-30:])
            if self.proc.returncode is not None and all(t.done() for t in self._readers):
                raise AssertionError(f"proxy exited before {what}:\n{tail}")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"{what} not seen in time:\n{tail}")
            try:
                await asyncio.wait_for(tick.wait(), left)
            except TimeoutError:
                pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pause(self) -> None:
        """SIGSTOP: the whole process freezes, timers and sockets included."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout if line.startswith("{")]

    def records(self) -> list[dict[str, Any]]:
        """stderr lines that are JSON objects (the operational log)."""
        return [r for r in map(_record, self.stderr) if r is not None]

    async def wait_for_access(self, ready: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first access-log line for which `ready` holds, waiting for it."""
        async with asyncio.timeout(timeout):
            while True:
                tick = self._tick
                for entry in self.access_log():
                    if ready(entry):
                        return entry
                await tick.wait()

    async def wait_access(self, count: int, *, timeout: float = 15) -> None:
        """Until `count` access-log lines arrived. A request is logged after
        its metrics are counted, while a client may see its response a
        moment earlier: scrapes that must include it wait for this."""
        await self._until(
            lambda: True if len(self.stdout) >= count else None, timeout,
            f"{count} access-log lines (have {len(self.stdout)})",
        )

    async def wait_lines(
        self, match: Callable[[str], bool], *, count: int = 1, timeout: float = 15
    ) -> list[str]:
        """The first `count` stderr lines `match` accepts, once there are that many."""

        def found() -> list[str] | None:
            lines = [line for line in self.stderr if match(line)]
            return lines[:count] if len(lines) >= count else None

        return await self._until(found, timeout, "log line")

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], *, count: int = 1, timeout: float = 15
    ) -> list[dict[str, Any]]:
        """The first `count` stderr JSON records `match` accepts."""

        def accept(line: str) -> bool:
            record = _record(line)
            return record is not None and match(record)

        lines = await self.wait_lines(accept, count=count, timeout=timeout)
        return [r for r in map(_record, lines) if r is not None]

    async def wait_listening(self, count: int = 1) -> list[dict[str, Any]]:
        return await self.wait_for(lambda r: r.get("msg", "").startswith("listening on"), count=count)

    async def metrics(self) -> list[Sample]:
        """The samples of the admin endpoint's Prometheus exposition."""
        return (await scrape(self.admin_url))[1]

    async def stop(self) -> int:
        """SIGTERM (after SIGCONT if paused); SIGKILL if it does not drain in time."""
        if self.proc.returncode is None:
            if self.paused:
                self.resume()
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._readers:
            await task
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def finish(self, timeout: float = 30) -> int:
        """Its exit code, once it exits by itself (after a signal the test sent)."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        """SIGKILL, a supervisor's logged workers first (SIGKILL on the
        supervisor alone would leave them running)."""
        if self.proc.returncode is None:
            for record in self.records():
                pid = record.get("worker")
                if isinstance(pid, int):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.proc.kill()
        await self.proc.wait()
        # Children that outlived it may still hold the pipes open.
        _, pending = await asyncio.wait(self._readers, timeout=5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@pytest.fixture
async def processes() -> AsyncIterator[Callable[..., Any]]:
    """`await processes(*args, env=...)` starts a ProxyProcess; every one a
    test starts is killed if the test did not stop it."""
    started: list[ProxyProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        p = await ProxyProcess.start(*args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        await p.kill()


async def start_proxy(
    config_text: str, workdir: Path, *, access_log: bool = False, env: dict[str, str] | None = None
) -> ProxyProcess:
    """Write `config_text` (which must name its admin port) and start a proxy
    on it; returns once it logged "listening on", with `url` and `admin_url` set."""
    admin = re.search(r"admin_listen: \S+:(\d+)", config_text)
    assert admin is not None, "the config must set admin_listen"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"proxy-{admin.group(1)}.yaml"
    path.write_text(config_text)
    args = ["--config", str(path), "--log-format", "json"]
    if not access_log:
        args.append("--no-access-log")
    handle = await ProxyProcess.start(*args, env=env)
    try:
        line, = await handle.wait_lines(lambda text: _LISTENING.search(text) is not None, timeout=START_TIMEOUT_S)
    except AssertionError:
        await handle.kill()
        raise RuntimeError("proxy did not start:\n" + "\n".join(handle.stderr[-30:])) from None
    found = _LISTENING.search(line)
    assert found is not None
    handle.url = f"http://127.0.0.1:{found.group(1)}"
    handle.admin_url = f"http://127.0.0.1:{admin.group(1)}"
    return handle


StartProxies = Callable[..., Awaitable[list[ProxyProcess]]]
"""The `proxies` fixture: `await proxies(upstream_url, store_url, n=2, access_log=False, **config)`."""


@pytest.fixture
async def proxies(tmp_path: Path) -> AsyncIterator[StartProxies]:
    """`n` replicas of the counter config (tests/test_lost_updates.py) on one
    upstream and one store; each must exit 0 when the test ends."""
    started: list[ProxyProcess] = []

    async def start(
        upstream: str, store: str, n: int = 2, *, access_log: bool = False, **cfg: str
    ) -> list[ProxyProcess]:
        texts = [counter_config(upstream, store, admin_port=free_port(), **cfg) for _ in range(n)]
        results = await asyncio.gather(
            *(start_proxy(text, tmp_path, access_log=access_log) for text in texts), return_exceptions=True
        )
        started.extend(r for r in results if isinstance(r, ProxyProcess))
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, ProxyProcess)]

    yield start
    codes = [await p.stop() for p in started]
    assert codes == [0] * len(started), [p.stderr[-20:] for p in started]
