"""Chaos: a slow and a partitioned network between the proxies and Redis.

Two proxy processes reach redis-server through a `TcpRelay` each
(tests/tcp_relay.py) while 16 clients run the read-modify-write workload of
tests/test_lost_updates.py. Mid-run a fault is applied to the relays for a
bounded time, then healed:

- latency past or within the proxies' store deadline (`timeouts.store`,
  200 ms in `counter_config`);
- a blackhole both ways, or one way only: commands reach Redis and the
  replies are held, or the commands are held.

Every run must lose nothing (the audit of tests/counter_clients.py: no
stale write, writes fail closed with 503) and no request may outlast the
proxy's own deadlines (the access log's `ms` of every request, and no
client timing out). Each scenario reports one row (tests/chaos_rows.py):
what clients saw, and the recovery time: from the heal to the first
acknowledged write after it.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from tests.chaos_rows import long_scenario, report
from tests.counter_clients import Ledger, audit
from tests.fault_upstream import FaultUpstream, running_upstream
from tests.proxy_processes import ProxyProcess, StartProxies
from tests.redis_fixtures import RedisServer
from tests.tcp_relay import TcpRelay
from tests.test_lost_updates import workload

WARM_ACKS = 150
"""Acknowledged writes before the fault: every connection open, every script loaded."""
AFTER_ACKS = 100
"""...and after the recovery, to show the run goes on as before."""
SLOWEST_S = 4.0
"""No request may take longer: BEGIN's wait (write_wait 2 s) and one store
round trip past it, the upstream deadline (0.5 s), END and an invalidation
(0.2 s each), with a margin for a loaded machine. A request slower than
that waited on something the proxy's deadlines do not bound."""


# -- the relay itself --------------------------------------------------------------


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    writer.write(data)
    assert await reader.readexactly(len(data)) == data
    return loop.time() - t0


