"""Chaos scenario 6: clock and time.

1. One replica's wall clock is stepped (libfaketime, that process only;
   its monotonic clock is left alone, as a real step leaves it) while both
   replicas share one real Redis: every deadline and mint time is Redis's
   TIME, so nothing that decides validity may depend on the stepped clock.
   Tags issued by either replica validate on the other, Last-Modified is
   the same whichever replica answers, and no update is lost.
2. A replica's event loop is blocked (a CPU-bound callback, or a blocking
   wait) for longer than its lease while its write is in flight: another
   replica takes the key once the lease expires, the stalled replica's END
   finds its lease lost, sends no ETag and counts it, and no update is lost
   when the write had landed before the stall.
3. The clock the scripts read (Redis TIME) stepped, emulated on the stored
   deadline and mint time (redis-server does not run under libfaketime):
   forward past a lease lets a second write in while the first is in
   flight, and back sends Last-Modified back, so If-Unmodified-Since and
   If-Modified-Since of the earlier date pass over a change. Both are
   residual risks, asserted as they are; If-Match is not fooled by either
   step, the forward one aside.
4. The memory store, whose mint times are the proxy's own wall clock: a
   real step back (libfaketime) does the same to date-only clients.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from etagproxy.exchange import Exchange
from etagproxy.store.redis import redis_key
from tests.chaos_rows import report
from tests.counter_clients import Ledger, audit, write_counter
from tests.fault_upstream import PREFIX, FaultUpstream, running_upstream
from tests.metrics import metric, scrape
from tests.ports import free_port
from tests.proxy_fixtures import ProxyHandle
from tests.proxy_processes import ProxyProcess, counter_config, start_proxy
from tests.redis_fixtures import RedisServer
from tests.test_lost_updates import CLIENTS, KEYS, workload

LEASE_S = 0.5 + 2 * 0.2 + 1.0  # writes.lease_ms for counter_config()'s timeouts
HOUR = 3600


def _libfaketime() -> str | None:
    """The path of libfaketime's preload library, if installed (Debian
    package `libfaketime`, which `faketime` depends on)."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _faketime_env(offset_file: Path) -> dict[str, str]:
    """Environment that runs one process with its wall clock offset by what
    `offset_file` says ("+3600", "-1h", ...), re-read on every clock call so
    a test can step it mid-run. CLOCK_MONOTONIC is not faked: a step of the
    system clock leaves it alone, and asyncio's deadlines run on it."""
    lib = _libfaketime()
    if lib is None:
        pytest.skip(
            "libfaketime is not installed (Debian/Ubuntu: apt-get install -y libfaketime, or faketime): "
            "the stepped-clock scenario preloads it into one proxy process"
        )
    return {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _http_date(headers: aiohttp.typedefs.LooseHeaders, name: str) -> float:
    return parsedate_to_datetime(headers[name]).timestamp()  # type: ignore[index]


@asynccontextmanager
async def _replicas(
    tmp_path: Path, upstream: str, store: str, env1: dict[str, str], **config: str
) -> AsyncIterator[tuple[ProxyProcess, ProxyProcess]]:
    """Replica 1 with `env1` added to its environment, replica 2 without."""
    started: list[ProxyProcess] = []
    try:
        for env in (env1, {}):
            text = counter_config(upstream, store, admin_port=free_port(), **config)
            started.append(await start_proxy(text, tmp_path, env=env or None))
        yield started[0], started[1]
    finally:
        codes = [await p.stop() for p in started]
        assert codes == [0] * len(started), [p.stderr[-20:] for p in started]


async def _own_date(session: aiohttp.ClientSession, proxy: ProxyProcess) -> float:
    """The Date of an answer the proxy makes itself (a 428 for a PUT without
    a precondition, never forwarded), i.e. the proxy's wall clock; a relayed
    answer carries the upstream's Date."""
    async with session.put(proxy.url + PREFIX + "clock", data=b"{}") as resp:
        await resp.read()
        assert resp.status == 428
        return _http_date(resp.headers, "Date")


async def _seen_offset(session: aiohttp.ClientSession, p1: ProxyProcess, p2: ProxyProcess) -> float:
    """p1's wall clock minus p2's, as their own answers show (seconds, ±1)."""
    return await _own_date(session, p1) - await _own_date(session, p2)


async def _until_offset(session: aiohttp.ClientSession, p1: ProxyProcess, p2: ProxyProcess, offset: float) -> None:
    """Until p1's Date shows the stepped clock (an event, not a wait)."""
    async with asyncio.timeout(10):
        while abs(await _seen_offset(session, p1, p2) - offset) > 2:
            pass


async def _cross_checks(
    session: aiohttp.ClientSession, ledger: Ledger, p1: ProxyProcess, p2: ProxyProcess
) -> dict[str, Any]:
    """With no client running: a tag and a Last-Modified issued by either
    replica, used on the other. Returns what was observed."""
    seen: dict[str, Any] = {}
    for n, (reader, writer) in enumerate(((p1, p2), (p2, p1), (p1, p2), (p2, p1))):
        key = "k0"
        async with session.get(reader.url + PREFIX + key) as resp:
            doc = json.loads(await resp.read())
            tag, lm = resp.headers["ETag"], resp.headers["Last-Modified"]
        value = int(doc["value"])
        # The other replica answers the same version with the same date.
        async with session.get(writer.url + PREFIX + key) as resp:
            await resp.read()
            assert resp.headers["ETag"] == tag
            assert resp.headers["Last-Modified"] == lm
        async with session.get(writer.url + PREFIX + key, headers={"If-Modified-Since": lm}) as resp:
            await resp.read()
            assert resp.status == 304, "If-Modified-Since of the other replica's Last-Modified"
        async with session.get(writer.url + PREFIX + key, headers={"If-None-Match": tag}) as resp:
            await resp.read()
            assert resp.status == 304, "If-None-Match of the other replica's tag"
        write = f"cross.{n}"
        if n < 2:
            # If-Match with the tag the other replica handed out.
            status, etag = await write_counter(session, writer.url, key, value + 1, tag, write)
            ledger.record_write(key, write, value + 1, tag, writer.url, status, etag)
            assert status == 200 and etag is not None, f"{tag} from {reader.url} refused by {writer.url}"
        else:
            # If-Unmodified-Since with the other replica's Last-Modified:
            # still unmodified, so applied; one second earlier is a 412.
            earlier = formatdate(parsedate_to_datetime(lm).timestamp() - 1, usegmt=True)
            stale = f"cross.{n}.early"
            status, _ = await _write_ius(session, writer.url, key, value + 1, earlier, stale)
            ledger.record_write(key, stale, value + 1, tag, writer.url, status, None)
            assert status == 412, "If-Unmodified-Since one second before the mint"
            status, etag = await _write_ius(session, writer.url, key, value + 1, lm, write)
            # Judged against the version `tag` names: the chain's link.
            ledger.record_write(key, write, value + 1, tag, writer.url, status, etag)
            assert status == 200, f"If-Unmodified-Since {lm} from {reader.url} refused by {writer.url}"
    # Last-Modified (Redis TIME) against the Date of a 200 (relayed: the
    # upstream's) and of a 304 (the proxy's own: the stepped clock).
    async with session.get(p1.url + PREFIX + "k0") as r1:
        await r1.read()
        tag, minted = r1.headers["ETag"], _http_date(r1.headers, "Last-Modified")
        seen["p1_200_date_minus_lm_s"] = round(_http_date(r1.headers, "Date") - minted)
    async with session.get(p1.url + PREFIX + "k0", headers={"If-None-Match": tag}) as r1:
        await r1.read()
        assert r1.status == 304
        seen["p1_304_date_minus_lm_s"] = round(_http_date(r1.headers, "Date") - minted)
        seen["p1_304_has_lm"] = "Last-Modified" in r1.headers
    return seen


async def _write_ius(
    session: aiohttp.ClientSession, base: str, key: str, value: int, ius: str, write: str
) -> tuple[int, str | None]:
    headers = {"If-Unmodified-Since": ius, "X-Request-ID": write, "Content-Type": "application/json"}
    body = json.dumps({"value": value, "write": write})
    async with session.put(base + PREFIX + key, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("ETag")


def _crossed(ledger: Ledger, first: str, second: str) -> int:
    """Acknowledged writes through `second` validated by a tag a write
    through `first` was answered with."""
    issuer = {a.etag: a.via for a in ledger.acks if a.etag is not None}
    return sum(1 for a in ledger.acks if a.via == second and issuer.get(a.if_match) == first)


def _acked_at_least(ledger: Ledger, n: int) -> Callable[[], bool]:
    return lambda: ledger.acked() >= n


# -- 1. a replica's wall clock stepped ------------------------------------------------

STEPS = {
    "ahead_1h": ("+1h", None),
    "behind_1h": ("-1h", None),
    "jumps_mid_run": ("+0", ("-1h", "+1h")),
}


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
@pytest.mark.parametrize("step", list(STEPS))
async def test_one_replica_with_its_wall_clock_stepped_loses_no_update(
    step: str, tmp_path: Path, redis_server: RedisServer
):
    start, jumps = STEPS[step]
    offset_file = tmp_path / "faketime"
    offset_file.write_text(start + "\n")
    env = _faketime_env(offset_file)
    expected = {"+0": 0, "+1h": HOUR, "-1h": -HOUR}
    ledger = Ledger()
    async with (
        running_upstream(FaultUpstream()) as up,
        aiohttp.ClientSession() as s,
        _replicas(tmp_path, up.url, redis_server.url, env) as (p1, p2),
    ):
        await _until_offset(s, p1, p2, expected[start])
        bases = [p1.url, p2.url]
        target = 400
        async with workload(ledger, bases, keys=KEYS, clients=CLIENTS):
            if jumps is None:
                await ledger.wait_until(lambda: ledger.acked() >= target, timeout=30)
            else:
                # The clock steps back an hour, then two hours forward,
                # while writes are in flight on both replicas.
                for i, jump in enumerate(jumps, 1):
                    await ledger.wait_until(_acked_at_least(ledger, target * i // 3), timeout=30)
                    offset_file.write_text(jump + "\n")
                    await _until_offset(s, p1, p2, expected[jump])
                await ledger.wait_until(lambda: ledger.acked() >= target, timeout=30)
        seen = await _cross_checks(s, ledger, p1, p2)
        seen["p1_date_minus_p2_date_s"] = round(await _seen_offset(s, p1, p2))
        lost = [metric(await p.metrics(), "etagproxy_lease_lost_total") for p in (p1, p2)]
    result = audit(up, ledger, whole_chain=True)
    crossed = (_crossed(ledger, p1.url, p2.url), _crossed(ledger, p2.url, p1.url))
    report(
        f"replica 1's wall clock stepped ({step}), 2 replicas x {CLIENTS} clients on one Redis", result,
        step=start if jumps is None else "->".join((start, *jumps)),
        tags_1_to_2=crossed[0], tags_2_to_1=crossed[1], lease_lost=int(sum(lost)), **seen,
    )
    assert result.problems == []
    assert result.stale == 0
    assert result.final_total == result.acknowledged >= target
    assert min(crossed) > 0, "tags issued by one replica must validate writes on the other"
    assert ledger.outcomes["412"] > 0
    assert sum(lost) == 0
    assert not ledger.unknown
    # The step is real (p1's own answers show it), and what p1 relays and
    # dates (Date from the upstream, Last-Modified from Redis) does not.
    assert abs(seen["p1_date_minus_p2_date_s"] - expected[(jumps or (start,))[-1]]) <= 2
    assert abs(seen["p1_200_date_minus_lm_s"]) <= 2
    assert abs(seen["p1_304_date_minus_lm_s"]) <= 2


# -- 2. a stalled event loop past the lease ------------------------------------------


@asynccontextmanager
async def _upstream_in_thread(up: FaultUpstream) -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Serve `up` from its own thread and event loop, so that it keeps
    answering while the test's loop (and the in-process proxy on it) is
    blocked. Yields that loop: touch `up`'s events only through it."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        async with running_upstream(up):
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="upstream", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10)
    loop: asyncio.AbstractEventLoop = box["loop"]
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()


def _sync_request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
                  ) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@dataclass
class OtherReplica:
    """A writer through replica 2 on its own thread: re-reads until the key
    carries a tag again (no tag while a write is in flight), then
    increments with If-Match, `writes` times. Every write attempt is kept
    as (write id, value, If-Match, status, ETag) for the ledger."""

    base: str
    writes: int
    attempts: list[tuple[str, int, str, int, str | None]] = field(default_factory=list)
    first_ack: float | None = None
    """time.monotonic() (the clock of asyncio's loop.time) of the first 2xx."""

    def run(self, key: str) -> None:
        n = 0
        while sum(1 for a in self.attempts if a[3] == 200) < self.writes:
            status, body, headers = _sync_request("GET", self.base + PREFIX + key)
            tag = headers.get("ETag")
            if status != 200 or tag is None:
                # The stalled write still holds the key: re-read after a
                # pause, as the workload's clients do.
                time.sleep(0.005)
                continue
            n += 1
            write, value = f"other.{n}", int(json.loads(body)["value"]) + 1
            status, _, headers = _sync_request(
                "PUT", self.base + PREFIX + key, json.dumps({"value": value, "write": write}).encode(),
                {"If-Match": tag, "X-Request-ID": write, "Content-Type": "application/json"},
            )
            if status == 200 and self.first_ack is None:
                self.first_ack = time.monotonic()
            self.attempts.append((write, value, tag, status, headers.get("ETag")))


def _spin_until(done: threading.Event) -> None:
    """CPU-bound work on the loop's thread until `done` (hashing releases
    the GIL on large buffers, so other threads still run)."""
    block = bytes(1 << 20)
    while not done.is_set():
        hashlib.sha256(block).digest()


async def _logged(proxy: ProxyHandle, rid: str) -> Exchange:
    """The access-log record of request `rid`, once logged (after its answer)."""
    async with asyncio.timeout(10):
        while True:
            for ex in proxy.exchanges:
                if ex.rid == rid:
                    return ex
            proxy.exchanges.logged.clear()
            await proxy.exchanges.logged.wait()


STALLS: dict[str, Callable[[threading.Event], object]] = {
    "cpu_bound": _spin_until,
    "blocking_wait": lambda done: done.wait(30),
}


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
@pytest.mark.parametrize("stall", list(STALLS))
async def test_event_loop_stalled_past_the_lease_with_a_write_in_flight(
    stall: str, tmp_path: Path, redis_server: RedisServer, make_proxy: Callable[..., Awaitable[ProxyHandle]]
):
    """Replica 1 runs in this process, on this loop; the upstream has
    applied its write and holds the answer when a callback blocks the loop.
    The stall lasts until replica 2 (another process) has taken the key and
    committed writes on it, which it can only do once replica 1's lease has
    expired in Redis: so the stall outlasts the lease by construction.
    Then replica 1's END finds the lease lost: no ETag, `lease_lost`, and
    the metric counted once. The write landed before the stall, so nothing
    is lost."""
    ledger = Ledger()
    up = FaultUpstream()
    async with _upstream_in_thread(up) as uloop, aiohttp.ClientSession() as s:
        text = counter_config(up.url, redis_server.url, admin_port=free_port())
        p1 = await make_proxy(text)
        p2 = await start_proxy(counter_config(up.url, redis_server.url, admin_port=free_port()), tmp_path)
        try:
            async with s.get(p1.url + PREFIX + "k0") as resp:
                value, tag = int(json.loads(await resp.read())["value"]), resp.headers["ETag"]
            held = up.hold("stalled.1", apply_on_receipt=True)
            loop = asyncio.get_running_loop()
            sent = loop.time()
            write = asyncio.ensure_future(write_counter(s, p1.url, "k0", value + 1, tag, "stalled.1"))
            received = asyncio.run_coroutine_threadsafe(held.received.wait(), uloop)
            await asyncio.wait_for(asyncio.wrap_future(received), 10)
            # The write has landed; its answer waits for `release`.
            other, done = OtherReplica(p2.url, writes=3), threading.Event()

            def replica_2() -> None:
                try:
                    other.run("k0")
                finally:
                    uloop.call_soon_threadsafe(held.release.set)
                    done.set()

            worker = threading.Thread(target=replica_2, name="replica-2-client")
            stalled: list[float] = []

            def stall_the_loop() -> None:
                began = time.monotonic()
                worker.start()
                STALLS[stall](done)
                stalled.append(time.monotonic() - began)

            loop.call_soon(stall_the_loop)
            status, etag = await write
            worker.join()
            entry = await _logged(p1, "stalled.1")
            lease_lost = metric((await scrape(p1.admin_url))[1], "etagproxy_lease_lost_total")
            other_lost = metric(await p2.metrics(), "etagproxy_lease_lost_total")
            # Both replicas serve the version replica 2's last write committed.
            async with s.get(p1.url + PREFIX + "k0") as r1, s.get(p2.url + PREFIX + "k0") as r2:
                await r1.read(), await r2.read()
                assert r1.headers["ETag"] == r2.headers["ETag"] == other.attempts[-1][4]
        finally:
            assert await p2.stop() == 0
    ledger.record_write("k0", "stalled.1", value + 1, tag, p1.url, status, etag)
    for w, v, t, st, e in other.attempts:
        ledger.record_write("k0", w, v, t, p2.url, st, e)
    result = audit(up, ledger)
    assert other.first_ack is not None
    report(
        f"event loop stalled past its lease ({stall}), write landed before the stall", result,
        lease_s=LEASE_S, stall_s=round(stalled[0], 2),
        replica_2_first_ack_after_send_s=round(other.first_ack - sent, 2),
        stalled_status=status, stalled_etag=etag is not None, decision=entry.decision,
        lease_lost=int(lease_lost), replica_2_lease_lost=int(other_lost),
    )
    # Nobody took the key while the lease was alive (it began after `sent`;
    # Redis TIME has millisecond resolution).
    assert other.first_ack - sent >= LEASE_S - 0.01
    assert stalled[0] >= LEASE_S - 0.01
    # Whether the answer or the upstream deadline wins after the stall is
    # up to the loop; either way the client gets no ETag.
    assert status in (200, 504)
    assert etag is None
    assert entry.decision == "lease_lost"
    assert lease_lost == 1
    assert other_lost == 0
    assert [a[3] for a in other.attempts] == [200] * 3
    assert result.problems == []
    assert result.stale == 0
    assert up.value("k0") == value + 4


# -- 3. the Redis host's clock stepped (emulated) --------------------------------------
#
# redis-server (jemalloc build) does not start under libfaketime 0.9.10: the
# preload recurses into clock_gettime during allocator start-up and aborts.
# So a step of the Redis clock is emulated on the one field of the resource
# key that the scripts compare TIME with: a step forward by more than a
# lease is, for a pending write, its deadline `l` already passed; a clock
# that was ahead when a version was minted and then stepped back is that
# version's mint time `m` later than the next version's.

RESOURCE = redis_key("etagproxy:", PREFIX + "k0")


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_redis_clock_stepped_forward_lets_a_second_write_in_while_the_first_is_in_flight(
    tmp_path: Path, redis_server: RedisServer
):
    """The residual risk of a Redis clock step forward by more than a lease:
    every lease in flight is over at once. A read re-mints the key (cause
    lease_expired), its tag validates a second write, which is forwarded
    while the first is still at the upstream; the first, landing later,
    erases it. The first write's END finds its lease lost and counts it."""
    ledger = Ledger()
    async with (
        running_upstream(FaultUpstream()) as up,
        aiohttp.ClientSession() as s,
        _replicas(tmp_path, up.url, redis_server.url, {}, upstream_timeout="5s") as (p1, p2),
    ):
        async with s.get(p1.url + PREFIX + "k0") as resp:
            value, tag = int(json.loads(await resp.read())["value"]), resp.headers["ETag"]
        held = up.hold("first", apply_on_receipt=False)
        first = asyncio.ensure_future(write_counter(s, p1.url, "k0", value + 1, tag, "first"))
        async with asyncio.timeout(10):
            await held.received.wait()
        assert redis_server.command("HGET", RESOURCE, "s") == b"p"
        # TIME jumps an hour forward: the lease's deadline is behind it.
        redis_server.command("HSET", RESOURCE, "l", str(int(redis_server.command("TIME")[0]) * 1000 - HOUR * 1000))
        async with s.get(p2.url + PREFIX + "k0") as resp:
            second_value = int(json.loads(await resp.read())["value"]) + 1
            second_tag = resp.headers.get("ETag")
        assert second_tag is not None and second_tag != tag
        status2, etag2 = await write_counter(s, p2.url, "k0", second_value, second_tag, "second")
        ledger.record_write("k0", "second", second_value, second_tag, p2.url, status2, etag2)
        held.release.set()
        status1, etag1 = await first
        ledger.record_write("k0", "first", value + 1, tag, p1.url, status1, etag1)
        lease_lost = metric(await p1.metrics(), "etagproxy_lease_lost_total")
        minted = metric(await p2.metrics(), "etagproxy_tokens_minted_total", cause="lease_expired")
    result = audit(up, ledger)
    report(
        "Redis clock stepped forward past a lease (emulated), a write in flight", result,
        second_status=status2, first_status=status1, first_etag=etag1 is not None,
        lease_lost=int(lease_lost), minted_lease_expired=int(minted),
    )
    assert status2 == 200, "the second write was forwarded while the first was in flight"
    assert status1 == 200 and etag1 is None
    assert lease_lost == 1
    assert [w.write for w in up.stale] == ["first"]
    assert any("lost update: write first" in p for p in result.problems)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_redis_clock_stepped_back_makes_last_modified_go_back(tmp_path: Path, redis_server: RedisServer):
    """A version minted while the Redis clock was an hour ahead, then the
    clock corrected: the next version's Last-Modified is an hour earlier.
    If-Match is not fooled (tokens), but a client holding the first date
    gets a 304 on If-Modified-Since for a changed resource, and its
    If-Unmodified-Since write is forwarded over the change: a lost update
    for date-only clients, beyond the known one-second limit."""
    ledger = Ledger()
    async with (
        running_upstream(FaultUpstream()) as up,
        aiohttp.ClientSession() as s,
        _replicas(tmp_path, up.url, redis_server.url, {}) as (p1, p2),
    ):
        async with s.get(p1.url + PREFIX + "k0") as resp:
            value, tag = int(json.loads(await resp.read())["value"]), resp.headers["ETag"]
        # The clock was an hour ahead when this version was minted.
        minted = int(redis_server.command("HGET", RESOURCE, "m"))
        redis_server.command("HSET", RESOURCE, "m", str(minted + HOUR * 1000))
        async with s.get(p1.url + PREFIX + "k0") as resp:
            await resp.read()
            first_lm = resp.headers["Last-Modified"]
        # Another client writes with If-Match (not fooled): a new version.
        status, etag = await write_counter(s, p2.url, "k0", value + 1, tag, "a")
        ledger.record_write("k0", "a", value + 1, tag, p2.url, status, etag)
        assert status == 200 and etag is not None
        async with s.get(p1.url + PREFIX + "k0") as resp:
            await resp.read()
            second_lm = resp.headers["Last-Modified"]
        went_back = parsedate_to_datetime(first_lm).timestamp() - parsedate_to_datetime(second_lm).timestamp()
        async with s.get(p2.url + PREFIX + "k0", headers={"If-Modified-Since": first_lm}) as resp:
            await resp.read()
            ims_status = resp.status
        # The date-only client computed its write from the first version.
        status_b, _ = await _write_ius(s, p1.url, "k0", value + 1, first_lm, "b")
        ledger.record_write("k0", "b", value + 1, tag, p1.url, status_b, None)
    result = audit(up, ledger, chain=False)
    report(
        "Redis clock stepped back an hour (emulated), date-only clients", result,
        last_modified_went_back_s=round(went_back), ims_status=ims_status, ius_status=status_b,
    )
    assert went_back >= HOUR - 2
    assert ims_status == 304, "If-Modified-Since of the earlier date: Not Modified over a change"
    assert status_b == 200, "If-Unmodified-Since of the earlier date: forwarded over a change"
    assert [w.write for w in up.stale] == ["b"]


@pytest.mark.slow
@pytest.mark.chaos
async def test_memory_store_proxy_clock_stepped_back_makes_last_modified_go_back(tmp_path: Path):
    """The same with `memory://`, whose mint times are the proxy's own wall
    clock: here the step is real (libfaketime), an hour back mid-run."""
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    env = _faketime_env(offset_file)
    ledger = Ledger()
    async with running_upstream(FaultUpstream()) as up, aiohttp.ClientSession() as s:
        proxy = await start_proxy(counter_config(up.url, "memory://", admin_port=free_port()), tmp_path, env=env)
        try:
            async with s.get(proxy.url + PREFIX + "k0") as resp:
                value, tag = int(json.loads(await resp.read())["value"]), resp.headers["ETag"]
                first_lm = resp.headers["Last-Modified"]
            before = await _own_date(s, proxy)
            offset_file.write_text("-1h\n")
            async with asyncio.timeout(10):
                while before - await _own_date(s, proxy) < HOUR - 2:
                    pass
            status, etag = await write_counter(s, proxy.url, "k0", value + 1, tag, "a")
            ledger.record_write("k0", "a", value + 1, tag, proxy.url, status, etag)
            assert status == 200 and etag is not None
            async with s.get(proxy.url + PREFIX + "k0") as resp:
                await resp.read()
                second_lm = resp.headers["Last-Modified"]
            async with s.get(proxy.url + PREFIX + "k0", headers={"If-Modified-Since": first_lm}) as resp:
                await resp.read()
                ims_status = resp.status
            status_b, _ = await _write_ius(s, proxy.url, "k0", value + 1, first_lm, "b")
            ledger.record_write("k0", "b", value + 1, tag, proxy.url, status_b, None)
        finally:
            assert await proxy.stop() == 0
    went_back = parsedate_to_datetime(first_lm).timestamp() - parsedate_to_datetime(second_lm).timestamp()
    result = audit(up, ledger, chain=False)
    report(
        "memory store, proxy clock stepped back an hour (libfaketime), date-only clients", result,
        last_modified_went_back_s=round(went_back), ims_status=ims_status, ius_status=status_b,
    )
    assert went_back >= HOUR - 2
    assert ims_status == 304
    assert status_b == 200
    assert [w.write for w in up.stale] == ["b"]
