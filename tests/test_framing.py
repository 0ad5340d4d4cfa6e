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


def test_lines_that_passed_are_remembered_bounded_and_without_credentials():
    from etagproxy import framing

    framing._PASSED.clear()  # noqa: SLF001
    ua = (b"User-Agent", b"client/1.0")
    private = [(b"Authorization", b"Basic dXNlcjpwYXNz"), (b"X-Api-Key", b"k1"), (b"Cookie", b"s=1"),
               (b"X-Auth-Token", b"t")]
    long = (b"X-Long", b"v" * framing.PASSED_LINE_MAX)
    long_name = (b"X-" + b"n" * framing.PASSED_LINE_MAX, b"v")
    for _ in range(2):
        assert refused(headers=[*HOST, ua, *private, long, long_name]) is None
    assert framing._PASSED[ua] == b"user-agent"  # noqa: SLF001
    # Neither credentials nor long lines are kept: the memory stays small.
    for line in (*private, long, long_name):
        assert line not in framing._PASSED, line  # noqa: SLF001
    # A refused line is never remembered, so it is refused every time; the
    # same name with another value is checked on its own.
    bad = (b"User-Agent", b"client/1.0\x01")
    for _ in range(2):
        assert refused(headers=[*HOST, bad]) == "400 bad-header"
    assert bad not in framing._PASSED  # noqa: SLF001
    assert refused(headers=[*HOST, (b"Bad Name", b"client/1.0")]) == "400 bad-header"
    # Many new lines only ever fill it up to its bound.
    for i in range(framing.PASSED_MAX * 2 + 5):
        assert refused(headers=[*HOST, (b"X-N", str(i).encode())]) is None
        assert len(framing._PASSED) <= framing.PASSED_MAX  # noqa: SLF001
    # What it remembers still decides as before: duplicate Host is refused.
    assert refused(headers=[*HOST, *HOST]) == "400 bad-host"