async def test_relay_delays_each_direction_and_blackholes_without_closing():
    received: list[bytes] = []

    async def recording_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            received.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(recording_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, TcpRelay(port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        assert await _round_trip(reader, writer, b"a") < 0.05
        relay.delay(up=0.15, down=0.05)
        rtt = await _round_trip(reader, writer, b"b")
        assert 0.19 <= rtt < 0.3, rtt
        relay.heal()

        # Both ways: nothing arrives, the connection stays open (no EOF, no reset).
        relay.blackhole()
        writer.write(b"c")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(1)
        assert b"c" not in received
        relay.heal()
        assert await reader.readexactly(1) == b"c"

        # client -> server only: the server never sees the bytes.
        relay.blackhole(down=False)
        writer.write(b"d")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(1)
        assert b"d" not in received
        relay.heal()
        assert await reader.readexactly(1) == b"d"

        # server -> client only: the server gets and answers them, the answer is held.
        relay.blackhole(up=False)
        writer.write(b"e")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(1)
        assert received[-1] == b"e"
        relay.heal()
        assert await reader.readexactly(1) == b"e"
        assert relay.stats["up_held"] == 2 and relay.stats["down_held"] == 1  # c, d; e
        sock = writer.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

        # Severed: this connection stays open and silent for good; a new one flows.
        assert relay.sever() == 1
        writer.write(b"f")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(1)
        assert b"f" not in received and not reader.at_eof()
        fresh_reader, fresh_writer = await asyncio.open_connection("127.0.0.1", relay.port)
        assert await _round_trip(fresh_reader, fresh_writer, b"g") < 0.05
        assert relay.stats["up_dropped"] == 1
        writer.close()
        fresh_writer.close()


# -- scenarios ------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    apply: Callable[[TcpRelay], None]
    seconds: float
    relays: str = "all"
    """"all", or "first": only the first replica's path to Redis."""
    heal: Callable[[TcpRelay], None] = TcpRelay.heal


def _forget_and_heal(relay: TcpRelay) -> None:
    """The partition ends, but the network forgot the connections through
    it: they stay silent for good (no reset); new ones flow."""
    relay.sever()
    relay.heal()


def _slowest(procs: Sequence[ProxyProcess]) -> tuple[float, Counter[str], dict]:
    entries = [e for p in procs for e in p.access_log()]
    slowest = max(entries, key=lambda e: e["ms"])
    statuses = Counter(f"{e['method']} {e['status']}" for e in entries)
    return slowest["ms"], statuses, slowest


async def _scenario(fault: Fault, redis: RedisServer, proxies: StartProxies) -> None:
    ledger = Ledger()
    clock = asyncio.get_running_loop().time
    relays = [await TcpRelay(redis.port).start() for _ in range(2)]
    faulty = relays if fault.relays == "all" else relays[:1]
    try:
        async with running_upstream(FaultUpstream()) as up:
            procs = [
                (await proxies(up.url, relay.url, 1, access_log=True))[0] for relay in relays
            ]
            async with workload(ledger, [p.url for p in procs]):
                await ledger.wait_until(lambda: ledger.acked() >= WARM_ACKS, timeout=30)
                before = ledger.acked()
                for relay in faulty:
                    fault.apply(relay)
                await asyncio.sleep(fault.seconds)  # the fault's duration
                for relay in faulty:
                    fault.heal(relay)
                healed, at_heal = clock(), ledger.acked()
                await ledger.wait_until(lambda: ledger.acked() > at_heal, timeout=15)
                recovery = clock() - healed
                await ledger.wait_until(lambda: ledger.acked() >= at_heal + AFTER_ACKS, timeout=30)
    finally:
        for relay in relays:
            await relay.close()
    slowest_ms, statuses, slowest = _slowest(procs)
    result = audit(up, ledger)
    held = sum(r.up.held + r.down.held for r in faulty)
    report(
        fault.name, result, recovery_s=recovery,
        fault_s=fault.seconds, acked_during_fault=at_heal - before,
        slowest_request_ms=round(slowest_ms), bytes_held=held,
        redis_connections=sum(r.connections for r in relays),
    )
    print(result.summary(), dict(statuses), slowest)
    assert result.problems == []
    assert result.stale == 0
    # A client that timed out (10 s) waited past every deadline of the proxy.
    assert not {k for k in ledger.outcomes if "Timeout" in k}, ledger.outcomes
    assert slowest_ms < SLOWEST_S * 1000, slowest


def _latency(seconds: float) -> Callable[[TcpRelay], None]:
    return lambda relay: relay.delay(up=seconds, down=seconds)


FAULTS = [
    Fault("Redis +50 ms each way, 2 replicas x 16 clients", _latency(0.05), 1.5),
    Fault("Redis +300 ms each way, 2 replicas x 16 clients", _latency(0.3), 1.5),
    Fault("Redis blackholed both ways 1.5 s", lambda r: r.blackhole(), 1.5),
    Fault("Redis blackholed proxy→Redis only 1.5 s", lambda r: r.blackhole(down=False), 1.5),
    Fault("Redis blackholed Redis→proxy only 1.5 s", lambda r: r.blackhole(up=False), 1.5),
    Fault(
        "Redis blackholed 1.5 s, its connections then silent for good (no reset)",
        lambda r: r.blackhole(), 1.5, heal=_forget_and_heal,
    ),
]
LONG_FAULTS = [
    Fault("Redis +2 s each way 3 s", _latency(2.0), 3.0),
    Fault("Redis blackholed both ways 5 s", lambda r: r.blackhole(), 5.0),
    Fault("One of 2 replicas cut off from Redis both ways 3 s", lambda r: r.blackhole(), 3.0, relays="first"),
]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
async def test_slow_or_partitioned_redis_loses_no_update(fault: Fault, redis_server: RedisServer, proxies: StartProxies):
    await _scenario(fault, redis_server, proxies)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
@long_scenario
@pytest.mark.parametrize("fault", LONG_FAULTS, ids=lambda f: f.name)
async def test_long_slow_or_partitioned_redis_loses_no_update(
    fault: Fault, redis_server: RedisServer, proxies: StartProxies
):
    await _scenario(fault, redis_server, proxies)
