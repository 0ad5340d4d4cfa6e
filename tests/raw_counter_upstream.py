"""The counter API of tests/fault_upstream.py on raw asyncio streams, to
misbehave on writes in ways aiohttp's web server cannot.

Same semantics (`GET /counters/<id>` answers `{"value": n, "rev": r}`,
`PUT` with `{"value": m, "write": id}` sets it, last writer wins) and the
same bookkeeping: the state lives in a `FaultUpstream` (`book`), whose
`apply()` does the lost-update detection, so `audit(raw.book, ledger)`
works unchanged. Only the wire differs: each PUT is answered per a plan
cycled over all PUTs in arrival order (or per `force`, by write id) with
one of the `RawFault`s, each of which applies the write, so that whatever
the proxy makes of the answer, the write landed and its outcome is the
proxy's to classify.

What the upstream saw of each faulted connection is kept: when the proxy
gave up on it (`gave_up`, seconds after the request arrived) and, for a
late write, whether it landed after that (`landed_after_give_up`).
`open_connections` counts connections the proxies have not closed, so a
run can check that none leaked.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

from tests.fault_upstream import PREFIX, FaultUpstream

__all__ = ["RawCounterUpstream", "RawFault", "running_raw_upstream"]


class RawFault(enum.Enum):
    """What the raw upstream does with one PUT."""

    NONE = "none"
    """Apply, answer 200 with the new document."""
    TRUNCATED = "truncated"
    """Apply, answer 200 whose Content-Length promises more body than is
    sent, then close the connection."""
    BAD_STATUS = "bad_status"
    """Apply, answer with a status line that is not HTTP."""
    CONTINUE_SILENT = "continue_silent"
    """Apply, send `100 Continue`, then nothing until the proxy hangs up."""
    AT_DEADLINE = "at_deadline"
    """Apply, answer 200 at the proxy's upstream deadline (`deadline_s`
    after the request arrived, give or take `DEADLINE_JITTER`, in turn)."""
    LATE = "late"
    """Keep the connection, apply only after `late_s` (after the proxy gave
    up and answered its client), then answer 200 to whoever still listens."""
    SLOW = "slow"
    """Apply after `slow_s / 2`, answer 200 after `slow_s` (within the deadline)."""


DEADLINE_JITTER = (-0.005, 0.0, 0.005)
"""Offsets from the deadline the AT_DEADLINE answers take in turn: both
sides of the proxy's timer and the tie."""
WATCHED = frozenset({RawFault.CONTINUE_SILENT, RawFault.LATE})
"""Faults whose connection is watched for the proxy hanging up."""


class _BadRequest(Exception):
    pass


