"""The version store contract shared by the memory and Redis stores.

One store key per resource holds either a *committed* version or a *pending*
write (DESIGN.md §2). Stores implement the protocol below; the pure
`evaluate_write` here is the single definition of how a write's
preconditions are judged against the committed version, which the Redis Lua
scripts mirror (the contract tests check both agree).

The values built on every request (`Version`, `WriteCondition`,
`Observation`, `BeginResult`, `EndResult`) are NamedTuples: as immutable
as frozen dataclasses, and built in about half the time.

Errors::

    StoreError            the store could not answer (down, timeout, protocol)
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from etagproxy.randomness import random_bytes


class StoreError(Exception):
    """The store did not answer in time or at all; callers fail closed (503).

    `kind` says which, for the log: store-timeout, store-unreachable,
    store-full (Redis at maxmemory with noeviction refuses writes) or
    store-error."""

    def __init__(self, message: str, kind: str = "store-error") -> None:
        super().__init__(message)
        self.kind = kind


# Every pair of lower-case base32 letters (RFC 4648 alphabet), indexed by
# the 10 bits they encode: a token is 12 lookups instead of
# `base64.b32encode` (pure Python on 3.11), with the same output.
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def new_token() -> str:
    """A fresh version token: 120 random bits as 24 lower-case base32 letters
    (what `base64.b32encode(...).lower()` gives for the same 15 bytes).

    The alphabet has no `-`, so `"<token>-<variant>"` splits unambiguously.
    """
    n = int.from_bytes(random_bytes(15), "big")
    t = _B32_PAIRS
    return (
        t[n >> 110] + t[(n >> 100) & 1023] + t[(n >> 90) & 1023] + t[(n >> 80) & 1023]
        + t[(n >> 70) & 1023] + t[(n >> 60) & 1023] + t[(n >> 50) & 1023] + t[(n >> 40) & 1023]
        + t[(n >> 30) & 1023] + t[(n >> 20) & 1023] + t[(n >> 10) & 1023] + t[n & 1023]
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Version(NamedTuple):
    """A committed version of one resource key."""

    token: str
    """Random, URL-safe, >= 96 bits; never reused."""
    minted_ms: int
    """Wall-clock milliseconds when the token was minted (Last-Modified)."""
    exists: bool = True
    """Whether the resource is known to have a current representation: set by
    a 2xx write or `confirm` (a 2xx read); False for a version minted at
    first sight (until confirmed) and after a successful DELETE. `If-Match: *`
    needs it, `If-None-Match: *` refuses it."""
    epoch: str = ""
    """Store epoch the version was committed in (Redis run_id)."""


class Cause(enum.Enum):
    """Why a token was minted (metrics label)."""

    FIRST_SIGHT = "first_sight"
    WRITE = "write"
    UNKNOWN_OUTCOME = "unknown_outcome"
    INVALIDATED = "invalidated"
    FINGERPRINT = "fingerprint"
    EPOCH = "epoch"
    LEASE_EXPIRED = "lease_expired"


class WriteCondition(NamedTuple):
    """The preconditions of one unsafe request, reduced to what BEGIN checks.

    Built by `preconditions.write_condition()` from the request headers.
    RFC 9110 §13.2.2: If-Match, else If-Unmodified-Since; then If-None-Match.
    """

    if_match: tuple[str, ...] | None = None
    """None: header absent. ("*",): any current version. Otherwise the version
    tokens a strong comparison accepts (token part of each strong tag); an
    empty tuple never matches (weak-only or malformed list)."""
    if_unmodified_since: int | None = None
    """Seconds since the epoch; only set when If-Match is absent."""
    if_none_match: tuple[str, ...] | None = None
    """None: absent. ("*",): fails if a current version exists. Otherwise
    tokens that fail the request if one equals the current token."""

    @property
    def has_precondition(self) -> bool:
        """True when the request is conditional on the resource's state (for
        428): If-Match, If-Unmodified-Since, or `If-None-Match: *` (create
        only, RFC 9110 §13.1.2), which a lost update cannot slip past either."""
        return (
            self.if_match is not None
            or self.if_unmodified_since is not None
            or self.if_none_match == ("*",)
        )


def evaluate_write(cond: WriteCondition, current: Version | None) -> bool:
    """True when the write may proceed against `current` (None: no version).

    A key with no version has no current representation as far as the proxy
    knows: `If-Match` (even `*`) fails, `If-None-Match: *` passes.
    """
    exists = current is not None and current.exists
    if cond.if_match is not None:
        if not exists:
            return False
        assert current is not None
        if cond.if_match != ("*",) and current.token not in cond.if_match:
            return False
    elif cond.if_unmodified_since is not None and exists:
        assert current is not None
        if current.minted_ms // 1000 > cond.if_unmodified_since:
            return False
    if cond.if_none_match is not None and exists:
        assert current is not None
        if cond.if_none_match == ("*",) or current.token in cond.if_none_match:
            return False
    return True


class Outcome(enum.Enum):
    """What END learned about the upstream's handling of the write."""

    SUCCESS = "success"
    """2xx or 303: the change was applied; mint a new token."""
    REJECTED = "rejected"
    """4xx: nothing changed; keep the committed token."""
    UNKNOWN = "unknown"
    """5xx, other 3xx, timeout, reset, cancellation: mint a new token, send
    no ETag. See etagproxy/outcome.py."""


