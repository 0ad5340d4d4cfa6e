"""Real redis-server processes on loopback: standalone, cluster, sentinel.

Processes start once per session in temporary directories, on free ports,
without persistence (`--save ''`) unless a test saves a snapshot itself.
Readiness is polled (PING, `cluster_state:ok`, replica link up) against a
deadline. The function-scoped fixtures hand out the session processes
empty, and the standalone server and the cluster running, so a test may kill
or restart them freely (a test that fails the sentinel group over builds a
`RedisSentinelGroup` of its own):

    redis_server      standalone `RedisServer`
    redis_cluster     `RedisClusterGroup`: 3 masters, no replicas
    redis_sentinel    `RedisSentinelGroup`: master, replica, one sentinel
    redis_store       async factory: `await redis_store(target, **overrides)`
                      -> RedisStore from `target.url` via `parse_store_url`
                      and `RedisStore.from_config`, closed after the test

A missing `redis-server` binary fails these tests: run the test command in
README.md, which installs it.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from etagproxy.config import parse_store_url
from etagproxy.store.redis import RedisStore
from tests.ports import free_port

__all__ = [
    "RedisClusterGroup",
    "RedisSentinelGroup",
    "RedisServer",
    "SentinelServer",
    "redis_cluster",
    "redis_cluster_session",
    "redis_sentinel",
    "redis_sentinel_session",
    "redis_server",
    "redis_server_session",
    "redis_store",
]

HOST = "127.0.0.1"
READY_TIMEOUT_S = 10.0
_POLL_S = 0.005


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH. The Redis store tests need a real server: "
            "run the test command from README.md, which installs redis-server.",
            pytrace=False,
        )
    return path


def _options(**options: object) -> list[str]:
    """Command-line configuration: cluster_port=1 -> ["--cluster-port", "1"]."""
    return [arg for name, value in options.items() for arg in ("--" + name.replace("_", "-"), str(value))]


def _poll(what: str, ready: Callable[[], bool], *, log: Path | None = None) -> None:
    """Call `ready` until it returns True; fail after READY_TIMEOUT_S."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(_POLL_S)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready within {READY_TIMEOUT_S} s ({last!r})\n{tail}", pytrace=False)


class _Target(Protocol):
    @property
    def url(self) -> str: ...


class RedisServer:
    """One redis-server process on a fixed port, started and killed at will."""

    _snapshots = itertools.count(1)

    def __init__(self, workdir: Path, *args: str, binary: str = "redis-server") -> None:
        self.host = HOST
        self.port = free_port(HOST)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self._binary = _binary(binary)
        self._args = args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def admin(self) -> redis.Redis:
        """A synchronous client for test set-up (caller closes it)."""
        return redis.Redis(self.host, self.port, socket_timeout=5)

    def command(self, *args: Any) -> Any:
        with self.admin() as client:
            return client.execute_command(*args)

    def run_id(self) -> str:
        with self.admin() as client:
            return str(client.info("server")["run_id"])

    def start(self, rdb: Path | None = None) -> None:
        """Start the process, loading `rdb` if given (else empty)."""
        assert not self.running, "already running"
        dump = self.dir / "dump.rdb"
        dump.unlink(missing_ok=True)
        if rdb is not None:
            shutil.copyfile(rdb, dump)
        argv = [self._binary, *self._config_args(), *self._args]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _poll(f"{self._binary} on port {self.port}", self._answers, log=self.log)

    def _config_args(self) -> list[str]:
        return _options(
            port=self.port,
            bind=self.host,
            dir=self.dir,
            logfile=self.log,
            daemonize="no",
            save="",
            appendonly="no",
            dbfilename="dump.rdb",
        )

    def _answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            pytest.fail(f"{self._binary} exited with {self._proc.returncode}\n{tail}", pytrace=False)
        with self.admin() as client:
            return bool(client.ping())

    def kill(self) -> None:
        """SIGKILL: no chance to save or to say goodbye to clients."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
            self._proc = None

    def restart(self, *, keep_data: bool = False) -> None:
        """A new process (new run_id) on the same port; with `keep_data`,
        loaded from a snapshot of the current data."""
        rdb = self.save_snapshot() if keep_data else None
        self.kill()
        self.start(rdb)

    def restart_from(self, rdb: Path) -> None:
        """A new process loaded from `rdb` (from `save_snapshot`)."""
        self.kill()
        self.start(rdb)

    def save_snapshot(self) -> Path:
        """SAVE the data set to a file of its own; a plain `start()` ignores it."""
        self.command("SAVE")
        path = self.dir / f"snapshot-{next(self._snapshots)}.rdb"
        shutil.move(self.dir / "dump.rdb", path)
        return path

    def flush(self) -> None:
        with self.admin() as client:
            client.flushall()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()


class SentinelServer(RedisServer):
    """A redis-sentinel process; it needs a config file it can rewrite."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, binary="redis-sentinel")
        self.conf = self.dir / "sentinel.conf"

    def monitor(self, name: str, master: RedisServer, quorum: int = 1) -> None:
        """Start watching `master` as `name` (failover after 1 s down)."""
        self.conf.write_text(
            f"sentinel monitor {name} {master.host} {master.port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 2000\n"
        )
        self.start()

    def _config_args(self) -> list[str]:
        options = _options(port=self.port, bind=self.host, dir=self.dir, logfile=self.log, daemonize="no")
        return [str(self.conf), *options]


