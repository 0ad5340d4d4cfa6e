"""The short-circuit decision and the 304 it shapes, without a server.

The end-to-end behaviour is in tests/test_conformance.py (short_circuit
rows); these pin the rules one by one on the pure pieces.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy.config import RouteConfig
from etagproxy.etag import make_etag
from etagproxy.exchange import Exchange
from etagproxy.preconditions import Conditionals
from etagproxy.shaping import not_modified
from etagproxy.shortcircuit import ShortCircuit
from etagproxy.store.base import Observation, Version
from etagproxy.variants import Selected

KEY = "/api/items/1"
VERSION = Version("tok0000000000000000000000", 1_700_000_000_000)
TAG = make_etag(VERSION.token)
PUBLIC = RouteConfig("/api/items/{id}", short_circuit=True, public=True)


def _headers(**fields: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in fields.items()}))


def _seen(sc: ShortCircuit, tag=TAG, **response: str) -> None:
    out = CIMultiDict({"Cache-Control": "max-age=5", "Content-Type": "application/json", **response})
    sc.remember(KEY, tag, Selected.of("", _headers(Accept="application/json"), out))


def _answer(sc: ShortCircuit, cfg: RouteConfig = PUBLIC, obs: Observation | None = None, **request: str):
    headers = _headers(**request)
    ex = Exchange("rid-1", "GET", key=KEY)
    return sc.answer(headers, ex, cfg, Conditionals.from_headers(headers), obs or Observation(VERSION, False), "")


def test_a_current_tag_seen_by_this_process_gets_the_200s_fields():
    sc = ShortCircuit("etagproxy")
    _seen(sc)
    resp = _answer(sc, If_None_Match=str(TAG), Accept="application/json")
    assert resp is not None and resp.status == 304
    assert resp.headers["ETag"] == str(TAG)
    assert resp.headers["Cache-Control"] == "max-age=5"
    assert resp.headers["Via"] == "1.1 etagproxy" and resp.headers["X-Request-ID"] == "rid-1"
    assert "Content-Type" not in resp.headers


def test_no_short_circuit_when_it_is_not_safe():
    sc = ShortCircuit("etagproxy")
    _seen(sc, Vary="Accept")
    current = str(TAG)
    # Never seen by this process.
    assert _answer(ShortCircuit("etagproxy"), If_None_Match=current) is None
    # Not public, and these credentials got no 2xx within the TTL.
    private = RouteConfig("/api/items/{id}", short_circuit=True)
    assert _answer(sc, private, If_None_Match=current, Accept="application/json") is None
    assert _answer(
        sc, private, Observation(VERSION, False, reader_seen=True), If_None_Match=current, Accept="application/json"
    ) is not None
    # Another precondition must be evaluated against the upstream's answer.
    assert _answer(sc, If_None_Match=current, If_Match=current, Accept="application/json") is None
    # `*`, a malformed list, an outdated version.
    assert _answer(sc, If_None_Match="*") is None
    assert _answer(sc, If_None_Match="not-a-tag") is None
    newer = Observation(Version("tok1111111111111111111111", 1), False)
    assert _answer(sc, PUBLIC, newer, If_None_Match=current, Accept="application/json") is None
    # Vary: Accept, and this request would select another representation.
    assert _answer(sc, If_None_Match=current, Accept="text/html") is None
    assert _answer(sc, If_None_Match=current, Accept="application/json") is not None


def test_the_selections_are_bounded_least_recently_used_first_out():
    sc = ShortCircuit("etagproxy", size=2)
    tags = [make_etag(VERSION.token, f"q{i}") for i in range(3)]
    for tag in tags[:2]:
        _seen(sc, tag)
    _seen(sc, tags[0])  # used again: the first one is now the oldest
    _seen(sc, tags[2])
    assert set(sc.selected) == {(KEY, tags[0].opaque), (KEY, tags[2].opaque)}


def test_a_304_carries_only_the_fields_rfc_9110_lists():
    upstream = CIMultiDict({
        "Cache-Control": "no-cache", "Expires": "0", "Vary": "Accept", "Content-Location": "/x",
        "Date": "Mon, 07 Dec 2026 00:00:00 GMT", "Content-Type": "application/json", "Content-Length": "10",
        "Set-Cookie": "a=b", "Via": "1.1 upstream",
    })
    resp = not_modified("rid-2", "etagproxy", TAG, upstream)
    assert {k for k in resp.headers if k not in ("ETag", "Via", "X-Request-ID", "Content-Length")} == {
        "Cache-Control", "Expires", "Vary", "Content-Location", "Date",
    }
    assert resp.headers["Via"] == "1.1 upstream"
    assert not_modified("r", "etagproxy", TAG, CIMultiDict()).headers["Via"] == "1.1 etagproxy"
