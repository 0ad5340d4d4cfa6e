"""A deliberately naive counter API that injects faults and detects lost updates.

The API is the kind etagproxy is meant to protect: `GET /counters/<id>`
answers `{"value": n}`; `PUT /counters/<id>` with `{"value": m, "write": id}`
sets the counter to `m`, last writer wins, no validators. Clients increment
(read n, write n + 1), so a write is *stale* exactly when it does not set the
counter to the value just above the current one: it was computed from an
older read, and applying it erases an increment someone else made. The
upstream sees every write in the order it applies them, so counting stale
writes here is a precise lost-update detector, independent of anything the
proxy or the clients report.

Faults are injected per write from a plan cycled over all PUTs, so a run's
fault counts are known exactly; `hold()` hands a single write to the test,
which decides when it lands and when it is answered. The server knows which
writes it applied (`applied`) and which it only received (`received`), so a
write whose outcome the client never learned (5xx, reset, timeout, a 302 or
307) is still accounted for.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["APPLYING", "REDIRECTS", "Applied", "Fault", "FaultUpstream", "Hold", "StaleWrite", "running_upstream"]

PREFIX = "/counters/"


class Fault(enum.Enum):
    """What the upstream does with one write."""

    NONE = "none"
    """Apply, answer 200 with the new document."""
    ERROR_BEFORE = "error_before"
    """Answer 500 without applying (a crash before the commit)."""
    ERROR_AFTER = "error_after"
    """Apply, then answer 500 (a crash after the commit)."""
    RESET_BEFORE = "reset_before"
    """Read the body, reset the connection, apply nothing."""
    RESET_AFTER = "reset_after"
    """Read the body, apply, reset the connection."""
    SLOW_AFTER = "slow_after"
    """Apply, answer only after `slow_s` (past the proxy's deadline)."""
    SEE_OTHER_AFTER = "see_other_after"
    """Apply, answer 303 See Other to the counter (Post/Redirect/Get)."""
    FOUND_AFTER = "found_after"
    """Apply, answer 302 Found to the counter (what a web framework's
    `redirect()` sends after a form write succeeded)."""
    TEMPORARY_BEFORE = "temporary_before"
    """Answer 307 Temporary Redirect without applying (the request belongs
    elsewhere and was not processed here)."""


APPLYING = frozenset({
    Fault.NONE, Fault.ERROR_AFTER, Fault.RESET_AFTER, Fault.SLOW_AFTER, Fault.SEE_OTHER_AFTER, Fault.FOUND_AFTER,
})
"""The faults whose write the upstream applies."""
REDIRECTS = {Fault.SEE_OTHER_AFTER: 303, Fault.FOUND_AFTER: 302, Fault.TEMPORARY_BEFORE: 307}
"""The status each redirecting fault answers with; `Location` names the counter."""


@dataclass(frozen=True, slots=True)
class Applied:
    key: str
    write: str
    value: int
    """The value the write set."""
    previous: int
    """The value it replaced."""


@dataclass(frozen=True, slots=True)
class StaleWrite:
    """A write that did not set the counter to previous + 1: a lost update."""

    key: str
    write: str
    value: int
    previous: int


@dataclass(slots=True)
class Hold:
    """One write handed to the test: `received` is set when its body has
    arrived; it is applied on receipt (`apply_on_receipt`) or when `release`
    is set, and answered 200 after `release`."""

    write: str
    apply_on_receipt: bool
    received: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    landed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the write has been applied."""


@dataclass
class FaultUpstream:
    """The counter API. Start it with `running_upstream()`."""

    plan: Sequence[Fault] = (Fault.NONE,)
    """Cycled over every PUT in arrival order."""
    slow_s: float = 1.0
    url: str = ""
    values: dict[str, int] = field(default_factory=dict)
    applied: dict[str, Applied] = field(default_factory=dict)
    """Every applied write by its id, in the order applied."""
    received: set[str] = field(default_factory=set)
    """Ids of every write whose body arrived, applied or not."""
    stale: list[StaleWrite] = field(default_factory=list)
    injected: Counter[Fault] = field(default_factory=Counter)
    reads: int = 0
    _puts: int = 0
    _holds: list[Hold] = field(default_factory=list)

    def hold(self, write: str, *, apply_on_receipt: bool) -> Hold:
        """Take the write with id `write` out of the plan and give it to the test."""
        held = Hold(write, apply_on_receipt)
        self._holds.append(held)
        return held

    def value(self, key: str) -> int:
        return self.values.get(key, 0)

    def _apply(self, key: str, write: str, value: int) -> None:
        previous = self.values.get(key, 0)
        if value != previous + 1:
            self.stale.append(StaleWrite(key, write, value, previous))
        self.values[key] = value
        self.applied[write] = Applied(key, write, value, previous)

    def _document(self, key: str) -> web.Response:
        return web.json_response({"value": self.value(key)})

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if not path.startswith(PREFIX) or len(path) == len(PREFIX):
            return web.Response(status=404)
        key = path[len(PREFIX):]
        if request.method in ("GET", "HEAD"):
            self.reads += 1
            return self._document(key)
        if request.method != "PUT":
            return web.Response(status=405, headers={"Allow": "GET, HEAD, PUT"})
        body = await request.read()
        try:
            doc = json.loads(body)
            value, write = int(doc["value"]), str(doc["write"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="expected {\"value\": int, \"write\": str}")
        self.received.add(write)
        held = next((h for h in self._holds if h.write == write), None)
        if held is not None:
            return await self._held(held, key, write, value)
        fault = self.plan[self._puts % len(self.plan)]
        self._puts += 1
        self.injected[fault] += 1
        if fault in APPLYING:
            self._apply(key, write, value)
        if fault in (Fault.RESET_BEFORE, Fault.RESET_AFTER):
            # The body has been read: the write reached the API, the answer never leaves it.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault in (Fault.ERROR_BEFORE, Fault.ERROR_AFTER):
            return web.Response(status=500, text="internal error")
        if fault in REDIRECTS:
            return web.Response(status=REDIRECTS[fault], headers={"Location": PREFIX + key})
        if fault is Fault.SLOW_AFTER:
            await asyncio.sleep(self.slow_s)
        return self._document(key)

    async def _held(self, held: Hold, key: str, write: str, value: int) -> web.StreamResponse:
        if held.apply_on_receipt:
            self._apply(key, write, value)
            held.landed.set()
        held.received.set()
        await held.release.wait()
        if not held.apply_on_receipt:
            self._apply(key, write, value)
            held.landed.set()
        return self._document(key)


@asynccontextmanager
async def running_upstream(upstream: FaultUpstream) -> AsyncIterator[FaultUpstream]:
    """Serve `upstream` on a free loopback port for the duration of the block."""
    server = web.Server(upstream.handle, access_log=None)
    # Held and slow handlers may still be waiting when the block ends.
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        for held in upstream._holds:
            held.release.set()
        await runner.cleanup()
