"""Redis at maxmemory: which keys the policy may evict, and what a client sees.

The store is safe under `volatile-*` and `noeviction` and unsafe under
`allkeys-*`, because a pending write's key has no TTL and every other key
has one (docs/DEPLOYING.md, "Redis memory"):

- `volatile-*` evicts only keys with a TTL: committed versions, reader and
  replay records. An evicted version is re-minted on the next read, so a tag
  issued before the eviction gets 412, never a false match.
- `noeviction` refuses writes when full: BEGIN fails and the proxy answers
  503 `store-full` with nothing forwarded.
- `allkeys-*` may evict the lease of a write in flight, and a second write to
  the resource could start beside it. The proxy warns at start.

Each server here is its own redis-server, started with the policy under test.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from etagproxy.config import parse_store_url
from etagproxy.store import open_store
from etagproxy.store.base import BeginStatus, Outcome, StoreError
from etagproxy.store.memory import MemoryStore
from etagproxy.store.redis import RedisStore, redis_key
from tests.fault_upstream import FaultUpstream, running_upstream
from tests.proxy_fixtures import ProxyHandle
from tests.redis_fixtures import RedisServer
from tests.store_contract import HELD_MS, NO_PRECONDITION, if_match

pytestmark = pytest.mark.redis

PREFIX = "etagproxy:"
# Room above the memory a fresh server uses: about 1,000 resources.
HEADROOM = 256 * 1024


@contextmanager
def policy_server(tmp_path: Path, policy: str) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / policy, "--maxmemory-policy", policy)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def volatile_lru(tmp_path: Path) -> Iterator[RedisServer]:
    with policy_server(tmp_path, "volatile-lru") as server:
        yield server


@pytest.fixture
def noeviction(tmp_path: Path) -> Iterator[RedisServer]:
    with policy_server(tmp_path, "noeviction") as server:
        yield server


def cap_memory(server: RedisServer, headroom: int = HEADROOM) -> None:
    used = int(server.admin().info("memory")["used_memory"])
    server.command("CONFIG", "SET", "maxmemory", str(used + headroom))


def evicted(server: RedisServer) -> int:
    return int(server.admin().info("stats")["evicted_keys"])


def exists(server: RedisServer, key: str) -> bool:
    return bool(server.command("EXISTS", redis_key(PREFIX, key)))


@pytest.fixture(params=["lean", "redis-py"])
async def store_of(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """`store_of(server)`: a RedisStore on `server` through either client."""
    opened: list[RedisStore] = []

    def open_(server: RedisServer) -> RedisStore:
        if request.param == "lean":
            store = open_store(parse_store_url(server.url), timeout_s=2.0)
        else:
            store = RedisStore(Redis(host=server.host, port=server.port), prefix=PREFIX, timeout_s=2.0)
        assert isinstance(store, RedisStore)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


async def fill_until(store: RedisStore, server: RedisServer, done, *, limit: int = 30_000) -> int:
    """Read new resources (each read mints a committed version) until
    `done()`, checked every 100 reads; the number of resources read."""
    for n in range(limit):
        await store.observe(f"/fill/{n}")
        if n % 100 == 99 and done():
            return n + 1
    raise AssertionError(f"{limit} resources read, {evicted(server)} keys evicted, and still not done")


# -- what each key costs -----------------------------------------------------------


async def test_a_lease_has_no_ttl_and_every_other_key_has_one(tmp_path: Path):
    """What makes volatile-* safe, and the memory the deployment guide quotes."""
    with policy_server(tmp_path, "noeviction") as server:
        await _key_costs(server)


async def _key_costs(server: RedisServer) -> None:
    store = open_store(parse_store_url(server.url), timeout_s=2.0)
    try:
        await store.observe("/api/dcim/sites/12345/")
        assert (await store.begin("/api/dcim/sites/12346/", NO_PRECONDITION, "w" * 22, HELD_MS, 0)).status is BeginStatus.OK
        await store.record_reader("/api/dcim/sites/12345/", "r" * 43, 60_000)
        committed_key = redis_key(PREFIX, "/api/dcim/sites/12345/")
        pending_key = redis_key(PREFIX, "/api/dcim/sites/12346/")
        reader_key = committed_key + ":r:" + "r" * 43
        assert server.command("PTTL", committed_key) > 0
        assert server.command("PTTL", reader_key) > 0
        assert server.command("PTTL", pending_key) == -1
        sizes = {name: server.command("MEMORY", "USAGE", key) for name, key in
                 (("committed", committed_key), ("pending", pending_key), ("reader", reader_key))}
        print("MEMORY USAGE, bytes:", sizes)
        # A small listpack hash: about 200 bytes for a 22-byte path.
        assert 100 < sizes["committed"] < 300
        assert 100 < sizes["pending"] < 300

        before = int(server.admin().info("memory")["used_memory"])
        for n in range(10_000):
            await store.observe(f"/api/dcim/devices/{n}/")
        per_resource = (int(server.admin().info("memory")["used_memory"]) - before) / 10_000
        print(f"used_memory per resource, 10,000 resources: {per_resource:.0f} bytes")
        # With the main and the expires dict entries: well under 400 bytes.
        assert per_resource < 400
    finally:
        await store.close()


# -- volatile-lru --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random"])
async def test_volatile_policies_evict_versions_and_never_a_lease(tmp_path: Path, policy: str, store_of):
    with policy_server(tmp_path, policy) as server:
        await _versions_evicted_lease_kept(server, store_of(server), policy)


async def _versions_evicted_lease_kept(server: RedisServer, store: RedisStore, policy: str) -> None:
    # Several old versions, since an LFU policy may keep any one of them for
    # good: a key whose counter drew one more increment than the new keys'
    # outranks every key read after it.
    olds = {f"/old/{i}": (await store.observe(f"/old/{i}")).version for i in range(50)}
    held = await store.begin("/held", NO_PRECONDITION, "writer-1", 60_000, 0)
    assert held.status is BeginStatus.OK
    cap_memory(server)
    n = await fill_until(
        store, server, lambda: evicted(server) >= 500 and not all(exists(server, k) for k in olds)
    )
    print(f"{policy}: {n} resources read, {evicted(server)} keys evicted")

    # The lease outlived the eviction of hundreds of keys around it: a
    # second write still waits for it.
    assert exists(server, "/held")
    second = await store.begin("/held", NO_PRECONDITION, "writer-2", 60_000, 0)
    assert second.status is BeginStatus.BUSY
    ended = await store.end("/held", "writer-1", Outcome.SUCCESS)
    assert not ended.lease_lost

    # An evicted old version's tag is refused, not matched.
    gone, old = next((k, v) for k, v in olds.items() if not exists(server, k))
    stale = await store.begin(gone, if_match(old.token), "writer-3", 60_000, 0)
    assert stale.status is BeginStatus.PRECONDITION_FAILED
    assert (await store.observe(gone)).version.token != old.token


# -- noeviction ------------------------------------------------------------------------


async def test_a_full_noeviction_store_refuses_a_write_as_store_full(noeviction: RedisServer, store_of):
    store = store_of(noeviction)
    await store.observe("/before")
    noeviction.command("CONFIG", "SET", "maxmemory", "1")
    with pytest.raises(StoreError) as raised:
        await store.begin("/k", NO_PRECONDITION, "w", HELD_MS, 0)
    assert raised.value.kind == "store-full", raised.value
    assert "OOM" in str(raised.value)
    # Nothing was taken: with room again, the write begins.
    noeviction.command("CONFIG", "SET", "maxmemory", "0")
    assert (await store.begin("/k", NO_PRECONDITION, "w", HELD_MS, 0)).status is BeginStatus.OK


def _tracked(upstream: str) -> str:
    return f"upstream: {upstream}\nroutes:\n  - path: /counters/{{id}}\n    require_if_match: true\n"


async def test_a_full_store_answers_a_write_503_store_full_and_forwards_nothing(noeviction: RedisServer, make_proxy):
    async with running_upstream(FaultUpstream()) as up, aiohttp.ClientSession() as s:
        proxy: ProxyHandle = await make_proxy(_tracked(up.url) + f"store: {noeviction.url}\n")
        async with s.get(proxy.url + "/counters/a") as resp:
            tag = resp.headers["ETag"]
        noeviction.command("CONFIG", "SET", "maxmemory", "1")
        body = '{"value": 1, "write": "w1"}'
        headers = {"If-Match": tag, "Content-Type": "application/json"}
        async with s.put(proxy.url + "/counters/a", data=body, headers=headers) as resp:
            problem = await resp.json(content_type=None)
            assert resp.status == 503
            assert resp.headers["Content-Type"] == "application/problem+json"
            assert resp.headers["Retry-After"] == "1"
        assert problem["type"].endswith("store-full"), problem
        assert "w1" not in up.received
        assert proxy.exchanges[-1].error == "store-full"
        # A read still answers, with no tag the store could not keep.
        async with s.get(proxy.url + "/counters/b") as resp:
            assert resp.status == 200
            assert "ETag" not in resp.headers


# -- the policy check at start -------------------------------------------------------------


@pytest.mark.parametrize("policy, unsafe", [("allkeys-lru", 1), ("volatile-lru", 0), ("noeviction", 0)])
async def test_the_eviction_policy_is_checked_at_start(
    tmp_path: Path, make_proxy, caplog: pytest.LogCaptureFixture, policy: str, unsafe: int
):
    with policy_server(tmp_path, policy) as server, caplog.at_level(logging.INFO, logger="etagproxy"):
        proxy: ProxyHandle = await make_proxy(_tracked("http://127.0.0.1:9") + f"store: {server.url}\n")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and policy in r.getMessage()]
    assert len(warned) == unsafe, [r.getMessage() for r in caplog.records]
    registry = proxy.server.metrics.registry
    assert registry.get_sample_value("etagproxy_store_eviction_unsafe") == unsafe


# -- allkeys-lru: why the warning ------------------------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
async def test_allkeys_policies_can_evict_the_lease_of_a_write_in_flight(tmp_path: Path, policy: str, store_of):
    """The failure the warning is about, shown: the held lease is evicted and
    a second write to the same resource begins while the first is in flight."""
    with policy_server(tmp_path, policy) as server:
        await _lease_evicted(server, store_of(server), policy)


async def _lease_evicted(server: RedisServer, store: RedisStore, policy: str) -> None:
    assert (await store.begin("/held", NO_PRECONDITION, "writer-1", 60_000, 0)).status is BeginStatus.OK
    cap_memory(server)
    n = await fill_until(store, server, lambda: not exists(server, "/held"))
    print(f"{policy}: the lease was evicted after {n} resources read")
    second = await store.begin("/held", NO_PRECONDITION, "writer-2", 60_000, 0)
    assert second.status is BeginStatus.OK  # two writes in flight at once
    assert (await store.end("/held", "writer-1", Outcome.SUCCESS)).lease_lost


async def test_the_server_says_its_version_and_policy_through_either_client(volatile_lru: RedisServer, store_of):
    settings = await store_of(volatile_lru).server_settings()
    assert settings["maxmemory_policy"] == "volatile-lru"
    assert int(settings["redis_version"].split(".")[0]) >= 7


class _OldRedis(MemoryStore):
    async def server_settings(self) -> dict[str, str]:
        return {"redis_version": "6.2.14", "maxmemory_policy": "volatile-lru"}


async def test_a_redis_older_than_7_is_an_error_at_start(make_proxy, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="etagproxy"):
        await make_proxy(_tracked("http://127.0.0.1:9"), store=_OldRedis())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "store runs Redis 6.2.14; etagproxy needs Redis 7.0 or later (script flags), "
        "so every request that needs the store will fail"
    ]
