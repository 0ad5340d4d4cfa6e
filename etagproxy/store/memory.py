"""The embedded single-process version store (`memory://`).

Implements the BEGIN/END write protocol of DESIGN.md §2 with plain dicts and
asyncio primitives. Everything runs on one event loop, so each method body
between awaits is atomic, exactly like a Lua script in Redis.

Deadlines use the monotonic clock; mint times use wall-clock milliseconds
(they become `Last-Modified`). Memory is bounded: committed versions expire
after `token_ttl_ms` and at most `max_keys` are kept (the oldest committed
ones are dropped first, which only ever leads to a fresh token, never to an
old one being revived). Pending writes are never dropped.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from etagproxy.store.base import (
    BeginResult,
    BeginStatus,
    Cause,
    EndResult,
    KeyInfo,
    Observation,
    Outcome,
    Replay,
    Version,
    WriteCondition,
    evaluate_write,
    new_token,
    now_ms,
)

WEEK_MS = 7 * 86_400_000


@dataclass(slots=True)
class _Entry:
    version: Version | None
    """Committed version (under a pending write: the one to restore)."""
    expires: float
    """Monotonic second at which the committed version is forgotten."""
    digest: str | None = None
    owner: str | None = None
    deadline: float = 0.0
    invalidated: bool = False
    released: asyncio.Event | None = None
    """Set when the pending write ends; BEGIN waiters block on it."""


class MemoryStore:
    """A `VersionStore` for one process (one worker)."""

    def __init__(
        self,
        *,
        token_ttl_ms: int = WEEK_MS,
        max_keys: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.epoch = os.urandom(8).hex()
        self._ttl = token_ttl_ms / 1000
        self._max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._readers: dict[tuple[str, str], float] = {}
        self._replays: dict[tuple[str, str], tuple[Replay, float]] = {}

    # -- helpers ---------------------------------------------------------

    def _mint(self, exists: bool) -> Version:
        return Version(new_token(), now_ms(), exists, self.epoch)

    def _current(self, key: str, now: float) -> tuple[_Entry | None, Cause | None]:
        """The live entry for `key` after applying expiry and lease rules.

        Returns the entry (None if absent) and the cause if this call minted.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None, None
        if entry.owner is not None:
            if entry.deadline > now:
                return entry, None
            # DESIGN §2.5: a pending value whose deadline passed is an
            # unknown outcome: the write may or may not have landed.
            exists = entry.version.exists if entry.version else False
            self._release(entry)
            entry.version = self._mint(exists)
            entry.expires = now + self._ttl
            entry.digest = None
            return entry, Cause.LEASE_EXPIRED
        if entry.expires <= now:
            del self._entries[key]
            return None, None
        return entry, None

    def _release(self, entry: _Entry) -> None:
        entry.owner = None
        entry.invalidated = False
        if entry.released is not None:
            entry.released.set()
            entry.released = None

    def _insert(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        if len(self._entries) > self._max_keys:
            for old_key, old in self._entries.items():
                if old.owner is None and old_key != key:
                    del self._entries[old_key]
                    break

    # -- VersionStore ------------------------------------------------------

    async def observe(self, key: str, *, reader: str | None = None) -> Observation:
        now = self._clock()
        entry, cause = self._current(key, now)
        if entry is None:
            entry = _Entry(self._mint(False), now + self._ttl)
            self._insert(key, entry)
            cause = Cause.FIRST_SIGHT
        elif entry.version is None:
            # A create in flight on a key nobody had read: give readers a
            # version to hang on to; REJECTED will restore it.
            entry.version = self._mint(False)
            cause = Cause.FIRST_SIGHT
        seen = False
        if reader is not None:
            until = self._readers.get((key, reader))
            seen = until is not None and until > now
        # Not None: minted above where it was (mypy cannot see it for the new entry).
        return Observation(entry.version, entry.owner is not None, cause, seen)  # type: ignore[arg-type]

    async def confirm(self, key: str, token: str) -> None:
        entry, _ = self._current(key, self._clock())
        if entry is not None and entry.version is not None and entry.version.token == token:
            if not entry.version.exists:
                entry.version = entry.version._replace(exists=True)

    async def record_reader(self, key: str, reader: str, ttl_ms: int) -> None:
        now = self._clock()
        if len(self._readers) > self._max_keys:
            self._readers = {k: v for k, v in self._readers.items() if v > now}
        self._readers[(key, reader)] = now + ttl_ms / 1000

    async def begin(
        self, key: str, cond: WriteCondition, owner: str, lease_ms: int, wait_ms: int
    ) -> BeginResult:
        start = self._clock()
        give_up = start + wait_ms / 1000
        while True:
            now = self._clock()
            entry, _ = self._current(key, now)
            if entry is None or entry.owner is None:
                break
            remaining = min(give_up, entry.deadline) - now
            if now >= give_up:
                waited = int((now - start) * 1000)
                return BeginResult(BeginStatus.BUSY, entry.version, waited)
            if entry.released is None:
                entry.released = asyncio.Event()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    await entry.released.wait()
            except TimeoutError:
                pass
        waited = int((self._clock() - start) * 1000)
        current = entry.version if entry is not None else None
        if not evaluate_write(cond, current):
            return BeginResult(BeginStatus.PRECONDITION_FAILED, current, waited)
        if entry is None:
            entry = _Entry(None, now + self._ttl)
            self._insert(key, entry)
        entry.owner = owner
        entry.deadline = now + lease_ms / 1000
        entry.invalidated = False
        return BeginResult(BeginStatus.OK, current, waited)

    async def end(
        self,
        key: str,
        owner: str,
        outcome: Outcome,
        *,
        exists: bool = True,
    ) -> EndResult:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or entry.owner != owner or entry.deadline <= now:
            # Lease lost: the deadline passed (someone may already have
            # minted past us) — whatever is there now is not ours to touch.
            return EndResult(None, lease_lost=True)
        if outcome is Outcome.REJECTED and not entry.invalidated and entry.version is not None:
            committed = entry.version
        else:
            if outcome is Outcome.REJECTED:
                exists = entry.version.exists if entry.version else False
            committed = self._mint(exists)
            entry.digest = None
        entry.version = committed
        entry.expires = now + self._ttl
        self._release(entry)
        self._entries.move_to_end(key)
        return EndResult(committed)

    async def put_replay(self, key: str, idem: str, record: Replay, ttl_ms: int) -> None:
        now = self._clock()
        if len(self._replays) > self._max_keys:
            self._replays = {k: v for k, v in self._replays.items() if v[1] > now}
        self._replays[(key, idem)] = (record, now + ttl_ms / 1000)

    async def invalidate(self, keys: list[str]) -> None:
        now = self._clock()
        for key in keys:
            entry, _ = self._current(key, now)
            if entry is None:
                continue  # no version: the next read mints one anyway
            if entry.owner is not None:
                entry.invalidated = True
                continue
            assert entry.version is not None
            entry.version = self._mint(entry.version.exists)
            entry.expires = now + self._ttl
            entry.digest = None

    async def fingerprint(self, key: str, token: str, digest: str) -> Version | None:
        entry, _ = self._current(key, self._clock())
        if entry is None or entry.owner is not None or entry.version is None:
            return None
        if entry.version.token != token:
            return None
        if entry.digest is not None and entry.digest != digest:
            # Not a baseline: reads may finish out of order (see fingerprint.lua).
            entry.version = self._mint(True)
            entry.digest = None
            return entry.version
        entry.digest = digest
        return entry.version

    async def get_replay(self, key: str, idem: str) -> Replay | None:
        item = self._replays.get((key, idem))
        if item is None:
            return None
        record, until = item
        if until <= self._clock():
            del self._replays[(key, idem)]
            return None
        return record

    async def inspect(self, key: str) -> KeyInfo:
        entry, _ = self._current(key, self._clock())
        if entry is None:
            return KeyInfo(key, "absent")
        if entry.owner is not None:
            deadline = now_ms() + int((entry.deadline - self._clock()) * 1000)
            return KeyInfo(key, "pending", entry.version, entry.owner, deadline)
        return KeyInfo(key, "committed", entry.version)

    async def ping(self) -> None:
        return None

    async def server_settings(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.released is not None:
                entry.released.set()
