"""Conditional request evaluation (RFC 9110 §13).

`evaluate` decides what the proxy does with a request's preconditions
against what it knows of the selected representation, in the order RFC 9110
§13.2.2 fixes. `write_condition` reduces the same headers to the
`WriteCondition` the store's BEGIN checks atomically; the two must agree for
every unsafe request, which the tests check.

How the proxy's tags are compared (DESIGN.md §1): `If-Match` and the
`If-None-Match` of a write are judged on the *token part* of each tag (the
version), since a write replaces every representation of the resource;
`If-None-Match` on GET/HEAD compares whole tags, because a cache holding one
representation must not be told another one is unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from etagproxy.etag import EntityTag, TagList, parse_etag, parse_tag_list, strong_match
from etagproxy.httpdate import parse_http_date
from etagproxy.store.base import WriteCondition

__all__ = [
    "IGNORED_METHODS",
    "Conditionals",
    "Decision",
    "Representation",
    "evaluate",
    "if_range_holds",
    "write_condition",
]

# RFC 9110 §13.2.1: preconditions are about the selected representation;
# CONNECT, OPTIONS and TRACE have none, so the proxy never evaluates them.
IGNORED_METHODS = frozenset({"CONNECT", "OPTIONS", "TRACE"})
_READ_METHODS = frozenset({"GET", "HEAD"})


class Decision(enum.Enum):
    """What the preconditions leave the proxy to do."""

    PROCEED = "proceed"
    """Every evaluated condition held (or none applied): perform the method."""
    NOT_MODIFIED = "not_modified"
    """304: a GET/HEAD whose cached representation is still current."""
    PRECONDITION_FAILED = "precondition_failed"
    """412: the client's view of the resource is stale."""


class _Headers(Protocol):
    def get(self, key: str, /) -> Any: ...


class Conditionals(NamedTuple):
    """Raw conditional header values of one request (several field lines joined with ', '), None when absent.

    A NamedTuple rather than a frozen dataclass: as immutable (a request
    without conditionals shares one instance), and built in half the time.
    """

    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None
    if_range: str | None = None
    range: str | None = None

    @classmethod
    def from_headers(cls, headers: _Headers) -> Conditionals:
        """Collect the conditional headers from a mapping.

        Takes anything with `.get(name)`; when it also has `.getall(name,
        default)` (aiohttp's CIMultiDictProxy, multidict) repeated field
        lines are joined with ", ", which RFC 9110 §5.3 makes equivalent to
        one line holding the list. So two `If-Modified-Since` lines become a
        list, which is not a valid date.
        """
        getall = getattr(headers, "getall", None)
        if getall is None:
            found = [headers.get(name) for name in _FIELDS]
            fields = [None if value is None else str(value) for value in found]
        else:
            lines = [getall(name, None) for name in _FIELDS]
            if not any(lines):
                return _NONE  # the usual read: no conditional at all
            fields = [
                None if not values else str(values[0]) if len(values) == 1 else ", ".join(str(v) for v in values)
                for values in lines
            ]
        return cls._make(fields)

    @property
    def any(self) -> bool:
        """True when the request carries a precondition `evaluate` acts on."""
        return (
            self.if_match is not None
            or self.if_none_match is not None
            or self.if_modified_since is not None
            or self.if_unmodified_since is not None
        )


# The fields of Conditionals, in its order; a request without any of them
# shares one instance.
_FIELDS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range", "Range")
_NONE = Conditionals()


@dataclass(frozen=True, slots=True)
class Representation:
    """What the proxy knows about the selected representation."""

    token: str | None
    """Current version token; None = no current representation."""
    etag: EntityTag | None
    """Full tag of the selected representation (token + variant); None if none."""
    last_modified: int | None
    """Seconds since the epoch, or None if the route does not expose one."""


def _modification_date(rep: Representation) -> int | None:
    # Without a current representation there is no modification date either.
    return rep.last_modified if rep.token is not None else None


def _if_match_holds(tags: TagList, rep: Representation) -> bool:
    # RFC 9110 §13.1.1: "*" is false iff there is no current representation.
    if tags.any:
        return rep.token is not None
    # RFC 9110 §13.1.1: strong comparison; a malformed list matches nothing.
    # DESIGN.md §1: the tag's token part is compared with the current version.
    return rep.token is not None and any(
        not tag.weak and tag.token == rep.token for tag in tags.tags
    )


def _if_none_match_holds(tags: TagList, rep: Representation, read: bool) -> bool:
    # RFC 9110 §13.1.2: "*" is false iff there is a current representation.
    if tags.any:
        return rep.token is None
    if rep.token is None:
        return True
    # RFC 9110 §13.1.2: weak comparison, false if any listed tag matches.
    if read:
        current = rep.etag
        return current is None or all(tag.opaque != current.opaque for tag in tags.tags)
    # A write replaces every representation: compare versions (token parts).
    return all(tag.token != rep.token for tag in tags.tags)


