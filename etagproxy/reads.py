"""The read path: GET and HEAD on a tracked route.

The key's version is observed *before* the request is forwarded and that
token is attached to a 2xx response. Attaching the pre-request token is what
keeps reads safe: if a write lands while the GET is in flight, the body may
be newer than the token, which can only make a later If-Match fail (a
spurious 412), never let a stale one pass. A read that starts while a write
holds the key gets no ETag at all (DESIGN §1). `short_circuit` answers a
current If-None-Match from the store; `fingerprint` notices bodies changed
behind the proxy. On a route whose `version` comes from the upstream, the
tag is derived from the answer itself (`read_derived`).
"""

from __future__ import annotations

import hashlib
import time

from aiohttp import web
from multidict import CIMultiDict

from etagproxy import headers as hdr
from etagproxy.config import RouteConfig
from etagproxy.derived import derive_token
from etagproxy.etag import make_etag
from etagproxy.exchange import Exchange
from etagproxy.forwarding import REQUEST_DROP_TRACKED, RESPONSE_DROP_TRACKED, Forwarding
from etagproxy.httpdate import format_http_date
from etagproxy.preconditions import Conditionals, Decision, Representation, evaluate
from etagproxy.problems import problem
from etagproxy.routes import Match
from etagproxy.shaping import not_modified
from etagproxy.shortcircuit import ShortCircuit
from etagproxy.store.base import Cause, Observation, StoreError, Version
from etagproxy.target import Target
from etagproxy.upstream import UpstreamError
from etagproxy.variants import Selected, query_variant, representation_variant

DRAIN_LIMIT = 1 << 16  # bodies up to this size are read to keep a connection


