"""Canonical request targets: examples for each rule, then properties."""

from __future__ import annotations

import re
import string
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etagproxy.target import Target, TargetError, _canonicalize_slow, canonicalize

# --- the rules, one example each -------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/", "/", ""),
        ("/api/sites/1/", "/api/sites/1/", ""),
        # RFC 3986 §6.2.2.1: hex digits in escapes are upper case.
        ("/caf%c3%a9", "/caf%C3%A9", ""),
        # §6.2.2.2: encoded unreserved characters are decoded.
        ("/%7euser/%41%2d%5f%2E", "/~user/A-_.", ""),
        # Encoded dots are dot segments once decoded (§5.2.4).
        ("/a/%2e%2e/b", "/b", ""),
        ("/a/%2E/b", "/a/b", ""),
        ("/a/.%2e/b", "/b", ""),
        ("/a/b/..", "/a/", ""),
        ("/a/b/.", "/a/b/", ""),
        ("/a/./b/../c/", "/a/c/", ""),
        ("/a/..", "/", ""),
        ("/.", "/", ""),
        # Slash runs collapse before dot segments are resolved.
        ("//a///b", "/a/b", ""),
        ("/a//b//", "/a/b/", ""),
        ("/a//../b", "/b", ""),
        ("//", "/", ""),
        # Escapes that are not unreserved stay encoded; decoding happens once.
        ("/a%2fb", "/a%2Fb", ""),
        ("/a%252F", "/a%252F", ""),
        ("/a%3Bb;c", "/a%3Bb;c", ""),
        ("/%E2%82%AC", "/%E2%82%AC", ""),
        # Characters not allowed raw in a path are encoded: same resource.
        ('/q"<>[]^`{|}', "/q%22%3C%3E%5B%5D%5E%60%7B%7C%7D", ""),
        # Segments that only look like dot segments are ordinary.
        ("/a/.../b", "/a/.../b", ""),
        ("/a/.b/c.", "/a/.b/c.", ""),
        ("/a/%2e%2e%2e", "/a/...", ""),
        # Query: escapes normalised, separators and order kept.
        ("/s?b=2&a=1", "/s", "b=2&a=1"),
        ("/s?q=%7e%2b+%26%3d%3D", "/s", "q=~%2B+%26%3D%3D"),
        ("/s?q=a%20b&&x", "/s", "q=a%20b&&x"),
        ("/s?path=/a/../b?c", "/s", "path=/a/../b?c"),
        ("/s?q={x}|\\", "/s", "q=%7Bx%7D%7C%5C"),
        ("/s?q=%5C", "/s", "q=%5C"),
        ("/s?", "/s", ""),
        ("/?", "/", ""),
    ],
)
def test_canonical_form(raw: str, path: str, query: str) -> None:
    assert canonicalize(raw) == Target(path, query)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/..", "above the root"),
        ("/a/../..", "above the root"),
        ("/%2e%2e/etc/passwd", "above the root"),
        ("/a/%2E%2E/%2e%2e/b", "above the root"),
        ("/%C0%AE%C0%AE/x", "UTF-8"),  # overlong "."
        ("/%C0%AF", "UTF-8"),  # overlong "/"
        ("/%ED%A0%80", "UTF-8"),  # surrogate
        ("/%FF", "UTF-8"),
        ("/caf%C3", "UTF-8"),  # truncated sequence
        ("/s?q=%C0%AE", "UTF-8"),
        ("/a%00b", "NUL"),
        ("/a\x00b", "NUL"),
        ("/s?q=%00", "NUL"),
        ("/a\\b", "backslash"),
        ("/a%5cb", "backslash"),
        ("/a%5C..%5Cb", "backslash"),
        ("/a/..%2Fsecret", "dot segment"),
        ("/a/%2e%2e%2fsecret", "dot segment"),
        ("/a/x%2F..", "dot segment"),
        ("/a#frag", "fragment"),
        ("/a?q=1#frag", "fragment"),
        ("/a b", "spaces"),
        ("/a\tb", "control"),
        ("/a\r\nb", "control"),
        ("/a\x7f", "control"),
        ("/caf\u00e9", "ASCII"),
        ("/caf\udcc3\udca9", "ASCII"),  # undecodable bytes kept by surrogateescape
        ("/a%", "malformed"),
        ("/a%2", "malformed"),
        ("/a%zz", "malformed"),
        ("/s?q=%g1", "malformed"),
        ("*", "asterisk"),
        ("example.com:443", "origin-form"),
        ("", "origin-form"),
        ("a/b", "origin-form"),
        ("ftp://example.com/a", "scheme"),
        ("http://user@example.com/a", "userinfo"),
        ("http://evil.example/a", "different host"),
    ],
)
def test_refused(raw: str, reason: str) -> None:
    with pytest.raises(TargetError, match=re.escape(reason)):
        canonicalize(raw, host="example.com")


