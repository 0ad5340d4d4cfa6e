"""What only the Redis store has: epochs, TTLs, script cache, faults,
cluster slots, replicas and sentinel failover. The shared behaviour is in
tests/store_contract.py."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from etagproxy.config import parse_store_url
from etagproxy.store import open_store
from etagproxy.store.base import BeginStatus, Cause, Outcome, Replay, StoreError, WriteCondition
from etagproxy.store.epoch import NO_EPOCH, epoch_tail
from etagproxy.store.memory import MemoryStore
from etagproxy.store.redis import RedisStore, redis_key
from etagproxy.store.redis_scripts import BEGIN
from etagproxy.store.resp import RespClient
from tests.redis_fixtures import RedisClusterGroup, RedisSentinelGroup, RedisServer
from tests.store_contract import HELD_MS, NO_PRECONDITION, PAST_SHORT_S, committed, if_match

pytestmark = pytest.mark.redis

T = TypeVar("T")
PREFIX = "etagproxy:"


async def eventually(call: Callable[[], Awaitable[T]], *, within_s: float) -> T:
    """`call()`'s result once it stops raising StoreError (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


def hash_tag(name: str) -> str:
    """The part of a key name Redis Cluster hashes (cluster spec, "hash tags")."""
    start = name.find("{")
    if start >= 0:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1 : end]
    return name


# -- key layout ----------------------------------------------------------------


def unescape(tag: str) -> str:
    if tag == "%00":
        return ""
    return re.sub("%(25|7B|7D)", lambda m: {"25": "%", "7B": "{", "7D": "}"}[m[1]], tag)


@given(st.text(alphabet=st.sampled_from("{}%027BD/a")) | st.text())
def test_a_resource_key_is_its_redis_keys_whole_hash_tag(key: str) -> None:
    # Decoding the tag gives the key back: no two resources share a Redis
    # key, and a resource's records carry the same tag, so the same slot.
    rkey = redis_key(PREFIX, key)
    for name in (rkey, f"{rkey}:r:reader{{x}}", f"{rkey}:i:}}{{"):
        assert unescape(hash_tag(name)) == key


async def test_prefix_must_not_hold_a_hash_tag() -> None:
    client = Redis()
    with pytest.raises(ValueError, match="hash tag"):
        RedisStore(client, prefix="app{1}:")
    await client.aclose()


async def test_cluster_keeps_a_resource_and_its_records_in_one_slot(
    redis_cluster: RedisClusterGroup, redis_store: Any
) -> None:
    store = await redis_store(redis_cluster)
    record = Replay("fp", 200, (), b"ok")
    keys = [f"/item/{n}" for n in range(30)] + ["/a{b}", "/}x{", "", "{}"]
    for key in keys:
        await store.record_reader(key, "reader", 60_000)
        assert (await store.observe(key, reader="reader")).reader_seen
        await store.put_replay(key, "idem", record, 60_000)
        assert await store.get_replay(key, "idem") == record
    node = redis_cluster.nodes[0]
    for key in keys:
        rkey = redis_key(PREFIX, key)
        slots = {node.command("CLUSTER", "KEYSLOT", name) for name in (rkey, f"{rkey}:r:reader", f"{rkey}:i:idem")}
        assert len(slots) == 1
    # ...while resources spread over the masters.
    assert sum(n.command("DBSIZE") > 0 for n in redis_cluster.nodes) >= 2


# -- epochs ----------------------------------------------------------------------


async def test_restart_from_a_snapshot_retires_every_token(redis_server: RedisServer, redis_store: Any) -> None:
    store = await redis_store(redis_server)
    v0 = await committed(store, "/a")
    assert v0.epoch == redis_server.run_id() == (await store.observe("/b")).version.epoch
    await store.begin("/b", NO_PRECONDITION, "in-flight", HELD_MS, 0)

    redis_server.restart(keep_data=True)
    assert redis_server.command("HGET", redis_key(PREFIX, "/a"), "t").decode() == v0.token
    info = await store.inspect("/a")
    assert info.state == "absent" and info.extra["stale_epoch"] == v0.epoch

    # This store saw the epoch change: writes are fenced for one lease,
    # since a write begun before the restart may still be in flight.
    fenced = await store.begin("/a", NO_PRECONDITION, "w0", HELD_MS, 0)
    assert fenced.status is BeginStatus.BUSY
    # A proxy whose first contact is the new epoch is not fenced, and the
    # restored token does not validate for it.
    fresh = await redis_store(redis_server)
    stale = await fresh.begin("/a", if_match(v0.token), "w", HELD_MS, 0)
    assert (stale.status, stale.current) == (BeginStatus.PRECONDITION_FAILED, None)
    seen = await store.observe("/a")
    assert seen.minted is Cause.EPOCH and seen.version.token != v0.token
    assert seen.version.epoch == store.epoch == redis_server.run_id() != v0.epoch

    # The write in flight survived in the snapshot; readers get a version of
    # this epoch, and its rejection cannot bring back the old token.
    during = await store.observe("/b")
    assert during.pending and during.minted is Cause.EPOCH
    ended = await store.end("/b", "in-flight", Outcome.REJECTED)
    assert ended.committed == during.version


