"""A write's hold on its resources: how long the lease lasts, and its end.

`Leases.end` is END, finished even when its caller is cancelled (a client
that hangs up must not leave a lease behind), for the write's key and the
members of a bulk write, with the outcome's metrics. `release_unanswered` ends a BEGIN
whose reply never came. Owns no decisions: which outcome a write has is
outcome.py's, when to end is writes.py's.
"""

from __future__ import annotations

import asyncio

from etagproxy.config import Config
from etagproxy.exchange import Exchange
from etagproxy.forwarding import Forwarding
from etagproxy.store.base import (
    Cause,
    Outcome,
    StoreError,
    Version,
)

LATE_HOLD_S = 0.9
"""How long past the upstream deadline a timed-out write keeps its lease:
most of the lease's 1 s margin (`lease_ms`), so END still lands in time."""


def lease_ms(config: Config) -> int:
    """How long a write holds its resource.

    The lease outlives the upstream deadline by the time BEGIN's answer and
    END's request can take (DESIGN §2.3: strictly shorter). With
    min_replicas, BEGIN's answer can take min_replicas_timeout more.
    """
    t = config.timeouts
    replicas = config.store.min_replicas_timeout * (config.store.min_replicas > 0)
    return int((t.upstream + 2 * t.store + replicas + 1.0) * 1000)


class Leases:
    """BEGIN's counterpart for one process's store (`io.store`)."""

    def __init__(self, io: Forwarding) -> None:
        self.io = io
        t = io.config.timeouts
        self.lease_ms = lease_ms(io.config)
        self.wait_ms = int(t.write_wait * 1000)
        self.retry_after = str(max(1, int(t.write_wait + 0.999)))

    async def end(
        self, ex: Exchange, key: str, owner: str, outcome: Outcome, *, exists: bool = True
    ) -> Version | None:
        """END, for the write's key and the members of a bulk write
        (`ex.members`), with the same outcome.

        A client that hangs up must not leave a lease behind, nor must a
        handler cut by the shutdown. END is awaited here directly, not in a
        shielded task of its own (that task cost 4 % of a PUT's instructions,
        bench/instructions.py). Usually, by the time the caller can be
        cancelled, its command is queued on the store's connection, which
        sends and runs it whatever happens to the caller. It may not be yet:
        the key's END waits for the members' first, and a reconnect comes
        before sending. So a cancelled END is sent again for every key in
        the background (`_end_again`). An END repeated after the first one
        landed finds the lease gone and changes nothing.
        """
        members, ex.members = ex.members, ()
        try:
            result = await self._end_all(ex, key, owner, outcome, exists, members)
        except StoreError:
            return None
        except asyncio.CancelledError:
            for k in (key, *members):
                self.io.spawn(self._end_again(k, owner, outcome, exists))
            raise
        if result.lease_lost:  # type: ignore[attr-defined]
            self.io.metrics.lease_lost.inc()
            ex.decision = "lease_lost"
            return None
        if outcome is not Outcome.REJECTED:
            self.io.minted(Cause.WRITE if outcome is Outcome.SUCCESS else Cause.UNKNOWN_OUTCOME)
        return result.committed  # type: ignore[attr-defined,no-any-return]

    async def _end_all(
        self, ex: Exchange, key: str, owner: str, outcome: Outcome, exists: bool, members: tuple[str, ...]
    ) -> object:
        if members:
            results = await asyncio.gather(
                *(self.io.store.end(m, owner, outcome, exists=exists) for m in members), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) or result.lease_lost:
                    self.io.metrics.lease_lost.inc()
                elif outcome is not Outcome.REJECTED:
                    self.io.minted(Cause.WRITE if outcome is Outcome.SUCCESS else Cause.UNKNOWN_OUTCOME)
        return await self.io.timed_store(ex, "end", self.io.store.end(key, owner, outcome, exists=exists))

    async def _end_again(self, key: str, owner: str, outcome: Outcome, exists: bool) -> None:
        """END once more for a caller cancelled mid-END; tried again only
        while the store does not answer. Any answer is final: BEGIN was
        answered, so a lost lease means the first END landed (or the lease
        ran out) and there is nothing left to end."""
        delay = 0.05
        for _ in range(5):
            try:
                await self.io.store.end(key, owner, outcome, exists=exists)
                return
            except StoreError:
                await asyncio.sleep(delay)  # backoff between retries, not a guess at an event
                delay *= 2

    async def release_unanswered(
        self, key: str, owner: str, outcome: Outcome = Outcome.REJECTED, mint: list[str] | None = None
    ) -> None:
        """END(`outcome`) for a BEGIN whose reply was lost, then mint new
        tokens for `mint`. The store may run BEGIN and END out of order
        (different connections), so END is tried a few times over 1.5 s; it
        touches the key only if `owner` holds it."""
        delay = 0.05
        for _ in range(5):
            try:
                result = await self.io.store.end(key, owner, outcome)
                if not result.lease_lost:
                    break
            except StoreError:
                pass
            await asyncio.sleep(delay)  # backoff between retries, not a guess at an event
            delay *= 2
        if mint:
            for _ in range(5):
                try:
                    await self.io.store.invalidate(mint)
                    return
                except StoreError:
                    await asyncio.sleep(delay)
                    delay *= 2
