"""Chaos scenario: an upstream that misbehaves on writes, and clients that hang up.

Two proxy processes on one real Redis in front of the raw-socket counter
API (tests/raw_counter_upstream.py); 16 clients run the read-modify-write
workload while one PUT in `EVERY` misbehaves, each kind in turn: a 2xx
whose body is cut short, a status line that is not HTTP, `100 Continue`
and then silence, an answer at the proxy's deadline, and a write the API
applies only after the proxy gave up on it. A further client sends PUTs
and aborts its connection while the (slow) API is applying them. Every one
of these writes lands, and none of their clients learns that it did: the
audit checks that each was told an unknown outcome and that no tag read
before it validates a later write (the token was replaced).

Then one write of each kind is probed on its own, for what the client is
told: a problem+json 502/504 without `ETag`, within the deadline, and a
412 for a write carrying the tag read before it.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence

import aiohttp
import pytest

from tests.chaos_rows import long_scenario, report
from tests.counter_clients import Ledger, audit, read_counter
from tests.fault_upstream import PREFIX
from tests.metrics import metric
from tests.proxy_processes import StartProxies
from tests.raw_counter_upstream import RawCounterUpstream, RawFault, running_raw_upstream
from tests.redis_fixtures import RedisServer
from tests.test_lost_updates import CLIENTS, KEYS, workload

FAULTS = (RawFault.TRUNCATED, RawFault.BAD_STATUS, RawFault.CONTINUE_SILENT, RawFault.AT_DEADLINE, RawFault.LATE)
EVERY = 6
PLAN = tuple(x for fault in FAULTS for x in (*(RawFault.NONE,) * (EVERY - 1), fault))
DEADLINE_S = 0.5
"""The proxies' upstream deadline (tests/proxy_processes.py counter_config)."""
GIVE_UP_SLACK_S = 0.35
"""How late past the deadline a loaded 2-core machine may close a connection."""
PROBLEM = "application/problem+json"


async def hang_up_until(
    stop: asyncio.Event, ledger: Ledger, up: RawCounterUpstream, bases: Sequence[str], aborted: Counter[str],
    *, seed: int,
) -> None:
    """A client that GETs a counter, PUTs value + 1 over a raw connection
    and aborts that connection once the API has the write (which the API
    applies `slow_s / 2` later): the write lands, the client never knows."""
    rng = random.Random(seed)
    n = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            key = rng.choice(KEYS)
            status, value, etag = await read_counter(session, rng.choice(bases), key)
            if etag is None:
                await asyncio.sleep(0.005)
                continue
            ledger.record_read(etag)
            n += 1
            write, base = f"gone.{n}", rng.choice(bases)
            up.force[write] = RawFault.SLOW
            body = json.dumps({"value": value + 1, "write": write}).encode()
            host, port = base.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"PUT {PREFIX}{key} HTTP/1.1\r\nHost: {host}:{port}\r\nIf-Match: {etag}\r\n"
                f"X-Request-ID: {write}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            answer = asyncio.ensure_future(reader.read(1 << 16))
            while not answer.done() and write not in up.book.received:
                await asyncio.sleep(0.002)
            if not answer.done():
                writer.transport.abort()
                answer.cancel()
                await asyncio.gather(answer, return_exceptions=True)
                aborted["aborted"] += 1
                ledger.record_write(key, write, value + 1, etag, base, None, None, "ClientAborted")
            else:
                # Refused before forwarding (412, 409): an ordinary answer.
                up.force.pop(write, None)
                line = answer.result().split(b"\r\n", 1)[0].split()
                got = int(line[1]) if len(line) > 1 else None
                ledger.record_write(key, write, value + 1, etag, base, got, None, "" if got else "closed")
                writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
            await asyncio.sleep(rng.uniform(0.05, 0.15))


