"""Precondition evaluation (RFC 9110 §13) against an oracle written from the RFC text.

The oracle below never calls the code under test: it works on an abstract
description of what the client sent (a list of (weak, opaque) pairs, "*", an
instant, or "invalid") and transcribes RFC 9110 §13.2.2 step by step. The
table test renders each abstract value as a header and checks `evaluate`
agrees for every combination of the four precondition headers.
"""

from __future__ import annotations

import base64
import email.utils
import itertools
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy.etag import EntityTag, make_etag
from etagproxy.preconditions import (
    IGNORED_METHODS,
    Conditionals,
    Decision,
    Representation,
    evaluate,
    if_range_holds,
    write_condition,
)
from etagproxy.store.base import Version, WriteCondition, evaluate_write


def _token(seed: bytes) -> str:
    return base64.b32encode(seed.ljust(15, b"\0")).decode("ascii").lower()


CUR = _token(b"current")  # the current version token (24 base32 letters)
OLD = _token(b"previous")  # a version the client may still hold
LM = 784111777  # the current version's Last-Modified, in seconds
VARIANT = "-gzip"

# --- the oracle: RFC 9110 §13 written out on abstract values ---------------------


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ABSENT = _Marker("ABSENT")
STAR = _Marker("STAR")
INVALID = _Marker("INVALID")  # a value the grammar does not accept

Tag = tuple[bool, str]  # (weak, opaque-tag)
TagField = _Marker | tuple[Tag, ...]
DateField = _Marker | int


@dataclass(frozen=True)
class Sent:
    """The four preconditions as the client meant them."""

    if_match: TagField
    if_unmodified_since: DateField
    if_none_match: TagField
    if_modified_since: DateField


@dataclass(frozen=True)
class Resource:
    """The oracle's view of the target resource."""

    version: str | None
    """Current version token; None: no current representation."""
    tag: Tag | None
    """Entity-tag of the selected representation, if one is sent."""
    modified: int | None
    """Modification date, if the resource has one."""


def rfc_strong(a: Tag, b: Tag) -> bool:
    # RFC 9110 §8.8.3.2: both not weak and opaque-tags match character by character.
    return not a[0] and not b[0] and a[1] == b[1]


def rfc_weak(a: Tag, b: Tag) -> bool:
    # RFC 9110 §8.8.3.2: opaque-tags match character by character, weak or not.
    return a[1] == b[1]


def version_of(tag: Tag) -> Tag:
    # DESIGN.md §1: the proxy's tags are "<token>" or "<token>-<variant>".
    return (tag[0], tag[1].split("-", 1)[0])


def if_match_is_true(value: TagField, r: Resource) -> bool:
    if value is STAR:
        # §13.1.1: false if the origin server has no current representation.
        return r.version is not None
    if value is INVALID:
        # A field that does not parse lists no tag, so none matches.
        return False
    assert isinstance(value, tuple)
    # §13.1.1: false if none of the listed tags match (strong comparison).
    # DESIGN.md §1: If-Match validates the version (the token part).
    if r.version is None:
        return False
    return any(rfc_strong(version_of(tag), (False, r.version)) for tag in value)


def if_none_match_is_true(value: TagField, r: Resource, method: str) -> bool:
    if value is STAR:
        # §13.1.2: false if the origin server has a current representation.
        return r.version is None
    if value is INVALID:
        return True
    assert isinstance(value, tuple)
    if r.version is None:
        return True
    # §13.1.2: false if one of the listed tags matches (weak comparison).
    if method in ("GET", "HEAD"):
        # The tag of the representation a GET would select.
        return r.tag is None or not any(rfc_weak(tag, r.tag) for tag in value)
    # DESIGN.md §1: a write is judged against the version.
    return not any(rfc_weak(version_of(tag), (False, r.version)) for tag in value)


def if_unmodified_since_is_true(value: DateField, r: Resource) -> bool | None:
    """None: the RFC says to ignore the field."""
    # §13.1.4: ignore a value that is not one valid HTTP-date.
    if not isinstance(value, int):
        return None
    # §13.1.4: may ignore without a modification date (no representation, none exposed).
    if r.version is None or r.modified is None:
        return None
    # §13.1.4: true if last modified earlier than or equal to the date.
    return r.modified <= value


