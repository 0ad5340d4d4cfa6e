"""Canonical request targets: one spelling per upstream resource.

The proxy forwards the canonical target and derives the resource key from
it, so two spellings of one resource share a version token and two
resources never do (DESIGN.md §1 "Resource identity"). Pure: no I/O, no
aiohttp.

Rules, applied to the path (RFC 3986 §6.2.2 syntax-based normalisation,
plus a few refusals for spellings an upstream could read two ways):

- percent-encoding uses upper-case hex; encoded unreserved characters
  (ALPHA DIGIT ``-._~``) are decoded; every other escape stays encoded, so
  ``%2F`` is a different resource from ``/`` and ``%252F`` stays ``%252F``
  (decoding happens once, never twice);
- characters that may not appear raw in a path (``"<>[]^`{|}``) are
  percent-encoded: they name the same resource as their encoded form;
- runs of ``/`` collapse to one, *then* dot segments (including encoded
  ones such as ``%2e%2e``) are resolved as in RFC 3986 §5.2.4; a trailing
  ``/`` is kept;
- refused (`TargetError`, answered with 400): a ``..`` that would climb
  above the root, NUL, backslash (raw or ``%5C``: some servers read it as
  ``/``), a segment hiding a dot segment behind ``%2F`` (``..%2F``, read as
  ``../`` by servers that decode ``%2F``), malformed escapes, bytes that are
  not valid UTF-8 once decoded (this catches overlong forms such as
  ``%C0%AE``), control characters, spaces, raw non-ASCII, and fragments.

The query gets the same escape normalisation (backslash is encoded there,
not refused) but keeps its parameters, separators and their order exactly as
sent. An empty query (a bare ``?``) is dropped.

Forms (RFC 9112 §3.2): origin-form is the norm; absolute-form is accepted
only when its authority is the request's own ``Host`` and is converted to
origin-form; authority-form and asterisk-form are refused.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

__all__ = ["Target", "TargetError", "canonicalize", "normalize_path_text"]


class TargetError(ValueError):
    """The request target cannot be canonicalised safely (400).

    ``str(e)`` is a reason fit to show the client.
    """


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# Printable ASCII that RFC 3986 §3.3 does not allow raw in a path and that
# carries no delimiter meaning here; sent raw they are read as their escape.
_ENCODE_IN_PATH = '"<>[]^`{|}'
# §3.4: the query also excludes these; backslash is only refused in paths.
_ENCODE_IN_QUERY = _ENCODE_IN_PATH + "\\"


def _replacements(encode: str) -> dict[str, str]:
    """Map every escape spelling and every raw character to encode onto its canonical form."""
    table: dict[str, str] = {}
    for byte in range(256):
        upper = f"{byte:02X}"
        canonical = chr(byte) if chr(byte) in _UNRESERVED else f"%{upper}"
        for first in {upper[0], upper[0].lower()}:
            for second in {upper[1], upper[1].lower()}:
                table[f"%{first}{second}"] = canonical
    for char in encode:
        table[char] = f"%{ord(char):02X}"
    return table


_PATH_REPLACEMENTS = _replacements(_ENCODE_IN_PATH)
_QUERY_REPLACEMENTS = _replacements(_ENCODE_IN_QUERY)
_PATH_TOKEN = re.compile("%[0-9A-Fa-f]{2}|[" + re.escape(_ENCODE_IN_PATH) + "]")
_QUERY_TOKEN = re.compile("%[0-9A-Fa-f]{2}|[" + re.escape(_ENCODE_IN_QUERY) + "]")
_BAD_ESCAPE = re.compile("%(?![0-9A-Fa-f]{2})")
# Anything outside visible ASCII; RFC 9112 §3.2 allows none of it raw.
_NOT_VISIBLE = re.compile(r"[^\x21-\x7e]")
_SLASH_RUN = re.compile("//+")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")

# The common case, already canonical: non-empty segments of characters that
# are allowed raw and need no escape, none of them "." or "..", and a query
# without escapes. Such a target is returned as it came.
_PCHAR_RAW = r"A-Za-z0-9\-._~!$&'()*+,;=:@"
_FAST = re.compile(
    rf"(?:/(?!\.\.?(?:/|\?|$))[{_PCHAR_RAW}]+)+/?(?:\?[{_PCHAR_RAW}/?]*)?"
    rf"|/(?:\?[{_PCHAR_RAW}/?]*)?"
)

_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?]*)(.*)", re.DOTALL)
_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::([0-9]*))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


class Target(NamedTuple):
    """A canonical origin-form request target.

    A NamedTuple: immutable, and built in about half the time of a frozen
    dataclass (one per request)."""

    path: str
    """Canonical, percent-encoded, starts with ``/``."""
    query: str
    """Canonical query without the ``?``; ``""`` when there is none."""

    @property
    def raw(self) -> str:
        """Exactly what is sent upstream."""
        return f"{self.path}?{self.query}" if self.query else self.path

    def params(self) -> list[tuple[str, str]]:
        """``(name, value)`` pairs in canonical encoded form, in the order sent.

        Empty pieces (``a=1&&b=2``) are skipped; a piece without ``=`` has
        the value ``""``.
        """
        pairs: list[tuple[str, str]] = []
        for piece in self.query.split("&"):
            if piece:
                name, _, value = piece.partition("=")
                pairs.append((name, value))
        return pairs


def canonicalize(raw_target: str, *, host: str | None = None) -> Target:
    """Return the canonical form of a request target, or raise `TargetError`.

    ``raw_target`` is the target from the request line, as a str; bytes that
    are not ASCII (however the server decoded them) are refused. ``host`` is
    the request's ``Host`` header, needed only to accept absolute-form.
    """
    if _FAST.fullmatch(raw_target):
        path, _, query = raw_target.partition("?")
        return Target(path, query)
    return _canonicalize_slow(raw_target, host)


def _canonicalize_slow(raw_target: str, host: str | None) -> Target:
    _check_visible(raw_target)
    if "#" in raw_target:
        # RFC 9112 §3.2: the target never carries a fragment.
        raise TargetError("request target must not contain a fragment ('#')")
    if not raw_target.startswith("/"):
        raw_target = _origin_form(raw_target, host)
    path, _, query = raw_target.partition("?")
    return Target(_canonical_path(path), _canonical_query(query) if query else "")


def _check_visible(text: str) -> None:
    bad = _NOT_VISIBLE.search(text)
    if bad is None:
        return
    char = bad.group()
    if char == "\x00":
        raise TargetError("request target must not contain NUL")
    if char == " ":
        raise TargetError("request target must not contain spaces")
    if char < " " or char == "\x7f":
        raise TargetError("request target must not contain control characters")
    raise TargetError("request target must be ASCII; percent-encode other characters")


def _origin_form(raw_target: str, host: str | None) -> str:
    """Convert a same-host absolute-form target to origin-form (RFC 9112 §3.2.2)."""
    if raw_target == "*":
        raise TargetError("asterisk-form request target is not supported")
    m = _ABSOLUTE.fullmatch(raw_target)
    if m is None:
        raise TargetError("request target must be origin-form ('/path?query')")
    scheme, authority, rest = m.group(1).lower(), m.group(2), m.group(3)
    if scheme not in _DEFAULT_PORTS:
        raise TargetError(f"absolute-form request target has unsupported scheme {scheme!r}")
    if "@" in authority:
        raise TargetError("absolute-form request target must not contain userinfo")
    own = None if host is None else _host_key(host, scheme)
    if own is None or _host_key(authority, scheme) != own:
        raise TargetError("absolute-form request target names a different host")
    if not rest.startswith("/"):
        rest = "/" + rest  # "http://h" and "http://h?q" mean path "/"
    return rest


def _host_key(authority: str, scheme: str) -> tuple[str, str] | None:
    """Host and port to compare: case-insensitive, default port explicit (RFC 3986 §6.2.3)."""
    m = _AUTHORITY.fullmatch(authority.strip().lower())
    if m is None or not m.group(1):
        return None
    port = m.group(2) or _DEFAULT_PORTS[scheme]
    return m.group(1), port


def normalize_path_text(text: str) -> str:
    """Normalise the escapes of a piece of path and check its decoded bytes.

    The character-level half of path canonicalisation, without the
    structural part (slashes and dot segments); route templates use it to
    bring their literal parts to the canonical spelling.
    """
    _check_visible(text)
    if "#" in text or "?" in text:
        raise TargetError("path must not contain '?' or '#'")
    if "\\" in text:
        raise TargetError("path must not contain a backslash")
    if "%" not in text:
        return _PATH_TOKEN.sub(_path_replacement, text)
    if _BAD_ESCAPE.search(text):
        raise TargetError("path contains a malformed percent-escape")
    decoded = unquote_to_bytes(text)
    if b"\x00" in decoded:
        raise TargetError("path must not contain NUL")
    if b"\\" in decoded:
        raise TargetError("path must not contain a backslash (%5C)")
    _check_utf8(decoded, "path")
    return _PATH_TOKEN.sub(_path_replacement, text)


def _path_replacement(m: re.Match[str]) -> str:
    return _PATH_REPLACEMENTS[m.group()]


def _query_replacement(m: re.Match[str]) -> str:
    return _QUERY_REPLACEMENTS[m.group()]


def _check_utf8(decoded: bytes, what: str) -> None:
    # Python's strict decoder refuses overlong forms, surrogates and code
    # points above U+10FFFF (RFC 3629 §3), so "%C0%AE" cannot smuggle a ".".
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise TargetError(f"{what} is not valid UTF-8 once percent-decoded") from None


def _canonical_path(path: str) -> str:
    path = normalize_path_text(path)
    if "//" in path:
        path = _SLASH_RUN.sub("/", path)
    if _DOT_SEGMENT.search(path):
        path = _remove_dot_segments(path)
    if "%2F" in path:
        _check_hidden_dot_segments(path)
    return path


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on a path without empty segments, refusing to climb above the root.

    §5.2.4 would silently drop a ``..`` at the root; here it means the
    client asked for something outside the API, which is refused instead.
    """
    segments = path[1:].split("/")
    out: list[str] = []
    trailing_slash = False
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        trailing_slash = False
        if segment == ".":
            trailing_slash = True  # "/a/." is "/a/"
        elif segment == "..":
            if not out:
                raise TargetError("request target climbs above the root with '..'")
            out.pop()
            trailing_slash = True  # "/a/b/.." is "/a/"
        elif segment or i != last:
            out.append(segment)
        else:
            trailing_slash = True
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing_slash else "")


def _check_hidden_dot_segments(path: str) -> None:
    for segment in path.split("/"):
        if "%2F" in segment and any(part in (".", "..") for part in segment.split("%2F")):
            raise TargetError("request target hides a dot segment behind %2F")


def _canonical_query(query: str) -> str:
    if "%" in query:
        if _BAD_ESCAPE.search(query):
            raise TargetError("query contains a malformed percent-escape")
        decoded = unquote_to_bytes(query)
        if b"\x00" in decoded:
            raise TargetError("query must not contain NUL")
        _check_utf8(decoded, "query")
    return _QUERY_TOKEN.sub(_query_replacement, query)