async def probe(
    session: aiohttp.ClientSession, ledger: Ledger, up: RawCounterUpstream, base: str, fault: RawFault, n: int
) -> dict[str, object]:
    """One write answered with `fault`, alone on its key, then a write with
    the tag read before it: what each client was told."""
    key = "probe"
    loop = asyncio.get_running_loop()
    status, value, etag = await read_counter(session, base, key)
    assert status == 200 and etag is not None
    write = f"probe.{fault.value}.{n}"
    up.force[write] = fault
    headers = {"If-Match": etag, "X-Request-ID": write, "Content-Type": "application/json"}
    t0 = loop.time()
    seen: dict[str, object] = {"fault": fault.value}
    try:
        async with session.put(
            base + PREFIX + key, data=json.dumps({"value": value + 1, "write": write}), headers=headers,
        ) as resp:
            seen.update(status=resp.status, etag=resp.headers.get("ETag"),
                        type=resp.headers.get("Content-Type", "").split(";")[0])
            doc = await resp.read()
            seen["body"] = json.loads(doc) if seen["type"] == PROBLEM else None
            ledger.record_write(key, write, value + 1, etag, base, resp.status, resp.headers.get("ETag"))
    except aiohttp.ClientError as exc:
        seen["error"] = type(exc).__name__
        ledger.record_write(key, write, value + 1, etag, base, None, None, type(exc).__name__)
    seen["elapsed"] = loop.time() - t0
    # The write landed (LATE: lands now); the tag read before it must not
    # validate another write.
    async with asyncio.timeout(5):
        while write not in up.book.applied:
            await asyncio.sleep(0.01)
    stale = f"probe.stale.{n}"
    async with session.put(
        base + PREFIX + key, data=json.dumps({"value": value + 1, "write": stale}),
        headers={**headers, "X-Request-ID": stale},
    ) as resp:
        await resp.read()
        seen["stale_status"] = resp.status
        ledger.record_write(key, stale, value + 1, etag, base, resp.status, resp.headers.get("ETag"))
    return seen


def _check_probe(seen: dict[str, object]) -> None:
    fault = RawFault(seen["fault"])
    assert seen["stale_status"] == 412, seen
    if fault is RawFault.TRUNCATED:
        # The 2xx headers were relayed (the write landed); the cut body is
        # relayed as a cut message.
        assert seen.get("error") == "ClientPayloadError", seen
        return
    if fault is RawFault.AT_DEADLINE and seen.get("status") == 200:
        assert seen["etag"] is not None, seen
        return
    expected = 502 if fault is RawFault.BAD_STATUS else 504
    assert seen.get("status") == expected, seen
    assert seen["type"] == PROBLEM and seen["etag"] is None, seen
    body = seen["body"]
    assert isinstance(body, dict) and body.get("status") == expected, seen
    assert seen["elapsed"] < DEADLINE_S + GIVE_UP_SLACK_S + 0.5, seen  # type: ignore[operator]