@pytest.mark.parametrize(
    ("raw", "host", "expected"),
    [
        ("http://example.com/a/%7e?x=1", "example.com", "/a/~?x=1"),
        ("HTTP://EXAMPLE.COM/a", "example.com", "/a"),
        ("http://example.com:80/a", "example.com", "/a"),
        ("http://example.com/a", "example.com:80", "/a"),
        ("https://example.com:443/a", "example.com", "/a"),
        ("http://example.com:8080/a", "example.com:8080", "/a"),
        ("http://example.com", "example.com", "/"),
        ("http://example.com?x", "example.com", "/?x"),
        ("http://[::1]:8080//a/./b", "[::1]:8080", "/a/b"),
    ],
)
def test_absolute_form_for_own_host(raw: str, host: str, expected: str) -> None:
    # RFC 9112 §3.2.2: absolute-form is converted to origin-form.
    assert canonicalize(raw, host=host).raw == expected


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("http://example.com/a", None),
        ("http://example.com:8080/a", "example.com"),
        ("https://example.com/a", "example.com:80"),
        ("http://example.com.evil/a", "example.com"),
        ("http:///a", ""),
        ("http://[::1]/a", "[::2]"),
    ],
)
def test_absolute_form_for_another_host(raw: str, host: str | None) -> None:
    with pytest.raises(TargetError):
        canonicalize(raw, host=host)


def test_encoded_slash_is_another_resource() -> None:
    assert canonicalize("/a%2Fb") != canonicalize("/a/b")
    assert canonicalize("/a%2fb") == canonicalize("/a%2Fb")


def test_raw_and_params() -> None:
    t = canonicalize("/s/?b=2&&a&c=x=y&b=1&")
    assert t.raw == "/s/?b=2&&a&c=x=y&b=1&"
    assert t.params() == [("b", "2"), ("a", ""), ("c", "x=y"), ("b", "1")]
    assert canonicalize("/s").raw == "/s"
    assert canonicalize("/s").params() == []
    assert canonicalize("/s?%61=%2b").params() == [("a", "%2B")]


# --- properties --------------------------------------------------------------

UNRESERVED = string.ascii_letters + string.digits + "-._~"
SUB_DELIMS = "!$&'()*+,;=:@"  # with ":" and "@": allowed raw, distinct from their escapes
ENCODED_WHEN_RAW = '"<>[]^`{|}'  # not allowed raw, same resource as their escapes
HEX = "0123456789abcdefABCDEF"

# Targets built from the characters that matter to the rules, including
# malformed escapes, so that both the accepting and the refusing paths run.
_pieces = st.one_of(
    st.sampled_from(list(UNRESERVED + SUB_DELIMS + ENCODED_WHEN_RAW + "/%?#\\ \x00é")),
    st.sampled_from(["/", "//", "/./", "/../", "/.", "/..", "%2e", "%2E%2e", "%2F", "%2f", "%25"]),
    st.tuples(st.sampled_from(HEX), st.sampled_from(HEX)).map(lambda h: "%" + "".join(h)),
    st.sampled_from(["%C3%A9", "%c3%a9", "%E2%82%AC", "%F0%9F%98%80", "%C0%AE", "%ED%A0%80"]),
)
targets = st.lists(_pieces, max_size=24).map(lambda p: "/" + "".join(p))

_ESCAPE = re.compile("%([0-9A-F]{2})")
_CANONICAL_PATH = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*")
_CANONICAL_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-F]{2})*")


def _check_canonical(t: Target) -> None:
    """What every canonical target looks like, stated independently of the algorithm."""
    assert _CANONICAL_PATH.fullmatch(t.path), t
    assert _CANONICAL_QUERY.fullmatch(t.query), t
    for text in (t.path, t.query):
        for hex_pair in _ESCAPE.findall(text):
            assert chr(int(hex_pair, 16)) not in UNRESERVED, t
        decoded = unquote_to_bytes(text)
        assert b"\x00" not in decoded
        decoded.decode("utf-8")
    assert "\\" not in t.path and "%5C" not in t.path
    assert "//" not in t.path
    segments = t.path.split("/")
    assert "." not in segments and ".." not in segments


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(targets)
@example("/a/%2e%2e/b")
@example("/%7e/%2F/./%41?q=%7e&%2b")
def test_idempotent_and_canonical(raw: str) -> None:
    try:
        t = canonicalize(raw)
    except TargetError:
        return
    _check_canonical(t)
    assert canonicalize(t.raw) == t
    assert canonicalize(t.raw).raw == t.raw