class Reads:
    """The read path over one process's services."""

    def __init__(self, io: Forwarding) -> None:
        self.io = io
        self.short_circuit = ShortCircuit(io.config.via)

    async def read(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        cfg: RouteConfig = match.route.config
        cond = Conditionals.from_headers(request.headers)
        # Credentials that get a 2xx are remembered for short_circuit and for
        # etag_in_412: the proxy only tells the current token to them. A
        # `public` route tells it to anyone, so it needs no record.
        reader = (
            self.io.creds(request, ex) if (cfg.short_circuit or cfg.etag_in_412) and not cfg.public else None
        )
        obs: Observation | None
        try:
            obs = await self.io.timed_store(ex, "observe", self.io.store.observe(match.key, reader=reader))  # type: ignore[assignment]
        except StoreError:
            obs = None
        if obs is not None:
            self.io.minted(obs.minted)
        qpart = query_variant(target, match.route.key_query)
        if obs is not None and cfg.short_circuit and not obs.pending and cond.if_none_match:
            early = self.short_circuit.answer(request.headers, ex, cfg, cond, obs, qpart)
            if early is not None:
                self.io.labelled(self.io.metrics.preconditions, ex.route, "not_modified").inc()
                return early

        headers = self._read_headers(request, ex, cfg, cond, named)
        t0 = time.perf_counter()
        try:
            async with self.io.send(match, target, request.method, headers, self.io.client_body(request, ex), ex=ex) as up:  # type: ignore[attr-defined]
                self.io.upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid
                )
                if obs is None or obs.pending or not 200 <= up.status < 300:
                    ex.decision = "pending" if obs is not None and obs.pending else ""
                    return await self.io.relay(request, ex, up, out)
                version: Version | None
                version = obs.version
                body: bytes | None = None
                more = False
                # Only the full representation without extra parameters or a
                # content coding is hashed: the others differ in bytes by
                # nature (and gzip output need not be stable), and one digest
                # per key would flip between them, minting on every read.
                coding = out.get("Content-Encoding", "identity").strip().lower()
                if (
                    cfg.fingerprint and request.method == "GET" and up.status == 200
                    and not qpart and coding == "identity"
                ):
                    body, complete, version = await self._fingerprint(ex, match, up, version)
                    more = not complete
                    if version is None:
                        ex.decision = "moved"
                        return await self.io.relay(request, ex, up, out, body=body, more=more)
                assert version is not None
                variant = representation_variant(qpart, out, cfg.plain_types)
                if cfg.computed:
                    # The tag also names the bytes: content computed from
                    # other resources changes without a write here.
                    if body is None and request.method == "GET":
                        body, complete = await up.read(self.io.config.limits.fingerprint_max)  # type: ignore[attr-defined]
                        more = not complete
                    if body is None or more:
                        ex.decision = "computed_unhashed"
                        return await self.io.relay(request, ex, up, out, body=body, more=more)
                    digest = "h" + hashlib.blake2b(body, digest_size=8).hexdigest()
                    variant = f"{variant}-{digest}" if variant else digest
                if not version.exists:
                    try:
                        await self.io.timed_store(ex, "confirm", self.io.store.confirm(match.key, version.token))
                    except StoreError:
                        pass
                if reader is not None and not obs.reader_seen:
                    # (Once seen, the record stands until its TTL; the next
                    # read after that records it again.)
                    self.io.spawn(self.io.record_reader(match.key, reader, cfg))
                tag = make_etag(version.token, variant)
                if cfg.short_circuit:
                    self.short_circuit.remember(ex.key, tag, Selected.of(qpart, request.headers, out))
                # A computed representation changes at times the version
                # does not record, so it gets no date to be compared with.
                last_modified = version.minted_ms // 1000 if cfg.last_modified and not cfg.computed else None
                return await self._answer_read(
                    request, ex, up, out, cond, Representation(version.token, tag, last_modified), body, more
                )
        except UpstreamError as exc:
            return self.io.upstream_failed(ex, exc)

    def _read_headers(
        self, request: web.BaseRequest, ex: Exchange, cfg: RouteConfig, cond: Conditionals,
        named: frozenset[str],
    ) -> CIMultiDict[str]:
        """The request headers a read forwards."""
        drop = named if cfg.upstream_conditionals else (REQUEST_DROP_TRACKED | named)
        if not cfg.upstream_conditionals and cond.range is not None and cond.if_range is not None:
            # If-Range is evaluated here after the fact; without it the
            # upstream must not answer a partial response.
            drop = drop | {"range"}
        return self.io.upstream_headers(request, ex, drop, keep_framing=True)

    async def _answer_read(
        self, request: web.BaseRequest, ex: Exchange, up: object, out: CIMultiDict[str],
        cond: Conditionals, rep: Representation, body: bytes | None, more: bool,
    ) -> web.StreamResponse:
        """Evaluate the read's preconditions against `rep` (§13.2.2) and answer
        304, 412, or the upstream's 2xx with the validators."""
        decision = evaluate(request.method, cond, rep)
        if decision is not Decision.PROCEED and body is None and request.method == "GET":
            # The body is not sent; reading a small one to its end keeps the
            # upstream connection reusable.
            await up.read(DRAIN_LIMIT)  # type: ignore[attr-defined]
        tag = rep.etag
        if decision is Decision.NOT_MODIFIED and tag is not None:
            self.io.decided(ex, "not_modified")
            return not_modified(ex.rid, self.io.config.via, tag, out)
        if decision is Decision.PRECONDITION_FAILED:
            self.io.decided(ex, "precondition_failed")
            return problem(
                412, "precondition-failed",
                "The resource has changed since the version named in the precondition. "
                "Re-read it and retry with the new ETag.",
            )
        if tag is not None:
            out["ETag"] = str(tag)
        if rep.last_modified is not None:
            out["Last-Modified"] = format_http_date(rep.last_modified)
        return await self.io.relay(request, ex, up, out, body=body, more=more)

    async def read_derived(
        self, request: web.BaseRequest, ex: Exchange, target: Target, match: Match,
        named: frozenset[str],
    ) -> web.StreamResponse:
        """A read on a route whose version comes from the upstream's answer:
        the tag names exactly the version in this body, so no store and no
        pending-write check is needed; a body that does not name its version
        goes out without a tag."""
        cfg: RouteConfig = match.route.config
        source = cfg.version
        assert source is not None
        cond = Conditionals.from_headers(request.headers)
        qpart = query_variant(target, match.route.key_query)
        headers = self._read_headers(request, ex, cfg, cond, named)
        t0 = time.perf_counter()
        try:
            async with self.io.send(match, target, request.method, headers, self.io.client_body(request, ex), ex=ex) as up:  # type: ignore[attr-defined]
                self.io.upstream_timing(ex, t0, up.status)
                out = hdr.response_headers(
                    up.raw_headers, drop=RESPONSE_DROP_TRACKED, via=self.io.config.via, rid=ex.rid
                )
                if not 200 <= up.status < 300:
                    return await self.io.relay(request, ex, up, out)
                body: bytes | None = None
                more = False
                if source.needs_body and request.method == "GET":
                    body, complete = await up.read(self.io.config.limits.fingerprint_max)  # type: ignore[attr-defined]
                    more = not complete
                token = None if more else derive_token(source, match.key, up.headers, body)  # type: ignore[attr-defined]
                if token is None:
                    ex.decision = "unversioned"
                    return await self.io.relay(request, ex, up, out, body=body, more=more)
                variant = representation_variant(qpart, out, cfg.plain_types)
                tag = make_etag(token, variant)
                return await self._answer_read(
                    request, ex, up, out, cond, Representation(token, tag, None), body, more
                )
        except UpstreamError as exc:
            return self.io.upstream_failed(ex, exc)

    async def _fingerprint(
        self, ex: Exchange, match: Match, up: object, version: Version
    ) -> tuple[bytes | None, bool, Version | None]:
        """Hash a bounded body; a changed hash means a write bypassed us.

        Returns what was read of the body, whether that is all of it (a
        larger body is not fingerprinted and streams on), and the version.
        """
        limit = self.io.config.limits.fingerprint_max
        length = up.content_length  # type: ignore[attr-defined]
        if length is not None and length > limit:
            return None, False, version
        body, complete = await up.read(limit)  # type: ignore[attr-defined]
        if not complete or len(body) > limit:
            return body, False, version
        digest = hashlib.blake2b(body, digest_size=16).hexdigest()
        try:
            moved = await self.io.timed_store(ex, "fingerprint", self.io.store.fingerprint(match.key, version.token, digest))
        except StoreError:
            return body, True, None
        if moved is not None and moved.token != version.token:  # type: ignore[attr-defined]
            # A write bypassed the proxy. Which body is the newer one cannot
            # be told from here (reads finish out of order): this read goes
            # out without ETag, the next one gets the new token.
            self.io.minted(Cause.FINGERPRINT)
            return body, True, None
        return body, True, moved  # type: ignore[return-value]
