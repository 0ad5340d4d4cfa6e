"""variants.py: which representation a tag names (RFC 9110 §8.8.3.3), and
whether another request would select it again (RFC 9111 §4.1)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy.target import canonicalize
from etagproxy.variants import Selected, query_variant, representation_variant


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_the_query_variant_ignores_key_parameters_and_their_order():
    assert query_variant(canonicalize("/sites/"), ()) == ""
    a = query_variant(canonicalize("/sites/?limit=50&offset=0"), ())
    b = query_variant(canonicalize("/sites/?offset=0&limit=50"), ())
    assert a == b and a.startswith("q")
    assert query_variant(canonicalize("/sites/?limit=50&offset=50"), ()) != a
    # A key parameter names another resource, not another representation.
    assert query_variant(canonicalize("/sites/?tenant=1"), ("tenant",)) == ""


def test_the_content_type_counts_only_when_negotiated_and_not_plain():
    json = headers(("Content-Type", "application/json"), ("Vary", "Accept"))
    html = headers(("Content-Type", "text/html; charset=utf-8"), ("Vary", "Accept"))
    unnegotiated_html = headers(("Content-Type", "text/html"))
    assert representation_variant("", json) == ""
    assert representation_variant("", html).startswith("t")
    assert representation_variant("", unnegotiated_html) == ""
    # Vary may come as several lines; `*` negotiates on everything.
    assert representation_variant("", headers(("Content-Type", "text/html"), ("Vary", "Origin"), ("Vary", "accept")))
    assert representation_variant("", headers(("Content-Type", "text/html"), ("Vary", "*")))


def test_the_content_coding_always_counts_and_identity_does_not():
    assert representation_variant("", headers(("Content-Encoding", "gzip"))) == "egzip"
    assert representation_variant("", headers(("Content-Encoding", "identity"))) == ""
    assert representation_variant("q1234", headers(("Content-Encoding", "gzip, br"))) == "q1234-egzip.br"


def test_a_selection_is_repeated_only_by_a_request_with_the_same_varied_fields():
    response = headers(("Vary", "Accept, Accept-Language"), ("Cache-Control", "max-age=0"), ("Date", "x"))
    request = CIMultiDictProxy(headers(("Accept", "application/json"), ("Accept-Language", "nl")))
    seen = Selected.of("", request, response)
    # The fields a 304 repeats (RFC 9110 §15.4.5), but not Date: the 304's own.
    assert seen.fields == (("Vary", "Accept, Accept-Language"), ("Cache-Control", "max-age=0"))
    assert seen.selects("", request)
    assert not seen.selects("", CIMultiDictProxy(headers(("Accept", "application/json"))))
    assert not seen.selects("q1", request)
    star = Selected.of("", request, headers(("Vary", "*")))
    assert not star.selects("", request), "Vary: * is never selected again"