def if_modified_since_is_true(value: DateField, r: Resource) -> bool | None:
    # §13.1.3: ignore a value that is not one valid HTTP-date.
    if not isinstance(value, int):
        return None
    # §13.1.3: ignore if the resource has no modification date.
    if r.version is None or r.modified is None:
        return None
    # §13.1.3: false if last modified earlier than or equal to the date.
    return not r.modified <= value


Outcome = Literal["perform", "304", "412"]


def oracle(method: str, sent: Sent, r: Resource) -> Outcome:
    # §13.2.1: CONNECT, OPTIONS, TRACE select no representation to compare.
    if method in ("CONNECT", "OPTIONS", "TRACE"):
        return "perform"
    step = 1
    while True:
        if step == 1:
            # 1. When If-Match is present, evaluate it: true -> step 3; false -> 412.
            if sent.if_match is ABSENT:
                step = 2
            elif if_match_is_true(sent.if_match, r):
                step = 3
            else:
                return "412"
        elif step == 2:
            # 2. If-Match absent and If-Unmodified-Since present: true -> step 3; false -> 412.
            if sent.if_unmodified_since is ABSENT:
                step = 3
            elif if_unmodified_since_is_true(sent.if_unmodified_since, r) is False:
                return "412"
            else:
                step = 3
        elif step == 3:
            # 3. If-None-Match present: true -> step 5; false -> 304 for GET/HEAD, else 412.
            if sent.if_none_match is ABSENT:
                step = 4
            elif if_none_match_is_true(sent.if_none_match, r, method):
                step = 5
            else:
                return "304" if method in ("GET", "HEAD") else "412"
        elif step == 4:
            # 4. GET/HEAD, If-None-Match absent, If-Modified-Since present: false -> 304.
            if method not in ("GET", "HEAD") or sent.if_modified_since is ABSENT:
                step = 5
            elif if_modified_since_is_true(sent.if_modified_since, r) is False:
                return "304"
            else:
                step = 5
        elif step == 5:
            # 5. If-Range: the proxy forwards Range requests, the upstream answers them.
            step = 6
        else:
            # 6. Otherwise, perform the requested method.
            return "perform"


# --- rendering abstract values as header fields ------------------------------------


def render_tags(value: TagField) -> str | None:
    if value is ABSENT:
        return None
    if value is STAR:
        return "*"
    assert isinstance(value, tuple)
    return ", ".join(('W/"%s"' if weak else '"%s"') % opaque for weak, opaque in value)


def render_date(seconds: int) -> str:
    # The standard library's IMF-fixdate, independent of etagproxy.httpdate.
    return email.utils.formatdate(seconds, usegmt=True)


KINDS = ("matching", "stale", "weak", "star", "malformed", "absent")


def tag_header(kind: str, name: str, held: str) -> tuple[TagField, str | None]:
    """`kind` of tag field from a client holding the tag `held` (opaque)."""
    older = OLD + held[len(OLD) :]  # the same representation of another version
    value: TagField
    if kind == "matching":
        value = ((False, older), (False, held))
    elif kind == "stale":
        value = ((False, older),)
    elif kind == "weak":
        value = ((True, held),)
    elif kind == "star":
        value = STAR
    elif kind == "malformed":
        # What a lax parser would read as the held tag.
        return INVALID, held if name == "If-Match" else f'"{held}" "{older}"'
    else:
        value = ABSENT
    return value, render_tags(value)


def date_header(kind: str, lm: int) -> tuple[DateField, str | None]:
    if kind == "matching":
        return lm, render_date(lm)
    if kind == "stale":
        return lm - 1, render_date(lm - 1)
    if kind == "weak":  # no weak dates: two dates, which is a list, not a date
        return INVALID, f"{render_date(lm)}, {render_date(lm)}"
    if kind == "star":
        return INVALID, "*"
    if kind == "malformed":  # RFC 5322 allows it, HTTP-date does not
        return INVALID, render_date(lm).replace("GMT", "+0000")
    return ABSENT, None


