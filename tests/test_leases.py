"""leases.py: how long a write holds its resource, the late hold, and END
finishing what a write began even when the write's handler is cancelled
in the middle of it."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from etagproxy.config import parse_config
from etagproxy.exchange import Exchange
from etagproxy.forwarding import Forwarding
from etagproxy.leases import LATE_HOLD_S, Leases, lease_ms
from etagproxy.metrics import Metrics
from etagproxy.routes import Router
from etagproxy.store.base import BeginStatus, EndResult, Outcome, WriteCondition
from etagproxy.store.memory import MemoryStore
from etagproxy.upstream import Upstream

UPSTREAM = "upstream: http://127.0.0.1:1\n"


@pytest.mark.parametrize("upstream, store", [("500ms", "200ms"), ("5s", "200ms"), ("30s", "1s")])
def test_the_lease_outlives_the_upstream_deadline_by_the_store_round_trips(upstream: str, store: str):
    config = parse_config(UPSTREAM + f"timeouts: {{upstream: {upstream}, store: {store}}}\n")
    t = config.timeouts
    lease = lease_ms(config) / 1000
    # BEGIN's answer and END's request both fit, with a margin: the lease
    # never runs out on a write whose API answered within its deadline.
    assert lease > t.upstream + 2 * t.store
    # The late hold of a timed-out write ends inside that margin.
    assert t.upstream + LATE_HOLD_S < lease - 2 * t.store


def test_min_replicas_lengthens_the_lease_by_the_wait_for_replicas():
    base = "timeouts: {upstream: 5s, store: 200ms}\n"
    plain = parse_config(UPSTREAM + base)
    replicated = parse_config(
        UPSTREAM + base + "store: {url: 'redis://127.0.0.1:1/0', min_replicas: 1, min_replicas_timeout: 3s}\n"
    )
    assert lease_ms(replicated) == lease_ms(plain) + 3000


class HeldEnd(MemoryStore):
    """A store whose END answers only once `go` is set; `ending` is set when
    the first arrives. With `lands_first`, END runs at once and only its
    answer waits, as on Redis with a command already sent; else END runs
    only after `go`, as one not yet sent."""

    def __init__(self, *, lands_first: bool = False) -> None:
        super().__init__()
        self.lands_first = lands_first
        self.ending = asyncio.Event()
        self.go = asyncio.Event()
        self.ends: list[str] = []

    async def end(self, key: str, owner: str, outcome: Outcome, *, exists: bool = True) -> EndResult:
        self.ends.append(key)
        result = await super().end(key, owner, outcome, exists=exists) if self.lands_first else None
        self.ending.set()
        await self.go.wait()
        return result if result is not None else await super().end(key, owner, outcome, exists=exists)


def _leases(store: MemoryStore) -> tuple[Forwarding, Leases]:
    config = parse_config("upstream: http://127.0.0.1:9\nroutes:\n  - path: /items/{id}\n")
    io = Forwarding(config, Router(config.routes), store, Upstream(connect_timeout=1.0), Metrics(CollectorRegistry()))
    return io, Leases(io)


@pytest.mark.parametrize("members", [(), ("/items/2", "/items/3")])
async def test_a_write_cancelled_during_end_still_ends_its_lease_with_its_outcome(members):
    store = HeldEnd()
    io, leases = _leases(store)
    before = {}
    for key in ("/items/1", *members):
        before[key] = (await store.observe(key)).version.token
        begun = await store.begin(key, WriteCondition(), "owner-1", leases.lease_ms, 0)
        assert begun.status is BeginStatus.OK
    ex = Exchange("rid", "PUT", "/items/1", "127.0.0.1", "")
    ex.members = members
    ending = asyncio.ensure_future(leases.end(ex, "/items/1", "owner-1", Outcome.SUCCESS))
    await asyncio.wait_for(store.ending.wait(), 5)
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    # The store answers only now, after the handler is gone.
    store.go.set()
    if io.tasks:
        await asyncio.wait(set(io.tasks), timeout=10)
    for key in ("/items/1", *members):
        # The lease is free: another writer's BEGIN goes through at once ...
        begun = await store.begin(key, WriteCondition(), "owner-2", leases.lease_ms, 0)
        assert begun.status is BeginStatus.OK, key
        # ... and the cut write's success minted a new version.
        assert begun.current is not None and begun.current.token != before[key], key


async def test_a_write_not_cancelled_ends_once():
    store = HeldEnd()
    store.go.set()
    io, leases = _leases(store)
    await store.begin("/items/1", WriteCondition(), "owner-1", leases.lease_ms, 0)
    ex = Exchange("rid", "PUT", "/items/1", "127.0.0.1", "")
    committed = await leases.end(ex, "/items/1", "owner-1", Outcome.SUCCESS)
    assert committed is not None
    assert store.ends == ["/items/1"]
    assert not io.tasks


async def test_an_end_that_landed_before_the_cancel_is_sent_again_once_and_changes_nothing():
    store = HeldEnd(lands_first=True)
    io, leases = _leases(store)
    await store.begin("/items/1", WriteCondition(), "owner-1", leases.lease_ms, 0)
    ex = Exchange("rid", "PUT", "/items/1", "127.0.0.1", "")
    ending = asyncio.ensure_future(leases.end(ex, "/items/1", "owner-1", Outcome.SUCCESS))
    await asyncio.wait_for(store.ending.wait(), 5)
    landed = (await store.observe("/items/1")).version.token
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    store.go.set()
    if io.tasks:
        await asyncio.wait(set(io.tasks), timeout=10)
    # The repeat found the lease gone: one more END, not a series of them,
    # and the version the first one minted stands.
    assert store.ends == ["/items/1", "/items/1"]
    assert (await store.observe("/items/1")).version.token == landed

