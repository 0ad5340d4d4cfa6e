"""Responses the proxy shapes itself, rather than relays. Pure.

A 304 carries the fields a 200 would have (RFC 9110 §15.4.5), the tag, and
the proxy's Via; problem+json answers are in `problems.py`.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from etagproxy.etag import EntityTag
from etagproxy.variants import NOT_MODIFIED_FIELDS

__all__ = ["from_lines", "not_modified", "not_modified_lines"]


Lines = tuple[tuple[str, str], ...]


def not_modified_lines(fields: CIMultiDict[str], tag: EntityTag, via: str) -> Lines:
    """The header lines of a 304 for `tag`: the NOT_MODIFIED_FIELDS among
    `fields` (the 200's), in that order, the tag, and `fields`' Via or the
    proxy's own. A short circuit keeps them with its selection
    (`shortcircuit.ShortCircuit.remember`) and answers from them."""
    lines = [(name, value) for name in NOT_MODIFIED_FIELDS for value in fields.getall(name, ())]
    lines += [("ETag", str(tag)), ("Via", fields.get("Via", f"1.1 {via}"))]
    return tuple(lines)


def from_lines(rid: str, lines: Lines) -> web.Response:
    """The 304 of `lines`, for the request `rid`."""
    resp = web.Response(status=304)
    resp.headers.extend(lines)
    resp.headers["X-Request-ID"] = rid
    return resp


def not_modified(rid: str, via: str, tag: EntityTag, upstream_headers: CIMultiDict[str]) -> web.Response:
    """304 for `tag`, with the NOT_MODIFIED_FIELDS of `upstream_headers` (the
    200's) and their Via, if any."""
    return from_lines(rid, not_modified_lines(upstream_headers, tag, via))