RESOURCES: dict[str, tuple[Resource, Representation]] = {
    "plain": (
        Resource(CUR, (False, CUR), LM),
        Representation(token=CUR, etag=EntityTag(CUR), last_modified=LM),
    ),
    "variant": (
        Resource(CUR, (False, CUR + VARIANT), LM),
        Representation(token=CUR, etag=EntityTag(CUR + VARIANT), last_modified=LM),
    ),
    "no-date": (
        Resource(CUR, (False, CUR), None),
        Representation(token=CUR, etag=EntityTag(CUR), last_modified=None),
    ),
    "no-etag": (  # e.g. a read overlapping a write in flight
        Resource(CUR, None, LM),
        Representation(token=CUR, etag=None, last_modified=LM),
    ),
    "none": (
        Resource(None, None, None),
        Representation(token=None, etag=None, last_modified=None),
    ),
}
METHODS = ("GET", "HEAD", "PUT", "PATCH", "DELETE", "POST")
_DECISION = {
    "perform": Decision.PROCEED,
    "304": Decision.NOT_MODIFIED,
    "412": Decision.PRECONDITION_FAILED,
}


@pytest.mark.parametrize("resource", list(RESOURCES))
@pytest.mark.parametrize("method", METHODS)
def test_every_combination_agrees_with_the_rfc(method: str, resource: str) -> None:
    """6 kinds ^ 4 headers for each method and resource state (6*5*1296 cases)."""
    model, rep = RESOURCES[resource]
    mismatches = []
    outcomes = set()
    # The tag the client holds for this representation; the plain one if none is sent.
    held = model.tag[1] if model.tag is not None else CUR
    for kinds in itertools.product(KINDS, repeat=4):
        im, im_header = tag_header(kinds[0], "If-Match", held)
        ius, ius_header = date_header(kinds[1], LM)
        inm, inm_header = tag_header(kinds[2], "If-None-Match", held)
        ims, ims_header = date_header(kinds[3], LM)
        cond = Conditionals(
            if_match=im_header,
            if_unmodified_since=ius_header,
            if_none_match=inm_header,
            if_modified_since=ims_header,
        )
        expected = _DECISION[oracle(method, Sent(im, ius, inm, ims), model)]
        outcomes.add(expected)
        got = evaluate(method, cond, rep)
        if got is not expected:
            mismatches.append(
                f"If-Match={kinds[0]} If-Unmodified-Since={kinds[1]} "
                f"If-None-Match={kinds[2]} If-Modified-Since={kinds[3]}: "
                f"expected {expected.name}, got {got.name}\n    {cond}"
            )
    assert not mismatches, f"{method} on {resource}: {len(mismatches)} mismatches\n" + "\n".join(
        mismatches[:10]
    )
    # The table exercises every outcome the method can have on this resource.
    assert Decision.PRECONDITION_FAILED in outcomes
    if resource != "none":
        possible = {Decision.NOT_MODIFIED} if method in ("GET", "HEAD") else set()
        assert possible <= outcomes


def test_oracle_sanity() -> None:
    """A few outcomes read straight off the RFC, so the oracle itself is checked."""
    plain = RESOURCES["plain"][0]
    none = RESOURCES["none"][0]
    sent = Sent(ABSENT, ABSENT, ((False, CUR),), ABSENT)
    assert oracle("GET", sent, plain) == "304"
    assert oracle("PUT", sent, plain) == "412"
    assert oracle("PUT", Sent(((False, OLD),), ABSENT, ABSENT, ABSENT), plain) == "412"
    assert oracle("PUT", Sent(((True, CUR),), ABSENT, ABSENT, ABSENT), plain) == "412"
    assert oracle("PUT", Sent(STAR, ABSENT, ABSENT, ABSENT), none) == "412"
    assert oracle("PUT", Sent(ABSENT, ABSENT, STAR, ABSENT), none) == "perform"
    # If-Match wins over a stale If-Unmodified-Since; If-None-Match over If-Modified-Since.
    assert oracle("PUT", Sent(((False, CUR),), LM - 1, ABSENT, ABSENT), plain) == "perform"
    assert oracle("GET", Sent(ABSENT, ABSENT, ((False, OLD),), LM), plain) == "perform"
    assert oracle("GET", Sent(ABSENT, ABSENT, ABSENT, LM), plain) == "304"
    assert oracle("PUT", Sent(ABSENT, ABSENT, ABSENT, LM), plain) == "perform"


# --- representations and methods the table does not spell out ------------------------


