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

A second kind of writer bypasses whatever sits in front: `POST
/counters/<id>` with `{"write": id}` increments the counter atomically
(what a database job or a web UI saving under its own row lock does), so
a bypass write never erases anything itself; what the detector then
counts is which writes a stale write erased, bypass or not (`erased`).
Every document carries `rev`, bumped by each applied write, the way an
auto-updated `last_updated` column moves; `read_at` keeps, by the
`X-Request-ID` of the read, when each read was answered, so the gap
between a proxy's verify read and its write landing can be measured
here, where the write is applied.

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

__all__ = ["APPLYING", "REDIRECTS", "Applied", "Erased", "Fault", "FaultUpstream", "Hold", "StaleWrite", "running_upstream"]

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
class Erased:
    """An applied write whose increment a later stale write undid."""

    key: str
    write: str
    by: str
    """The stale write that erased it."""
    bypass: bool
    """Whether the erased write bypassed the proxy."""


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
    own_etags: bool = False
    """Send a weak `ETag: W/"<rev>"` and check If-Match on PUT against it
    (weakly, the way NetBox 4.6 does), atomically with applying the write."""
    url: str = ""
    values: dict[str, int] = field(default_factory=dict)
    applied: dict[str, Applied] = field(default_factory=dict)
    """Every applied write by its id, in the order applied."""
    received: set[str] = field(default_factory=set)
    """Ids of every write whose body arrived, applied or not."""
    refused: set[str] = field(default_factory=set)
    """Of `received`, the writes this API refused itself with 412 (`own_etags`)."""
    stale: list[StaleWrite] = field(default_factory=list)
    erased: list[Erased] = field(default_factory=list)
    bypass: set[str] = field(default_factory=set)
    """Ids of the applied writes that came in by POST, bypassing the proxy."""
    read_at: dict[str, float] = field(default_factory=dict)
    """X-Request-ID of a read -> when it was answered (loop time)."""
    applied_at: dict[str, float] = field(default_factory=dict)
    """Write id -> when it was applied (loop time)."""
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """For each PUT whose id named an earlier read (a proxy's verify read
    carries the write's request id): (read answered, write applied)."""
    revs: dict[str, int] = field(default_factory=dict)
    injected: Counter[Fault] = field(default_factory=Counter)
    reads: int = 0
    _puts: int = 0
    _holds: list[Hold] = field(default_factory=list)
    _live: dict[str, list[str]] = field(default_factory=dict)
    """Per key, the writes whose increments the value is made of, in order."""

    def hold(self, write: str, *, apply_on_receipt: bool) -> Hold:
        """Take the write with id `write` out of the plan and give it to the test."""
        held = Hold(write, apply_on_receipt)
        self._holds.append(held)
        return held

    def value(self, key: str) -> int:
        return self.values.get(key, 0)

    def note_read(self, rid: str | None) -> None:
        """Count a read; `rid` (its X-Request-ID) timestamps it in `read_at`."""
        self.reads += 1
        if rid is not None:
            self.read_at[rid] = asyncio.get_running_loop().time()

    def apply(self, key: str, write: str, value: int) -> None:
        """Apply one PUT's write, with the lost-update bookkeeping (for a
        server in front of this one's state, e.g. tests/raw_counter_upstream.py)."""
        self._apply(key, write, value)

    def _apply(self, key: str, write: str, value: int) -> None:
        previous = self.values.get(key, 0)
        live = self._live.setdefault(key, [])
        if value != previous + 1:
            self.stale.append(StaleWrite(key, write, value, previous))
            # The increments that set values value..previous are gone.
            for gone in live[max(value - 1, 0):]:
                self.erased.append(Erased(key, gone, write, gone in self.bypass))
            del live[max(value - 1, 0):]
        live.append(write)
        self.values[key] = value
        self.revs[key] = self.revs.get(key, 0) + 1
        self.applied[write] = Applied(key, write, value, previous)
        now = asyncio.get_running_loop().time()
        self.applied_at[write] = now
        read = self.read_at.pop(write, None)
        if read is not None:
            self.windows[write] = (read, now)

    def _document(self, key: str) -> web.Response:
        rev = self.revs.get(key, 0)
        headers = {"ETag": f'W/"{rev}"'} if self.own_etags else None
        return web.json_response({"value": self.value(key), "rev": rev}, headers=headers)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if not path.startswith(PREFIX) or len(path) == len(PREFIX):
            return web.Response(status=404)
        key = path[len(PREFIX):]
        if request.method in ("GET", "HEAD"):
            self.note_read(request.headers.get("X-Request-ID"))
            return self._document(key)
        if request.method == "POST":
            return await self._bypass(request, key)
        if request.method != "PUT":
            return web.Response(status=405, headers={"Allow": "GET, HEAD, POST, PUT"})
        body = await request.read()
        try:
            doc = json.loads(body)
            value, write = int(doc["value"]), str(doc["write"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="expected {\"value\": int, \"write\": str}")
        self.received.add(write)
        if self.own_etags and "If-Match" in request.headers:
            tags = [t.strip().removeprefix("W/") for t in request.headers["If-Match"].split(",")]
            if f'"{self.revs.get(key, 0)}"' not in tags:
                self.refused.add(write)
                return web.Response(status=412, text="precondition failed")
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

    async def _bypass(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        try:
            write = str(json.loads(await request.read())["write"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="expected {\"write\": str}")
        self.received.add(write)
        self.bypass.add(write)
        self._apply(key, write, self.value(key) + 1)
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
