"""headers.py: hop-by-hop fields, Via, request ids and trusted proxies."""

from __future__ import annotations

import pytest

from etagproxy.headers import (
    HeaderError,
    TrustedProxies,
    check_connection,
    connection_tokens,
    request_id,
    response_headers,
)


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


def test_connection_options_are_read_from_every_line():
    assert connection_tokens(["keep-alive, X-Trace", " close ", ""]) == {"keep-alive", "x-trace", "close"}


@pytest.mark.parametrize("name", ["if-match", "authorization", "host", "content-length"])
def test_connection_may_not_strip_what_the_proxy_relies_on(name: str):
    with pytest.raises(HeaderError):
        check_connection(frozenset({name}))


def test_a_response_loses_hop_by_hop_and_named_fields_and_gains_one_via():
    out = response_headers(
        raw(
            ("Content-Type", "application/json"), ("Connection", "X-Secret"), ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Via", "1.0 cdn"),
            ("Via", "1.1 lb"), ("ETag", '"up"'),
        ),
        drop=frozenset({"etag"}), via="etagproxy", rid="r1",
    )
    assert list(out.items()) == [
        ("Content-Type", "application/json"), ("Via", "1.0 cdn, 1.1 lb, 1.1 etagproxy"), ("X-Request-ID", "r1"),
    ]


def test_a_request_id_is_kept_only_when_short_and_printable():
    assert request_id("abc-123") == "abc-123"
    for bad in (None, "", "x" * 500, "a\x00b", "a b\n"):
        fresh = request_id(bad)
        assert fresh != bad and len(fresh) == 24


def test_trusted_proxies_are_addresses_and_networks():
    trusted = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert "127.0.0.1" in trusted and "10.2.3.4" in trusted and "::1" in trusted
    assert "192.0.2.1" not in trusted and "not-an-ip" not in trusted and None not in trusted
    assert "127.0.0.1" not in TrustedProxies([])