@pytest.mark.parametrize("method", sorted(IGNORED_METHODS))
def test_ignored_methods_always_proceed(method: str) -> None:
    _, rep = RESOURCES["plain"]
    cond = Conditionals(
        if_match=f'"{OLD}"',
        if_none_match="*",
        if_unmodified_since=render_date(LM - 1),
        if_modified_since=render_date(LM),
    )
    assert evaluate(method, cond, rep) is Decision.PROCEED
    assert evaluate("PUT", cond, rep) is Decision.PRECONDITION_FAILED


def test_ignored_methods_are_exactly_connect_options_trace() -> None:
    assert IGNORED_METHODS == frozenset({"CONNECT", "OPTIONS", "TRACE"})


@pytest.mark.parametrize(
    ("method", "header", "value", "decision"),
    [
        # No current representation: "*" and any list fail If-Match ...
        ("PUT", "if_match", "*", Decision.PRECONDITION_FAILED),
        ("PUT", "if_match", f'"{CUR}"', Decision.PRECONDITION_FAILED),
        ("DELETE", "if_match", "*", Decision.PRECONDITION_FAILED),
        ("GET", "if_match", "*", Decision.PRECONDITION_FAILED),
        # ... while If-None-Match: * (create-only) holds.
        ("PUT", "if_none_match", "*", Decision.PROCEED),
        ("POST", "if_none_match", "*", Decision.PROCEED),
        ("GET", "if_none_match", "*", Decision.PROCEED),
        ("GET", "if_none_match", f'"{CUR}"', Decision.PROCEED),
        # Dates have nothing to compare with.
        ("PUT", "if_unmodified_since", render_date(0), Decision.PROCEED),
        ("GET", "if_modified_since", render_date(LM * 2), Decision.PROCEED),
    ],
)
def test_no_current_representation(method: str, header: str, value: str, decision: Decision) -> None:
    rep = Representation(token=None, etag=None, last_modified=None)
    assert evaluate(method, Conditionals(**{header: value}), rep) is decision


def test_date_without_a_current_representation_is_ignored() -> None:
    # A last_modified left on a representation that does not exist is not used.
    rep = Representation(token=None, etag=None, last_modified=LM)
    assert evaluate("PUT", Conditionals(if_unmodified_since=render_date(LM - 1)), rep) is Decision.PROCEED
    assert evaluate("GET", Conditionals(if_modified_since=render_date(LM)), rep) is Decision.PROCEED


@pytest.mark.parametrize(
    ("method", "cond", "decision"),
    [
        # GET compares whole tags: another representation's tag is not this one.
        ("GET", Conditionals(if_none_match=f'"{CUR}"'), Decision.PROCEED),
        ("GET", Conditionals(if_none_match=f'"{CUR}-br"'), Decision.PROCEED),
        ("GET", Conditionals(if_none_match=f'"{CUR}{VARIANT}"'), Decision.NOT_MODIFIED),
        ("HEAD", Conditionals(if_none_match=f'W/"{CUR}{VARIANT}"'), Decision.NOT_MODIFIED),
        # A write compares versions: any representation's tag of the current version.
        ("PUT", Conditionals(if_none_match=f'"{CUR}"'), Decision.PRECONDITION_FAILED),
        ("PUT", Conditionals(if_none_match=f'W/"{CUR}-br"'), Decision.PRECONDITION_FAILED),
        ("PUT", Conditionals(if_match=f'"{CUR}"'), Decision.PROCEED),
        ("PUT", Conditionals(if_match=f'"{CUR}-br"'), Decision.PROCEED),
        ("GET", Conditionals(if_match=f'"{CUR}"'), Decision.PROCEED),
        ("PUT", Conditionals(if_match=f'W/"{CUR}{VARIANT}"'), Decision.PRECONDITION_FAILED),
        ("PUT", Conditionals(if_match=f'"{OLD}{VARIANT}"'), Decision.PRECONDITION_FAILED),
        # A tag that merely starts with the token is another version.
        ("PUT", Conditionals(if_match=f'"{CUR}x"'), Decision.PRECONDITION_FAILED),
        ("PUT", Conditionals(if_match=f'"{CUR[:-1]}"'), Decision.PRECONDITION_FAILED),
    ],
)
def test_variant_representation(method: str, cond: Conditionals, decision: Decision) -> None:
    rep = Representation(token=CUR, etag=make_etag(CUR, VARIANT[1:]), last_modified=LM)
    assert evaluate(method, cond, rep) is decision


