"""The write path: every method but GET/HEAD/OPTIONS/TRACE/CONNECT on a
tracked route (DESIGN §2).

`Writes.write` reads top to bottom: the body (bounded), then BEGIN
(preconditions + the lease, and the members of a bulk write), then for a
version from the upstream the verify read, then one forward with a hard
deadline (`_forward_write`), then END by the outcome (`outcome.py`: 2xx and
303 commit a new version, 4xx keep the old one, anything else replaces it),
shielded from cancellation; after a timeout END waits until the lease is
nearly over (`LATE_HOLD_S`), since the API may still apply the write. A
write that fails its precondition is answered by `_precondition_failed`
without reaching the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from etagproxy import headers as hdr
from etagproxy.bodyvars import BulkError, bulk_values, fields_for, json_document
from etagproxy.config import Bulk, Config, RouteConfig
from etagproxy.derived import derive_token
from etagproxy.etag import make_etag
from etagproxy.exchange import Exchange
from etagproxy.forwarding import REQUEST_DROP_TRACKED, RESPONSE_DROP_TRACKED, BodyTooLarge, Forwarding
from etagproxy.httpdate import format_http_date
from etagproxy.outcome import validators_allowed, write_outcome
from etagproxy.preconditions import Conditionals, write_condition
from etagproxy.problems import problem
from etagproxy.randomness import random_hex
from etagproxy.routes import Match, TemplateError, compile_template, expand
from etagproxy.store.base import (
    BeginStatus,
    Cause,
    Outcome,
    Replay,
    StoreError,
    Version,
    WriteCondition,
    evaluate_write,
)
from etagproxy.target import Target, TargetError, canonicalize
from etagproxy.upstream import UpstreamError, UpstreamTimeout, body_errors, map_body_error

REPLAY_MAX = 1 << 20  # write responses up to this size are recorded for Idempotency-Key replays
LATE_HOLD_S = 0.9
"""How long past the upstream deadline a timed-out write keeps its lease:
most of the lease's 1 s margin (`lease_ms`), so END still lands in time."""
BULK_METHODS = frozenset({"PUT", "PATCH", "DELETE"})  # on a bulk route, a JSON array body names members
# The `authorize: upstream` probe carries the caller's credentials, not its body.
AUTHORIZE_DROP = frozenset(
    {"content-type", "content-encoding", "content-language", "content-location",
     "content-range", "content-digest", "repr-digest", "digest", "idempotency-key"}
)


def lease_ms(config: Config) -> int:
    """How long a write holds its resource.

    The lease outlives the upstream deadline by the time BEGIN's answer and
    END's request can take (DESIGN §2.3: strictly shorter). With
    min_replicas, BEGIN's answer can take min_replicas_timeout more.
    """
    t = config.timeouts
    replicas = config.store.min_replicas_timeout * (config.store.min_replicas > 0)
    return int((t.upstream + 2 * t.store + replicas + 1.0) * 1000)


