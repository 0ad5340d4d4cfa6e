"""Addresses and URLs: listen addresses (`host:port`), upstream base URLs
and store URLs (`parse_store_url`), and how an address is written back.

Parsers raise `scalars._Bad`. Knows nothing of YAML or of where a value
came from; uses only `schema` (StoreConfig, _mask_url) and `scalars`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final
from urllib.parse import unquote, urlsplit

from etagproxy.config.scalars import _Bad
from etagproxy.config.schema import StoreConfig, _mask_url

_ADDRESS_EXPECTED: Final = "host:port such as 0.0.0.0:8080, [::1]:8080 or :8080"
# Host names as resolvers accept them; "_" is allowed because container
# service names (docker compose) often contain it.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        return False  # a mistyped IPv4 address such as 300.1.1.1, not a name
    return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None


def _parse_address(
    value: object, *, expected: str, default_port: int | None, any_host: str | None, min_port: int
) -> tuple[str, int]:
    """(host, port) from `host:port`, `[v6]:port`, `:port` (any_host) or `host` (default_port)."""
    if isinstance(value, int) and not isinstance(value, bool) and any_host is not None:
        value = f":{value}"  # `listen: 8080`
    if not isinstance(value, str):
        raise _Bad(expected, value)
    text = value.strip()
    port_text: str | None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Bad(expected, value) from None
        if not bracket or (rest and not rest.startswith(":")):
            raise _Bad(expected, value)
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, None
        if ":" in host:
            raise _Bad(f"{expected} (IPv6 addresses go in brackets)", value)
        if not host:
            if any_host is None:
                raise _Bad(expected, value)
            host = any_host
        if not _valid_host(host):
            raise _Bad(expected, value)
    if port_text is None:
        if default_port is None:
            raise _Bad(expected, value)
        return host, default_port
    valid_port = port_text.isascii() and port_text.isdigit()
    if not valid_port or not min_port <= int(port_text) <= 65535:
        raise _Bad(f"{expected} (port {min_port} to 65535)", value)
    return host, int(port_text)


def _parse_listen(value: object) -> tuple[str, int]:
    # Port 0 asks the kernel for a free port (tests, ephemeral sidecars).
    return _parse_address(
        value, expected=_ADDRESS_EXPECTED, default_port=None, any_host="0.0.0.0", min_port=0
    )


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_URL_EXPECTED: Final = "an http:// or https:// URL such as http://127.0.0.1:8000"


def _parse_upstream(value: object) -> str:
    """An upstream base URL: http(s), a host, no credentials, query or fragment."""
    if not isinstance(value, str):
        raise _Bad(_URL_EXPECTED, value)
    text = value.strip()
    if any(c.isspace() or not c.isprintable() for c in text):
        raise _Bad(_URL_EXPECTED, value)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _Bad(_URL_EXPECTED, value) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Bad(_URL_EXPECTED, value)
    if "@" in parts.netloc:
        # It would end up in logs, and the client's own Authorization is what is forwarded.
        raise _Bad(f"{_URL_EXPECTED} without user:password@", _mask_url(value))
    if "?" in text or "#" in text:
        raise _Bad(f"{_URL_EXPECTED} without a query or fragment", value)
    if port == 0:
        raise _Bad(f"{_URL_EXPECTED} (port 1 to 65535)", value)
    if not _valid_host(parts.hostname):
        raise _Bad(_URL_EXPECTED, value)
    return text


_STORE_EXPECTED: Final = (
    "a store URL: memory://, redis://host:port/db, rediss://..., "
    "redis+sentinel://host:port,host:port/master or redis+cluster://host:port,host:port"
)
_STORE_SCHEMES: Final[dict[str, tuple[str, bool]]] = {
    "memory": ("memory", False),
    "redis": ("redis", False),
    "rediss": ("redis", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


def parse_store_url(url: object) -> StoreConfig:
    """A `StoreConfig` (with default settings) from a store URL.

    Raises ValueError ("expected ..., got ...", the password masked).
    """
    if not isinstance(url, str):
        raise _Bad(_STORE_EXPECTED, url)
    text = url.strip()
    shown = _mask_url(text)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _STORE_SCHEMES:
        raise _Bad(_STORE_EXPECTED, shown)
    kind, tls = _STORE_SCHEMES[scheme.lower()]
    if kind == "memory":
        if rest not in ("", "/"):
            raise _Bad("memory:// with nothing after it", shown)
        return StoreConfig(url=text, kind="memory", hosts=())
    if "?" in rest or "#" in rest:
        raise _Bad(f"{_STORE_EXPECTED}, without a query (settings go in a store: mapping)", shown)
    authority, _, path = rest.partition("/")
    userinfo, at, host_list = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    default_port = 26379 if kind == "sentinel" else 6379
    hosts: list[tuple[str, int]] = []
    for item in host_list.split(","):
        try:
            hosts.append(
                _parse_address(
                    item, expected="", default_port=default_port, any_host=None, min_port=1
                )
            )
        except _Bad:
            raise _Bad(f"{_STORE_EXPECTED}, with host or host:port for each host", shown) from None
    segments = path.strip("/").split("/") if path.strip("/") else []
    db_text: str | None = None
    service_name: str | None = None
    if kind == "redis":
        if len(hosts) != 1:
            raise _Bad(
                "one host in a redis:// URL"
                " (several hosts need redis+sentinel:// or redis+cluster://)",
                shown,
            )
        if len(segments) > 1:
            raise _Bad("redis://host:port/db with a database number", shown)
        db_text = segments[0] if segments else None
    elif kind == "sentinel":
        if not segments or len(segments) > 2:
            raise _Bad("redis+sentinel://host:port,host:port/master[/db] naming the master", shown)
        service_name = segments[0]
        db_text = segments[1] if len(segments) == 2 else None
    elif segments not in ([], ["0"]):
        raise _Bad("redis+cluster:// without a database (a cluster has only database 0)", shown)
    if db_text is not None and not (db_text.isascii() and db_text.isdigit()):
        raise _Bad("a database number such as redis://host:6379/0", shown)
    return StoreConfig(
        url=text,
        kind=kind,
        hosts=tuple(hosts),
        tls=tls,
        db=int(db_text) if db_text is not None else 0,
        username=username,
        password=password,
        service_name=service_name,
    )
