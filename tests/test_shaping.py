"""shaping.py: the 304 the proxy shapes itself (RFC 9110 §15.4.5)."""

from __future__ import annotations

from multidict import CIMultiDict

from etagproxy.etag import EntityTag
from etagproxy.shaping import not_modified


def test_a_304_repeats_what_the_200_would_carry_and_nothing_else():
    upstream = CIMultiDict([
        ("Content-Type", "application/json"), ("Content-Length", "20"), ("Cache-Control", "private"),
        ("Vary", "Accept"), ("Vary", "Cookie"), ("Expires", "0"), ("Set-Cookie", "a=1"), ("Date", "d"),
    ])
    resp = not_modified("r1", "etagproxy", EntityTag("tok"), upstream)
    assert resp.status == 304
    assert list(resp.headers.items()) == [
        ("Cache-Control", "private"), ("Date", "d"), ("Expires", "0"), ("Vary", "Accept"), ("Vary", "Cookie"),
        ("ETag", '"tok"'), ("Via", "1.1 etagproxy"), ("X-Request-ID", "r1"),
    ]


def test_the_upstream_s_via_chain_is_kept():
    resp = not_modified("r1", "etagproxy", EntityTag("tok"), CIMultiDict([("Via", "1.0 cdn, 1.1 etagproxy")]))
    assert resp.headers["Via"] == "1.0 cdn, 1.1 etagproxy"
