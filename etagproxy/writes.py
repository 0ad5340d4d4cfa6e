"""The write path: every method but GET/HEAD/OPTIONS/TRACE/CONNECT on a
tracked route (DESIGN §2).

`Writes.write` reads top to bottom: the body (bounded), then BEGIN
(preconditions + the lease, and the members of a bulk write, bulk.py), then
for a version from the upstream the verify read (refusals.py), then one
forward with a hard deadline (`_forward_write`), then END by the outcome
(`outcome.py`: 2xx and 303 commit a new version, 4xx keep the old one,
anything else replaces it), finished even if the handler is cancelled (leases.py); after
a timeout END waits until the lease is nearly over (`leases.LATE_HOLD_S`),
since the API may still apply the write. What
the write changes beyond its key is after_write.py's; a write that fails its
precondition is answered by refusals.py without reaching the upstream.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from multidict import CIMultiDict

from etagproxy import headers as hdr
from etagproxy.after_write import AfterWrite, route_fields
from etagproxy.bodyvars import BulkError
from etagproxy.bulk import BULK_METHODS, BulkMembers
from etagproxy.config import RouteConfig
from etagproxy.derived import derive_token
from etagproxy.etag import make_etag
from etagproxy.exchange import Exchange
from etagproxy.forwarding import REQUEST_DROP_TRACKED, RESPONSE_DROP_TRACKED, BodyTooLarge, Forwarding
from etagproxy.httpdate import format_http_date
from etagproxy.leases import LATE_HOLD_S, Leases, lease_ms
from etagproxy.outcome import validators_allowed, write_outcome
from etagproxy.preconditions import Conditionals, write_condition
from etagproxy.problems import problem
from etagproxy.randomness import random_hex
from etagproxy.refusals import Refusals
from etagproxy.replay import REPLAY_MAX, Replays, idempotency_key
from etagproxy.routes import Match
from etagproxy.store.base import (
    BeginStatus,
    Outcome,
    Replay,
    StoreError,
    WriteCondition,
)
from etagproxy.target import Target
from etagproxy.upstream import UpstreamError, UpstreamTimeout, body_errors, map_body_error

__all__ = ["Writes", "lease_ms"]


class Writes:
    """The write path over one process's services."""

    def __init__(self, io: Forwarding) -> None:
        self.io = io
        self.leases = Leases(io)
        self.replays = Replays(io)
        self.refusals = Refusals(io, self.replays)
        self.bulk = BulkMembers(io, self.leases)
        self.after = AfterWrite(io, self.leases)

    async def write(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        cond = Conditionals.from_headers(request.headers)
        wcond = write_condition(cond)
        # With a version from the upstream there is no modification date:
        # only If-Match and If-None-Match can be checked (§13.1.4).
        checked = (
            wcond.has_precondition if cfg.version is None
            else wcond.if_match is not None or wcond.if_none_match is not None
        )
        if cfg.require_if_match and not checked:
            self.io.decided(ex, "precondition_required")
            return problem(
                428, "precondition-required",
                "This resource requires a conditional write. GET it, then repeat the request "
                "with `If-Match: <the ETag you received>`.",
            )
        # DESIGN §2.1: the whole body before anything else, so a slow client
        # never holds the resource.
        try:
            body = await self.io.read_body(request, ex)
        except BodyTooLarge:
            return problem(
                413, "body-too-large",
                f"The request body exceeds the limit of {self.io.config.limits.max_body} bytes.",
                headers=(("Connection", "close"),),
            )
        except TimeoutError:
            return problem(
                408, "body-timeout", "The request body did not arrive in time.",
                headers=(("Connection", "close"),),
            )
        members: list[str] = []
        if cfg.bulk is not None and request.method in BULK_METHODS:
            try:
                members = self.bulk.members(match, cfg.bulk, body)
            except BulkError as exc:
                return problem(exc.status, "bulk-members", str(exc))
        drop = named if cfg.upstream_conditionals else (REQUEST_DROP_TRACKED | named)
        headers = self.io.upstream_headers(request, ex, drop, keep_framing=False)
        # Unique per write: the request id may come from the client.
        owner = random_hex(12)
        try:
            # A version from the upstream is checked against the upstream
            # below; the store's lease still serialises the proxy's writes.
            stored = wcond if cfg.version is None else WriteCondition()
            asked_at = self.io.loop.time()
            begun = await self.io.timed_store(
                ex, "begin", self.io.store.begin(match.key, stored, owner, self.leases.lease_ms, self.leases.wait_ms)
            )
        except StoreError as exc:
            ex.error = exc.kind
            if cfg.on_store_error == "fail_open":
                ex.decision = "store_unavailable_open"
                try:
                    return await self._forward_unchecked(request, ex, target, match, headers, body)
                finally:
                    # The write went through unchecked: once the store
                    # answers again, every token it may have outdated must go
                    # (after the forward, so no reader pairs a new token with
                    # an old body).
                    self.io.spawn(self.leases.release_unanswered(
                        match.key, owner, Outcome.UNKNOWN,
                        [match.key, *members, *self.io.router.invalidation_keys(match, route_fields(match, body))],
                    ))
            # BEGIN may have run even though its answer never came: give the
            # lease back (nothing was forwarded) rather than leave the key
            # locked until its deadline.
            self.io.spawn(self.leases.release_unanswered(match.key, owner))
            ex.decision = "store_unavailable"
            if exc.kind == "store-full":
                return problem(
                    503, "store-full",
                    "The version store is full and refuses new writes, so this write was not "
                    "forwarded. Retry later; the operator must give the store more memory.",
                    headers=(("Retry-After", "1"),),
                )
            return problem(
                503, "store-unavailable",
                "The version store is unavailable, so the write was not forwarded. Retry later.",
                headers=(("Retry-After", "1"),),
            )
        except asyncio.CancelledError:
            # Shut down mid-BEGIN: it may have taken the lease; give it back.
            self.io.spawn(self.leases.release_unanswered(match.key, owner))
            raise
        self.io.metrics.lease_wait.observe(begun.waited_ms / 1000)  # type: ignore[attr-defined]
        if begun.status is BeginStatus.BUSY:  # type: ignore[attr-defined]
            self.io.decided(ex, "busy")
            return problem(
                409, "write-in-progress",
                "Another write to this resource is in progress. Retry after a moment.",
                headers=(("Retry-After", self.leases.retry_after),),
            )
        if begun.status is BeginStatus.PRECONDITION_FAILED:  # type: ignore[attr-defined]
            return await self.refusals.precondition_failed(request, ex, target, match, cond, body, begun.current)  # type: ignore[attr-defined]
        if members:
            refused = await self.bulk.lease(ex, match.key, owner, members)
            if refused is not None:
                return refused
        if cfg.version is not None and checked:
            try:
                refused = await self.refusals.verify(request, ex, target, match, wcond)
            except UpstreamError as exc:
                refused = self.io.upstream_failed(ex, exc)
            except BaseException:
                await self.leases.end(ex, match.key, owner, Outcome.REJECTED)
                raise
            if refused is not None:
                await self.leases.end(ex, match.key, owner, Outcome.REJECTED)
                return refused
            if ex.upstream_validator is not None:
                # The upstream re-checks the version under its own lock.
                headers["If-Match"] = ex.upstream_validator
        # The lease runs from no earlier than BEGIN's call plus its wait.
        lease_ends = asked_at + (begun.waited_ms + self.leases.lease_ms) / 1000  # type: ignore[attr-defined]
        return await self._forward_write(request, ex, target, match, headers, body, owner, cond, lease_ends)

    async def _forward_write(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes, owner: str, cond: Conditionals, lease_ends: float,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        ended = False
        t0 = time.perf_counter()
        sent_at = self.io.loop.time()
        try:
            async with self.io.send(match, target, request.method, headers, body, whole=True, ex=ex) as up:  # type: ignore[attr-defined]
                self.io.upstream_timing(ex, t0, up.status)
                if ex.verified_at:
                    self.io.metrics.verify_window.observe(time.perf_counter() - ex.verified_at)
                status = up.status
                outcome = write_outcome(status)
                validated = validators_allowed(status)
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid
                )
                resp_body: bytes | None = None
                replay = None
                idem = idempotency_key(request) if cfg.replay_ttl > 0 else None
                more = False
                # The response's JSON names resources: the one a 201 created
                # (`created`), related ones (`{response.x}` in invalidates).
                names = match.route.reads_response or (
                    status == 201 and cfg.created is not None and "Location" not in up.headers  # type: ignore[attr-defined]
                ) or (cfg.version is not None and cfg.version.needs_body)
                if validated and (idem is not None or names) and request.method != "HEAD":
                    try:
                        # Recorded for replay only if small; a larger body
                        # streams on unrecorded.
                        resp_body, complete = await up.read(REPLAY_MAX)
                        more = not complete
                    except body_errors() as exc:
                        # 2xx headers arrived: the change was applied.
                        resp_body = None
                        ex.error = map_body_error(exc).kind
                # A DELETE that may or may not have landed leaves the resource
                # "existing": `If-None-Match: *` then refuses a create (412)
                # rather than risk overwriting a resource that is still there.
                exists = not (request.method == "DELETE" and outcome is Outcome.SUCCESS)
                ended = True
                committed = await self.leases.end(ex, match.key, owner, outcome, exists=exists)
                ex.decision = ex.decision or outcome.value
                fields = route_fields(match, body, None if more else resp_body)
                if outcome is not Outcome.REJECTED:
                    # The write landed, or may have: so may what it invalidates.
                    await self.after.invalidate(ex, match, fields)
                if validated and committed is not None:
                    if cfg.short_circuit or cfg.etag_in_412:
                        # A 2xx write is a success of these credentials too.
                        self.io.spawn(self.io.record_reader(match.key, self.io.creds(request, ex), cfg))
                    # A deleted resource has no validator (RFC 9110 §8.8).
                    if cfg.version is not None:
                        shown = None
                        # The write's answer names the new version when it
                        # is the resource's representation (not a 201's).
                        token = None if request.method == "DELETE" or status == 201 or more else derive_token(
                            cfg.version, match.key, up.headers, resp_body  # type: ignore[attr-defined]
                        )
                        if token is not None and cfg.etag_on_write:
                            out["ETag"] = str(make_etag(token))
                    else:
                        shown = None if request.method == "DELETE" else await self.after.response_version(
                            ex, match, up, committed, target, request.headers.get("Host"), fields
                        )
                    if shown is not None and cfg.etag_on_write:
                        version, dated = shown
                        out["ETag"] = str(make_etag(version.token))
                        if dated:
                            out["Last-Modified"] = format_http_date(version.minted_ms // 1000)
                    if idem is not None and resp_body is not None and not more:
                        replay = Replay(
                            self.replays.fingerprint(request, ex, cond, body),
                            status,
                            tuple((k, v) for k, v in out.items() if k.lower() not in ("x-request-id",)),
                            resp_body,
                        )
                        await self.replays.store(ex, match.key, idem, replay, cfg)
                return await self.io.relay(request, ex, up, out, body=resp_body, more=more)
        except UpstreamError as exc:
            if not ended:
                ended = True
                hold_until = min(sent_at + self.io.config.timeouts.upstream + LATE_HOLD_S, lease_ends - 0.1)
                if isinstance(exc, UpstreamTimeout) and hold_until > self.io.loop.time():
                    # The API may still be applying the write it was sent:
                    # keep the resource until the lease is nearly over, so
                    # that a write applied late still lands before the next
                    # one is forwarded. The client is answered now. (A
                    # lease already over, as after a stall, ends at once.)
                    self.io.spawn(self._end_unknown_at(ex, match, owner, body, hold_until))
                    return self.io.upstream_failed(ex, exc)
                await self.leases.end(ex, match.key, owner, Outcome.UNKNOWN if exc.sent else Outcome.REJECTED)
                if exc.sent:
                    await self.after.invalidate(ex, match, route_fields(match, body))
            return self.io.upstream_failed(ex, exc)
        except asyncio.CancelledError:
            if not ended:
                # Cut by the shutdown (handlers are cancelled only when the
                # drain budget runs out) while the upstream may still hold
                # the write: END would free the key for a second writer
                # (another replica, or this one restarted) that the cut
                # write, landing later, erases. The lease stays until its
                # deadline, which outlives the upstream's; the next BEGIN
                # after it treats the outcome as unknown, as after a crash.
                ended = True
                ex.decision = "cut_by_shutdown"
            raise
        finally:
            if not ended:
                # Crashed between BEGIN and END: the outcome is unknown, so
                # the token must move on.
                await self.leases.end(ex, match.key, owner, Outcome.UNKNOWN)

    async def _end_unknown_at(self, ex: Exchange, match: Match, owner: str, body: bytes, when: float) -> None:
        """END a timed-out write as an unknown outcome at `when` (loop time).
        Cancelled first (shutdown), it leaves the lease to expire, which
        replaces the token too."""
        await asyncio.sleep(max(0.0, when - self.io.loop.time()))
        await self.leases.end(ex, match.key, owner, Outcome.UNKNOWN)
        await self.after.invalidate(ex, match, route_fields(match, body))

    async def _forward_unchecked(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes,
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            async with self.io.send(match, target, request.method, headers, body, whole=True, ex=ex) as up:  # type: ignore[attr-defined]
                self.io.upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid)
                return await self.io.relay(request, ex, up, out)
        except UpstreamError as exc:
            return self.io.upstream_failed(ex, exc)