class RedisClusterGroup:
    """Three cluster masters sharing the 16384 slots, by default no replicas.

    With `replicas`, each master gets that many (`nodes` then holds the
    masters first, as `redis-cli --cluster create` assigns them, then the
    replicas), and `start()` waits until every replica's link is up, so a
    failover has a synced replica to promote."""

    def __init__(self, workdir: Path, size: int = 3, *, replicas: int = 0, node_timeout_ms: int = 500) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                *_options(
                    cluster_enabled="yes",
                    cluster_config_file="nodes.conf",
                    cluster_port=free_port(HOST),
                    cluster_node_timeout=node_timeout_ms,
                    # No 5 s wait for more replicas before a (diskless) sync.
                    repl_diskless_sync_delay=0,
                ),
            )
            for i in range(size * (1 + replicas))
        ]
        self._cli = _binary("redis-cli")

    @property
    def hosts(self) -> tuple[tuple[str, int], ...]:
        return tuple((node.host, node.port) for node in self.nodes)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.hosts)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"{h}:{p}" for h, p in self.hosts]
        done = subprocess.run(
            [self._cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{done.stdout!r}\n{done.stderr!r}", pytrace=False)
        self.wait_ok()

    def wait_ok(self) -> None:
        def ok() -> bool:
            return all(b"cluster_state:ok" in node.command("CLUSTER", "INFO") for node in self.nodes)

        def linked() -> bool:
            for node in self.nodes:
                with node.admin() as client:
                    info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            return True

        _poll("redis cluster", ok, log=self.nodes[0].log)
        if self.replicas:
            _poll("redis cluster replicas", linked, log=self.nodes[-1].log)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def ensure_running(self) -> None:
        """Restart killed nodes; each keeps its slots (nodes.conf), not its data."""
        stopped = [node for node in self.nodes if not node.running]
        for node in stopped:
            node.start()
        if stopped:
            self.wait_ok()

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()


class RedisSentinelGroup:
    """A master, one replica of it, and one sentinel (quorum 1) watching it."""

    service_name = "etagproxy"

    def __init__(self, workdir: Path) -> None:
        # No 5 s wait for more replicas before the first (diskless) sync.
        self.master = RedisServer(workdir / "master", *_options(repl_diskless_sync_delay=0))
        self.replica = RedisServer(workdir / "replica", "--replicaof", HOST, str(self.master.port))
        self.sentinel = SentinelServer(workdir / "sentinel")

    @property
    def url(self) -> str:
        return f"redis+sentinel://{self.sentinel.host}:{self.sentinel.port}/{self.service_name}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        self.sentinel.monitor(self.service_name, self.master)
        self.wait_ready()

    def wait_ready(self) -> None:
        def linked() -> bool:
            with self.replica.admin() as client:
                return bool(client.info("replication").get("master_link_status") == "up")

        def monitored() -> bool:
            addr = self.sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
            return addr is not None and int(addr[1]) == self.master.port

        _poll("redis replica link", linked, log=self.replica.log)
        _poll("redis sentinel", monitored, log=self.sentinel.log)

    def kill(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.kill()

    def flush(self) -> None:
        self.master.flush()


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's standalone server, running and empty."""
    redis_server_session.ensure_running()
    redis_server_session.flush()
    return redis_server_session


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    cluster = RedisClusterGroup(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterGroup) -> RedisClusterGroup:
    """The session's cluster, all nodes running, empty."""
    redis_cluster_session.ensure_running()
    redis_cluster_session.flush()
    return redis_cluster_session


@pytest.fixture(scope="session")
def redis_sentinel_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelGroup]:
    group = RedisSentinelGroup(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        group.start()
        yield group
    finally:
        group.kill()


@pytest.fixture
def redis_sentinel(redis_sentinel_session: RedisSentinelGroup) -> RedisSentinelGroup:
    """The session's sentinel group, empty."""
    redis_sentinel_session.flush()
    return redis_sentinel_session


StoreFactory = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def redis_store() -> AsyncIterator[StoreFactory]:
    """`await redis_store(target, timeout_s=..., **StoreConfig overrides)`:
    a store built from `target.url` as the proxy builds it."""
    stores: list[RedisStore] = []

    async def make(target: _Target, *, timeout_s: float = 2.0, **overrides: Any) -> RedisStore:
        cfg = dataclasses.replace(parse_store_url(target.url), **overrides)
        store = RedisStore.from_config(cfg, timeout_s=timeout_s)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