async def test_reading_a_committed_version_runs_no_script(redis_server: RedisServer, redis_store: Any) -> None:
    store = await redis_store(redis_server)
    v0 = await committed(store, "/a")
    redis_server.command("CONFIG", "RESETSTAT")
    for _ in range(10):
        seen = await store.observe("/a", reader="r1")
        assert (seen.version, seen.pending, seen.minted, seen.reader_seen) == (v0, False, None, False)
    stats = redis_server.command("INFO", "commandstats")
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    assert "cmdstat_evalsha" not in text and "cmdstat_eval:" not in text, text
    # A key with a write in flight still goes to the script, which knows leases.
    await store.begin("/a", NO_PRECONDITION, "w", HELD_MS, 0)
    assert (await store.observe("/a")).pending


async def test_scripts_on_one_server_take_the_epoch_their_connection_read(
    redis_server: RedisServer, redis_store: Any
) -> None:
    # The run_id and start time come from the connection's INFO at connect,
    # passed as the scripts' last ARGV: no script reads INFO (~7 us of the
    # server's CPU each, half of what a write cost it), and the versions and
    # fences are still those of the answering process.
    store = await redis_store(redis_server)
    await store.observe("/warm")  # the connection opens, with its one INFO
    run_id = redis_server.run_id()
    redis_server.command("CONFIG", "RESETSTAT")
    for i in range(5):
        begun = await store.begin("/a", NO_PRECONDITION, f"w{i}", HELD_MS, 0)
        assert begun.status is BeginStatus.OK
        ended = await store.end("/a", f"w{i}", Outcome.SUCCESS)
        assert ended.committed is not None and ended.committed.epoch == run_id
    await store.invalidate(["/a"])
    assert (await store.observe("/a")).version.epoch == run_id
    stats = redis_server.command("INFO", "commandstats")
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    assert "cmdstat_evalsha" in text and "cmdstat_info" not in text, text

    # A restart ends the connection; the next one reads the new process's
    # epoch and start: the restart fence is one lease less the new uptime,
    # as when the script read INFO itself.
    redis_server.restart(keep_data=False)
    assert (await store.begin("/a", NO_PRECONDITION, "w", HELD_MS, 0)).status is BeginStatus.BUSY
    assert store.epoch == redis_server.run_id()
    client = RespClient("127.0.0.1", redis_server.port, timeout=5.0)
    try:
        rid = redis_server.run_id()
        args = ["w2", HELD_MS, "t", 60_000, "c2", "", "", "", 0, "", rid]
        fenced_ms = {}
        for epoch in (True, False):  # False: the script reads INFO
            reply = await client.evalsha(BEGIN, [redis_key(PREFIX, "/b")], [*args, *((), NO_EPOCH)[not epoch]],
                                         epoch=epoch)
            assert reply[0] == b"busy"
            fenced_ms[epoch] = reply[1]
        uptime_ms = HELD_MS - fenced_ms[False]
        assert HELD_MS - uptime_ms - 1500 <= fenced_ms[True] <= HELD_MS - uptime_ms + 1000, fenced_ms
    finally:
        await client.close()