@settings(max_examples=300)
@given(targets)
def test_fast_path_agrees_with_full_algorithm(raw: str) -> None:
    try:
        expected: Target | TargetError = _canonicalize_slow(raw, None)
    except TargetError as exc:
        expected = exc
    try:
        got: Target | TargetError = canonicalize(raw)
    except TargetError as exc:
        got = exc
    if isinstance(expected, TargetError):
        assert isinstance(got, TargetError)
    else:
        assert got == expected


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")),
        st.binary(max_size=64).map(lambda b: "/" + b.decode("latin-1")),
        st.text(max_size=64),
    ),
    st.one_of(st.none(), st.text(max_size=20), st.just("example.com")),
)
def test_arbitrary_input_only_raises_target_error(raw: str, host: str | None) -> None:
    try:
        t = canonicalize(raw, host=host)
    except TargetError:
        return
    _check_canonical(t)


# Resources are modelled as bytes, independently of any spelling; each byte
# says how it must be written. The expected canonical form follows from the
# model alone, and every spelling the rules call equivalent must reach it.

_text_bytes = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00\\"),
    min_size=1,
    max_size=6,
).map(lambda s: s.encode("utf-8"))


@st.composite
def _segment(draw: st.DrawFn) -> list[tuple[int, bool]]:
    """One segment: (byte, written_raw) pairs; written_raw only matters for sub-delims."""
    return [(b, draw(st.booleans())) for b in draw(_text_bytes)]


def _ordinary(seg: list[tuple[int, bool]]) -> bool:
    # A segment that decodes to a dot segment, or hides one behind %2F, is
    # not an ordinary segment; the model keeps to ordinary ones.
    parts = _expected_segment(seg).split("%2F")
    return not any(part in (".", "..") for part in parts)


segments = _segment().filter(_ordinary)


def _expected_segment(seg: list[tuple[int, bool]]) -> str:
    out = []
    for byte, written_raw in seg:
        char = chr(byte)
        if char in UNRESERVED or (char in SUB_DELIMS and written_raw):
            out.append(char)
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


@st.composite
def spelling(draw: st.DrawFn, segs: list[list[tuple[int, bool]]], trailing: bool) -> str:
    """One of the many ways a client may write the modelled path."""

    def escape(byte: int) -> str:
        return "%" + "".join(draw(st.sampled_from([c, c.lower()])) for c in f"{byte:02X}")

    def slash() -> str:
        return draw(st.sampled_from(["/", "/", "//", "/./", "/%2e/", "/x/../", "/x/%2E%2e/"]))

    out = []
    for seg in segs:
        out.append(slash())
        for byte, written_raw in seg:
            char = chr(byte)
            if char in UNRESERVED or char in ENCODED_WHEN_RAW:
                out.append(char if draw(st.booleans()) else escape(byte))
            elif char in SUB_DELIMS and written_raw:
                out.append(char)
            else:
                out.append(escape(byte))
    if trailing or not segs:
        out.append(draw(st.sampled_from(["/", "//", "/.", "/./"])))
    return "".join(out)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(segments, max_size=5), st.booleans())
def test_equivalent_spellings_share_one_canonical_form(
    data: st.DataObject, segs: list[list[tuple[int, bool]]], trailing: bool
) -> None:
    expected = "/" + "/".join(_expected_segment(s) for s in segs)
    if segs and trailing:
        expected += "/"
    first = data.draw(spelling(segs, trailing))
    second = data.draw(spelling(segs, trailing))
    assert canonicalize(first).path == expected
    assert canonicalize(second) == canonicalize(first)


@settings(max_examples=200)
@given(st.lists(segments, min_size=2, max_size=4), st.integers(min_value=0))
def test_encoded_slash_never_merges_with_a_real_one(
    segs: list[list[tuple[int, bool]]], which: int
) -> None:
    canon = [_expected_segment(s) for s in segs]
    i = which % (len(canon) - 1)
    joined = [*canon[:i], canon[i] + "%2F" + canon[i + 1], *canon[i + 2 :]]
    with_slash = canonicalize("/" + "/".join(canon))
    try:
        with_escape = canonicalize("/" + "/".join(joined))
    except TargetError:
        return  # the join formed a hidden dot segment: refused, never merged
    assert with_escape != with_slash


def test_a_target_is_immutable() -> None:
    target = canonicalize("/a/?b=1")
    with pytest.raises(AttributeError):
        target.path = "/other"  # type: ignore[misc]
    assert (target.path, target.query, target.raw) == ("/a/", "b=1", "/a/?b=1")
