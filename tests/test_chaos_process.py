"""Chaos scenario 4: process faults.

A worker of `etagproxy run --workers 2` is SIGKILLed while it forwards a
write; the proxy (one process, and a pool of two workers) is SIGTERMed
under load. Real Redis, the naive counter API of tests/fault_upstream.py,
16 read-modify-write clients; every wait is for an event (a log line, a
write held at the upstream arriving, a recorded answer) under a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.chaos_rows import report
from tests.counter_clients import Ledger, Span, audit, client_session, increment_until, read_counter, write_counter
from tests.fault_upstream import FaultUpstream, Hold, running_upstream
from tests.ports import free_port
from tests.proxy_processes import ProxyProcess, counter_config
from tests.redis_fixtures import RedisServer

CLIENTS = 16
KEYS = ("k0", "k1", "k2", "k3")


def lease_s(upstream_s: float, store_s: float = 0.2) -> float:
    """writes.lease_ms for counter_config()'s timeouts, in seconds."""
    return upstream_s + 2 * store_s + 1.0


@dataclass
class PeerUpstream(FaultUpstream):
    """FaultUpstream that also keeps, by X-Request-ID, the address a write
    came from: the proxy side of its upstream connection, which names the
    process forwarding it."""

    peers: dict[str, tuple[str, int]] = field(default_factory=dict)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rid = request.headers.get("X-Request-ID")
        if request.method == "PUT" and rid is not None and request.transport is not None:
            self.peers[rid] = request.transport.get_extra_info("peername")[:2]
        return await super().handle(request)


def owner_of_port(port: int, pids: Sequence[int]) -> int | None:
    """Which of `pids` holds the TCP socket bound to local `port` (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] != "0":
                inodes.add(f"socket:[{cols[9]}]")
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None


async def start_run(config: str, workdir: Path, workers: int = 1) -> tuple[ProxyProcess, list[int]]:
    """`etagproxy run` (with `--workers` when > 1) on `config`; returns once
    every worker listens, with the pids serving."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"proxy-{free_port()}.yaml"
    path.write_text(config)
    args = ["--config", str(path), "--log-format", "json", "--no-access-log"]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = await ProxyProcess.start(*args)
    try:
        listening = await proc.wait_listening(count=workers)
    except AssertionError:
        await proc.kill()
        raise
    port = listening[0]["port"]
    assert {r["port"] for r in listening} == {port}
    proc.url = f"http://127.0.0.1:{port}"
    proc.admin_url = f"http://127.0.0.1:{listening[0]['admin_port']}"
    return proc, [r["pid"] for r in listening]