@dataclass
class RawCounterUpstream:
    """Start it with `running_raw_upstream()`."""

    plan: Sequence[RawFault] = (RawFault.NONE,)
    deadline_s: float = 0.5
    late_s: float = 0.9
    slow_s: float = 0.3
    hold_cap_s: float = 5.0
    """Longest a silent fault waits for the proxy to hang up."""
    force: dict[str, RawFault] = field(default_factory=dict)
    """Write id -> its fault, out of the plan."""
    book: FaultUpstream = field(default_factory=FaultUpstream)
    url: str = ""
    injected: Counter[RawFault] = field(default_factory=Counter)
    gave_up: dict[RawFault, list[float]] = field(default_factory=dict)
    """Per fault, how long after the request arrived the proxy closed the connection."""
    landed_after_give_up: int = 0
    """LATE writes applied after the proxy had closed their connection."""
    answered_at_deadline: list[float] = field(default_factory=list)
    """When each AT_DEADLINE answer was sent, after the request arrived."""
    fault_of: dict[str, RawFault] = field(default_factory=dict)
    """Write id -> the fault it was answered with."""
    open_connections: int = 0
    connections: int = 0
    _puts: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    # -- the wire ------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _BadRequest):
            pass
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False once the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        arrived = asyncio.get_running_loop().time()
        lines = head[:-4].decode("latin-1").split("\r\n")
        try:
            method, path, _ = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(lines[0]) from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if not path.startswith(PREFIX) or len(path) == len(PREFIX):
            await self._answer(writer, 404, b"")
            return True
        key = path[len(PREFIX):]
        if method in ("GET", "HEAD"):
            self.book.note_read(headers.get("x-request-id"))
            await self._answer(writer, 200, self._document(key), head_only=method == "HEAD")
            return True
        if method != "PUT":
            await self._answer(writer, 405, b"")
            return True
        try:
            doc = json.loads(body)
            value, write = int(doc["value"]), str(doc["write"])
        except (ValueError, KeyError, TypeError):
            await self._answer(writer, 400, b'{"detail": "expected {\\"value\\": int, \\"write\\": str}"}')
            return True
        self.book.received.add(write)
        fault = self.force.pop(write, None)
        if fault is None:
            fault = self.plan[self._puts % len(self.plan)]
            self._puts += 1
        self.injected[fault] += 1
        self.fault_of[write] = fault
        return await self._put(fault, reader, writer, key, write, value, arrived)

    async def _put(
        self, fault: RawFault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        key: str, write: str, value: int, arrived: float,
    ) -> bool:
        loop = asyncio.get_running_loop()
        hung_up = asyncio.ensure_future(self._hang_up(reader, fault, arrived)) if fault in WATCHED else None
        try:
            if fault is RawFault.LATE:
                await asyncio.sleep(max(0.0, arrived + self.late_s - loop.time()))
                self.book.apply(key, write, value)
                if hung_up.done():  # type: ignore[union-attr]
                    self.landed_after_give_up += 1
                await self._answer(writer, 200, self._document(key))
                return False
            if fault is RawFault.SLOW:
                await asyncio.sleep(self.slow_s / 2)
                self.book.apply(key, write, value)
                await asyncio.sleep(self.slow_s / 2)
                await self._answer(writer, 200, self._document(key))
                return True
            self.book.apply(key, write, value)
            doc = self._document(key)
            if fault is RawFault.NONE:
                await self._answer(writer, 200, doc)
                return True
            if fault is RawFault.TRUNCATED:
                # Promise more than is sent, then end the connection.
                writer.write(self._head(200, len(doc) + 64) + doc)
                await writer.drain()
                return False
            if fault is RawFault.BAD_STATUS:
                writer.write(b"HTTP/1.1 two hundred OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return False
            if fault is RawFault.CONTINUE_SILENT:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(hung_up), self.hold_cap_s)  # type: ignore[arg-type]
                return False
            assert fault is RawFault.AT_DEADLINE
            jitter = DEADLINE_JITTER[self.injected[fault] % len(DEADLINE_JITTER)]
            await asyncio.sleep(max(0.0, arrived + self.deadline_s + jitter - loop.time()))
            self.answered_at_deadline.append(loop.time() - arrived)
            await self._answer(writer, 200, doc)
            # A proxy that gave up at that very moment has closed it.
            return True
        finally:
            if hung_up is not None:
                # Let it see the hang-up (it is bounded by hold_cap_s).
                with suppress(TimeoutError):
                    await asyncio.wait_for(hung_up, self.hold_cap_s)

    async def _hang_up(self, reader: asyncio.StreamReader, fault: RawFault, arrived: float) -> None:
        """Until the proxy closes the connection; records after how long."""
        try:
            while await reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
        self.gave_up.setdefault(fault, []).append(asyncio.get_running_loop().time() - arrived)

    @staticmethod
    def _head(status: int, length: int) -> bytes:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode("latin-1")

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: bytes, *, head_only: bool = False) -> None:
        writer.write(self._head(status, len(body)) + (b"" if head_only else body))
        await writer.drain()

    def _document(self, key: str) -> bytes:
        return json.dumps({"value": self.book.value(key), "rev": self.book.revs.get(key, 0)}).encode()


@asynccontextmanager
async def running_raw_upstream(upstream: RawCounterUpstream) -> AsyncIterator[RawCounterUpstream]:
    """Serve `upstream` on a free loopback port for the duration of the block."""
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        server.close()
        # Whatever still waits (a kept-alive connection, a silent fault)
        # sees its connection end.
        for writer in list(upstream._writers):
            writer.transport.abort()
        await asyncio.gather(*upstream._tasks, return_exceptions=True)
        await server.wait_closed()
