"""What a write that landed (or may have) changes beyond its own key.

- `invalidate`: new tokens for the keys the route's `invalidates` names.
- `response_version`: the version whose validators a 2xx answer carries;
  for a 201, the created resource's (from `Location` or the route's
  `created` template), minted here, or none.
- `route_fields`: the `{body.x}` / `{response.x}` values those templates use.
May not decide a write's outcome or end its lease.
"""

from __future__ import annotations

from yarl import URL

from etagproxy.bodyvars import fields_for, json_document
from etagproxy.exchange import Exchange
from etagproxy.forwarding import Forwarding
from etagproxy.leases import Leases
from etagproxy.randomness import random_hex
from etagproxy.routes import Match, TemplateError, expand
from etagproxy.store.base import (
    BeginStatus,
    Cause,
    Outcome,
    StoreError,
    Version,
    WriteCondition,
)
from etagproxy.target import Target, TargetError, canonicalize


def route_fields(match: Match, body: bytes, response: bytes | None = None) -> dict[str, str]:
    """Values of `{body.x}` / `{response.x}` in the route's templates."""
    route = match.route
    documents: dict[str, object] = {}
    if route.reads_request:
        documents["body"] = json_document(body)
    if response is not None and route.reads_response:
        documents["response"] = json_document(response)
    return fields_for(route.body_names, documents) if documents else {}


class AfterWrite:
    def __init__(self, io: Forwarding, leases: Leases) -> None:
        self.io = io
        self.leases = leases

    async def invalidate(self, ex: Exchange, match: Match, fields: dict[str, str] | None = None) -> None:
        """New tokens for the keys the route's `invalidates` templates name."""
        keys = self.io.router.invalidation_keys(match, fields)
        if keys:
            try:
                await self.io.timed_store(ex, "invalidate", self.io.store.invalidate(keys))
                for _ in keys:
                    self.io.minted(Cause.INVALIDATED)
            except StoreError:
                pass

    async def response_version(
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
            created = self.location_match(location, target, host)
        else:
            # DRF and NetBox send no Location: the route's `created` template
            # names the resource from the response body, or nothing does,
            # and the target's token must not pass for its validator.
            created = self.created_match(match, fields)
        if created is None:
            return None
        if created.key == match.key:
            return committed, match.route.config.last_modified
        owner = random_hex(12)
        try:
            begun = await self.io.timed_store(
                ex, "begin", self.io.store.begin(created.key, WriteCondition(), owner, self.leases.lease_ms, 0)
            )
        except StoreError:
            # The created key may be leased without our knowing: release it
            # as an unknown outcome, which mints (the resource is new).
            self.io.spawn(self.leases.release_unanswered(created.key, owner, Outcome.UNKNOWN))
            return None
        if begun.status is not BeginStatus.OK:  # type: ignore[attr-defined]
            return None
        version = await self.leases.end(ex, created.key, owner, Outcome.SUCCESS)
        return None if version is None else (version, created.route.config.last_modified)

    def created_match(self, match: Match, fields: dict[str, str]) -> Match | None:
        """The tracked resource the route's `created` template names."""
        template = match.route.config.created
        if template is None:
            return None
        try:
            found = self.io.router.key_for(canonicalize(expand(template, {**match.params, **fields})))
        except (TemplateError, TargetError):
            return None
        return found if found is not None and found.route.tracked else None

    def location_match(self, location: str, target: Target, host: str | None) -> Match | None:
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