class Writes:
    """The write path over one process's services."""

    def __init__(self, io: Forwarding) -> None:
        self.io = io
        t = io.config.timeouts
        self.lease_ms = lease_ms(io.config)
        self.wait_ms = int(t.write_wait * 1000)
        self.retry_after = str(max(1, int(t.write_wait + 0.999)))

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
            ex.decision = "precondition_required"
            self.io.metrics.preconditions.labels(ex.route, "precondition_required").inc()
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
                members = self._bulk_members(match, cfg.bulk, body)
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
            begun = await self.io.timed_store(
                ex, "begin", self.io.store.begin(match.key, stored, owner, self.lease_ms, self.wait_ms)
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
                    self.io.spawn(self._release_unanswered(
                        match.key, owner, Outcome.UNKNOWN,
                        [match.key, *members, *self.io.router.invalidation_keys(match, self._fields(match, body))],
                    ))
            # BEGIN may have run even though its answer never came: give the
            # lease back (nothing was forwarded) rather than leave the key
            # locked until its deadline.
            self.io.spawn(self._release_unanswered(match.key, owner))
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
            self.io.spawn(self._release_unanswered(match.key, owner))
            raise
        self.io.metrics.lease_wait.observe(begun.waited_ms / 1000)  # type: ignore[attr-defined]
        if begun.status is BeginStatus.BUSY:  # type: ignore[attr-defined]
            ex.decision = "busy"
            self.io.metrics.preconditions.labels(ex.route, "busy").inc()
            return problem(
                409, "write-in-progress",
                "Another write to this resource is in progress. Retry after a moment.",
                headers=(("Retry-After", self.retry_after),),
            )
        if begun.status is BeginStatus.PRECONDITION_FAILED:  # type: ignore[attr-defined]
            return await self._precondition_failed(request, ex, target, match, cond, body, begun.current)  # type: ignore[attr-defined]
        if members:
            refused = await self._lease_members(ex, match.key, owner, members)
            if refused is not None:
                return refused
        if cfg.version is not None and checked:
            try:
                refused = await self._verify(request, ex, target, match, wcond)
            except UpstreamError as exc:
                refused = self.io.upstream_failed(ex, exc)
            except BaseException:
                await self._end(ex, match.key, owner, Outcome.REJECTED)
                raise
            if refused is not None:
                await self._end(ex, match.key, owner, Outcome.REJECTED)
                return refused
            if ex.upstream_validator is not None:
                # The upstream re-checks the version under its own lock.
                headers["If-Match"] = ex.upstream_validator
        return await self._forward_write(request, ex, target, match, headers, body, owner, cond)

    async def _verify(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match, wcond: WriteCondition
    ) -> web.StreamResponse | None:
        """Check the write's preconditions against the version the upstream
        holds now, under the write's lease: GET the resource with the
        caller's credentials and derive its version. None: forward the write.

        A non-2xx answer is relayed (§13.2.1: preconditions are ignored when
        the request without them would fail), except a 404/410 when the
        write may create (PUT/PATCH with `If-None-Match: *` passes, If-Match
        gets 412). The window in which a write bypassing the proxy can still
        be overwritten runs from the end of this read to the upstream
        applying the write (`etagproxy_verify_window_seconds`).
        """
        source = match.route.config.version
        assert source is not None
        headers = self._probe_headers(request, ex)
        current: Version | None = None
        async with self.io.send(match, target, "GET", headers, None) as up:  # type: ignore[attr-defined]
            out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid)
            if 200 <= up.status < 300:
                body, complete = await up.read(self.io.config.limits.fingerprint_max)
                token = derive_token(source, match.key, up.headers, body) if complete else None
                if token is None:
                    ex.decision = "version_unavailable"
                    return problem(
                        502, "version-unavailable",
                        "The upstream's representation does not name its version, so the "
                        "precondition cannot be checked; the write was not forwarded.",
                    )
                current = Version(token, 0)
                if source.upstream_if_match:
                    ex.upstream_validator = up.headers.get(source.header)
            elif up.status in (404, 410) and request.method != "DELETE":
                current = None
            else:
                ex.decision = "authorize_refused"
                ex.upstream_status = up.status
                return await self.io.relay(request, ex, up, out)
        ex.verified_at = time.perf_counter()
        return None if evaluate_write(wcond, current) else self._write_refused(ex)

    def _write_refused(
        self, ex: Exchange, headers: Sequence[tuple[str, str]] = (), **extra: object
    ) -> web.Response:
        """412 for a write whose precondition failed; nothing was forwarded."""
        ex.decision = "precondition_failed"
        self.io.metrics.preconditions.labels(ex.route, "precondition_failed").inc()
        return problem(
            412, "precondition-failed",
            "The resource has changed since the version named in the precondition; "
            "the write was not applied. Re-read it and retry with the new ETag.",
            headers=headers, **extra,
        )

    def _bulk_members(self, match: Match, bulk: Bulk, body: bytes) -> list[str]:
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

    async def _lease_members(
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
                    ex, "begin", self.io.store.begin(member, WriteCondition(), owner, self.lease_ms, self.wait_ms)
                )
            except StoreError:
                self.io.spawn(self._release_unanswered(member, owner))
                failure = problem(
                    503, "store-unavailable",
                    "The version store is unavailable, so the write was not forwarded. Retry later.",
                    headers=(("Retry-After", "1"),),
                )
                break
            if begun.status is not BeginStatus.OK:  # type: ignore[attr-defined]
                ex.decision = "busy"
                self.io.metrics.preconditions.labels(ex.route, "busy").inc()
                failure = problem(
                    409, "write-in-progress",
                    "Another write to a member named in this bulk request is in progress. "
                    "Retry after a moment.",
                    headers=(("Retry-After", self.retry_after),),
                )
                break
            taken.append(member)
        if failure is None:
            ex.members = tuple(members)
            return None
        ex.members = tuple(taken)
        await self._end(ex, key, owner, Outcome.REJECTED)
        return failure

    @staticmethod
    def _fields(match: Match, body: bytes, response: bytes | None = None) -> dict[str, str]:
        """Values of `{body.x}` / `{response.x}` in the route's templates."""
        route = match.route
        documents: dict[str, object] = {}
        if route.reads_request:
            documents["body"] = json_document(body)
        if response is not None and route.reads_response:
            documents["response"] = json_document(response)
        return fields_for(route.body_names, documents) if documents else {}

    async def _release_unanswered(
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

    def _replay_fingerprint(
        self, request: web.BaseRequest, ex: Exchange, cond: Conditionals, body: bytes
    ) -> str:
        h = hashlib.blake2b(digest_size=16, person=b"etagproxy-rply")
        h.update((request.method + "\0" + (cond.if_match or "") + "\0").encode("latin-1", "replace"))
        h.update(self.io.creds(request, ex).encode() + b"\0")
        h.update(body)
        return h.hexdigest()

    @staticmethod
    def _idempotency_key(request: web.BaseRequest) -> str | None:
        value = request.headers.get("Idempotency-Key")
        if not value or len(value) > 255:
            return None
        return hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16).hexdigest()

    async def _precondition_failed(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        cond: Conditionals, body: bytes, current: Version | None,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        idem = self._idempotency_key(request) if cfg.replay_ttl > 0 else None
        if idem is not None:
            try:
                record = await self.io.timed_store(ex, "get_replay", self.io.store.get_replay(match.key, idem))
            except StoreError:
                record = None
            if isinstance(record, Replay) and record.fingerprint == self._replay_fingerprint(request, ex, cond, body):
                ex.decision = "replayed"
                self.io.metrics.preconditions.labels(ex.route, "replayed").inc()
                resp = web.Response(status=record.status, body=record.body)
                for name, value in record.headers:
                    resp.headers.add(name, value)
                resp.headers["X-Request-ID"] = ex.rid
                resp.headers["Idempotency-Replayed"] = "true"
                return resp
        authorized = False
        # A DELETE of a resource the proxy knows no current version of
        # (deleted, or never seen): RFC 9110 §13.2.1 ignores preconditions
        # when the request without them would not get a 2xx, so a repeat
        # DELETE gets the upstream's 404, not a 412. The DELETE itself is
        # never forwarded; a HEAD/GET probe asks whether the resource is
        # there. Other methods keep their 412: a PUT or PATCH to a missing
        # resource may create it, which the probe cannot tell.
        gone = request.method == "DELETE" and (current is None or not current.exists)
        if cfg.authorize == "upstream" or gone:
            try:
                refused = await self._authorize(request, ex, target, match)
            except UpstreamError as exc:
                return self.io.upstream_failed(ex, exc)
            if refused is not None:
                return refused
            authorized = True
        extra: dict[str, object] = {}
        headers: list[tuple[str, str]] = []
        if (
            cfg.etag_in_412 and current is not None and current.exists
            and (cfg.public or authorized or await self._reader_seen(ex, match.key, request))
        ):
            tag = str(make_etag(current.token))
            headers.append(("ETag", tag))
            extra["current_etag"] = tag
        return self._write_refused(ex, headers, **extra)

    async def _reader_seen(self, ex: Exchange, key: str, request: web.BaseRequest) -> bool:
        """Whether these credentials got a 2xx on `key` lately: only they may
        learn its current token from a 412."""
        try:
            obs = await self.io.timed_store(
                ex, "observe", self.io.store.observe(key, reader=self.io.creds(request, ex))
            )
        except StoreError:
            return False
        return bool(obs.reader_seen)  # type: ignore[attr-defined]

    def _probe_headers(self, request: web.BaseRequest, ex: Exchange) -> CIMultiDict[str]:
        """Headers of a GET/HEAD the proxy sends on the caller's behalf:
        their credentials, nothing of the write's body or preconditions."""
        named = hdr.connection_tokens(request.headers.getall("Connection", ()))
        return self.io.upstream_headers(request, ex, REQUEST_DROP_TRACKED | AUTHORIZE_DROP | named, keep_framing=False)

    async def _authorize(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match
    ) -> web.StreamResponse | None:
        """`authorize: upstream`: ask the upstream before answering 412.

        RFC 9110 §13.2.1: preconditions are ignored when the request without
        them would have failed (or redirected) before any processing, so a
        caller the upstream refuses must get the upstream's status, not a
        412 that says the resource exists and has moved on. HEAD with the
        caller's credentials (GET when the upstream does not do HEAD); a
        non-2xx is relayed, None means go on with the 412.
        """
        headers = self._probe_headers(request, ex)
        for method in ("HEAD", "GET"):
            async with self.io.send(match, target, method, headers, None) as up:  # type: ignore[attr-defined]
                if method == "HEAD" and up.status in (405, 501):
                    continue
                if 200 <= up.status < 300:
                    return None
                ex.decision = "authorize_refused"
                ex.upstream_status = up.status
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid
                )
                if method == "HEAD":
                    return web.Response(status=up.status, reason=up.reason, headers=out)
                return await self.io.relay(request, ex, up, out)
        return None

    async def _forward_unchecked(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes,
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            async with self.io.send(match, target, request.method, headers, body, whole=True) as up:  # type: ignore[attr-defined]
                self.io.upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid)
                return await self.io.relay(request, ex, up, out)
        except UpstreamError as exc:
            return self.io.upstream_failed(ex, exc)

    async def _end(
        self, ex: Exchange, key: str, owner: str, outcome: Outcome, *, exists: bool = True
    ) -> Version | None:
        """END, shielded: a client that hangs up must not leave a lease behind.
        A bulk write's members (`ex.members`) end with the same outcome."""
        task = self.io.loop.create_task(self._end_all(ex, key, owner, outcome, exists))
        self.io.tasks.add(task)
        task.add_done_callback(self.io.tasks.discard)
        try:
            result = await asyncio.shield(task)
        except StoreError:
            return None
        if result.lease_lost:  # type: ignore[attr-defined]
            self.io.metrics.lease_lost.inc()
            ex.decision = "lease_lost"
            return None
        if outcome is not Outcome.REJECTED:
            self.io.minted(Cause.WRITE if outcome is Outcome.SUCCESS else Cause.UNKNOWN_OUTCOME)
        return result.committed  # type: ignore[attr-defined,no-any-return]

    async def _end_all(self, ex: Exchange, key: str, owner: str, outcome: Outcome, exists: bool) -> object:
        members, ex.members = ex.members, ()
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

    async def _forward_write(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        headers: CIMultiDict[str], body: bytes, owner: str, cond: Conditionals,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        ended = False
        t0 = time.perf_counter()
        sent_at = self.io.loop.time()
        try:
            async with self.io.send(match, target, request.method, headers, body, whole=True) as up:  # type: ignore[attr-defined]
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
                idem = self._idempotency_key(request) if cfg.replay_ttl > 0 else None
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
                committed = await self._end(ex, match.key, owner, outcome, exists=exists)
                ex.decision = ex.decision or outcome.value
                fields = self._fields(match, body, None if more else resp_body)
                if outcome is not Outcome.REJECTED:
                    # The write landed, or may have: so may what it invalidates.
                    await self._invalidate(ex, match, fields)
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
                        shown = None if request.method == "DELETE" else await self._response_version(
                            ex, match, up, committed, target, request.headers.get("Host"), fields
                        )
                    if shown is not None and cfg.etag_on_write:
                        version, dated = shown
                        out["ETag"] = str(make_etag(version.token))
                        if dated:
                            out["Last-Modified"] = format_http_date(version.minted_ms // 1000)
                    if idem is not None and resp_body is not None and not more:
                        replay = Replay(
                            self._replay_fingerprint(request, ex, cond, body),
                            status,
                            tuple((k, v) for k, v in out.items() if k.lower() not in ("x-request-id",)),
                            resp_body,
                        )
                        await self._store_replay(ex, match.key, idem, replay, cfg)
                return await self.io.relay(request, ex, up, out, body=resp_body, more=more)
        except UpstreamError as exc:
            if not ended:
                ended = True
                if isinstance(exc, UpstreamTimeout):
                    # The API may still be applying the write it was sent:
                    # keep the resource until the lease is nearly over, so
                    # that a write applied late still lands before the next
                    # one is forwarded. The client is answered now.
                    hold_until = sent_at + self.io.config.timeouts.upstream + LATE_HOLD_S
                    self.io.spawn(self._end_unknown_at(ex, match, owner, body, hold_until))
                    return self.io.upstream_failed(ex, exc)
                await self._end(ex, match.key, owner, Outcome.UNKNOWN if exc.sent else Outcome.REJECTED)
                if exc.sent:
                    await self._invalidate(ex, match, self._fields(match, body))
            return self.io.upstream_failed(ex, exc)
        finally:
            if not ended:
                # Cancelled or crashed between BEGIN and END: the outcome is
                # unknown, so the token must move on.
                await self._end(ex, match.key, owner, Outcome.UNKNOWN)

    async def _end_unknown_at(self, ex: Exchange, match: Match, owner: str, body: bytes, when: float) -> None:
        """END a timed-out write as an unknown outcome at `when` (loop time).
        Cancelled first (shutdown), it leaves the lease to expire, which
        replaces the token too."""
        await asyncio.sleep(max(0.0, when - self.io.loop.time()))
        await self._end(ex, match.key, owner, Outcome.UNKNOWN)
        await self._invalidate(ex, match, self._fields(match, body))

    async def _store_replay(
        self, ex: Exchange, key: str, idem: str, record: Replay, cfg: RouteConfig
    ) -> None:
        """Record a 2xx for safe retries, before the client can see it (a
        retry after a lost response must find it). Separate from END because
        the record carries the ETag END minted; only consulted after a
        precondition already failed, so it need not be atomic with END."""
        try:
            await self.io.timed_store(
                ex, "put_replay", self.io.store.put_replay(key, idem, record, int(cfg.replay_ttl * 1000))
            )
        except StoreError:
            pass

    async def _invalidate(self, ex: Exchange, match: Match, fields: dict[str, str] | None = None) -> None:
        """New tokens for the keys the route's `invalidates` templates name."""
        keys = self.io.router.invalidation_keys(match, fields)
        if keys:
            try:
                await self.io.timed_store(ex, "invalidate", self.io.store.invalidate(keys))
                for _ in keys:
                    self.io.minted(Cause.INVALIDATED)
            except StoreError:
                pass

    async def _response_version(
        self, ex: Exchange, match: Match, up: object, committed: Version, target: Target,
        host: str | None, fields: dict[str, str],
    ) -> tuple[Version, bool] | None:
        """The version whose validators a 2xx write response carries, and
        whether its route sends Last-Modified; None for no validators.

        RFC 9110 §15.3.2: a 201's validators describe the created resource.
        When `Location` names another resource it gets a new token here if
        the proxy tracks it; otherwise the response carries none, since the
        target's token would be read as the created resource's.
        """
        if up.status != 201:  # type: ignore[attr-defined]
            return committed, match.route.config.last_modified
        location = up.headers.get("Location")  # type: ignore[attr-defined]
        if location:
            created = self._location_match(location, target, host)
        else:
            # DRF and NetBox send no Location: the route's `created` template
            # names the resource from the response body, or nothing does,
            # and the target's token must not pass for its validator.
            created = self._created_match(match, fields)
        if created is None:
            return None
        if created.key == match.key:
            return committed, match.route.config.last_modified
        owner = random_hex(12)
        try:
            begun = await self.io.timed_store(
                ex, "begin", self.io.store.begin(created.key, WriteCondition(), owner, self.lease_ms, 0)
            )
        except StoreError:
            # The created key may be leased without our knowing: release it
            # as an unknown outcome, which mints (the resource is new).
            self.io.spawn(self._release_unanswered(created.key, owner, Outcome.UNKNOWN))
            return None
        if begun.status is not BeginStatus.OK:  # type: ignore[attr-defined]
            return None
        version = await self._end(ex, created.key, owner, Outcome.SUCCESS)
        return None if version is None else (version, created.route.config.last_modified)

    def _created_match(self, match: Match, fields: dict[str, str]) -> Match | None:
        """The tracked resource the route's `created` template names."""
        template = match.route.config.created
        if template is None:
            return None
        try:
            found = self.io.router.key_for(canonicalize(expand(template, {**match.params, **fields})))
        except (TemplateError, TargetError):
            return None
        return found if found is not None and found.route.tracked else None

    def _location_match(self, location: str, target: Target, host: str | None) -> Match | None:
        """The tracked route a `Location` value falls in, if any.

        RFC 9110 §10.2.2: the value is a URI-reference resolved against the
        target URI. An absolute one counts on the upstream's origin or on
        the authority the client addressed (`Host` is forwarded as sent, and
        an API builds its links from it).
        """
        try:
            url = URL(target.raw).join(URL(location))
        except ValueError:
            return None
        if url.is_absolute():
            upstream = URL(self.io.config.upstream)
            addressed = host is not None and (url.raw_authority or "").lower() == host.lower()
            if url.origin() != upstream.origin() and not addressed:
                return None
        raw = url.raw_path + (("?" + url.raw_query_string) if url.raw_query_string else "")
        try:
            target = canonicalize(raw or "/")
        except TargetError:
            return None
        found = self.io.router.key_for(target)
        if found is None or found.route.config.mode != "track":
            return None
        return found