@pytest.mark.parametrize(
    ("if_match", "decision"),
    [
        (f'"{OLD}", W/"{CUR}", "{CUR}"', Decision.PROCEED),
        (f'W/"{CUR}", "{OLD}"', Decision.PRECONDITION_FAILED),
        (f'"{OLD}",,  "{CUR}" ,', Decision.PROCEED),
        (f'"{CUR}" "{OLD}"', Decision.PRECONDITION_FAILED),  # no comma: malformed
        (f'*, "{CUR}"', Decision.PRECONDITION_FAILED),  # "*" mixed with tags: malformed
        ('"*"', Decision.PRECONDITION_FAILED),  # a quoted "*" is an ordinary tag
        ("", Decision.PRECONDITION_FAILED),  # an empty list matches nothing
        (f'w/"{CUR}"', Decision.PRECONDITION_FAILED),
    ],
)
def test_if_match_lists(if_match: str, decision: Decision) -> None:
    rep = Representation(token=CUR, etag=EntityTag(CUR), last_modified=LM)
    assert evaluate("PATCH", Conditionals(if_match=if_match), rep) is decision


def test_if_modified_since_later_than_last_modified_is_304_and_ignored_for_writes() -> None:
    rep = Representation(token=CUR, etag=EntityTag(CUR), last_modified=LM)
    later = Conditionals(if_modified_since=render_date(LM + 3600))
    assert evaluate("GET", later, rep) is Decision.NOT_MODIFIED
    assert evaluate("DELETE", later, rep) is Decision.PROCEED
    earlier_ius = Conditionals(if_unmodified_since="Sunday, 06-Nov-94 08:49:36 GMT")
    assert evaluate("DELETE", earlier_ius, rep) is Decision.PRECONDITION_FAILED


def test_method_names_are_case_sensitive() -> None:
    # RFC 9110 §9.1: "get" is not GET, so a failed If-None-Match gives 412, not 304.
    rep = Representation(token=CUR, etag=EntityTag(CUR), last_modified=LM)
    assert evaluate("get", Conditionals(if_none_match="*"), rep) is Decision.PRECONDITION_FAILED
    assert evaluate("options", Conditionals(if_match=f'"{OLD}"'), rep) is Decision.PRECONDITION_FAILED


# --- If-Range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("if_range", "range_", "holds"),
    [
        (None, "bytes=0-9", True),
        (f'"{OLD}"', None, True),  # §13.1.5: ignored without Range
        (f'"{CUR}{VARIANT}"', "bytes=0-9", True),
        (f'"{CUR}"', "bytes=0-9", False),  # another representation's tag
        (f'W/"{CUR}{VARIANT}"', "bytes=0-9", False),  # weak never matches strongly
        (f'"{OLD}{VARIANT}"', "bytes=0-9", False),
        ("Sun, 06 Nov 1994 08:49:37 GMT", "bytes=0-9", True),  # exact date
        ("Sunday, 06-Nov-94 08:49:37 GMT", "bytes=0-9", True),
        ("Sun, 06 Nov 1994 08:49:38 GMT", "bytes=0-9", False),
        ("Sun, 06 Nov 1994 08:49:36 GMT", "bytes=0-9", False),
        ("garbage", "bytes=0-9", False),
        ("*", "bytes=0-9", False),
        (f'"{CUR}{VARIANT}", "{OLD}"', "bytes=0-9", False),
    ],
)
def test_if_range(if_range: str | None, range_: str | None, holds: bool) -> None:
    rep = Representation(token=CUR, etag=make_etag(CUR, VARIANT[1:]), last_modified=LM)
    assert if_range_holds(Conditionals(if_range=if_range, range=range_), rep) is holds


def test_if_range_without_validators() -> None:
    cond_tag = Conditionals(if_range=f'"{CUR}"', range="bytes=0-9")
    cond_date = Conditionals(if_range=render_date(LM), range="bytes=0-9")
    none = Representation(token=None, etag=None, last_modified=None)
    assert not if_range_holds(cond_tag, none)
    assert not if_range_holds(cond_date, none)
    no_date = Representation(token=CUR, etag=EntityTag(CUR), last_modified=None)
    assert not if_range_holds(cond_date, no_date)
    assert if_range_holds(cond_tag, no_date)