async def test_epoch_script_makes_every_call_learn_the_epoch_on_the_server(
    redis_server: RedisServer, redis_store: Any
) -> None:
    # store.epoch: script, for a Redis behind a proxy that keeps client
    # connections across a failover: no call trusts the connection's run_id,
    # reads included (they run the script instead of the HMGET shortcut).
    store = await redis_store(redis_server, epoch="script")
    await store.observe("/warm")
    v0 = await committed(store, "/a")
    redis_server.command("CONFIG", "RESETSTAT")
    begun = await store.begin("/a", if_match(v0.token), "w", HELD_MS, 0)
    assert begun.status is BeginStatus.OK
    ended = await store.end("/a", "w", Outcome.SUCCESS)
    seen = await store.observe("/a")
    assert ended.committed == seen.version and seen.version.token != v0.token
    stats = redis_server.command("INFO", "commandstats")
    assert stats["cmdstat_info"]["calls"] == 3 and "cmdstat_hmget" in stats, stats
    assert stats["cmdstat_evalsha"]["calls"] == 3


def test_an_info_reply_without_its_fields_gives_no_epoch_pair() -> None:
    info = b"# Server\r\nrun_id:ab12\r\nuptime_in_seconds:3\r\nserver_time_usec:1700000000123456\r\n"
    assert epoch_tail(info) == (b"ab12", b"1699999997123")
    for dropped in (b"run_id", b"uptime_in_seconds", b"server_time_usec"):
        assert epoch_tail(info.replace(dropped, b"other")) == NO_EPOCH


# -- TTLs ------------------------------------------------------------------------


async def test_committed_keys_expire_pending_keys_do_not(redis_server: RedisServer, redis_store: Any) -> None:
    store = await redis_store(redis_server, token_ttl=60.0)
    rkey = redis_key(PREFIX, "/a")
    await store.observe("/a")
    assert 59_000 < redis_server.command("PTTL", rkey) <= 60_000
    await store.begin("/a", NO_PRECONDITION, "w", HELD_MS, 0)
    assert redis_server.command("PTTL", rkey) == -1
    await store.end("/a", "w", Outcome.REJECTED)
    assert 59_000 < redis_server.command("PTTL", rkey) <= 60_000


async def test_an_expired_version_is_minted_afresh(redis_server: RedisServer, redis_store: Any) -> None:
    store = await redis_store(redis_server, token_ttl=0.05)
    first = await store.observe("/a")
    await asyncio.sleep(PAST_SHORT_S)
    again = await store.observe("/a")
    assert again.minted is Cause.FIRST_SIGHT and again.version.token != first.version.token


# -- script cache ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
async def test_scripts_survive_script_flush(
    kind: str, redis_server: RedisServer, redis_cluster: RedisClusterGroup, redis_store: Any
) -> None:
    target = redis_server if kind == "standalone" else redis_cluster
    nodes = [redis_server] if kind == "standalone" else redis_cluster.nodes
    store = await redis_store(target)
    v0 = await committed(store, "/a")
    for node in nodes:
        node.command("SCRIPT", "FLUSH")
    assert (await store.observe("/a")).version == v0
    for node in nodes:
        node.command("SCRIPT", "FLUSH")
    assert (await store.begin("/a", if_match(v0.token), "w", HELD_MS, 0)).status is BeginStatus.OK
    for node in nodes:
        node.command("SCRIPT", "FLUSH")
    v1 = (await store.end("/a", "w", Outcome.SUCCESS)).committed
    assert v1 is not None and v1.token != v0.token
    for node in nodes:
        node.command("SCRIPT", "FLUSH")
    await store.invalidate(["/a", "/b", "/c"])
    assert (await store.observe("/a")).version.token != v1.token


# -- faults ----------------------------------------------------------------------


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def every_call(store: RedisStore) -> list[Callable[[], Awaitable[object]]]:
    return [
        lambda: store.observe("/a", reader="r"),
        lambda: store.confirm("/a", "t"),
        lambda: store.record_reader("/a", "r", 1000),
        lambda: store.begin("/a", WriteCondition(), "w", HELD_MS, 100),
        lambda: store.end("/a", "w", Outcome.SUCCESS),
        lambda: store.put_replay("/a", "i", Replay("f", 200, (), b""), 1000),
        lambda: store.invalidate(["/a", "/b"]),
        lambda: store.fingerprint("/a", "t", "d"),
        lambda: store.get_replay("/a", "i"),
        lambda: store.inspect("/a"),
        store.ping,
    ]


async def test_a_silent_server_gives_store_error_within_the_timeout(silent_port: int) -> None:
    store = RedisStore(Redis(port=silent_port), timeout_s=0.1)
    try:
        for call in every_call(store):
            start = time.monotonic()
            with pytest.raises(StoreError, match="no answer within 100 ms"):
                await call()
            assert 0.09 < time.monotonic() - start < 0.5
    finally:
        await store.close()


