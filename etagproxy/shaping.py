"""Responses the proxy shapes itself, rather than relays. Pure.

A 304 carries the fields a 200 would have (RFC 9110 §15.4.5), the tag, and
the proxy's Via; problem+json answers are in `problems.py`.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from etagproxy.etag import EntityTag
from etagproxy.variants import NOT_MODIFIED_FIELDS

__all__ = ["not_modified"]


def not_modified(rid: str, via: str, tag: EntityTag, upstream_headers: CIMultiDict[str]) -> web.Response:
    """304 for `tag`, with the NOT_MODIFIED_FIELDS of `upstream_headers` (the
    200's) and their Via, if any. A short circuit's 304 has the same lines,
    kept with its selection (`shortcircuit.ShortCircuit.remember`)."""
    resp = web.Response(status=304)
    for name in NOT_MODIFIED_FIELDS:
        for value in upstream_headers.getall(name, ()):
            resp.headers.add(name, value)
    resp.headers["ETag"] = str(tag)
    resp.headers["Via"] = upstream_headers.get("Via", f"1.1 {via}")
    resp.headers["X-Request-ID"] = rid
    return resp