# --- collecting headers --------------------------------------------------------------


def test_from_headers_joins_repeated_field_lines() -> None:
    headers = CIMultiDict(
        [
            ("if-none-match", f'"{OLD}"'),
            ("If-None-Match", f'"{CUR}"'),
            ("If-Modified-Since", render_date(LM)),
            ("IF-MODIFIED-SINCE", render_date(LM)),
            ("If-Match", "*"),
            ("Range", "bytes=0-1"),
            ("If-Range", f'"{CUR}"'),
            ("If-Unmodified-Since", render_date(LM)),
        ]
    )
    cond = Conditionals.from_headers(CIMultiDictProxy(headers))
    assert cond == Conditionals(
        if_match="*",
        if_none_match=f'"{OLD}", "{CUR}"',
        if_modified_since=f"{render_date(LM)}, {render_date(LM)}",
        if_unmodified_since=render_date(LM),
        if_range=f'"{CUR}"',
        range="bytes=0-1",
    )
    rep = Representation(token=CUR, etag=EntityTag(CUR), last_modified=LM)
    # The second If-None-Match line matches: 304.
    assert evaluate("GET", cond, rep) is Decision.NOT_MODIFIED
    # Two If-Modified-Since lines are a list, not a date: ignored.
    assert evaluate("GET", Conditionals.from_headers({"If-Modified-Since": cond.if_modified_since}), rep) is (
        Decision.PROCEED
    )


def test_from_headers_with_a_plain_mapping() -> None:
    cond = Conditionals.from_headers({"If-Match": f'"{CUR}"', "Range": "bytes=0-1"})
    assert cond == Conditionals(if_match=f'"{CUR}"', range="bytes=0-1")
    assert cond.any
    assert Conditionals.from_headers({}) == Conditionals()


def test_empty_field_line_is_present() -> None:
    cond = Conditionals.from_headers(CIMultiDict([("If-Match", "")]))
    assert cond.if_match == ""
    rep = Representation(token=CUR, etag=EntityTag(CUR), last_modified=LM)
    assert evaluate("PUT", cond, rep) is Decision.PRECONDITION_FAILED


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        (Conditionals(), False),
        (Conditionals(if_range='"x"', range="bytes=0-1"), False),
        (Conditionals(if_match="*"), True),
        (Conditionals(if_none_match="*"), True),
        (Conditionals(if_modified_since="x"), True),
        (Conditionals(if_unmodified_since="x"), True),
    ],
)
def test_any(cond: Conditionals, expected: bool) -> None:
    assert cond.any is expected


# --- write_condition ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        (Conditionals(), WriteCondition()),
        (Conditionals(if_match="*"), WriteCondition(if_match=("*",))),
        (
            Conditionals(if_match=f'W/"{OLD}", "{CUR}-gzip", "{CUR}", "{OLD}"'),
            WriteCondition(if_match=(CUR, OLD)),
        ),
        (Conditionals(if_match=f'W/"{CUR}"'), WriteCondition(if_match=())),
        (Conditionals(if_match=f"{CUR}"), WriteCondition(if_match=())),
        # A quoted "*" is a tag that matches no version, not the wildcard.
        (Conditionals(if_match='"*"'), WriteCondition(if_match=())),
        (Conditionals(if_none_match='"*", W/"*-x"'), WriteCondition(if_none_match=())),
        # If-Unmodified-Since counts only without If-Match, and only if valid.
        (
            Conditionals(if_unmodified_since=render_date(LM)),
            WriteCondition(if_unmodified_since=LM),
        ),
        (
            Conditionals(if_match="*", if_unmodified_since=render_date(LM)),
            WriteCondition(if_match=("*",)),
        ),
        (Conditionals(if_unmodified_since="yesterday"), WriteCondition()),
        # If-None-Match: weak tags count; a malformed field never matches: no check.
        (
            Conditionals(if_none_match=f'W/"{CUR}-br", "{OLD}"'),
            WriteCondition(if_none_match=(CUR, OLD)),
        ),
        (Conditionals(if_none_match="*"), WriteCondition(if_none_match=("*",))),
        (Conditionals(if_none_match=f'*, "{CUR}"'), WriteCondition()),
        # If-Modified-Since and If-Range do not concern writes.
        (Conditionals(if_modified_since=render_date(LM), if_range='"x"'), WriteCondition()),
    ],
)
def test_write_condition(cond: Conditionals, expected: WriteCondition) -> None:
    assert write_condition(cond) == expected


