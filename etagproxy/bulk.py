"""Bulk writes on a list endpoint: the members a body names, and their leases.

A bulk route (`bulk: {field, member, max_members}`) names each member by a
field of the JSON array it is sent; `members` turns them into keys (sorted,
so two bulk writes lease shared members in one order) and `lease` takes
every one under the write's owner, after the write's own key. Owns no
precondition: members are leased unconditionally, the write's own key
carries the If-Match.
"""

from __future__ import annotations

from aiohttp import web

from etagproxy.bodyvars import BulkError, bulk_values, json_document
from etagproxy.config import Bulk
from etagproxy.exchange import Exchange
from etagproxy.forwarding import Forwarding
from etagproxy.leases import Leases
from etagproxy.problems import problem
from etagproxy.routes import Match, TemplateError, compile_template, expand
from etagproxy.store.base import (
    BeginStatus,
    Outcome,
    StoreError,
    WriteCondition,
)
from etagproxy.target import TargetError, canonicalize

BULK_METHODS = frozenset({"PUT", "PATCH", "DELETE"})  # on a bulk route, a JSON array body names members


class BulkMembers:
    def __init__(self, io: Forwarding, leases: Leases) -> None:
        self.io = io
        self.leases = leases

    def members(self, match: Match, bulk: Bulk, body: bytes) -> list[str]:
        """Keys of the members a bulk body names, sorted (so two bulk writes
        lease shared members in one order); [] when the body is no array."""
        values = bulk_values(json_document(body), bulk.field, bulk.max_members)
        if not values:
            return []
        name = compile_template(bulk.member).names[0]
        keys: set[str] = set()
        for value in values:
            try:
                found = self.io.router.key_for(canonicalize(expand(bulk.member, {name: value})))
            except (TemplateError, TargetError):
                raise BulkError(f"{bulk.field} {value!r} does not name a member.") from None
            if found is None or not found.route.tracked:
                raise BulkError(f"{bulk.field} {value!r} does not name a tracked member.")
            if found.key != match.key:
                keys.add(found.key)
        return sorted(keys)

    async def lease(
        self, ex: Exchange, key: str, owner: str, members: list[str]
    ) -> web.StreamResponse | None:
        """Lease every member of a bulk write under the write's owner, after
        its own key: no member write interleaves with it, and END versions
        each member by the outcome, as a member write would. None when all
        are held; otherwise everything taken is given back and the answer is
        409 (a member is being written) or 503 (the store failed)."""
        taken: list[str] = []
        failure: web.StreamResponse | None = None
        for member in members:
            try:
                begun = await self.io.timed_store(
                    ex, "begin", self.io.store.begin(member, WriteCondition(), owner, self.leases.lease_ms, self.leases.wait_ms)
                )
            except StoreError:
                self.io.spawn(self.leases.release_unanswered(member, owner))
                failure = problem(
                    503, "store-unavailable",
                    "The version store is unavailable, so the write was not forwarded. Retry later.",
                    headers=(("Retry-After", "1"),),
                )
                break
            if begun.status is not BeginStatus.OK:  # type: ignore[attr-defined]
                self.io.decided(ex, "busy")
                failure = problem(
                    409, "write-in-progress",
                    "Another write to a member named in this bulk request is in progress. "
                    "Retry after a moment.",
                    headers=(("Retry-After", self.leases.retry_after),),
                )
                break
            taken.append(member)
        if failure is None:
            ex.members = tuple(members)
            return None
        ex.members = tuple(taken)
        await self.leases.end(ex, key, owner, Outcome.REJECTED)
        return failure
