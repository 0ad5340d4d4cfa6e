"""Versions derived from the upstream's answer (derived.py) and their config."""

from __future__ import annotations

import pytest

from etagproxy.config import ConfigError, parse_config
from etagproxy.derived import VersionSource, derive_token
from etagproxy.etag import make_etag

FIELD = VersionSource("field", fields=("last_updated", "created"))


def test_a_field_version_moves_with_the_field_only() -> None:
    a = derive_token(FIELD, "/s/1/", {}, b'{"last_updated": "2026-01-01T00:00:00.123Z", "x": 1}')
    b = derive_token(FIELD, "/s/1/", {}, b'{"x": 2, "last_updated": "2026-01-01T00:00:00.123Z"}')
    c = derive_token(FIELD, "/s/1/", {}, b'{"last_updated": "2026-01-01T00:00:00.124Z", "x": 1}')
    assert a is not None and a == b and a != c
    make_etag(a)  # a valid strong tag


def test_fallback_fields_and_missing_versions() -> None:
    assert derive_token(FIELD, "/s/1/", {}, b'{"created": "2026"}') is not None
    for body in (b'{"x": 1}', b'{"last_updated": null}', b'{"last_updated": ""}', b"not json", None, b"[1]"):
        assert derive_token(FIELD, "/s/1/", {}, body) is None, body


def test_the_key_is_part_of_the_token() -> None:
    body = b'{"last_updated": "2026"}'
    assert derive_token(FIELD, "/s/1/", {}, body) != derive_token(FIELD, "/s/2/", {}, body)


def test_header_and_body_versions() -> None:
    header = VersionSource("header", header="ETag")
    assert derive_token(header, "/k", {"ETag": 'W/"1"'}, None) != derive_token(header, "/k", {"ETag": 'W/"2"'}, None)
    assert derive_token(header, "/k", {}, None) is None
    body = VersionSource("body")
    assert derive_token(body, "/k", {}, b"a") != derive_token(body, "/k", {}, b"b")
    assert derive_token(body, "/k", {}, None) is None


def _problems(route: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config("upstream: http://127.0.0.1:1\nroutes:\n  - path: /a/{id}/\n" + route, filename="c.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("    version: {from: field}\n",
         "c.yaml:4: routes[0].version.field: expected a value such as last_updated (the key is required), got nothing"),
        ("    version: {from: clock}\n", "c.yaml:4: routes[0].version.from: expected token or field or header or body, got 'clock'"),
        ("    version: 3\n", "c.yaml:4: routes[0].version: expected token, or a mapping with from: field, header or body, got 3"),
        ("    version: {from: body}\n    short_circuit: true\n",
         "c.yaml:5: routes[0].short_circuit: expected short_circuit false on a route whose version comes from the upstream, got true"),
        ("    version: {from: header, header: 'bad name'}\n",
         "c.yaml:4: routes[0].version.header: expected a header name such as ETag, got 'bad name'"),
        ("    version: {from: header, header: ETag, upstream_if_match: maybe}\n",
         "c.yaml:4: routes[0].version.upstream_if_match: expected true or false, got 'maybe'"),
        # Only the upstream's own validator can be sent back to it.
        ("    version: {from: field, field: x, upstream_if_match: true}\n",
         "c.yaml:4: routes[0].version.upstream_if_match: expected a known key (one of from, field), got an unknown key"),
    ],
)
def test_bad_version_settings_are_one_message(route: str, message: str) -> None:
    assert message in _problems(route)


def test_version_settings_parse() -> None:
    config = parse_config(
        "upstream: http://127.0.0.1:1\nroutes:\n  - path: /a/{id}/\n    version: {from: field, field: [a.b, c]}\n"
        "  - path: /b/\n    version: token\n"
        "  - path: /c/{id}\n    version: {from: header, header: ETag, upstream_if_match: true}\n",
        filename="c.yaml",
    )
    assert config.routes[2].version == VersionSource("header", header="ETag", upstream_if_match=True)
    assert config.routes[0].version == VersionSource("field", fields=("a.b", "c"))
    assert config.routes[1].version is None