async def _run(redis: RedisServer, proxies: StartProxies, *, acked: int, each: int, timeout: float, name: str) -> None:
    ledger = Ledger()
    aborted: Counter[str] = Counter()
    up = RawCounterUpstream(plan=PLAN, deadline_s=DEADLINE_S, late_s=0.9, slow_s=0.3)
    async with running_raw_upstream(up):
        procs = await proxies(up.url, redis.url, 2)
        bases = [p.url for p in procs]
        stop = asyncio.Event()
        gone = asyncio.ensure_future(hang_up_until(stop, ledger, up, bases, aborted, seed=99))
        try:
            async with workload(ledger, bases):
                await ledger.wait_until(
                    lambda: ledger.acked() >= acked and all(up.injected[f] >= each for f in FAULTS)
                    and aborted["aborted"] >= each,
                    timeout=timeout,
                )
        finally:
            stop.set()
            await gone
        async with aiohttp.ClientSession() as session:
            probes = [await probe(session, ledger, up, bases[i % 2], f, i) for i, f in enumerate(FAULTS)]
        # Late writes still in flight land, connections the proxies gave up on close.
        await asyncio.sleep(up.late_s)
        samples = [s for p in procs for s in await p.metrics()]
        open_after = up.open_connections
        logged = [r for p in procs for r in p.records() if r.get("level") in ("error", "critical")]
    result = audit(up.book, ledger)
    print(result.summary(), {f.value: n for f, n in up.injected.items()}, probes)
    gave_up = [t for f in (RawFault.CONTINUE_SILENT, RawFault.LATE) for t in up.gave_up.get(f, [])]
    timeouts = ledger.outcomes.get("504", 0)
    at_deadline = up.injected[RawFault.AT_DEADLINE]
    deadline_timeouts = timeouts - up.injected[RawFault.CONTINUE_SILENT] - up.injected[RawFault.LATE]
    minted_unknown = metric(samples, "etagproxy_tokens_minted_total", cause="unknown_outcome")
    lease_lost = metric(samples, "etagproxy_lease_lost_total")
    report(
        name, result,
        truncated=up.injected[RawFault.TRUNCATED], bad_status=up.injected[RawFault.BAD_STATUS],
        continue_silent=up.injected[RawFault.CONTINUE_SILENT],
        at_deadline=f"{at_deadline} ({at_deadline - deadline_timeouts} acked, {deadline_timeouts} 504)",
        late=f"{up.injected[RawFault.LATE]} ({up.landed_after_give_up} landed after the proxy gave up)",
        client_aborts=aborted["aborted"],
        max_give_up=f"{max(gave_up) * 1000:.0f}ms", open_connections_after=open_after,
    )
    stale_by_fault = Counter(up.fault_of.get(s.write, RawFault.NONE).value for s in up.book.stale)
    assert result.problems == [], stale_by_fault
    assert result.stale == 0
    assert logged == []
    for seen in probes:
        _check_probe(seen)
    # Every misbehaving write landed and was an unknown outcome for its client.
    unknown_kinds = Counter(ledger.unknown.values())
    assert unknown_kinds["502"] == up.injected[RawFault.BAD_STATUS]
    assert unknown_kinds["ClientPayloadError"] == up.injected[RawFault.TRUNCATED]
    assert unknown_kinds["ClientAborted"] == aborted["aborted"] == up.injected[RawFault.SLOW]
    assert 0 <= deadline_timeouts <= at_deadline
    assert set(unknown_kinds) <= {"502", "504", "ClientPayloadError", "ClientAborted"}, unknown_kinds
    faulted = sum(up.injected[f] for f in (*FAULTS, RawFault.SLOW))
    assert result.landed_unacknowledged == faulted - (at_deadline - deadline_timeouts)
    assert result.final_total == result.acknowledged + result.landed_unacknowledged
    # Each 502 and 504 replaced the token (the truncated 2xx and the
    # aborted writes committed a new one as writes).
    assert minted_unknown == unknown_kinds["502"] + unknown_kinds["504"]
    # A timed-out write holds its lease past the deadline, never past the lease.
    assert lease_lost == 0
    # The late writes did land after the proxy had given up on them.
    assert up.landed_after_give_up == up.injected[RawFault.LATE]
    # No proxy waited past its deadline, and none kept a connection it gave up on.
    assert len(gave_up) == up.injected[RawFault.CONTINUE_SILENT] + up.injected[RawFault.LATE]
    assert max(gave_up) < DEADLINE_S + GIVE_UP_SLACK_S, sorted(gave_up)[-5:]
    assert open_after <= 2 * (CLIENTS + 2), open_after


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_upstream_misbehaving_on_writes_loses_no_update(redis_server: RedisServer, proxies: StartProxies):
    await _run(
        redis_server, proxies, acked=250, each=5, timeout=30,
        name="upstream misbehaving on writes, 2 replicas x 16 clients",
    )


@long_scenario
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_upstream_misbehaving_on_writes_loses_no_update_long(redis_server: RedisServer, proxies: StartProxies):
    await _run(
        redis_server, proxies, acked=2500, each=50, timeout=240,
        name="upstream misbehaving on writes, 2 replicas x 16 clients, long",
    )