async def test_a_dead_server_gives_store_error_then_recovers(redis_server: RedisServer, redis_store: Any) -> None:
    store = await redis_store(redis_server, timeout_s=0.5)
    v0 = await committed(store, "/a")
    redis_server.kill()
    for call in every_call(store):
        start = time.monotonic()
        with pytest.raises(StoreError):
            await call()
        assert time.monotonic() - start < 0.6
    redis_server.start()
    # Pooled connections died with the old process; the first call after the
    # restart already succeeds.
    seen = await store.observe("/a")
    assert seen.minted is Cause.FIRST_SIGHT and seen.version.token != v0.token
    await store.ping()


async def test_a_cluster_node_restart_is_survived(redis_cluster: RedisClusterGroup, redis_store: Any) -> None:
    store = await redis_store(redis_cluster, timeout_s=0.5)
    keys = [f"/item/{n}" for n in range(12)]
    for key in keys:
        await store.observe(key)
    victim = redis_cluster.nodes[1]
    victim.kill()
    outcomes = await asyncio.gather(*(store.observe(key) for key in keys), return_exceptions=True)
    assert any(isinstance(o, StoreError) for o in outcomes)
    assert not any(isinstance(o, Exception) and not isinstance(o, StoreError) for o in outcomes)
    redis_cluster.ensure_running()
    for key in keys:
        await eventually(lambda key=key: store.observe(key), within_s=5)  # type: ignore[misc]


def start_migrating(cluster: RedisClusterGroup, rkey: str) -> tuple[RedisServer, RedisServer]:
    """Mark the slot of `rkey` as migrating from its owner to another master
    (keys not moved yet); (source, destination)."""
    slot = int(cluster.nodes[0].command("CLUSTER", "KEYSLOT", rkey))
    ids = {node.port: node.command("CLUSTER", "MYID").decode() for node in cluster.nodes}
    src = next(node for node in cluster.nodes if node.command("CLUSTER", "COUNTKEYSINSLOT", slot))
    dst = next(node for node in cluster.nodes if node is not src)
    dst.command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src.port])
    src.command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst.port])
    return src, dst


async def test_scripts_follow_ask_while_their_slot_migrates(tmp_path: Path, redis_store: Any) -> None:
    """The resource has moved to the importing node, its slot is still
    migrating: the old owner answers ASK, and the script must run on the
    importing node after ASKING on the same connection. Sent on another
    (redis-py's own ASK handling, 8.2), the importing node answers MOVED
    back to the old owner and busy callers bounce until they give up."""
    cluster = RedisClusterGroup(tmp_path / "cluster")
    cluster.start()
    try:
        store = await redis_store(cluster, timeout_s=1.0)
        v0 = await committed(store, "/a")
        rkey = redis_key(PREFIX, "/a")
        src, dst = start_migrating(cluster, rkey)
        src.command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", rkey)
        for node in cluster.nodes:
            node.command("CONFIG", "RESETSTAT")
        # Another epoch on the importing node: the moved version is re-minted once.
        seen = await asyncio.gather(*(store.observe("/a") for _ in range(40)))
        assert {o.version.epoch for o in seen} == {dst.run_id()}
        assert len({o.version.token for o in seen} - {v0.token}) == 1
        token = seen[0].version.token
        await store.confirm("/a", token)
        begun = await store.begin("/a", if_match(token), "w", HELD_MS, 0)
        assert begun.status is BeginStatus.OK
        ended = await store.end("/a", "w", Outcome.SUCCESS)
        assert ended.committed is not None
        # An invalidation of the moved key follows ASK too, and lands.
        await store.invalidate(["/a"])
        assert (await store.observe("/a")).version.token != ended.committed.token
        stats = {node.port: node.admin().info("errorstats") for node in (src, dst)}
        assert int(stats[src.port]["errorstat_ASK"]["count"]) >= 40
        assert "errorstat_MOVED" not in stats[dst.port]
    finally:
        cluster.kill()