def test_write_condition_has_precondition_for_428() -> None:
    assert write_condition(Conditionals(if_match="garbage")).has_precondition
    assert write_condition(Conditionals(if_unmodified_since=render_date(LM))).has_precondition
    assert not write_condition(Conditionals(if_unmodified_since="garbage")).has_precondition
    # Create-only (RFC 9110 §13.1.2) is a precondition: a 428 route accepts it.
    assert write_condition(Conditionals(if_none_match="*")).has_precondition
    assert not write_condition(Conditionals(if_none_match='"abc"')).has_precondition


# --- the store's BEGIN agrees with evaluate --------------------------------------------

OTHER = _token(b"other")
tokens = st.sampled_from([CUR, OLD, OTHER, "*", ""])
variants = st.sampled_from(["", "-gzip", "-a-b"])
one_tag = st.builds(
    lambda weak, token, variant: ('W/"%s"' if weak else '"%s"') % (token + variant),
    st.booleans(),
    tokens,
    variants,
)
separators = st.sampled_from([", ", ",", " , ", ",,", ", ,\t", " "])
tag_lists = st.builds(
    lambda tags, seps: "".join(t + s for t, s in zip(tags, seps)).rstrip(" ,\t"),
    st.lists(one_tag, max_size=4),
    st.lists(separators, min_size=4, max_size=4),
)
tag_headers = st.one_of(
    st.none(),
    st.just("*"),
    tag_lists,
    st.sampled_from([f'*, "{CUR}"', CUR, f'"{CUR}', f'w/"{CUR}"', "", " "]),
    st.text(max_size=20),
)
MINTED_S = LM
date_headers = st.one_of(
    st.none(),
    st.integers(min_value=-2, max_value=2).map(lambda d: render_date(MINTED_S + d)),
    st.sampled_from(
        [
            "Sunday, 06-Nov-94 08:49:36 GMT",
            "Sun Nov  6 08:49:38 1994",
            f"{render_date(MINTED_S + 5)}, {render_date(MINTED_S + 5)}",
            render_date(MINTED_S + 5).replace("GMT", "UTC"),
            "*",
        ]
    ),
    st.text(max_size=20),
)
versions = st.one_of(
    st.none(),
    st.builds(
        Version,
        token=st.sampled_from([CUR, OLD]),
        minted_ms=st.integers(min_value=(MINTED_S - 2) * 1000, max_value=(MINTED_S + 2) * 1000 + 999),
        exists=st.booleans(),
    ),
)
conditionals = st.builds(
    Conditionals,
    if_match=tag_headers,
    if_none_match=tag_headers,
    if_modified_since=date_headers,
    if_unmodified_since=date_headers,
    if_range=st.one_of(st.none(), one_tag),
    range=st.one_of(st.none(), st.just("bytes=0-9")),
)


@given(st.sampled_from(["PUT", "PATCH", "DELETE", "POST"]), conditionals, versions)
def test_store_evaluation_agrees_with_evaluate(method: str, cond: Conditionals, version: Version | None) -> None:
    if version is not None and version.exists:
        rep = Representation(
            token=version.token, etag=make_etag(version.token), last_modified=version.minted_ms // 1000
        )
    else:
        rep = Representation(token=None, etag=None, last_modified=None)
    proceeds = evaluate(method, cond, rep) is Decision.PROCEED
    assert evaluate_write(write_condition(cond), version) == proceeds


def test_conditionals_are_immutable() -> None:
    # A request without conditionals shares one instance.
    shared = Conditionals.from_headers({})
    assert shared is Conditionals.from_headers({"Accept": "*/*"}) or shared == Conditionals()
    with pytest.raises(AttributeError):
        shared.if_match = '"x"'  # type: ignore[misc]
    assert shared == Conditionals()
