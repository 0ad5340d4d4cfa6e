"""A lean, pipelined RESP2 client for the store's hot path.

redis-py's asyncio client costs ~50 µs of CPU per EVALSHA on the proxy's
hot path (connection pool checkout, command packing, response callbacks);
this one costs ~11 µs (bench/clients.py, "hiredis-protocol"). It does only
what the store needs:

- one TCP (or TLS) connection per client, shared by every request of the
  process: replies are matched to commands in order (RESP replies arrive in
  command order), so concurrent requests are pipelined on one connection
  instead of queueing for pooled ones;
- a command sent while others await their replies waits for the end of
  the event loop's turn, and everything queued by then goes out in one
  write: under load one system call (and one wake-up of the server)
  carries the commands of many requests, and the replies come back batched
  the same way. A command on an idle connection goes out at once, so a lone
  request pays no extra latency;
- replies parsed by hiredis' C reader;
- AUTH / SELECT and the server's run_id (`INFO server`) on connect;
  reconnect on the next call after a failure, and a command that finds its
  kept connection dead (the server restarted since) is sent once more on a
  new one;
- a broken connection fails every command in flight with `RespError`
  (the store translates it into StoreError: the outcome of a write script
  in flight is then unknown, which the write protocol already handles);
- with `timeout`, a call (reconnecting, a second attempt, the NOSCRIPT
  fallback included) that has no reply that long after it started fails
  with `TimeoutError`; a reply that comes later is read and dropped. One
  timer per connection enforces it, armed for the earliest deadline: a
  timer per command (`asyncio.timeout`) costs more than the rest of the
  call;
- a connection on which nothing at all arrived for as long as a command
  it carries has been waiting past its deadline is abandoned (closed, its
  other commands failed with `RespError`, so they are sent again on a new
  one): a connection a network dropped silently (a NAT or firewall that
  forgot it, a partition) sends no reset, and TCP may take many minutes
  to notice, while a new connection would get through. A server that is
  merely slow keeps its connection: it is still answering earlier
  commands.

Cluster and Sentinel discovery stay with redis-py; a Sentinel-resolved
master could use this client too.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import socket
import ssl as ssl_module
from collections.abc import Sequence

import hiredis

from etagproxy.store.epoch import NO_EPOCH, epoch_tail, run_id


def _retrieve(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


class RespError(Exception):
    """The connection failed or the server could not be reached."""


class ReplyError(Exception):
    """The server answered with an error reply (e.g. NOSCRIPT, WRONGTYPE)."""


def pack(args: Sequence[bytes | str | int | float]) -> bytes:
    """One RESP command: an array of bulk strings (hiredis' C packer)."""
    # hiredis' stub types the command as a tuple of one item (`Tuple[X]`, not `Tuple[X, ...]`).
    return hiredis.pack_command(args if isinstance(args, tuple) else tuple(args))  # type: ignore[arg-type]


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        # Kept: `asyncio.get_running_loop()` is a system call (getpid) on 3.11.
        self.loop = loop
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[asyncio.Future[object]] = collections.deque()
        # (deadline, sent, future) per command sent with a timeout, oldest first.
        self.deadlines: collections.deque[tuple[float, float, asyncio.Future[object]]] = collections.deque()
        self.heard = loop.time()
        """When bytes last arrived (or the connection opened)."""
        self.watchdog: asyncio.TimerHandle | None = None
        self.watchdog_at = math.inf
        self.lost = False
        self.outgoing: list[bytes] = []
        """Commands packed in this turn of the loop, written by `flush`."""
        self.run_id = b""
        """The server process's run_id, read once when connecting: a
        connection never outlives the process it is connected to."""
        self.epoch_tail = NO_EPOCH
        """(run_id, start ms) as the store's scripts take them in their last
        two ARGV (lua/prelude.lua), read with run_id."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not waiters:
                    raise RespError("reply without a command")
                fut = waiters.popleft()
                if not fut.done():
                    if isinstance(reply, ReplyError):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        except (hiredis.ProtocolError, RespError) as exc:
            self._fail(RespError(f"protocol error: {exc}"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail(RespError(f"connection lost: {exc}" if exc else "connection closed by server"))

    def expect_by(self, deadline: float, fut: asyncio.Future[object]) -> None:
        """Fail `fut` with TimeoutError if it is still unanswered at `deadline`."""
        self.deadlines.append((deadline, self.loop.time(), fut))
        if deadline < self.watchdog_at:
            self._watch(deadline)

    def _watch(self, when: float) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.watchdog_at = when
        self.watchdog = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        # Runs about once per timeout while commands flow: answered entries
        # are dropped, overdue ones failed, and the timer re-armed for the
        # earliest of the rest (a retried call may carry an earlier
        # deadline than commands sent before it).
        self.watchdog = None
        self.watchdog_at = math.inf
        now = self.loop.time()
        waiting: collections.deque[tuple[float, float, asyncio.Future[object]]] = collections.deque()
        earliest = math.inf
        silent = False
        for deadline, sent, fut in self.deadlines:
            if fut.done():
                continue
            if deadline <= now:
                fut.set_exception(TimeoutError())
                # Nothing arrived since it was sent, for its whole timeout.
                silent = silent or self.heard < sent
                continue
            waiting.append((deadline, sent, fut))
            earliest = min(earliest, deadline)
        self.deadlines = waiting
        if silent:
            self._fail(RespError("no reply and nothing else from the server in time: connection abandoned"))
        elif waiting:
            self._watch(earliest)

    def queue(self, data: bytes) -> None:
        """Write `data` (the command of the newest waiter), now or batched."""
        if not self.outgoing:
            if len(self.waiters) == 1 and self.transport is not None:
                self.transport.write(data)  # nothing else in flight
                return
            self.loop.call_soon(self.flush)
        self.outgoing.append(data)

    def flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if outgoing and not self.lost and self.transport is not None:
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def _fail(self, exc: BaseException) -> None:
        self.lost = True
        self.outgoing = []
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.watchdog_at = math.inf
        self.deadlines.clear()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        self.client._lost(self)


class RespClient:
    """One pipelined connection to one Redis server, opened on first use."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        connect_timeout: float = 1.0,
        timeout: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._db = db
        self._username = username
        self._password = password
        self._ssl = ssl_module.create_default_context() if tls else None
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._shas: dict[str, str] = {}
        self._closed = False

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        proto: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Protocol(self, loop), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
                setup: list[list[bytes | str | int]] = []
                if self._password is not None:
                    if self._username:
                        setup.append(["AUTH", self._username, self._password])
                    else:
                        setup.append(["AUTH", self._password])
                if self._db:
                    setup.append(["SELECT", self._db])
                for cmd in setup:
                    await self._send(proto, cmd)
                try:
                    info = await self._send(proto, ["INFO", "server"])
                except ReplyError:
                    info = b""  # INFO refused (ACL, a proxy in between): no run_id
                info = info if isinstance(info, bytes) else b""
                proto.run_id = run_id(info)
                proto.epoch_tail = epoch_tail(info)
        except BaseException as exc:
            if proto is not None and proto.transport is not None:
                proto.transport.close()  # opened, but the setup failed, took too long or was cancelled
            if isinstance(exc, ReplyError):
                raise RespError(f"{self.host}:{self.port} refused the connection setup: {exc}") from exc
            if isinstance(exc, (OSError, TimeoutError)):
                raise RespError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            raise
        return proto

    async def _conn(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._closed:
            raise RespError("client closed")
        # One connect at a time, shared by concurrent callers; shielded so a
        # caller's timeout cannot orphan a connection that did open.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect_and_keep())
        return await asyncio.shield(self._connecting)

    async def _connect_and_keep(self) -> _Protocol:
        try:
            proto = await self._connect()
            self._proto = proto
            return proto
        finally:
            self._connecting = None

    def deadline(self) -> float | None:
        """When a call starting now must have its reply (None: never)."""
        if self.timeout is None:
            return None
        proto = self._proto
        loop = proto.loop if proto is not None else asyncio.get_running_loop()
        return loop.time() + self.timeout

    async def _reconnect(self, until: float | None) -> _Protocol:
        if until is None:
            return await self._conn()
        async with asyncio.timeout_at(until):
            return await self._conn()

    @staticmethod
    def _send(
        proto: _Protocol, args: Sequence[bytes | str | int | float], until: float | None = None
    ) -> asyncio.Future[object]:
        if proto.lost or proto.transport is None:
            raise RespError("connection lost")
        data = pack(args)  # before the waiter: a command that cannot be packed is never queued
        fut: asyncio.Future[object] = proto.loop.create_future()
        proto.waiters.append(fut)
        proto.queue(data)
        if until is not None:
            proto.expect_by(until, fut)
        return fut

    async def execute(
        self, *args: bytes | str | int | float, until: float | None = None, epoch: bool = False
    ) -> object:
        """Send one command and return its reply (error replies raise
        ReplyError; no reply by `until`, default `timeout` from now, raises
        TimeoutError).

        A command that fails because a kept connection turned out dead (the
        server restarted since its last use) is sent once more on a new
        one, within the same deadline, as redis-py does: every command the
        store sends is safe to repeat (see `RedisStore`).

        With `epoch`, the connection's `epoch_tail` is appended to the
        arguments of the connection the command goes out on."""
        if until is None:
            until = self.deadline()
        proto = self._proto
        if proto is not None and not proto.lost:
            try:
                return await self._send(proto, args + proto.epoch_tail if epoch else args, until)
            except RespError:
                pass
        proto = await self._reconnect(until)
        return await self._send(proto, args + proto.epoch_tail if epoch else args, until)

    async def pipeline(
        self, commands: Sequence[Sequence[bytes | str | int | float]], until: float | None = None,
        epoch: bool = False,
    ) -> tuple[list[object], bytes]:
        """Send `commands` together; their replies, and the run_id of the
        server that answered them (b"" if it did not tell). Deadline, second
        attempt and `epoch` (on every command) as for `execute`."""
        if until is None:
            until = self.deadline()
        proto = self._proto
        if proto is not None and not proto.lost:
            try:
                return await self._pipeline(proto, commands, until, epoch)
            except RespError:
                pass
        return await self._pipeline(await self._reconnect(until), commands, until, epoch)

    async def _pipeline(
        self, proto: _Protocol, commands: Sequence[Sequence[bytes | str | int | float]], until: float | None,
        epoch: bool = False,
    ) -> tuple[list[object], bytes]:
        if epoch:
            tail = proto.epoch_tail
            commands = [(*cmd, *tail) for cmd in commands]
        futures = [self._send(proto, cmd, until) for cmd in commands]
        replies: list[object] = []
        error: BaseException | None = None
        try:
            for fut in futures:
                try:
                    replies.append(await fut)
                except (ReplyError, RespError, TimeoutError) as exc:
                    error = error or exc
        finally:
            for fut in futures:  # cancelled midway: nobody else will look at the rest
                if not fut.done():
                    fut.add_done_callback(_retrieve)
        if error is not None:
            raise error
        return replies, proto.run_id

    async def evalsha(
        self, script: str, keys: Sequence[str], args: Sequence[bytes | str | int | float], *, epoch: bool = False
    ) -> object:
        """EVALSHA `script`, loading it on NOSCRIPT (a restarted or flushed
        server); both attempts within one deadline. `epoch` as for `execute`."""
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        until = self.deadline()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args, until=until, epoch=epoch)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script, len(keys), *keys, *args, until=until, epoch=epoch)

    async def close(self) -> None:
        self._closed = True
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            connecting.cancel()  # a connect nobody waits for any more
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
