"""etagproxy as separate processes, started the way a user starts it.

`python -m etagproxy run --config FILE` in the repository root, one process
per replica. A process counts as started when it logs "listening on" (an
event, not a guess); its stdout (the JSON access log) and stderr are read
continuously into lists, so a busy process never blocks on a full pipe.
Processes are signalled only through their own pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.metrics import Sample, scrape

__all__ = ["ProxyProcess", "counter_config", "start_proxy"]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"listening on \S*?:(\d+)")


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


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    url: str
    admin_url: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    paused: bool = False
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _tick: asyncio.Event = field(default_factory=asyncio.Event)

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

    async def wait_for_access(self, ready: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first access-log line for which `ready` holds, waiting for it."""
        async with asyncio.timeout(timeout):
            while True:
                tick = self._tick
                for entry in self.access_log():
                    if ready(entry):
                        return entry
                await tick.wait()

    async def metrics(self) -> list[Sample]:
        """The samples of the admin endpoint's Prometheus exposition."""
        return (await scrape(self.admin_url))[1]

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode("utf-8", "replace").rstrip("\n"))
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

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


async def start_proxy(
    config_text: str, workdir: Path, *, access_log: bool = False, env: dict[str, str] | None = None
) -> ProxyProcess:
    """Write `config_text` (which must name its admin port) and start a proxy on it."""
    admin = re.search(r"admin_listen: \S+:(\d+)", config_text)
    assert admin is not None, "the config must set admin_listen"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"proxy-{admin.group(1)}.yaml"
    path.write_text(config_text)
    argv = [sys.executable, "-m", "etagproxy", "run", "--config", str(path), "--log-format", "json"]
    if not access_log:
        argv.append("--no-access-log")
    extra = env or {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("ETAGPROXY_")} | extra
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    early: list[str] = []
    port = 0
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while line := await proc.stderr.readline():
                text = line.decode("utf-8", "replace").rstrip("\n")
                early.append(text)
                found = _LISTENING.search(text)
                if found:
                    port = int(found.group(1))
                    break
    except TimeoutError:
        pass
    if not port:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise RuntimeError("proxy did not start:\n" + "\n".join(early[-30:]))
    handle = ProxyProcess(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin.group(1)}", stderr=early)
    handle._readers = [
        asyncio.ensure_future(handle._read(proc.stdout, handle.stdout)),
        asyncio.ensure_future(handle._read(proc.stderr, handle.stderr)),
    ]
    return handle