async def test_scripts_on_a_key_in_a_migrating_slot_keep_it(tmp_path: Path, redis_store: Any) -> None:
    """The slot is migrating, the key not moved yet: scripts run on the old
    owner, and must rewrite the key in place. Deleted and recreated within
    a script, it is gone from this node at the DEL, and the HSET after it is
    refused ("non local key"): the script fails halfway, the key lost."""
    cluster = RedisClusterGroup(tmp_path / "cluster")
    cluster.start()
    try:
        store = await redis_store(cluster, timeout_s=1.0)
        v0 = await committed(store, "/a")
        replay = Replay("fp", 200, (("content-type", "text/plain"),), b"ok")
        await store.put_replay("/a", "idem", replay, 60_000)
        rkey = redis_key(PREFIX, "/a")
        src, dst = start_migrating(cluster, rkey)
        assert (await store.begin("/a", if_match(v0.token), "w", HELD_MS, 0)).status is BeginStatus.OK
        ended = await store.end("/a", "w", Outcome.SUCCESS)
        assert ended.committed is not None and ended.committed.token != v0.token
        await store.invalidate(["/a"])
        await store.put_replay("/a", "idem", replay, 60_000)
        assert src.command("EXISTS", rkey, f"{rkey}:i:idem") == 2
        assert (await store.observe("/a")).version.epoch == src.run_id()
    finally:
        cluster.kill()


# -- waiting and concurrency across processes ---------------------------------------


async def test_waiter_on_another_client_notices_the_release(redis_server: RedisServer, redis_store: Any) -> None:
    holder, waiter = await redis_store(redis_server), await redis_store(redis_server)
    v0 = await committed(holder, "/a")
    await holder.begin("/a", if_match(v0.token), "first", HELD_MS, 0)
    pending = asyncio.ensure_future(waiter.begin("/a", if_match(v0.token), "second", HELD_MS, 5_000))
    await asyncio.sleep(0.1)
    assert not pending.done()
    await holder.end("/a", "first", Outcome.REJECTED)
    released = time.monotonic()
    result = await asyncio.wait_for(pending, 2)
    assert result.status is BeginStatus.OK and result.current == v0
    assert time.monotonic() - released < 0.2  # the poll cap is 20 ms; slack for loaded machines


async def test_one_winner_among_writers_on_several_clients(redis_server: RedisServer, redis_store: Any) -> None:
    stores = [await redis_store(redis_server) for _ in range(3)]
    v0 = await committed(stores[0], "/a")

    async def writer(n: int) -> BeginStatus:
        store = stores[n % len(stores)]
        begun = await store.begin("/a", if_match(v0.token), f"w{n}", HELD_MS, 3_000)
        if begun.status is BeginStatus.OK:
            await asyncio.sleep(0.005)
            await store.end("/a", f"w{n}", Outcome.SUCCESS)
        return begun.status  # type: ignore[no-any-return]

    statuses = await asyncio.gather(*(writer(n) for n in range(12)))
    assert statuses.count(BeginStatus.OK) == 1
    assert statuses.count(BeginStatus.PRECONDITION_FAILED) == 11


async def test_begin_retried_after_a_lost_reply_still_holds_the_lease(
    redis_server: RedisServer, redis_store: Any
) -> None:
    # redis-py repeats a command whose connection broke, with the same
    # arguments, so a BEGIN that already ran must recognise its own call.
    store = await redis_store(redis_server)
    v0 = await committed(store, "/a")
    args = ["w", HELD_MS, "fresh-token", 60_000, "call-1", "L", "", "", 1, store.epoch, "", v0.token]
    rkey = redis_key(PREFIX, "/a")
    first = await store._begin([rkey], args)
    again = await store._begin([rkey], args)
    assert first[0] == again[0] == b"ok" and first[2] == again[2] == v0.token.encode()
    other_call = await store._begin([rkey], [*args[:4], "call-2", *args[5:]])
    assert other_call[0] == b"busy"


# -- replicas ---------------------------------------------------------------------


async def test_min_replicas_met(redis_sentinel: RedisSentinelGroup, redis_store: Any) -> None:
    store = await redis_store(redis_sentinel, min_replicas=1, min_replicas_timeout=1.0)
    v0 = await committed(store, "/a")
    redis_sentinel.master.command("SCRIPT", "FLUSH")  # BEGIN and WAIT go as one pipeline
    assert (await store.begin("/a", if_match(v0.token), "w", HELD_MS, 0)).status is BeginStatus.OK
    with redis_sentinel.replica.admin() as replica:
        assert replica.hget(redis_key(PREFIX, "/a"), "o") == b"w"