class BeginStatus(enum.Enum):
    OK = "ok"
    """The caller now holds the key's write lease."""
    PRECONDITION_FAILED = "precondition_failed"
    """412: the condition did not hold; nothing was written."""
    BUSY = "busy"
    """409: another write held the key for longer than `wait`."""


class Observation(NamedTuple):
    """What a read learned about a key (one round trip)."""

    version: Version
    """The committed version (minted now if the key had none)."""
    pending: bool
    """A write is in flight on this key: the read must not get a fresh ETag."""
    minted: Cause | None = None
    """Set when this observation minted the version, and why."""
    reader_seen: bool = False
    """`reader` (a credential hash) saw a 2xx for this key within its TTL."""


class BeginResult(NamedTuple):
    status: BeginStatus
    current: Version | None
    """The committed version BEGIN judged against (None: key had none)."""
    waited_ms: int = 0
    """How long BEGIN waited behind another write."""


class EndResult(NamedTuple):
    committed: Version | None
    """The version now committed; None when the lease was lost."""
    lease_lost: bool = False
    """The key no longer held our pending value: send no ETag, count it."""


@dataclass(frozen=True, slots=True)
class Replay:
    """A recorded 2xx write response for safe retries (Idempotency-Key)."""

    fingerprint: str
    """Hash of (If-Match, body, credentials) of the original request."""
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """`etagproxy inspect` view of a key."""

    key: str
    state: str
    """"absent", "committed" or "pending"."""
    version: Version | None = None
    owner: str | None = None
    deadline_ms: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


class VersionStore(Protocol):
    """Both stores implement this; see tests/store_contract.py."""

    epoch: str

    def observe(self, key: str, *, reader: str | None = None) -> Awaitable[Observation]:
        """Return the committed version of `key`, minting one (exists=False)
        if it has none (or its pending write's deadline passed, or it is from
        another epoch). `reader`, if given, is checked against readers recorded by
        `record_reader`. An awaitable rather than a coroutine: RedisStore hands
        back the coroutine that answers (one coroutine layer less per read)."""
        ...

    async def confirm(self, key: str, token: str) -> None:
        """A read of `key` at `token` got a 2xx: mark the version as existing
        (only if `token` is still the committed one). Called when an
        observation's version has `exists` False, so at most once per mint."""
        ...

    async def record_reader(self, key: str, reader: str, ttl_ms: int) -> None:
        """Remember that credentials `reader` received a 2xx for `key`."""
        ...

    async def begin(
        self, key: str, cond: WriteCondition, owner: str, lease_ms: int, wait_ms: int
    ) -> BeginResult:
        """Atomically: wait (up to wait_ms) while another write holds the key,
        evaluate `cond` with `evaluate_write`, and on success store
        pending(owner, now + lease_ms) with no expiry."""
        ...

    async def end(
        self, key: str, owner: str, outcome: Outcome, *, exists: bool = True
    ) -> EndResult:
        """If `key` still holds owner's pending value, commit: a new token on
        SUCCESS/UNKNOWN (with `exists`), the old one on REJECTED (a new one if
        the key was invalidated meanwhile)."""
        ...

    async def put_replay(self, key: str, idem: str, record: Replay, ttl_ms: int) -> None:
        """Record a 2xx write response under idempotency key hash `idem`."""
        ...

    async def invalidate(self, keys: list[str]) -> None:
        """Mint new tokens for `keys`; a pending key is marked so that its
        END mints a new token whatever the outcome."""
        ...

    async def fingerprint(self, key: str, token: str, digest: str) -> Version | None:
        """Reads of a `fingerprint` route: if `key` is committed at `token`
        and its recorded body digest differs from `digest` (and one was
        recorded), mint a new token and forget the digest; otherwise record
        `digest`. Returns the version now committed (a new token means the
        caller's body must go out without ETag), or None if the key moved on
        meanwhile."""
        ...

    async def get_replay(self, key: str, idem: str) -> Replay | None:
        """The recorded response for idempotency key hash `idem`, if any."""
        ...

    async def inspect(self, key: str) -> KeyInfo: ...

    async def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        ...

    async def server_settings(self) -> dict[str, str]:
        """What the server says of itself that the proxy checks at start:
        `redis_version` and `maxmemory_policy` where known (empty for the
        memory store)."""
        ...

    async def close(self) -> None: ...
