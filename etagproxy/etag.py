"""Entity tags: the RFC 9110 §8.8.3 grammar, formatting and comparison.

The proxy's tags are `"<token>"` for the plain representation of a resource
and `"<token>-<variant>"` for its other representations. Version tokens are
lower-case base32 and never contain `-`, so the *token part* of any tag (the
opaque text up to the first `-`) names the version it was minted for;
`If-Match` is judged on that part, `If-None-Match` on the whole tag.

Parsing follows the grammar exactly and never raises: a client's header is
untrusted text, and a field that does not parse must simply never match
(starlette's `tag.strip(" W/")`, which strips characters rather than a
prefix, is the kind of shortcut this module avoids).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "EntityTag",
    "TagList",
    "make_etag",
    "parse_etag",
    "parse_tag_list",
    "strong_match",
    "weak_match",
]

# RFC 9110 §8.8.3: etagc = %x21 / %x23-7E / obs-text, obs-text = %x80-FF.
# A header value reaches us as str decoded from bytes; whatever the decoding
# (latin-1, UTF-8, or UTF-8 with surrogateescape as aiohttp uses), every byte
# >= 0x80 becomes a code point >= U+0080 and no such code point comes from
# an ASCII byte, so "any non-ASCII character" is exactly obs-text.
_ETAGC = "\x21\x23-\x7e\x80-\U0010ffff"
# RFC 9110 §8.8.3: entity-tag = [ weak ] opaque-tag; weak = %s"W/" (case-sensitive).
_ENTITY_TAG = re.compile(f'(W/)?"([{_ETAGC}]*)"')
_OPAQUE = re.compile(f"[{_ETAGC}]*")
# RFC 9110 §5.6.3: OWS = *( SP / HTAB ).
_OWS = " \t"


@dataclass(frozen=True, slots=True)
class EntityTag:
    """One entity-tag; `opaque` is the text between the double quotes."""

    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return f'W/"{self.opaque}"' if self.weak else f'"{self.opaque}"'

    @property
    def token(self) -> str:
        """The version-token part: `opaque` up to the first `-` (all of it if none)."""
        return self.opaque.partition("-")[0]


@dataclass(frozen=True, slots=True)
class TagList:
    """A parsed If-Match / If-None-Match field value."""

    any: bool
    """The field value was exactly `*`."""
    tags: tuple[EntityTag, ...]
    """The listed entity-tags; empty when `any` or `malformed`."""
    malformed: bool = False
    """The field did not parse; RFC 9110 gives it no meaning, so it never matches."""


_MALFORMED = TagList(any=False, tags=(), malformed=True)
_ANY = TagList(any=True, tags=())


def parse_etag(value: str) -> EntityTag | None:
    """Parse one entity-tag (such as an upstream's `ETag`); None if invalid.

    Surrounding OWS is ignored, as RFC 9110 §5.5 excludes it from field values.
    """
    if not isinstance(value, str):
        return None
    match = _ENTITY_TAG.fullmatch(value.strip(_OWS))
    if match is None:
        return None
    return EntityTag(match.group(2), weak=match.group(1) is not None)


def parse_tag_list(value: str | None) -> TagList | None:
    """Parse an If-Match / If-None-Match value; None when the header is absent.

    `value` may be several field lines joined with ", " (RFC 9110 §5.3).
    Anything that is neither `*` nor a valid list is `malformed`.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return _MALFORMED
    # A TagList is immutable: a value seen before (a client revalidating the
    # same tag, a short circuit that falls through to `evaluate`) is parsed
    # once. Bounded in entries and in the length of a value kept; full, the
    # memo starts over.
    parsed = _PARSED.get(value)
    if parsed is None:
        parsed = _parse_tag_list(value)
        if len(value) <= _PARSED_LONGEST:
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[value] = parsed
    return parsed


_PARSED: dict[str, TagList] = {}
_PARSED_MAX = 4096
_PARSED_LONGEST = 256


def _parse_tag_list(value: str) -> TagList:
    single = _ENTITY_TAG.fullmatch(value)
    if single is not None:  # the usual case: one tag, no list
        return TagList(any=False, tags=(EntityTag(single.group(2), weak=single.group(1) is not None),))
    # RFC 9110 §13.1.1/§13.1.2: If-Match / If-None-Match = "*" / #entity-tag.
    if value.strip(_OWS) == "*":
        return _ANY
    tags: list[EntityTag] = []
    pos, end = 0, len(value)
    # RFC 9110 §5.6.1.2: a recipient accepts empty list elements and OWS
    # around commas: #element => [ element ] *( OWS "," OWS [ element ] ).
    while True:
        while pos < end and value[pos] in _OWS:
            pos += 1
        if pos == end:
            break
        if value[pos] == ",":
            pos += 1
            continue
        match = _ENTITY_TAG.match(value, pos)
        if match is None:
            return _MALFORMED
        tags.append(EntityTag(match.group(2), weak=match.group(1) is not None))
        pos = match.end()
        while pos < end and value[pos] in _OWS:
            pos += 1
        if pos == end:
            break
        # Two elements must be separated by a comma: '"a" "b"' is not a list.
        if value[pos] != ",":
            return _MALFORMED
        pos += 1
    return TagList(any=False, tags=tuple(tags))


def strong_match(a: EntityTag, b: EntityTag) -> bool:
    """RFC 9110 §8.8.3.2 strong comparison: neither weak, opaque-tags identical."""
    return not a.weak and not b.weak and a.opaque == b.opaque


def weak_match(a: EntityTag, b: EntityTag) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison: opaque-tags identical, weakness ignored."""
    return a.opaque == b.opaque


def make_etag(token: str, variant: str = "") -> EntityTag:
    """The strong tag `"<token>"`, or `"<token>-<variant>"` for a non-plain representation.

    Raises ValueError if the result would not be a valid entity-tag or its
    token part would not be `token`: that is a programming error, not input.
    """
    # ASCII letters and digits (every token the stores mint) are etagc and
    # no `-`: the grammar is only consulted for anything else.
    if not (token.isascii() and token.isalnum()) and (not token or "-" in token or not _OPAQUE.fullmatch(token)):
        raise ValueError(f"invalid version token {token!r}")
    if not variant:
        return EntityTag(token)
    if not (variant.isascii() and variant.isalnum()) and not _OPAQUE.fullmatch(variant):
        raise ValueError(f"invalid representation variant {variant!r}")
    return EntityTag(f"{token}-{variant}")
