"""Header rewriting at the proxy boundary (pure: no I/O).

- Hop-by-hop fields (RFC 9110 §7.6.1) are removed in both directions: the
  fixed set below plus every field the `Connection` header names. A client
  cannot use `Connection` to make the proxy drop fields the proxy or the
  upstream rely on (Host, credentials, framing, preconditions, forwarding
  information): such a request is refused.
- `Via` (RFC 9110 §7.6.3) is appended on requests and responses.
- `X-Forwarded-For/Proto/Host` and `Forwarded` (RFC 7239) are appended;
  values a client sent are kept only when the peer is a trusted proxy.
- `X-Request-ID` is passed through when sane, else generated.
- `traceparent` / `tracestate` (W3C Trace Context) are replaced by the
  proxy's own (`tracing.py`): the client's lines never cross as sent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from multidict import CIMultiDict

from etagproxy.randomness import random_hex

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Framing is redone by the proxy on each side; these never cross as sent.
FRAMING = frozenset({"content-length", "transfer-encoding"})

CONDITIONALS = frozenset(
    {"if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range"}
)

FORWARDING = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
)

TRACE_CONTEXT = frozenset({"traceparent", "tracestate"})

_PROTECTED_PREFIXES = ("if-", "x-forwarded-")
_PROTECTED = frozenset(
    {"host", "authorization", "cookie", "content-length", "transfer-encoding", "forwarded"}
)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class HeaderError(ValueError):
    """A request whose headers the proxy refuses (400)."""


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Lower-cased field names listed in `Connection` header values."""
    names = set()
    for value in values:
        for item in value.split(","):
            item = item.strip().lower()
            if item:
                names.add(item)
    return frozenset(names)


def check_connection(tokens: frozenset[str]) -> None:
    """Refuse `Connection` options that would strip protected fields."""
    for name in tokens:
        if name in _PROTECTED or name.startswith(_PROTECTED_PREFIXES):
            raise HeaderError(f"Connection must not name the {name!r} header field")


def new_request_id() -> str:
    return random_hex(12)


def request_id(value: str | None) -> str:
    """The client's X-Request-ID if it is short and printable, else a new one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


class TrustedProxies:
    """Peers whose forwarding headers are believed (uvicorn's _TrustedHosts idea)."""

    def __init__(self, entries: Sequence[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(e, strict=False) for e in entries)

    def __contains__(self, peer: str | None) -> bool:
        if not peer or not self._networks:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in net for net in self._networks)


def _forwarded_node(ip: str) -> str:
    # RFC 7239 §6: IPv6 addresses are quoted and bracketed.
    return f'"[{ip}]"' if ":" in ip else ip


def upstream_request_headers(
    raw: Sequence[tuple[bytes, bytes]],
    *,
    drop: frozenset[str],
    peer: str | None,
    trusted: bool,
    proto: str,
    via: str,
    rid: str,
    keep_framing: bool,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> CIMultiDict[str]:
    """Headers to send upstream, in the client's order and spelling.

    `drop` holds extra lower-case names to remove (conditionals the proxy
    evaluated, fields named by `Connection`). `keep_framing` keeps the
    client's Content-Length for a streamed body; a buffered body is framed
    afresh by the client library. The client's `traceparent` and
    `tracestate` are dropped; `traceparent` and `tracestate` are sent instead
    (the proxy's span as parent, the checked state).
    """
    out: CIMultiDict[str] = CIMultiDict()
    host = None
    prior_via = None
    for bname, bvalue in raw:
        name = bname.decode("latin-1")
        low = name.lower()
        value = bvalue.decode("latin-1")
        if low == "host":
            host = value
        if low in HOP_BY_HOP or low in drop:
            continue
        if low == "content-length" and not keep_framing:
            continue
        if low in FORWARDING and not trusted:
            continue
        if low == "x-request-id" or low in TRACE_CONTEXT:
            continue
        if low == "via":
            prior_via = value if prior_via is None else f"{prior_via}, {value}"
            continue
        out.add(name, value)
    via_value = f"1.1 {via}"
    out["Via"] = via_value if prior_via is None else f"{prior_via}, {via_value}"
    if peer:
        # Several field lines of a list header are one list (RFC 9110 §5.3).
        xff = ", ".join(out.getall("X-Forwarded-For", ()))
        out["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        node = f"for={_forwarded_node(peer)};proto={proto}"
        if host:
            node += f';host="{host}"'
        fwd = ", ".join(out.getall("Forwarded", ()))
        out["Forwarded"] = f"{fwd}, {node}" if fwd else node
    out.setdefault("X-Forwarded-Proto", proto)
    if host:
        out.setdefault("X-Forwarded-Host", host)
    out["X-Request-ID"] = rid
    if traceparent is not None:
        out["traceparent"] = traceparent
        if tracestate is not None:
            out["tracestate"] = tracestate
    return out


def response_headers(
    raw: Sequence[tuple[bytes, bytes]],
    *,
    drop: frozenset[str],
    via: str,
    rid: str,
) -> CIMultiDict[str]:
    """Upstream response headers to relay, minus hop-by-hop and framing."""
    named = connection_tokens(
        v.decode("latin-1") for n, v in raw if n.lower() == b"connection"
    )
    out: CIMultiDict[str] = CIMultiDict()
    prior_via = None
    for bname, bvalue in raw:
        name = bname.decode("latin-1")
        low = name.lower()
        if low in HOP_BY_HOP or low in FRAMING or low in drop or low in named:
            continue
        value = bvalue.decode("latin-1")
        if low == "via":
            prior_via = value if prior_via is None else f"{prior_via}, {value}"
            continue
        out.add(name, value)
    via_value = f"1.1 {via}"
    out["Via"] = via_value if prior_via is None else f"{prior_via}, {via_value}"
    out["X-Request-ID"] = rid
    return out
