"""Chaos: Redis Cluster under change (slot migration, master failover).

Two proxy processes on `redis+cluster://` while 16 clients run the
read-modify-write workload of tests/test_lost_updates.py on a handful of
counters. Mid-run the cluster changes under them:

- slot migration: the slots holding the counters move to another master,
  the way `redis-cli --cluster reshard` does it (CLUSTER SETSLOT IMPORTING /
  MIGRATING, MIGRATE of the slot's keys, SETSLOT NODE on every master). While
  a slot is migrating, a key already moved is answered ASK by its old owner;
  once the slot is reassigned, a client with the old map gets MOVED;
- failover: the master owning a counter's slot is killed (SIGKILL) and the
  cluster promotes its replica.

Either way the data lands on a server with another run_id, so every
version there is of another epoch: re-minted, and a tag read before the
change must be refused (412), never validate. Every run must lose nothing
(the audit of tests/counter_clients.py); each reports one row
(tests/chaos_rows.py) with the client-visible errors, the redirections the
servers answered (INFO errorstats), the proxies' 503s by store error, and
the recovery time: for a migration from the last SETSLOT NODE, for a
failover from the kill, to the first acknowledged write on a changed key.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from etagproxy.store.redis import redis_key
from tests.chaos_rows import long_scenario, report
from tests.counter_clients import Ledger, Span, audit, increment_until, read_counter, write_counter
from tests.fault_upstream import PREFIX, FaultUpstream, running_upstream
from tests.proxy_processes import ProxyProcess, StartProxies
from tests.redis_fixtures import RedisClusterGroup, RedisServer

CLIENTS = 16
KEYS = ("k0", "k1", "k2", "k3")
WARM_ACKS = 150
"""Acknowledged writes before the change: every connection open, every script loaded."""
STAGE_ACKS = 60
"""Acknowledged writes on the changed keys that each stage of a change must let through."""
STAGE_TIMEOUT_S = 15.0


# -- the cluster, seen from its nodes ------------------------------------------------


def rkey(key: str) -> str:
    """The Redis key of counter `key` as the proxy names it."""
    return redis_key("etagproxy:", PREFIX + key)


def node_id(node: RedisServer) -> str:
    return node.command("CLUSTER", "MYID").decode()


def slot_of(cluster: RedisClusterGroup, key: str) -> int:
    return int(cluster.nodes[0].command("CLUSTER", "KEYSLOT", rkey(key)))


def owners(node: RedisServer) -> dict[int, str]:
    """slot -> id of the master owning it, as `node` sees the cluster."""
    found: dict[int, str] = {}
    for line in node.command("CLUSTER", "NODES").decode().splitlines():
        fields = line.split()
        if "master" not in fields[2]:
            continue
        for part in fields[8:]:
            if part.startswith("["):
                continue  # a slot being imported or migrated, not owned
            lo, _, hi = part.partition("-")
            for slot in range(int(lo), int(hi or lo) + 1):
                found[slot] = fields[0]
    return found


def masters(cluster: RedisClusterGroup) -> list[RedisServer]:
    """The running nodes that are masters, in `cluster.nodes` order."""
    found = []
    for node in cluster.nodes:
        if node.running:
            with node.admin() as client:
                if client.info("replication")["role"] == "master":
                    found.append(node)
    return found


def owner_node(cluster: RedisClusterGroup, slot: int, seen_by: RedisServer | None = None) -> RedisServer:
    ids = {node_id(n): n for n in cluster.nodes if n.running}
    return ids[owners(seen_by or masters(cluster)[0])[slot]]


def probe_on(cluster: RedisClusterGroup, owner: RedisServer) -> str:
    """A counter outside KEYS whose slot `owner` holds: nobody but the test
    writes it, so a tag of it only goes stale by the change itself."""
    for n in range(1000):
        key = f"probe{n}"
        if owner_node(cluster, slot_of(cluster, key)) is owner:
            return key
    raise AssertionError(f"no probe key on {owner.port}")


def redirections(nodes: Sequence[RedisServer]) -> dict[str, int]:
    """ASK, MOVED and TRYAGAIN error replies the running `nodes` sent since
    their last CONFIG RESETSTAT (INFO errorstats)."""
    totals = {"ASK": 0, "MOVED": 0, "TRYAGAIN": 0}
    for node in nodes:
        if not node.running:
            continue
        with node.admin() as client:
            stats = client.info("errorstats")
        for kind in totals:
            entry = stats.get(f"errorstat_{kind}")
            if entry:
                totals[kind] += int(entry["count"])
    return totals


def store_failures(procs: Sequence[ProxyProcess]) -> Counter[str]:
    """The proxies' 503s by the store error behind them (access log):
    store-timeout, store-unreachable, or store-error (an error reply)."""
    return Counter(str(e.get("error")) for p in procs for e in p.access_log() if e.get("status") == 503)


def kinds(counts: Counter[str]) -> str:
    return ",".join(f"{k}:{n}" for k, n in sorted(counts.items())) or "-"


def reset_stats(nodes: Sequence[RedisServer]) -> None:
    for node in nodes:
        if node.running:
            node.command("CONFIG", "RESETSTAT")


# -- the workload --------------------------------------------------------------------


@asynccontextmanager
async def workload(ledger: Ledger, bases: Sequence[str], spans: list[Span]) -> AsyncIterator[None]:
    """CLIENTS incrementing clients over KEYS, every request in `spans`;
    stopped (and their last request finished) when the block ends."""
    stop = asyncio.Event()
    tasks = [
        asyncio.ensure_future(
            increment_until(stop, ledger, bases, lambda rng: rng.choice(KEYS), name=f"c{i}", seed=i, spans=spans)
        )
        for i in range(CLIENTS)
    ]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def acked_on(ledger: Ledger, keys: Sequence[str]) -> int:
    return sum(1 for a in ledger.acks if a.key in keys)


async def stage(ledger: Ledger, keys: Sequence[str], what: str, n: int = STAGE_ACKS) -> None:
    """Wait until `n` more writes on `keys` are acknowledged; a deadline
    that passes is the finding (writes stuck), named by `what`."""
    target = acked_on(ledger, keys) + n
    try:
        await ledger.wait_until(lambda: acked_on(ledger, keys) >= target, timeout=STAGE_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(
            f"{what}: fewer than {n} writes on {list(keys)} acknowledged within {STAGE_TIMEOUT_S} s"
            f" (outcomes so far {dict(ledger.outcomes)})"
        ) from None


def first_ack_after(spans: Sequence[Span], keys: Sequence[str], since: float) -> float | None:
    """Loop time of the first acknowledged write on `keys` sent at or after `since`."""
    ends = [s.ended for s in spans if s.method == "PUT" and s.key in keys and s.began >= since and s.outcome.startswith("2")]
    return min(ends, default=None)


async def tag_of(session: aiohttp.ClientSession, bases: Sequence[str], key: str) -> tuple[int, str]:
    """A read of `key` that carries an ETag (re-read while the store does not answer)."""
    for i in range(100):
        status, value, tag = await read_counter(session, bases[i % len(bases)], key)
        if status == 200 and tag is not None:
            return value, tag
        await asyncio.sleep(0.05)
    raise AssertionError(f"no ETag on {key}")


async def old_tag_refused(
    session: aiohttp.ClientSession, ledger: Ledger, bases: Sequence[str], key: str, value: int, tag: str, write: str,
) -> int:
    """PUT with a tag read before the change until the answer is decided
    (not 503: the store unreachable; not 409: held back), each attempt its
    own write in the ledger. Returns the decided status."""
    status = 503
    for i in range(100):
        base = bases[i % len(bases)]
        attempt = f"{write}.{i}"
        status, etag = await write_counter(session, base, key, value + 1, tag, attempt)
        ledger.record_write(key, attempt, value + 1, tag, base, status, etag)
        if status not in (409, 503):
            break
        await asyncio.sleep(0.05)
    return status


# -- slot migration ------------------------------------------------------------------


async def migrate(
    cluster: RedisClusterGroup, slots: dict[int, tuple[RedisServer, RedisServer]], ledger: Ledger, keys: Sequence[str],
) -> float:
    """Move each slot from its source to its destination master in the three
    steps of a reshard, letting STAGE_ACKS writes on `keys` through after
    each of the first two; returns when the last SETSLOT NODE was sent
    (loop time)."""
    run = asyncio.to_thread
    for slot, (src, dst) in slots.items():
        await run(dst.command, "CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(src))
        await run(src.command, "CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(dst))
    # Keys still on their source: served there as before.
    await stage(ledger, keys, "slots migrating, keys on the source")
    for slot, (src, dst) in slots.items():
        while names := await run(src.command, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            await run(src.command, "MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *names)
    # Every key on its destination, every slot still migrating: the source
    # answers ASK for each of them.
    await stage(ledger, keys, "keys moved, slots still migrating (ASK)")
    everyone = masters(cluster)
    for slot, (src, dst) in slots.items():
        for node in (dst, src, *(n for n in everyone if n not in (src, dst))):
            await run(node.command, "CLUSTER", "SETSLOT", slot, "NODE", node_id(dst))
    return asyncio.get_running_loop().time()


async def slot_migration_run(tmp_path: Path, proxies: StartProxies, rounds: int) -> None:
    cluster = RedisClusterGroup(tmp_path / "cluster")
    cluster.start()
    try:
        ledger, spans = Ledger(), list[Span]()
        recoveries: list[float] = []
        moved_slots = 0
        async with running_upstream(FaultUpstream()) as up, aiohttp.ClientSession() as s:
            procs = await proxies(up.url, cluster.url, 2, access_log=True)
            bases = [p.url for p in procs]
            async with workload(ledger, bases, spans):
                await ledger.wait_until(lambda: ledger.acked() >= WARM_ACKS, timeout=30)
                reset_stats(cluster.nodes)
                for n in range(rounds):
                    ring = masters(cluster)
                    slots = {}
                    probe = probe_on(cluster, owner_node(cluster, slot_of(cluster, "k0")))
                    for key in (*KEYS, probe):
                        slot = slot_of(cluster, key)
                        src = owner_node(cluster, slot)
                        slots[slot] = (src, ring[(ring.index(src) + 1) % len(ring)])
                    moved_slots += len(slots)
                    # A tag of a key in a moving slot, read before the move.
                    value, tag = await tag_of(s, bases, probe)
                    src_run_id = slots[slot_of(cluster, probe)][0].run_id()
                    done = await migrate(cluster, slots, ledger, KEYS)
                    await stage(ledger, KEYS, f"round {n}: slots reassigned (MOVED)")
                    first = first_ack_after(spans, KEYS, done)
                    assert first is not None
                    recoveries.append(first - done)
                    for slot, (_, dst) in slots.items():
                        assert owner_node(cluster, slot) is dst
                    # The moved version still names its old server's run_id:
                    # another epoch on its new one, so the old tag is refused.
                    _, dst = slots[slot_of(cluster, probe)]
                    epoch = await asyncio.to_thread(dst.command, "HGET", rkey(probe), "e")
                    assert epoch.decode() == src_run_id != dst.run_id()
                    status = await old_tag_refused(s, ledger, bases, probe, value, tag, f"old-tag.{n}")
                    assert status == 412, status
            seen = redirections(cluster.nodes)
            failures = store_failures(procs)
    finally:
        cluster.kill()
    result = audit(up, ledger)
    row = report(
        f"Redis Cluster: slots of 4 counters migrated between masters x{rounds}, 2 proxies x 16 clients", result,
        recovery_s=max(recoveries), slots_moved=moved_slots, ask=seen["ASK"], moved=seen["MOVED"],
        tryagain=seen["TRYAGAIN"], store_503s=kinds(failures),
    )
    assert result.problems == []
    assert result.stale == 0
    assert row.lost == 0
    # The proxies were redirected, both ways, and followed: no error reply
    # of Redis reached a client (a 503 of a store deadline on a loaded
    # machine may).
    assert seen["ASK"] > 0 and seen["MOVED"] > 0
    assert failures["store-error"] == 0, failures
    assert result.final_total == result.acknowledged + result.landed_unacknowledged


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_slot_migration_mid_run_loses_no_update(tmp_path: Path, proxies: StartProxies):
    await slot_migration_run(tmp_path, proxies, rounds=1)


@long_scenario
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_slot_migration_round_the_masters_loses_no_update(tmp_path: Path, proxies: StartProxies):
    """The slots go round all three masters, twice."""
    await slot_migration_run(tmp_path, proxies, rounds=6)


# -- failover ------------------------------------------------------------------------


def wait_promoted(cluster: RedisClusterGroup, slot: int, dead: str, timeout: float) -> RedisServer:
    """Poll until a running master other than `dead` owns `slot` in its own
    view and the cluster is ok again; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in masters(cluster):
            mine = node_id(node)
            owned = mine != dead and owners(node).get(slot) == mine
            if owned and b"cluster_state:ok" in node.command("CLUSTER", "INFO"):
                return node
        time.sleep(0.02)
    raise AssertionError(f"no replica promoted for slot {slot} within {timeout} s")