def evaluate(method: str, cond: Conditionals, rep: Representation) -> Decision:
    """Evaluate `cond` against `rep` in the order of RFC 9110 §13.2.2.

    If-Range is left to `if_range_holds`: the proxy never answers a Range
    request itself (step 5 is the upstream's business).
    """
    if method in IGNORED_METHODS:
        return Decision.PROCEED
    read = method in _READ_METHODS

    # RFC 9110 §13.2.2 step 1: If-Match present -> false means 412.
    if_match = parse_tag_list(cond.if_match)
    if if_match is not None:
        if not _if_match_holds(if_match, rep):
            return Decision.PRECONDITION_FAILED
    # RFC 9110 §13.2.2 step 2: If-Unmodified-Since only without If-Match.
    elif cond.if_unmodified_since is not None:
        # RFC 9110 §13.1.4: ignored if not one valid HTTP-date or no modification date known.
        date = parse_http_date(cond.if_unmodified_since)
        modified = _modification_date(rep)
        # RFC 9110 §13.1.4: true iff last modified earlier than or equal to the date.
        if date is not None and modified is not None and modified > date:
            return Decision.PRECONDITION_FAILED

    # RFC 9110 §13.2.2 step 3: If-None-Match -> 304 for GET/HEAD, else 412.
    if_none_match = parse_tag_list(cond.if_none_match)
    if if_none_match is not None:
        if not if_none_match.malformed and not _if_none_match_holds(if_none_match, rep, read):
            return Decision.NOT_MODIFIED if read else Decision.PRECONDITION_FAILED
    # RFC 9110 §13.2.2 step 4: If-Modified-Since only for GET/HEAD without If-None-Match.
    elif read and cond.if_modified_since is not None:
        # RFC 9110 §13.1.3: ignored if not one valid HTTP-date or no modification date known.
        date = parse_http_date(cond.if_modified_since)
        modified = _modification_date(rep)
        # RFC 9110 §13.1.3: false (304) iff last modified earlier than or equal to the date.
        if date is not None and modified is not None and modified <= date:
            return Decision.NOT_MODIFIED

    # RFC 9110 §13.2.2 step 6: perform the method.
    return Decision.PROCEED


def if_range_holds(cond: Conditionals, rep: Representation) -> bool:
    """False when the request's Range must be dropped because If-Range fails.

    The proxy forwards Range requests; if If-Range does not hold, the client
    must get the whole representation (RFC 9110 §13.2.2 step 5), so the
    proxy strips Range before forwarding.
    """
    # RFC 9110 §13.1.5: If-Range without Range is ignored.
    if cond.if_range is None or cond.range is None:
        return True
    # RFC 9110 §13.1.5: an entity-tag holds only under strong comparison with the current tag.
    tag = parse_etag(cond.if_range)
    if tag is not None:
        return rep.token is not None and rep.etag is not None and strong_match(tag, rep.etag)
    # RFC 9110 §13.1.5: an HTTP-date holds only if it exactly equals Last-Modified.
    date = parse_http_date(cond.if_range)
    if date is not None:
        return date == _modification_date(rep)
    # RFC 9110 §13.1.5: any other value: the condition is false.
    return False


def write_condition(cond: Conditionals) -> WriteCondition:
    """Reduce an unsafe request's preconditions to what the store's BEGIN checks.

    `evaluate_write(write_condition(c), version)` agrees with `evaluate` for
    unsafe methods. A tag whose token part is `*` is dropped: it can never
    equal a (base32) version token, and kept it would read as the wildcard.
    """
    if_match_tags = parse_tag_list(cond.if_match)
    if_match: tuple[str, ...] | None
    if if_match_tags is None:
        if_match = None
    elif if_match_tags.any:
        if_match = ("*",)
    else:
        # RFC 9110 §13.1.1: strong comparison, so weak tags never match;
        # a malformed list leaves the empty tuple, which never matches.
        if_match = _tokens(tag for tag in if_match_tags.tags if not tag.weak)

    # RFC 9110 §13.2.2 step 2: If-Unmodified-Since only when If-Match is absent;
    # RFC 9110 §13.1.4: an invalid date is ignored.
    if_unmodified_since = None
    if if_match_tags is None:
        if_unmodified_since = parse_http_date(cond.if_unmodified_since)

    if_none_match_tags = parse_tag_list(cond.if_none_match)
    if_none_match: tuple[str, ...] | None
    # A malformed If-None-Match never matches, so its condition always holds: no check.
    if if_none_match_tags is None or if_none_match_tags.malformed:
        if_none_match = None
    elif if_none_match_tags.any:
        if_none_match = ("*",)
    else:
        # RFC 9110 §13.1.2: weak comparison, so weak and strong tags both count.
        if_none_match = _tokens(if_none_match_tags.tags)

    return WriteCondition(
        if_match=if_match,
        if_unmodified_since=if_unmodified_since,
        if_none_match=if_none_match,
    )


def _tokens(tags: Iterable[EntityTag]) -> tuple[str, ...]:
    """Distinct token parts in order, without the `*` that would mean "any"."""
    return tuple(dict.fromkeys(tag.token for tag in tags if tag.token != "*"))
