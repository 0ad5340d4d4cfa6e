"""Start and stop the processes of a benchmark run, all on loopback.

Every process is started in its own session (so its own process group) and
registered with a `Stack`; leaving the `with Stack()` block stops every
group it started -- SIGTERM, a bounded wait, then SIGKILL -- whatever
happened in between. Nothing is ever signalled by name, only by the group
id of a process this module started.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import configs
import procstat

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # first: a dependency may install a top-level `tests` package

from tests.ports import free_port  # noqa: E402  (the suite's helper, also stack.free_port)


class StartError(RuntimeError):
    """A process exited or did not become ready; the message holds its log tail."""


@dataclass
class Service:
    """One started process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    info: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.proc.pid)

    def memory(self) -> procstat.Memory:
        return procstat.memory(self.proc.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        # Long lines (a logged config, say) are cut: the tail is for humans.
        return "\n".join(ln if len(ln) <= 240 else ln[:240] + " ..." for ln in text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, wait up to `timeout`, then SIGKILL it."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Workers may outlive a leader that exited; the group id stays ours.
        _signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Stack:
    """The processes of one run; `with Stack(workdir) as s:` stops them all on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.services: list[Service] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.services:
            self.services.pop().stop()

    def stop(self, service: Service) -> None:
        if service in self.services:
            self.services.remove(service)
        service.stop()

    def spawn(
        self,
        name: str,
        argv: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Service:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        service = Service(name=name, proc=proc, port=port, log=log)
        self.services.append(service)
        return service

    def ready(self, service: Service, check: Callable[[Service], None]) -> Service:
        """Run `check` (which raises StartError); a service that fails it is stopped at once."""
        try:
            check(service)
        except BaseException:
            self.stop(service)
            raise
        return service

    # -- the pieces ---------------------------------------------------------

    def nginx(self, name: str, text: str, port: int) -> Service:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.workdir / f"{name}.conf"
        conf.write_text(text)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / "tmp" / name / sub).mkdir(parents=True, exist_ok=True)
        service = self.spawn(
            name,
            [nginx, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / f"{name}.error.log")],
            port,
        )
        service.info["config"] = str(conf)
        return self.ready(service, lambda s: wait_http(s, "/api/items/1", expect=(200,)))

    def origin(self, *, body: bytes, builtin: bool, workers: int) -> Service:
        www = self.workdir / "www"
        www.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        (www / "item.json").write_bytes(body)
        # nginx workers may run as another user: let them read the tree.
        for path in (self.workdir, self.workdir / "tmp", www):
            path.chmod(0o755)
        (www / "item.json").chmod(0o644)
        port = free_port()
        if builtin:
            service = self.spawn(
                "origin",
                [sys.executable, str(BENCH / "origin.py"), "--port", str(port),
                 "--body", str(www / "item.json"), "--workers", str(workers)],
                port,
            )
            service.info["kind"] = "builtin"
            return self.ready(service, lambda s: wait_http(s, "/api/items/1", expect=(200,)))
        service = self.nginx("origin", configs.origin_nginx(self.workdir, port, workers=workers), port)
        service.info["kind"] = "nginx"
        return service

    def front(self, origin_port: int, *, workers: int) -> Service:
        port = free_port()
        return self.nginx(
            "front", configs.front_nginx(self.workdir, port, origin_port, workers=workers), port
        )

    def redis(self) -> Service:
        server = shutil.which("redis-server")
        if server is None:
            raise StartError("redis-server not found (apt-get install -y redis-server)")
        port = free_port()
        service = self.spawn(
            "redis",
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
             "--logfile", ""],
            port,
        )
        return self.ready(service, wait_redis)

    def proxy(
        self,
        name: str,
        *,
        upstream_port: int,
        store: str,
        workers: int,
        command: list[str],
        source: Path = REPO,
        ready_timeout: float = 30.0,
    ) -> Service:
        """etagproxy from the source tree `source` (default: this one)."""
        port = free_port()
        cfg = self.workdir / f"{name}.yaml"
        cfg.write_text(
            configs.proxy_yaml(port=port, upstream_port=upstream_port, store=store, prefix=f"bench-{name}:")
        )
        argv = [*command, "run", "--config", str(cfg), "--no-access-log"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH", "")]))
        # The config above is the whole truth; stray ETAGPROXY_* would change it.
        for key in [k for k in env if k.startswith("ETAGPROXY_")]:
            del env[key]
        service = self.spawn(name, argv, port, env=env, cwd=source)
        service.info.update(config=str(cfg), store=store, workers=str(workers), source=str(source))
        return self.ready(service, lambda s: wait_http(s, "/api/items/1", expect=(200,), timeout=ready_timeout))


def wait_http(service: Service, path: str, *, expect: tuple[int, ...], timeout: float = 15.0) -> None:
    """Poll `GET path` until it answers one of `expect`; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    for _ in range(int(timeout / 0.05) + 1):
        if not service.alive():
            raise StartError(f"{service.name} exited ({service.proc.returncode}):\n{service.log_tail()}")
        if time.monotonic() > deadline:
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status in expect:
                return
            last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise StartError(f"{service.name} not ready after {timeout:.0f}s ({last}):\n{service.log_tail()}")


def wait_redis(service: Service, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if not service.alive():
            raise StartError(f"redis exited:\n{service.log_tail()}")
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", service.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise StartError(f"redis not ready after {timeout:.0f}s:\n{service.log_tail()}")