async def failover_run(tmp_path: Path, proxies: StartProxies, kills: int) -> None:
    cluster = RedisClusterGroup(tmp_path / "cluster", replicas=1, node_timeout_ms=1000)
    cluster.start()
    try:
        ledger, spans = Ledger(), list[Span]()
        clock = asyncio.get_running_loop().time
        recoveries, promotions = [], []
        async with running_upstream(FaultUpstream()) as up, aiohttp.ClientSession() as s:
            procs = await proxies(up.url, cluster.url, 2, access_log=True)
            bases = [p.url for p in procs]
            async with workload(ledger, bases, spans):
                await ledger.wait_until(lambda: ledger.acked() >= WARM_ACKS, timeout=30)
                reset_stats(cluster.nodes)
                for n in range(kills):
                    slot = slot_of(cluster, "k0")
                    victim = owner_node(cluster, slot)
                    old_run_id, dead = victim.run_id(), node_id(victim)
                    affected = [k for k in KEYS if owner_node(cluster, slot_of(cluster, k)) is victim]
                    probe = probe_on(cluster, victim)
                    value, tag = await tag_of(s, bases, probe)
                    # The replica has the probe's version before the kill.
                    assert await asyncio.to_thread(victim.command, "WAIT", 1, 2000) == 1
                    killed = clock()
                    await asyncio.to_thread(victim.kill)
                    promoted = await asyncio.to_thread(wait_promoted, cluster, slot, dead, 20.0)
                    promotions.append(clock() - killed)
                    await stage(ledger, affected, f"kill {n}: replica promoted")
                    first = first_ack_after(spans, affected, killed)
                    assert first is not None
                    recoveries.append(first - killed)
                    # The promoted replica holds the versions it replicated,
                    # minted under the dead master's run_id: another epoch here.
                    epoch = await asyncio.to_thread(promoted.command, "HGET", rkey(probe), "e")
                    assert epoch.decode() == old_run_id != promoted.run_id()
                    status = await old_tag_refused(s, ledger, bases, probe, value, tag, f"old-tag.{n}")
                    assert status == 412, status
                    if n + 1 < kills:
                        # The old master comes back as a replica of the new
                        # one (its nodes.conf), ready for the next kill.
                        await asyncio.to_thread(victim.start)
                        await asyncio.to_thread(cluster.wait_ok)
            seen = redirections(cluster.nodes)
            failures = store_failures(procs)
    finally:
        cluster.kill()
    result = audit(up, ledger)
    row = report(
        f"Redis Cluster: master owning a counter killed, replica promoted x{kills}, 2 proxies x 16 clients", result,
        recovery_s=max(recoveries), promoted_after_s=round(max(promotions), 2), moved=seen["MOVED"],
        store_503s=kinds(failures),
    )
    assert result.problems == []
    assert result.stale == 0
    assert row.lost == 0
    assert result.final_total == result.acknowledged + result.landed_unacknowledged


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_master_killed_replica_promoted_mid_run_loses_no_update(tmp_path: Path, proxies: StartProxies):
    await failover_run(tmp_path, proxies, kills=1)


@long_scenario
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.chaos
async def test_repeated_master_failovers_lose_no_update(tmp_path: Path, proxies: StartProxies):
    """Kill, promote, bring the old master back as a replica; three times."""
    await failover_run(tmp_path, proxies, kills=3)
