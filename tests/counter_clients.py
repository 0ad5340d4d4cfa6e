"""Clients that increment counters through the proxy, and the audit of a run.

Each client loops: GET a counter (value and ETag), PUT value + 1 with
`If-Match`, and on anything but a 2xx starts over with a fresh GET. Every
write carries a unique id (in the body and as `X-Request-ID`), so the
`Ledger` of what clients were told can be set against what the upstream
(`FaultUpstream`) actually applied. `audit()` does that and lists every way
the run broke the promise "no acknowledged update is lost":

- the upstream saw no stale write (its own lost-update detector);
- every acknowledged write (2xx, or 303 See Other: the write was applied and
  the answer points elsewhere) was applied, with the value the client sent;
- no write answered 412/409/428/503 reached the upstream (they are decided
  before forwarding);
- every applied but unacknowledged write is one whose client got an
  unknown outcome (5xx, reset, timeout, any 3xx but 303), so that per key
  final value == acknowledged increments + landed-but-unacknowledged ones;
- per key, the (If-Match sent -> ETag received) pairs of acknowledged writes
  form one chain: no tag validated two writes, no tag was handed out twice,
  and a write validated by another write's tag is that write's successor.
  With `whole_chain`, every acknowledged write but the first is validated
  by its predecessor's tag (no token was minted other than by a write).

Writes that bypass the proxy (`bypass_until`, straight to the upstream) are
atomic increments: they never erase anything themselves, and a stale write
that erases only bypass writes is counted (`erased_bypass`), not reported
as a lost proxied update: whether any happen is what the route's `version`
setting decides.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.fault_upstream import PREFIX, FaultUpstream

__all__ = ["Ack", "Audit", "Ledger", "Span", "acknowledged", "audit", "client_session", "bypass_until", "increment_until", "read_counter", "write_counter"]

# A write answered with one of these was decided before anything was forwarded.
NOT_FORWARDED = frozenset({409, 412, 428, 503})


def acknowledged(status: int) -> bool:
    """Whether a write answered `status` was applied, as far as its client
    can tell: a 2xx, or a 303 (RFC 9110 §15.4.4, Post/Redirect/Get)."""
    return 200 <= status < 300 or status == 303


@dataclass(frozen=True, slots=True)
class Ack:
    """A write the client was told succeeded."""

    key: str
    write: str
    value: int
    if_match: str
    etag: str | None
    """None: 2xx without ETag (END could not commit or lost its lease), or a
    303 (its validators would describe the redirect)."""
    via: str
    status: int = 200


@dataclass(frozen=True, slots=True)
class Span:
    """One client request: when it was sent and answered (loop time), and
    how (status, or the exception's name)."""

    client: str
    method: str
    key: str
    began: float
    ended: float
    outcome: str


@dataclass
class Ledger:
    """What the clients were told, by write id."""

    acks: list[Ack] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    """Write answers by status ("2xx", "303", "412", "504", "error", ...)."""
    not_forwarded: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    """Writes whose outcome the client could not know: id -> status or error."""
    attempts: int = 0
    reads: int = 0
    reads_without_etag: int = 0
    _tick: asyncio.Event = field(default_factory=asyncio.Event)

    def _changed(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def record_read(self, etag: str | None) -> None:
        self.reads += 1
        if etag is None:
            self.reads_without_etag += 1

    def record_write(
        self, key: str, write: str, value: int, if_match: str, via: str,
        status: int | None, etag: str | None, error: str = "",
    ) -> None:
        self.attempts += 1
        if status is not None and acknowledged(status):
            self.outcomes["303" if status == 303 else "2xx"] += 1
            self.acks.append(Ack(key, write, value, if_match, etag, via, status))
        elif status in NOT_FORWARDED:
            self.outcomes[str(status)] += 1
            self.not_forwarded[write] = status
        else:
            what = str(status) if status is not None else "error"
            self.outcomes[what] += 1
            self.unknown[write] = error or what
        self._changed()

    def acked(self, key: str | None = None) -> int:
        return sum(1 for a in self.acks if key is None or a.key == key)

    async def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Wait for a recorded write after which `ready()` holds."""
        async with asyncio.timeout(timeout):
            while True:
                tick = self._tick
                if ready():
                    return
                await tick.wait()


def client_session(**kw: Any) -> aiohttp.ClientSession:
    """An aiohttp session that never resends a request on its own.

    aiohttp resends an idempotent request (GET, PUT, DELETE) once when its
    connection breaks (ServerDisconnectedError, ClientOSError), new
    connection or not. A PUT that reached the upstream before the proxy
    died would then be answered by its resend (409 or 412: the proxy
    refuses a stale resend), and the ledger would record a refusal for a
    write that landed. The clients here must see the reset: the write's
    outcome is unknown to them."""
    session = aiohttp.ClientSession(**kw)
    session._retry_connection = False  # no public switch as of aiohttp 3.14
    return session


async def read_counter(
    session: aiohttp.ClientSession, base: str, key: str
) -> tuple[int, int, str | None]:
    """GET a counter: (status, value, ETag or None)."""
    async with session.get(base + PREFIX + key) as resp:
        body = await resp.read()
        if resp.status != 200:
            return resp.status, -1, None
        return resp.status, int(json.loads(body)["value"]), resp.headers.get("ETag")


async def write_counter(
    session: aiohttp.ClientSession, base: str, key: str, value: int, if_match: str, write: str
) -> tuple[int, str | None]:
    """PUT a counter value with `If-Match`: (status, ETag or None). A 3xx is
    the answer itself, not followed: following a 303 would report the GET's
    200 and ETag as the write's."""
    headers = {"If-Match": if_match, "X-Request-ID": write, "Content-Type": "application/json"}
    body = json.dumps({"value": value, "write": write})
    async with session.put(base + PREFIX + key, data=body, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status, resp.headers.get("ETag")


async def increment_until(
    stop: asyncio.Event,
    ledger: Ledger,
    bases: Sequence[str],
    keys: Callable[[random.Random], str],
    *,
    name: str,
    seed: int,
    timeout: float = 10.0,
    spans: list[Span] | None = None,
) -> None:
    """One client: GET -> PUT value + 1 with If-Match, again and again until
    `stop`. Each request goes to a proxy picked at random from `bases`, so a
    read and the write based on it usually cross replicas. With `spans`,
    every request is appended to it once answered (or failed)."""
    rng = random.Random(seed)
    n = 0
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    clock = asyncio.get_running_loop().time

    def span(method: str, key: str, began: float, outcome: str) -> None:
        if spans is not None:
            spans.append(Span(name, method, key, began, clock(), outcome))

    async with client_session(timeout=client_timeout) as session:
        while not stop.is_set():
            key = keys(rng)
            began = clock()
            try:
                status, value, etag = await read_counter(session, rng.choice(bases), key)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, etag = 0, None
                span("GET", key, began, type(exc).__name__)
            else:
                span("GET", key, began, str(status))
            if status == 200:
                ledger.record_read(etag)
            if etag is None:
                # A write is in flight on the key, or the store is down: the
                # read carries no validator. Back off briefly and re-read.
                await asyncio.sleep(rng.uniform(0.001, 0.005))
                continue
            n += 1
            write = f"{name}.{n}"
            base = rng.choice(bases)
            began = clock()
            try:
                put_status, new_tag = await write_counter(session, base, key, value + 1, etag, write)
            except (aiohttp.ClientError, TimeoutError) as exc:
                span("PUT", key, began, type(exc).__name__)
                ledger.record_write(key, write, value + 1, etag, base, None, None, type(exc).__name__)
            else:
                span("PUT", key, began, str(put_status))
                ledger.record_write(key, write, value + 1, etag, base, put_status, new_tag)
                if put_status == 412 or acknowledged(put_status):
                    continue
            await asyncio.sleep(rng.uniform(0.005, 0.02))


async def bypass_until(
    stop: asyncio.Event, upstream: str, keys: Callable[[random.Random], str], *, name: str, seed: int,
    pause: tuple[float, float] = (0.002, 0.01),
) -> None:
    """A writer that bypasses the proxy: atomic increments straight at the
    upstream (`POST /counters/<id>`), until `stop`."""
    rng = random.Random(seed)
    n = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            n += 1
            body = json.dumps({"write": f"{name}.{n}"})
            async with session.post(upstream + PREFIX + keys(rng), data=body) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            await asyncio.sleep(rng.uniform(*pause))


@dataclass
class Audit:
    """The reconciliation of a run; `problems` is empty when nothing was lost."""

    attempts: int
    acknowledged: int
    outcomes: dict[str, int]
    applied: int
    landed_unacknowledged: int
    stale: int
    """Stale writes the upstream applied."""
    erased: int
    """Increments those stale writes erased."""
    bypass_applied: int
    """Writes that bypassed the proxy."""
    erased_bypass: int
    """Of `erased`, the bypass writes."""
    final_total: int
    problems: list[str]

    def summary(self) -> str:
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        return (
            f"writes attempted={self.attempts} acknowledged={self.acknowledged} "
            f"landed-unacknowledged={self.landed_unacknowledged} applied={self.applied} "
            f"final-total={self.final_total} lost-updates={self.stale}"
            f" erased-increments={self.erased} bypass-writes={self.bypass_applied}"
            f" erased-bypass-writes={self.erased_bypass} [{outcomes}]"
        )


def audit(upstream: FaultUpstream, ledger: Ledger, *, whole_chain: bool = False, chain: bool = True) -> Audit:
    """Set what the clients were told against what the upstream applied.
    `chain=False` leaves out the tag-chain checks: for a run whose bypass
    writes are meant not to move the tags."""
    problems: list[str] = []
    erasers = {e.by for e in upstream.erased}
    proxied_victims = {e.by for e in upstream.erased if not e.bypass}
    for s in upstream.stale:
        if s.write in proxied_victims or s.write not in erasers:
            problems.append(f"lost update: write {s.write} set {s.key} to {s.value} over {s.previous}")
    acked_ids = {a.write for a in ledger.acks}
    for a in ledger.acks:
        applied = upstream.applied.get(a.write)
        if applied is None:
            problems.append(f"acknowledged write {a.write} on {a.key} never reached the upstream")
        elif applied.value != a.value or applied.key != a.key:
            problems.append(f"acknowledged write {a.write} applied as {applied}, sent {a.value}")
    for write, status in ledger.not_forwarded.items():
        if write in upstream.received and write not in upstream.refused:
            problems.append(f"write {write} was answered {status} but reached the upstream")
    landed = [w for w in upstream.applied if w not in acked_ids and w not in upstream.bypass]
    for write in landed:
        if write not in ledger.unknown:
            problems.append(
                f"write {write} was applied but its client was told neither 2xx/303 nor an unknown outcome"
            )
    keys = set(upstream.values) | {a.key for a in ledger.acks}
    for key in sorted(keys):
        acked = ledger.acked(key)
        landed_here = sum(1 for w in landed if upstream.applied[w].key == key)
        bypass_here = sum(1 for w in upstream.bypass if upstream.applied[w].key == key)
        # Only erased bypass writes are allowed for: an erased proxied write is lost.
        erased_here = sum(1 for e in upstream.erased if e.key == key and e.bypass)
        if upstream.value(key) != acked + landed_here + bypass_here - erased_here:
            problems.append(
                f"{key}: final value {upstream.value(key)} != {acked} acknowledged"
                f" + {landed_here} landed-but-unacknowledged + {bypass_here} bypass"
                f" - {erased_here} erased bypass writes"
            )
        if chain:
            problems.extend(_chain_problems(key, [a for a in ledger.acks if a.key == key], whole_chain))
    return Audit(
        attempts=ledger.attempts,
        acknowledged=len(ledger.acks),
        outcomes=dict(ledger.outcomes),
        applied=len(upstream.applied),
        landed_unacknowledged=len(landed),
        stale=len(upstream.stale),
        erased=len(upstream.erased),
        bypass_applied=len(upstream.bypass),
        erased_bypass=sum(1 for e in upstream.erased if e.bypass),
        final_total=sum(upstream.values.values()),
        problems=problems,
    )


def _chain_problems(key: str, acks: list[Ack], whole: bool) -> list[str]:
    problems: list[str] = []
    by_match: dict[str, Ack] = {}
    by_tag: dict[str, Ack] = {}
    for a in acks:
        if a.if_match in by_match:
            problems.append(f"{key}: If-Match {a.if_match} validated two writes: {by_match[a.if_match].write}, {a.write}")
        by_match[a.if_match] = a
        if a.etag is not None:
            if a.etag in by_tag:
                problems.append(f"{key}: ETag {a.etag} handed out twice: {by_tag[a.etag].write}, {a.write}")
            by_tag[a.etag] = a
    for a in acks:
        parent = by_tag.get(a.if_match)
        if parent is not None and parent.value + 1 != a.value:
            problems.append(
                f"{key}: write {a.write} (value {a.value}) was validated by the tag of"
                f" {parent.write} (value {parent.value}): not its successor"
            )
    if whole:
        ordered = sorted(acks, key=lambda a: a.value)
        if [a.value for a in ordered] != list(range(1, len(ordered) + 1)):
            problems.append(f"{key}: acknowledged values are not 1..{len(ordered)}")
        for prev, a in zip(ordered, ordered[1:]):
            if prev.etag is None or a.if_match != prev.etag:
                problems.append(f"{key}: chain broken between {prev.write} and {a.write}")
                break
    return problems