@asynccontextmanager
async def load(
    ledger: Ledger, bases: Sequence[str], spans: list[Span] | None = None, clients: int = CLIENTS
) -> AsyncIterator[asyncio.Event]:
    """`clients` incrementing clients over KEYS until the block ends (or the
    yielded event is set); their last requests finish before it returns."""
    stop = asyncio.Event()
    tasks = [
        asyncio.ensure_future(increment_until(
            stop, ledger, bases, lambda rng: rng.choice(KEYS), name=f"c{i}", seed=i, spans=spans,
        ))
        for i in range(clients)
    ]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def held_write(
    up: FaultUpstream, ledger: Ledger, session: aiohttp.ClientSession, base: str, key: str, name: str,
    *, apply_on_receipt: bool, within: float = 15.0,
) -> tuple[Hold, asyncio.Future[tuple[int, str | None]], int, str, float]:
    """A write of `key` held at the upstream once it arrived: read, PUT with
    the tag, again if the PUT was answered first (a 412 or 409 from the
    clients' contention). Returns the hold, the PUT's future, its value,
    tag, and when it was sent."""
    clock = asyncio.get_running_loop().time
    deadline = clock() + within
    i = 0
    while clock() < deadline:
        i += 1
        status, value, tag = await read_counter(session, base, key)
        if status != 200 or tag is None:
            await asyncio.sleep(0.005)  # a write in flight on the key: re-read
            continue
        write = f"{name}.{i}"
        hold = up.hold(write, apply_on_receipt=apply_on_receipt)
        sent = clock()
        put = asyncio.ensure_future(write_counter(session, base, key, value + 1, tag, write))
        arrived = asyncio.ensure_future(hold.received.wait())
        await asyncio.wait({put, arrived}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if hold.received.is_set():
            return hold, put, value + 1, tag, sent
        arrived.cancel()
        hold.release.set()
        put_status, new_tag = await put
        ledger.record_write(key, write, value + 1, tag, base, put_status, new_tag)
    raise AssertionError(f"no write of {key} got through to the upstream in {within} s ({i} attempts)")


async def settle(
    put: asyncio.Future[tuple[int, str | None]], ledger: Ledger, key: str, write: str, value: int, tag: str, base: str
) -> tuple[int | None, str | None, str]:
    """Record the held write's answer (or failure) in the ledger."""
    try:
        status, etag = await asyncio.wait_for(put, 15)
    except (aiohttp.ClientError, TimeoutError) as exc:
        ledger.record_write(key, write, value, tag, base, None, None, type(exc).__name__)
        return None, None, type(exc).__name__
    ledger.record_write(key, write, value, tag, base, status, etag)
    return status, etag, str(status)


# -- SIGKILL one worker mid-write -----------------------------------------------------

KILL_UPSTREAM_S = 1.0


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_sigkill_one_worker_mid_write(redis_server: RedisServer, tmp_path: Path):
    """One of two workers dies (SIGKILL) while the upstream holds a write it
    forwarded; the upstream applied it. The write's client sees a reset (an
    unknown outcome); the supervisor starts a new worker; the dead worker's
    lease keeps every other writer off the key until its deadline, then
    writes to it resume, and nothing acknowledged is lost."""
    ledger = Ledger()
    lease = lease_s(KILL_UPSTREAM_S)
    clock = asyncio.get_running_loop().time
    async with running_upstream(PeerUpstream()) as up:
        config = counter_config(up.url, redis_server.url, admin_port=free_port(), upstream_timeout=f"{KILL_UPSTREAM_S}s")
        pool, pids = await start_run(config, tmp_path, workers=2)
        try:
            async with load(ledger, [pool.url]), client_session(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as s:
                await ledger.wait_until(lambda: ledger.acked() >= 150, timeout=30)
                hold, put, value, tag, sent = await held_write(up, ledger, s, pool.url, "k0", "kill", apply_on_receipt=True)
                victim = owner_of_port(up.peers[hold.write][1], pids)
                assert victim in pids, (victim, pids)
                os.kill(victim, signal.SIGKILL)
                killed = clock()
                before = ledger.acked("k0")
                status, etag, outcome = await settle(put, ledger, "k0", hold.write, value, tag, pool.url)
                hold.release.set()
                restarted = (await pool.wait_listening(count=3))[-1]
                restart_s = clock() - killed
                crash, = await pool.wait_for(lambda r: r.get("worker") == victim and "exit" in r)
                await ledger.wait_until(lambda: ledger.acked("k0") > before, timeout=lease + 10)
                first_ack = clock()
                resumed = ledger.acked()
                await ledger.wait_until(lambda: ledger.acked() >= resumed + 150, timeout=30)
        finally:
            code = await pool.stop()
    result = audit(up, ledger)
    row = report(
        "SIGKILL 1 of --workers 2 mid-write", result, recovery_s=first_ack - killed,
        lease_s=lease, key_blocked_s=round(first_ack - sent, 2), worker_restart_s=round(restart_s, 2),
        killed_write=outcome,
    )
    assert result.problems == [], result.problems
    assert result.stale == 0 and row.lost == 0
    assert code == 0
    assert crash["exit"] == "signal 9" and restarted["pid"] not in pids
    # The write in flight on the dead worker: applied upstream, its client
    # told nothing but a broken connection.
    assert status is None and ledger.unknown[hold.write] in ("ServerDisconnectedError", "ClientOSError"), outcome
    assert hold.write in up.applied and result.landed_unacknowledged >= 1
    # Nobody wrote k0 before the dead worker's lease ran out (less Redis
    # TIME's millisecond resolution), and writes to it resumed after that.
    assert first_ack - sent >= lease - 0.01
    assert first_ack - killed < lease + 3


# -- SIGTERM under load -----------------------------------------------------------------

DRAIN_S = 2.0
TERM_UPSTREAM_S = 5.0
"""Longer than the drain budget, so a write held past it is cut by the drain."""


@dataclass
class Poll:
    sent: float
    answered: float
    status: int | str
    """The HTTP status, "refused", or the exception's name."""


async def poll_readyz(admin: str, stop: asyncio.Event, polls: list[Poll], tick: list[asyncio.Event]) -> None:
    """GET /readyz in a tight loop, each on a new connection (as a kubelet
    probes), so with SO_REUSEPORT every poll may reach another worker."""
    clock = asyncio.get_running_loop().time
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as s:
        while not stop.is_set():
            sent = clock()
            status: int | str
            try:
                async with s.get(admin + "/readyz") as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientConnectorError:
                status = "refused"
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            polls.append(Poll(sent, clock(), status))
            event, tick[0] = tick[0], asyncio.Event()
            event.set()
            if status == "refused":
                await asyncio.sleep(0.002)  # nobody listens: do not spin on the CPU


async def wait_polls(polls: list[Poll], tick: list[asyncio.Event], ready, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not ready(polls):
            await tick[0].wait()


async def sigterm_during_load(redis_server: RedisServer, tmp_path: Path, workers: int, acked: int) -> None:
    ledger = Ledger()
    spans: list[Span] = []
    polls: list[Poll] = []
    tick = [asyncio.Event()]
    clock = asyncio.get_running_loop().time
    async with running_upstream(PeerUpstream()) as up:
        config = counter_config(
            up.url, redis_server.url, admin_port=free_port(), upstream_timeout=f"{TERM_UPSTREAM_S}s"
        )
        proxy, pids = await start_run(config, tmp_path, workers=workers)
        stop_polls = asyncio.Event()
        poller = asyncio.ensure_future(poll_readyz(proxy.admin_url, stop_polls, polls, tick))
        try:
            async with load(ledger, [proxy.url], spans), client_session(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as s:
                await ledger.wait_until(lambda: ledger.acked() >= acked, timeout=30)
                await wait_polls(polls, tick, lambda p: sum(x.status == 200 for x in p) >= 5, 10)
                # Two writes in flight at the signal, on keys of their own:
                # one the upstream answers during the drain, one it holds
                # past the drain budget.
                done = await held_write(up, ledger, s, proxy.url, "drained", "drained", apply_on_receipt=True)
                cut = await held_write(up, ledger, s, proxy.url, "cut", "cut", apply_on_receipt=False)
                proxy.proc.send_signal(signal.SIGTERM)
                signalled = clock()
                # Readiness fails before the drain ends: the drained write is
                # answered only once 3 probes sent after the signal were.
                await wait_polls(polls, tick, lambda p: sum(x.sent >= signalled for x in p) >= 3, 5)
                released = clock()
                done[0].release.set()
                done_status, done_etag, _ = await settle(done[1], ledger, "drained", done[0].write, done[2], done[3], proxy.url)
                cut_status, _, cut_outcome = await settle(cut[1], ledger, "cut", cut[0].write, cut[2], cut[3], proxy.url)
                cut_answered = clock()
                code = await proxy.finish(timeout=DRAIN_S + 10)
                exited = clock()
                # The restart below listens on the same admin port.
                stop_polls.set()
                await poller
                # The restart of a rolling deploy: the cut write may still
                # land, so its key must stay leased until the lease runs out.
                again, _ = await start_run(config, tmp_path / "again", workers=workers)
                try:
                    status, value, tag = await read_counter(s, again.url, "cut")
                    # A fresh tag if the restarted proxy hands one out (it
                    # must not while the cut write's lease runs), else the
                    # tag a client read before the cut write.
                    use_tag, use_value = (tag, value + 1) if tag is not None else (cut[3], cut[2])
                    probe_status, probe_tag = await write_counter(s, again.url, "cut", use_value, use_tag, "after-cut")
                    ledger.record_write("cut", "after-cut", use_value, use_tag, again.url, probe_status, probe_tag)
                    cut[0].release.set()
                    async with asyncio.timeout(10):
                        await cut[0].landed.wait()
                finally:
                    await again.stop()
        finally:
            stop_polls.set()
            await poller
            if proxy.proc.returncode is None:
                await proxy.kill()
    result = audit(up, ledger)
    after = [p for p in polls if p.sent >= signalled]
    ready_after = [p for p in after if p.status == 200]
    refused_early = [p for p in after if p.status == "refused" and p.sent < released]
    others = [p for p in after if p.status not in (200, 503, "refused")]
    in_flight = [x for x in spans if x.began < signalled < x.ended]
    longest = max([x.ended - x.began for x in spans] + [cut_answered - cut[4]])
    row = report(
        f"SIGTERM during load{', --workers 2' if workers > 1 else ''}, drain budget {DRAIN_S:g} s", result,
        exit_s=round(exited - signalled, 2), longest_client_wait_s=round(longest, 2),
        in_flight_at_signal=len(in_flight) + 2, cut_by_drain=cut_outcome,
        readyz_polls_after_signal=len(after), readyz_200_after_signal=len(ready_after),
        restarted_write_on_cut_key=probe_status, restarted_read_etag=tag is not None,
    )
    assert result.problems == [], result.problems
    assert result.stale == 0 and row.lost == 0
    assert code == 0, proxy.stderr[-20:]
    # Readiness: the first probe sent after the signal is 503; none is 200;
    # the admin port refuses only once the drain is over; no other failure.
    assert after and after[0].status == 503, after[:3]
    assert ready_after == [], ready_after[:5]
    assert refused_early == [] and others == [], (refused_early[:3], others[:3])
    # The drain: a write answered during it completes with its ETag; one the
    # upstream holds past the budget is cut then, not later; the process
    # exits within the budget; no client waits longer than that.
    assert (done_status, done_etag is not None) == (200, True)
    assert cut_answered - signalled <= DRAIN_S + 0.5, cut_answered - signalled
    assert cut_status is None or cut_status >= 500, cut_status
    assert exited - signalled <= DRAIN_S + 1.0
    assert longest <= DRAIN_S + 0.5, longest
    for x in in_flight:
        assert x.ended - signalled <= DRAIN_S + 0.5, x
    # The cut write's lease outlived the drain: a write through the
    # restarted proxy is not forwarded while the cut one may still land.
    assert tag is None and probe_status in (409, 412), (tag, probe_status)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_sigterm_during_load_single_process(redis_server: RedisServer, tmp_path: Path):
    await sigterm_during_load(redis_server, tmp_path, workers=1, acked=150)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_sigterm_during_load_two_workers(redis_server: RedisServer, tmp_path: Path):
    await sigterm_during_load(redis_server, tmp_path, workers=2, acked=150)
