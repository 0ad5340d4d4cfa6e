"""Writes answered without being forwarded: the 412 and what decides it
against the upstream (RFC 9110 §13.2.1).

- `precondition_failed`: BEGIN refused the write. A recorded replay is
  served; `authorize: upstream` (and a DELETE of what is gone) asks the
  upstream first, so a caller it refuses gets its status, not a 412; the
  current ETag goes in the 412 only to callers allowed to read it.
- `verify`: a version from the upstream (`version:`) is read under the
  write's lease and compared with the preconditions.
Owns the probes' headers. May not touch the lease: the caller ends it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDict

from etagproxy import headers as hdr
from etagproxy.config import RouteConfig
from etagproxy.derived import derive_token
from etagproxy.etag import make_etag
from etagproxy.exchange import Exchange
from etagproxy.forwarding import REQUEST_DROP_TRACKED, RESPONSE_DROP_TRACKED, Forwarding
from etagproxy.preconditions import Conditionals
from etagproxy.problems import problem
from etagproxy.replay import Replays
from etagproxy.routes import Match
from etagproxy.store.base import (
    StoreError,
    Version,
    WriteCondition,
    evaluate_write,
)
from etagproxy.target import Target
from etagproxy.upstream import UpstreamError

# The `authorize: upstream` probe carries the caller's credentials, not its body.
AUTHORIZE_DROP = frozenset(
    {"content-type", "content-encoding", "content-language", "content-location",
     "content-range", "content-digest", "repr-digest", "digest", "idempotency-key"}
)


class Refusals:
    def __init__(self, io: Forwarding, replays: Replays) -> None:
        self.io = io
        self.replays = replays

    async def precondition_failed(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        cond: Conditionals, body: bytes, current: Version | None,
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        replayed = await self.replays.lookup(request, ex, match, cond, body)
        if replayed is not None:
            return replayed
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
                refused = await self.authorize(request, ex, target, match)
            except UpstreamError as exc:
                return self.io.upstream_failed(ex, exc)
            if refused is not None:
                return refused
            authorized = True
        extra: dict[str, object] = {}
        headers: list[tuple[str, str]] = []
        if (
            cfg.etag_in_412 and current is not None and current.exists
            and (cfg.public or authorized or await self.reader_seen(ex, match.key, request))
        ):
            tag = str(make_etag(current.token))
            headers.append(("ETag", tag))
            extra["current_etag"] = tag
        return self.write_refused(ex, headers, **extra)

    def write_refused(
        self, ex: Exchange, headers: Sequence[tuple[str, str]] = (), **extra: object
    ) -> web.Response:
        """412 for a write whose precondition failed; nothing was forwarded."""
        self.io.decided(ex, "precondition_failed")
        return problem(
            412, "precondition-failed",
            "The resource has changed since the version named in the precondition; "
            "the write was not applied. Re-read it and retry with the new ETag.",
            headers=headers, **extra,
        )

    async def verify(
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
        headers = self.probe_headers(request, ex)
        current: Version | None = None
        async with self.io.send(match, target, "GET", headers, None, ex=ex) as up:  # type: ignore[attr-defined]
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
        return None if evaluate_write(wcond, current) else self.write_refused(ex)

    async def reader_seen(self, ex: Exchange, key: str, request: web.BaseRequest) -> bool:
        """Whether these credentials got a 2xx on `key` lately: only they may
        learn its current token from a 412."""
        try:
            obs = await self.io.timed_store(
                ex, "observe", self.io.store.observe(key, reader=self.io.creds(request, ex))
            )
        except StoreError:
            return False
        return bool(obs.reader_seen)  # type: ignore[attr-defined]

    def probe_headers(self, request: web.BaseRequest, ex: Exchange) -> CIMultiDict[str]:
        """Headers of a GET/HEAD the proxy sends on the caller's behalf:
        their credentials, nothing of the write's body or preconditions."""
        named = hdr.connection_tokens(request.headers.getall("Connection", ()))
        return self.io.upstream_headers(request, ex, REQUEST_DROP_TRACKED | AUTHORIZE_DROP | named, keep_framing=False)

    async def authorize(
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
        headers = self.probe_headers(request, ex)
        for method in ("HEAD", "GET"):
            async with self.io.send(match, target, method, headers, None, ex=ex) as up:  # type: ignore[attr-defined]
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