@pytest.mark.parametrize("kind", ["sentinel", "standalone", "cluster"])
async def test_min_replicas_missed_fails_closed_and_releases_the_lease(
    kind: str,
    redis_server: RedisServer,
    redis_cluster: RedisClusterGroup,
    redis_sentinel: RedisSentinelGroup,
    redis_store: Any,
) -> None:
    target = {"sentinel": redis_sentinel, "standalone": redis_server, "cluster": redis_cluster}[kind]
    have = 1 if kind == "sentinel" else 0
    store = await redis_store(target, min_replicas=have + 1, min_replicas_timeout=0.05)
    v0 = (await store.observe("/a")).version
    with pytest.raises(StoreError, match=f"{have} of {have + 1} replicas"):
        await store.begin("/a", NO_PRECONDITION, "w", HELD_MS, 0)
    info = await store.inspect("/a")
    assert (info.state, info.version) == ("committed", v0)


@pytest.mark.slow
async def test_sentinel_failover_retires_every_token(tmp_path: Path, redis_store: Any) -> None:
    group = RedisSentinelGroup(tmp_path)
    group.start()
    try:
        store = await redis_store(group, timeout_s=0.5)
        v0 = await committed(store, "/a")
        with group.replica.admin() as replica:
            deadline = time.monotonic() + 5
            while replica.hget(redis_key(PREFIX, "/a"), "t") != v0.token.encode():
                assert time.monotonic() < deadline, "the replica never got the version"
                await asyncio.sleep(0.01)
        group.master.kill()
        # The replica's copy is intact, but it came from another run_id.
        seen = await eventually(lambda: store.observe("/a"), within_s=15)
        assert seen.minted is Cause.EPOCH and seen.version.token != v0.token
        assert seen.version.epoch == group.replica.run_id()
        # (This store saw the epoch change, so its writes may be fenced while
        # the new master is younger than a lease; a fresh one is not.)
        fresh = await redis_store(group, timeout_s=0.5)
        stale = await fresh.begin("/a", if_match(v0.token), "w", HELD_MS, 0)
        assert stale.status is BeginStatus.PRECONDITION_FAILED
    finally:
        group.kill()


# -- factory ------------------------------------------------------------------------


async def test_open_store_picks_the_store_the_url_names(
    redis_server: RedisServer, redis_cluster: RedisClusterGroup, redis_sentinel: RedisSentinelGroup
) -> None:
    memory = open_store(dataclasses.replace(parse_store_url("memory://"), token_ttl=5.0), timeout_s=0.2)
    assert isinstance(memory, MemoryStore)
    for target in (redis_server, redis_cluster, redis_sentinel):
        store = open_store(parse_store_url(target.url), timeout_s=1.0)
        try:
            assert isinstance(store, RedisStore)
            await store.ping()
            assert (await store.observe("/a")).minted is Cause.FIRST_SIGHT
        finally:
            await store.close()


def test_a_proxy_on_one_redis_server_never_imports_redis_py(redis_server: RedisServer) -> None:
    """redis-py costs a proxy process ~15 MB; on a single server every
    operation goes through the lean client, so it is never imported."""
    import subprocess
    import sys

    script = f"""
import asyncio, sys
import etagproxy.app, etagproxy.cli
from etagproxy.config import parse_store_url
from etagproxy.store import open_store
from etagproxy.store.base import Outcome, Replay, WriteCondition

async def main():
    store = open_store(parse_store_url({redis_server.url!r}), timeout_s=2.0)
    obs = await store.observe("/a", reader="r")
    await store.confirm("/a", obs.version.token)
    await store.record_reader("/a", "r", 1000)
    begun = await store.begin("/a", WriteCondition(), "w", 5000, 0)
    await store.end("/a", "w", Outcome.SUCCESS)
    await store.put_replay("/a", "i", Replay("f", 200, (("ETag", '"x"'),), b"{{}}"), 1000)
    assert (await store.get_replay("/a", "i")).body == b"{{}}"
    await store.invalidate(["/a", "/b"])
    await store.fingerprint("/a", (await store.observe("/a")).version.token, "d")
    await store.inspect("/a")
    await store.ping()
    await store.close()

asyncio.run(main())
loaded = sorted(m for m in sys.modules if m == "redis" or m.startswith("redis."))
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
