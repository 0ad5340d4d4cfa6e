"""The VersionStore contract (DESIGN.md §2): what every store must do.

`StoreContract` holds the tests; a subclass provides a `store` fixture (a
fresh, empty store) and pytest runs every test against it, see
tests/test_store_contract.py. Tests only use the `VersionStore` protocol
(plus `confirm`, which the proxy calls after a 2xx read), so that the memory
store and the Redis scripts are held to one behaviour.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etagproxy.store.base import (
    BeginResult,
    BeginStatus,
    Cause,
    EndResult,
    Outcome,
    Replay,
    Version,
    WriteCondition,
    evaluate_write,
)

__all__ = ["StoreContract"]

HELD_MS = 10_000
"""A lease that does not run out during a test."""
SHORT_MS = 60
"""A lease or TTL a test outlives on purpose."""
PAST_SHORT_S = 0.12
"""Sleeping this long puts SHORT_MS behind us (deadlines are absolute times)."""
NO_PRECONDITION = WriteCondition()


def if_match(*tokens: str) -> WriteCondition:
    return WriteCondition(if_match=tokens)


def if_none_match(*tokens: str) -> WriteCondition:
    return WriteCondition(if_none_match=tokens)


def fresh_key() -> str:
    return f"/things/{uuid.uuid4().hex}"


async def committed(store: Any, key: str, *, exists: bool = True) -> Version:
    """Give `key` a committed version through a successful write."""
    owner = f"setup-{uuid.uuid4().hex}"
    begun = await store.begin(key, NO_PRECONDITION, owner, HELD_MS, 0)
    assert begun.status is BeginStatus.OK
    ended = await store.end(key, owner, Outcome.SUCCESS, exists=exists)
    assert ended.committed is not None and not ended.lease_lost
    return ended.committed  # type: ignore[no-any-return]


# Abstract preconditions for the agreement test: token names are bound to the
# key's real token ("CUR") or to tokens no version has.
_tag_lists = st.one_of(
    st.none(),
    st.just(("*",)),
    st.lists(st.sampled_from(["CUR", "other", "*"]), max_size=3).map(tuple),
)
_unmodified_since = st.one_of(
    st.none(),
    st.integers(-2, 2).map(lambda d: ("relative", d)),
    st.sampled_from([-(2**63), -1, 0, 2**53 + 1, 2**63]).map(lambda n: ("absolute", n)),
)
_states = st.sampled_from(["absent", "first_sight", "exists", "deleted"])


class StoreContract:
    """Behaviour every VersionStore shows; subclasses provide `store`."""

    # -- reads ---------------------------------------------------------------

    async def test_observe_mints_once_then_is_stable(self, store: Any) -> None:
        key = fresh_key()
        before = time.time_ns() // 1_000_000
        first = await store.observe(key)
        again = await store.observe(key)
        after = time.time_ns() // 1_000_000
        assert first.minted is Cause.FIRST_SIGHT
        assert again.minted is None
        assert again.version == first.version
        assert not first.pending and not again.pending
        # Never seen answering 2xx: no representation is known to exist yet.
        assert first.version.exists is False
        assert before - 1000 <= first.version.minted_ms <= after + 1000
        token = first.version.token
        assert len(token) >= 20 and token.isalnum() and token == token.lower()

    async def test_concurrent_first_observers_share_one_token(self, store: Any) -> None:
        key = fresh_key()
        seen = await asyncio.gather(*(store.observe(key) for _ in range(10)))
        assert len({o.version.token for o in seen}) == 1
        assert sum(o.minted is Cause.FIRST_SIGHT for o in seen) == 1

    async def test_keys_are_independent_whatever_their_characters(self, store: Any) -> None:
        keys = ["/a", "/a{x}", "/a%7Bx%7D", "{", "}", "}{", "/b}/c", "%", "%00", ""]
        tokens = {key: (await store.observe(key)).version.token for key in keys}
        assert len(set(tokens.values())) == len(keys)
        begun = await store.begin("/a{x}", NO_PRECONDITION, "w", HELD_MS, 0)
        assert begun.status is BeginStatus.OK
        for key in keys:
            seen = await store.observe(key)
            assert seen.version.token == tokens[key]
            assert seen.pending is (key == "/a{x}")

    async def test_confirm_marks_the_version_as_existing(self, store: Any) -> None:
        key = fresh_key()
        token = (await store.observe(key)).version.token
        await store.confirm(key, "not-the-token")
        assert (await store.observe(key)).version.exists is False
        assert (await store.begin(key, if_match(token), "a", HELD_MS, 0)).status is BeginStatus.PRECONDITION_FAILED
        await store.confirm(key, token)
        seen = await store.observe(key)
        assert seen.version.exists is True and seen.version.token == token
        assert (await store.begin(key, if_match(token), "b", HELD_MS, 0)).status is BeginStatus.OK

    async def test_reader_records_are_per_key_and_reader_and_expire(self, store: Any) -> None:
        key, other = fresh_key(), fresh_key()
        assert (await store.observe(key, reader="alice")).reader_seen is False
        await store.record_reader(key, "alice", 60_000)
        await store.record_reader(key, "bob", SHORT_MS)
        assert (await store.observe(key, reader="alice")).reader_seen is True
        assert (await store.observe(key, reader="carol")).reader_seen is False
        assert (await store.observe(other, reader="alice")).reader_seen is False
        assert (await store.observe(key)).reader_seen is False
        assert (await store.observe(key, reader="bob")).reader_seen is True
        await asyncio.sleep(PAST_SHORT_S)
        assert (await store.observe(key, reader="bob")).reader_seen is False
        assert (await store.observe(key, reader="alice")).reader_seen is True

    # -- writes --------------------------------------------------------------

    async def test_success_mints_a_new_token_and_the_old_one_fails(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        begun = await store.begin(key, if_match(v0.token), "w1", HELD_MS, 0)
        assert begun == BeginResult(BeginStatus.OK, v0, begun.waited_ms)
        ended = await store.end(key, "w1", Outcome.SUCCESS)
        v1 = ended.committed
        assert not ended.lease_lost and v1 is not None
        assert v1.token != v0.token and v1.exists and v1.minted_ms >= v0.minted_ms
        seen = await store.observe(key)
        assert seen.version == v1 and seen.minted is None
        stale = await store.begin(key, if_match(v0.token), "w2", HELD_MS, 0)
        assert (stale.status, stale.current) == (BeginStatus.PRECONDITION_FAILED, v1)
        assert (await store.begin(key, if_match(v1.token), "w3", HELD_MS, 0)).status is BeginStatus.OK

    async def test_rejected_write_keeps_the_token(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        assert (await store.begin(key, if_match(v0.token), "w1", HELD_MS, 0)).status is BeginStatus.OK
        ended = await store.end(key, "w1", Outcome.REJECTED)
        assert ended.committed == v0 and not ended.lease_lost
        assert (await store.observe(key)).version == v0
        assert (await store.begin(key, if_match(v0.token), "w2", HELD_MS, 0)).status is BeginStatus.OK

    async def test_unknown_outcome_mints(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, if_match(v0.token), "w1", HELD_MS, 0)
        v1 = (await store.end(key, "w1", Outcome.UNKNOWN)).committed
        assert v1 is not None and v1.token != v0.token
        assert (await store.begin(key, if_match(v0.token), "w2", HELD_MS, 0)).status is BeginStatus.PRECONDITION_FAILED

    async def test_reads_during_a_write_see_it_pending(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, NO_PRECONDITION, "w1", HELD_MS, 0)
        during = await store.observe(key)
        assert during.pending and during.version == v0 and during.minted is None
        await store.end(key, "w1", Outcome.SUCCESS)
        assert not (await store.observe(key)).pending

    async def test_end_by_another_owner_is_lease_lost_and_changes_nothing(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, NO_PRECONDITION, "w1", HELD_MS, 0)
        assert await store.end(key, "intruder", Outcome.SUCCESS) == EndResult(None, lease_lost=True)
        assert (await store.observe(key)).pending
        assert (await store.end(key, "w1", Outcome.REJECTED)).committed == v0
        assert (await store.end(key, "w1", Outcome.SUCCESS)).lease_lost

    async def test_a_second_begin_by_the_same_owner_does_not_share_the_lease(self, store: Any) -> None:
        key = fresh_key()
        await committed(store, key)
        assert (await store.begin(key, NO_PRECONDITION, "same", HELD_MS, 0)).status is BeginStatus.OK
        assert (await store.begin(key, NO_PRECONDITION, "same", HELD_MS, 20)).status is BeginStatus.BUSY

    async def test_create_only_with_if_none_match_star(self, store: Any) -> None:
        key = fresh_key()
        assert (await store.begin(key, if_none_match("*"), "w1", HELD_MS, 0)).status is BeginStatus.OK
        created = (await store.end(key, "w1", Outcome.SUCCESS, exists=True)).committed
        assert created is not None and created.exists
        second = await store.begin(key, if_none_match("*"), "w2", HELD_MS, 0)
        assert (second.status, second.current) == (BeginStatus.PRECONDITION_FAILED, created)

    async def test_if_match_star_needs_a_current_representation(self, store: Any) -> None:
        key = fresh_key()
        absent = await store.begin(key, if_match("*"), "w1", HELD_MS, 0)
        assert (absent.status, absent.current) == (BeginStatus.PRECONDITION_FAILED, None)
        await store.observe(key)  # first sight: not known to exist
        assert (await store.begin(key, if_match("*"), "w2", HELD_MS, 0)).status is BeginStatus.PRECONDITION_FAILED
        key2 = fresh_key()
        await committed(store, key2)
        assert (await store.begin(key2, if_match("*"), "w3", HELD_MS, 0)).status is BeginStatus.OK

    async def test_delete_leaves_a_version_that_does_not_exist(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, if_match(v0.token), "del", HELD_MS, 0)
        gone = (await store.end(key, "del", Outcome.SUCCESS, exists=False)).committed
        assert gone is not None and not gone.exists and gone.token != v0.token
        assert (await store.observe(key)).version == gone
        for cond in (if_match(gone.token), if_match("*"), if_match(v0.token)):
            assert (await store.begin(key, cond, "w", HELD_MS, 0)).status is BeginStatus.PRECONDITION_FAILED
        recreate = await store.begin(key, if_none_match("*"), "create", HELD_MS, 0)
        assert (recreate.status, recreate.current) == (BeginStatus.OK, gone)

    async def test_rejected_write_on_a_key_without_version(self, store: Any) -> None:
        key = fresh_key()
        await store.begin(key, NO_PRECONDITION, "w1", HELD_MS, 0)
        ended = await store.end(key, "w1", Outcome.REJECTED)
        assert not ended.lease_lost
        # Whatever is committed now, no If-Match can pass: nothing exists.
        assert (await store.begin(key, if_match("*"), "w2", HELD_MS, 0)).status is BeginStatus.PRECONDITION_FAILED

    # -- leases --------------------------------------------------------------

    async def test_expired_lease_mints_and_its_end_is_lease_lost(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, if_match(v0.token), "slow", SHORT_MS, 0)
        assert (await store.observe(key)).pending
        await asyncio.sleep(PAST_SHORT_S)
        seen = await store.observe(key)
        assert seen.minted is Cause.LEASE_EXPIRED and not seen.pending
        assert seen.version.token != v0.token and seen.version.exists == v0.exists
        ended = await store.end(key, "slow", Outcome.SUCCESS)
        assert ended.lease_lost and ended.committed is None
        assert (await store.observe(key)).version == seen.version

    async def test_end_after_the_deadline_is_lease_lost(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, if_match(v0.token), "slow", SHORT_MS, 0)
        await asyncio.sleep(PAST_SHORT_S)
        assert (await store.end(key, "slow", Outcome.REJECTED)).lease_lost
        after = await store.observe(key)
        assert after.version.token != v0.token and not after.pending

    async def test_begin_after_an_expired_lease_judges_a_new_token(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, NO_PRECONDITION, "crashed", SHORT_MS, 0)
        late = await store.begin(key, if_match(v0.token), "late", HELD_MS, 2_000)
        assert late.status is BeginStatus.PRECONDITION_FAILED
        assert late.current is not None and late.current.token != v0.token
        assert (await store.begin(key, if_match(late.current.token), "next", HELD_MS, 0)).status is BeginStatus.OK

    async def test_busy_once_wait_runs_out(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, NO_PRECONDITION, "holder", HELD_MS, 0)
        now = await store.begin(key, NO_PRECONDITION, "impatient", HELD_MS, 0)
        assert (now.status, now.current) == (BeginStatus.BUSY, v0)
        start = time.monotonic()
        later = await store.begin(key, NO_PRECONDITION, "patient", HELD_MS, 50)
        assert (later.status, later.current) == (BeginStatus.BUSY, v0)
        assert later.waited_ms >= 50 and time.monotonic() - start >= 0.05
        assert (await store.observe(key)).pending

    @pytest.mark.parametrize("outcome", [Outcome.REJECTED, Outcome.SUCCESS])
    async def test_waiter_proceeds_as_soon_as_the_write_ends(self, store: Any, outcome: Outcome) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, if_match(v0.token), "first", HELD_MS, 0)
        waiter = asyncio.ensure_future(store.begin(key, if_match(v0.token), "second", HELD_MS, 5_000))
        await asyncio.sleep(0.03)
        assert not waiter.done()
        ended = await store.end(key, "first", outcome)
        released = time.monotonic()
        result = await asyncio.wait_for(waiter, 2)
        assert time.monotonic() - released < 0.2
        assert result.current == ended.committed
        expected = BeginStatus.OK if outcome is Outcome.REJECTED else BeginStatus.PRECONDITION_FAILED
        assert result.status is expected and result.waited_ms >= 30

    async def test_one_winner_among_concurrent_writers_with_one_tag(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)

        async def writer(n: int) -> BeginStatus:
            begun = await store.begin(key, if_match(v0.token), f"w{n}", HELD_MS, 3_000)
            if begun.status is BeginStatus.OK:
                await asyncio.sleep(0.005)  # the upstream's time
                await store.end(key, f"w{n}", Outcome.SUCCESS)
            return begun.status  # type: ignore[no-any-return]

        statuses = await asyncio.gather(*(writer(n) for n in range(8)))
        assert statuses.count(BeginStatus.OK) == 1
        assert statuses.count(BeginStatus.PRECONDITION_FAILED) == 7

    # -- invalidation and fingerprints ---------------------------------------

    async def test_invalidate_committed_and_absent_keys(self, store: Any) -> None:
        key, never_seen = fresh_key(), fresh_key()
        v0 = await committed(store, key)
        await store.invalidate([key, never_seen])
        seen = await store.observe(key)
        assert seen.version.token != v0.token and seen.version.exists == v0.exists
        assert (await store.begin(key, if_match(v0.token), "w", HELD_MS, 0)).status is BeginStatus.PRECONDITION_FAILED
        assert (await store.observe(never_seen)).minted is Cause.FIRST_SIGHT
        await store.invalidate([])

    async def test_invalidate_during_a_write_makes_its_end_mint(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        await store.begin(key, if_match(v0.token), "w1", HELD_MS, 0)
        await store.invalidate([key])
        assert (await store.observe(key)).pending
        after = (await store.end(key, "w1", Outcome.REJECTED)).committed
        assert after is not None and after.token != v0.token and after.exists == v0.exists
        # The mark belonged to that write only.
        await store.begin(key, NO_PRECONDITION, "w2", HELD_MS, 0)
        assert (await store.end(key, "w2", Outcome.REJECTED)).committed == after

    async def test_fingerprint_mints_when_the_body_changes(self, store: Any) -> None:
        key = fresh_key()
        v0 = await committed(store, key)
        assert await store.fingerprint(key, v0.token, "digest-1") == v0
        assert await store.fingerprint(key, v0.token, "digest-1") == v0
        v1 = await store.fingerprint(key, v0.token, "digest-2")
        assert v1 is not None and v1.token != v0.token and v1.exists
        assert (await store.observe(key)).version == v1
        assert await store.fingerprint(key, v0.token, "digest-2") is None
        # The disagreeing digest is no baseline: the next read under v1 sets it.
        assert await store.fingerprint(key, v1.token, "digest-1") == v1
        assert await store.fingerprint(key, v1.token, "digest-2") != v1
        await store.begin(key, NO_PRECONDITION, "w", HELD_MS, 0)
        assert await store.fingerprint(key, v1.token, "digest-3") is None
        assert await store.fingerprint(fresh_key(), v1.token, "digest-3") is None

    # -- replay records ------------------------------------------------------

    async def test_replay_records_round_trip_per_key_and_expire(self, store: Any) -> None:
        key = fresh_key()
        record = Replay(
            "fp-1",
            201,
            (("ETag", '"abc"'), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Ü", "é")),
            bytes(range(256)),
        )
        await store.put_replay(key, "idem-1", record, 60_000)
        await store.put_replay(key, "idem-2", Replay("fp-2", 200, (), b""), SHORT_MS)
        assert await store.get_replay(key, "idem-1") == record
        assert await store.get_replay(key, "idem-2") == Replay("fp-2", 200, (), b"")
        assert await store.get_replay(key, "idem-3") is None
        assert await store.get_replay(fresh_key(), "idem-1") is None
        await asyncio.sleep(PAST_SHORT_S)
        assert await store.get_replay(key, "idem-2") is None
        assert await store.get_replay(key, "idem-1") == record

    # -- inspect -------------------------------------------------------------

    async def test_inspect_shows_each_state(self, store: Any) -> None:
        key = fresh_key()
        info = await store.inspect(key)
        assert (info.key, info.state, info.version, info.owner, info.deadline_ms) == (key, "absent", None, None, None)
        v0 = await committed(store, key)
        info = await store.inspect(key)
        assert (info.key, info.state, info.version, info.owner) == (key, "committed", v0, None)
        before = time.time_ns() // 1_000_000
        await store.begin(key, NO_PRECONDITION, "w1", HELD_MS, 0)
        info = await store.inspect(key)
        assert (info.state, info.version, info.owner) == ("pending", v0, "w1")
        assert info.deadline_ms is not None
        assert before + HELD_MS - 1000 <= info.deadline_ms <= before + HELD_MS + 1000

    # -- agreement with base.evaluate_write ----------------------------------

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        # One store serves all examples (each uses a fresh key); each
        # subclass runs the test against another store, on purpose.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(state=_states, im=_tag_lists, ius=_unmodified_since, inm=_tag_lists)
    # Each branch of evaluate_write at least once, whatever hypothesis draws:
    @example(state="exists", im=("CUR",), ius=("relative", -1), inm=None)  # If-Match wins over IUS
    @example(state="exists", im=None, ius=("relative", -1), inm=None)
    @example(state="exists", im=None, ius=("relative", 0), inm=None)
    @example(state="exists", im=None, ius=("absolute", 2**63), inm=None)
    @example(state="exists", im=None, ius=("absolute", -(2**63)), inm=None)
    @example(state="absent", im=None, ius=("absolute", 0), inm=None)
    @example(state="exists", im=("*", "other"), ius=None, inm=None)  # "*" in a list is no wildcard
    @example(state="exists", im=("other", "CUR"), ius=None, inm=None)
    @example(state="exists", im=(), ius=None, inm=None)
    @example(state="first_sight", im=("*",), ius=None, inm=None)
    @example(state="exists", im=None, ius=None, inm=("other", "CUR"))
    @example(state="exists", im=("CUR",), ius=None, inm=("other",))
    @example(state="deleted", im=None, ius=None, inm=("*",))
    @example(state="deleted", im=("CUR",), ius=None, inm=None)
    async def test_begin_agrees_with_evaluate_write(self, store: Any, state: str, im: Any, ius: Any, inm: Any) -> None:
        key = fresh_key()
        current: Version | None = None
        if state == "first_sight":
            current = (await store.observe(key)).version
        elif state != "absent":
            current = await committed(store, key, exists=state == "exists")
        token = current.token if current is not None else "never-minted"

        def bind(tags: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if tags is None else tuple(token if t == "CUR" else t for t in tags)

        since = None
        if ius is not None:
            base = current.minted_ms // 1000 if current is not None else int(time.time())
            since = base + ius[1] if ius[0] == "relative" else ius[1]
        cond = WriteCondition(if_match=bind(im), if_unmodified_since=since, if_none_match=bind(inm))
        begun = await store.begin(key, cond, "judge", HELD_MS, 0)
        expected = BeginStatus.OK if evaluate_write(cond, current) else BeginStatus.PRECONDITION_FAILED
        assert (begun.status, begun.current) == (expected, current), cond
