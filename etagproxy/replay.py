"""Idempotency-Key replays: a 2xx write's answer recorded so that a retry
whose first answer was lost gets it again, not a 412 (DESIGN §1, "Safe retry").

A record is looked up only after a write's precondition failed, and only
served to the same request: same method, If-Match, credentials and body
(`fingerprint`). Owns the record's key and fingerprint; it may not decide
whether a write is forwarded.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from etagproxy.config import RouteConfig
from etagproxy.exchange import Exchange
from etagproxy.forwarding import Forwarding
from etagproxy.preconditions import Conditionals
from etagproxy.routes import Match
from etagproxy.store.base import (
    Replay,
    StoreError,
)

REPLAY_MAX = 1 << 20  # write responses up to this size are recorded for Idempotency-Key replays


def idempotency_key(request: web.BaseRequest) -> str | None:
    """The record's name for the request's Idempotency-Key, if usable."""
    value = request.headers.get("Idempotency-Key")
    if not value or len(value) > 255:
        return None
    return hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16).hexdigest()


class Replays:
    def __init__(self, io: Forwarding) -> None:
        self.io = io

    def fingerprint(
        self, request: web.BaseRequest, ex: Exchange, cond: Conditionals, body: bytes
    ) -> str:
        h = hashlib.blake2b(digest_size=16, person=b"etagproxy-rply")
        h.update((request.method + "\0" + (cond.if_match or "") + "\0").encode("latin-1", "replace"))
        h.update(self.io.creds(request, ex).encode() + b"\0")
        h.update(body)
        return h.hexdigest()

    async def lookup(
        self, request: web.BaseRequest, ex: Exchange, match: Match, cond: Conditionals, body: bytes
    ) -> web.Response | None:
        """The recorded answer to this very request, if there is one."""
        cfg: RouteConfig = match.route.config
        idem = idempotency_key(request) if cfg.replay_ttl > 0 else None
        if idem is None:
            return None
        try:
            record = await self.io.timed_store(ex, "get_replay", self.io.store.get_replay(match.key, idem))
        except StoreError:
            return None
        if not isinstance(record, Replay) or record.fingerprint != self.fingerprint(request, ex, cond, body):
            return None
        self.io.decided(ex, "replayed")
        resp = web.Response(status=record.status, body=record.body)
        for name, value in record.headers:
            resp.headers.add(name, value)
        resp.headers["X-Request-ID"] = ex.rid
        resp.headers["Idempotency-Replayed"] = "true"
        return resp

    async def store(
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
