"""framing.py: what a request head may be (RFC 9112), judged without I/O.

The hostile-input corpus runs these checks through both of aiohttp's
parsers end to end (tests/test_security.py); here each rule is asked
directly."""

from __future__ import annotations

import pytest

from etagproxy.framing import check_request

HOST = [(b"Host", b"api.example")]


def refused(method="GET", target="/", version=(1, 1), headers=HOST, **kw) -> str | None:
    refusal = check_request(method, target, version, headers, **kw)
    return None if refusal is None else f"{refusal.status} {refusal.kind}"


def test_an_ordinary_request_passes():
    assert refused() is None
    assert refused("PUT", "/api/sites/1/", (1, 0), [*HOST, (b"Content-Length", b"12")]) is None


@pytest.mark.parametrize(
    "kw, answer",
    [
        ({"version": (2, 0)}, "505 http-version"),
        ({"version": (0, 9)}, "505 http-version"),
        ({"method": "get"}, "400"),
        ({"headers": []}, "400"),
        ({"headers": [*HOST, *HOST]}, "400"),
        ({"headers": [(b"Host", b"a b")]}, "400"),
        ({"headers": [*HOST, (b"Transfer-Encoding", b"gzip, chunked")]}, "400"),
        ({"headers": [*HOST, (b"Transfer-Encoding", b"chunked")], "version": (1, 0)}, "400"),
        ({"headers": [*HOST, (b"Content-Length", b"1" * 19)]}, "400"),
        ({"headers": [*HOST, (b"Expect", b"101-dance")]}, "417"),
    ],
)
def test_what_a_front_end_could_frame_otherwise_is_refused(kw: dict, answer: str):
    got = refused(**kw)
    assert got is not None and got.startswith(answer), got


def test_an_upgrade_passes_only_where_the_route_allows_it():
    ws = [*HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    assert refused("GET", "/ws", headers=ws, upgrade=True) is not None
    allowed = refused("GET", "/ws", headers=ws, upgrade=True, upgrade_allowed=lambda m, t, h: t == "/ws")
    assert allowed is None
