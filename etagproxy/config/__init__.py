"""Configuration: a YAML file read into frozen dataclasses, checked once at load.

Every problem in the file and in the `ETAGPROXY_*` environment is collected
before anything is reported, so a bad file is fixed in one pass. Each problem
is one line saying where it is, which key, what was expected and what was
found (list indexes count from 0)::

    etagproxy.yaml:12: routes[2].require_if_match: expected true or false, got 'yes please'
    env ETAGPROXY_LISTEN: listen: expected host:port such as ..., got '127.0.0.1'

The YAML is *composed* with PyYAML's SafeLoader and never constructed into
arbitrary objects: each value keeps the line it came from, and no tag can
build anything. Aliases (`*name`) are refused: `defaults:` covers what they
would be used for, and refusing them rules out documents that expand
exponentially ("billion laughs") or refer to themselves.

Environment: `ETAGPROXY_<KEY>` overrides the top-level key `<key>`. Mapping
keys (`timeouts`, `limits`, `defaults`, `store`) take a YAML flow mapping that
is merged over the file's; `routes` takes a YAML flow list that replaces the
file's; `store` also takes a bare URL; `trusted_proxies` takes a comma
separated list or a YAML flow list. An empty variable overrides nothing,
except `ETAGPROXY_ADMIN_LISTEN=`, which turns the admin endpoints off.
`ETAGPROXY_CONFIG` and `ETAGPROXY_LOG_*` belong to the command line; any
Kubernetes service-link variables (`ETAGPROXY_REDIS_SERVICE_HOST`,
`ETAGPROXY_REDIS_PORT=tcp://...`) are ignored; any
other unknown `ETAGPROXY_` name is a problem, so a typo cannot silently leave
a setting at its default.

Errors::

    ConfigError     the configuration is unusable; `.problems` lists every reason
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import yaml

from etagproxy.derived import VersionSource

__all__ = [
    "Config",
    "ConfigError",
    "Limits",
    "RouteConfig",
    "StoreConfig",
    "Timeouts",
    "dump_effective",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "parse_store_url",
]


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per reason."""

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# ---------------------------------------------------------------------------
# The configuration objects


@dataclass(frozen=True, slots=True)
class Timeouts:
    """One deadline per phase, in seconds (httpx `Timeout`, aiohttp `ClientTimeout`)."""

    connect: float = 2.0
    """Upstream TCP (and TLS) connect."""
    upstream: float = 30.0
    """Hard deadline for the whole upstream exchange, headers and body."""
    write_wait: float = 2.0
    """How long BEGIN waits behind a write in flight on the same key before 409."""
    store: float = 0.2
    """Each store call; past it the store counts as unavailable."""
    shutdown: float = 20.0
    """Drain budget after SIGTERM before open requests are cut."""
    header_read: float = 10.0
    """A client must send its request line and headers within this."""
    body_read: float = 30.0
    """A client must send its whole request body within this."""
    keepalive: float = 75.0
    """Idle time after which a client keep-alive connection is closed."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes and counts that bound what one client can make the proxy hold."""

    max_body: int = 10 * 1024 * 1024
    """Largest request body read (and buffered) before a write; larger gets 413."""
    max_header_size: int = 8190
    """Longest request line or single header line."""
    max_headers: int = 100
    """Most header fields in one request."""
    max_connections: int = 10000
    """Most client connections open at once."""
    max_in_flight: int = 1000
    """Most requests being handled at once."""
    fingerprint_max: int = 1 * 1024 * 1024
    """Response bodies larger than this are not fingerprinted."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where versions live; parsed from a store URL plus optional settings."""

    url: str
    """As written; may hold a password, so log `masked_url` instead."""
    kind: str
    """"memory", "redis", "sentinel" or "cluster"."""
    hosts: tuple[tuple[str, int], ...]
    """() for memory; one host for redis; the seed hosts for sentinel and cluster."""
    tls: bool = False
    """rediss://, rediss+sentinel://, rediss+cluster://."""
    db: int = 0
    """Database number (always 0 for a cluster)."""
    username: str | None = None
    """ACL user name from the URL, percent-decoded."""
    password: str | None = None
    """Password from the URL, percent-decoded; never logged."""
    service_name: str | None = None
    """Sentinel master name (the path of a redis+sentinel:// URL)."""
    prefix: str = "etagproxy:"
    """Prepended to every key, so several proxies can share one Redis."""
    token_ttl: float = 7 * 86400.0
    """Idle lifetime of a committed version; an expired key mints a new token."""
    min_replicas: int = 0
    """Replicas that must acknowledge each write's lease (Redis WAIT after
    BEGIN) before the write is forwarded; if fewer do, the write gets 503.
    0 = do not wait."""
    min_replicas_timeout: float = 0.1
    """How long WAIT may take before the lease counts as not replicated."""

    @property
    def masked_url(self) -> str:
        """The URL with its password replaced by '***'."""
        return _mask_url(self.url)

    def __repr__(self) -> str:
        # The generated repr would print the password.
        return (
            f"StoreConfig(url={self.masked_url!r}, kind={self.kind!r}, hosts={self.hosts!r},"
            f" tls={self.tls!r}, db={self.db!r}, prefix={self.prefix!r})"
        )


def _memory_store() -> StoreConfig:
    return StoreConfig(url="memory://", kind="memory", hosts=())


@dataclass(frozen=True, slots=True)
class Bulk:
    """`bulk:` of a list endpoint: a write whose JSON body is an array of
    objects names the members it changes by `field` (NetBox's bulk edit)."""

    field: str
    """The member's identifier in each object, e.g. `id`."""
    member: str
    """Template of a member's path with one variable, e.g. /api/sites/{id}/."""
    max_members: int = 100
    """More members than this in one request gets 413."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One `routes:` entry, with `defaults:` merged in and the upstream resolved."""

    path: str
    """Template: `{name}` is one segment, `{name:path}` the rest of the path."""
    line: int = 0
    """Line of the entry in the file (0 when it came from the environment)."""
    methods: frozenset[str] | None = None
    """Upper-cased method names the route applies to; None = every method."""
    upstream: str | None = None
    """Base URL requests are forwarded to; filled with the top-level one at load."""
    mode: str = "track"
    """"track" (versions, ETags, preconditions) or "passthrough" (forwarded untouched)."""
    key_query: tuple[str, ...] = ()
    """Query parameters that are part of the resource key."""
    require_if_match: bool = False
    """Unsafe requests without If-Match or If-Unmodified-Since get 428."""
    invalidates: tuple[str, ...] = ()
    """Templates of other resources made stale by a successful write here.
    Besides the route's own variables they may use `{body.<field>}` and
    `{response.<field>}`: a field of the request's or the response's JSON
    object (dotted for nested fields)."""
    created: str | None = None
    """Template naming the resource a 201 created when it sends no Location,
    e.g. /api/sites/{response.id}/; without one such a 201 carries no ETag."""
    bulk: Bulk | None = None
    """Bulk writes on this list endpoint lease and version each named member."""
    plain_types: tuple[str, ...] = ("application/json",)
    """Media types served as the default representation under `Vary: Accept`:
    they carry the plain tag a write returns; other types get their own."""
    version: VersionSource | None = None
    """Where the version comes from: None for the proxy's own token (the
    default, `version: token`), or a field, header or body hash of the
    upstream's answer, checked against the upstream before each write."""
    computed: bool = False
    """The representation includes data of other resources (counts, nested
    objects): its tag also carries a hash of the body, so no 304 is given
    for content that changed behind the route's own writes."""
    short_circuit: bool = False
    """Answer a current If-None-Match with 304 without asking the upstream."""
    short_circuit_ttl: float = 60.0
    """How long a credential's 2xx for a resource allows short-circuiting."""
    fingerprint: bool = False
    """Hash 2xx bodies and mint a new token when they change behind the proxy."""
    last_modified: bool = True
    """Send Last-Modified (the version's mint time)."""
    etag_on_write: bool = True
    """Send the new ETag on a successful write."""
    replay_ttl: float = 300.0
    """How long an Idempotency-Key retry gets the recorded 2xx; 0 disables replay."""
    upstream_conditionals: bool = False
    """Also forward the client's If-* headers to the upstream."""
    on_store_error: str = "fail_closed"
    """"fail_closed" (503 on writes) or "fail_open" (forward writes unchecked)."""
    etag_in_412: bool = False
    """Include the current ETag in 412 responses."""
    public: bool = False
    """Everyone gets the same representation: short-circuit without a credential check."""
    allow_upgrade: bool = False
    """Let Upgrade (WebSocket) requests through this route."""
    authorize: str = "none"
    """"none", or "upstream": before answering 412 the proxy asks the upstream
    (HEAD, or GET, with the caller's credentials) and relays a non-2xx, so
    authorisation failures come before precondition failures (RFC 9110 §13.2.1)."""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    upstream: str
    """Base URL of the API behind the proxy."""
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    """Where clients connect."""
    admin_listen: tuple[str, int] | None = None
    """Where /healthz, /readyz and /metrics are served; None = not served."""
    store: StoreConfig = field(default_factory=_memory_store)
    """The version store."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    routes: tuple[RouteConfig, ...] = ()
    """In file order; the first match wins, unmatched requests are passthrough."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDRs whose Forwarded / X-Forwarded-* headers are believed."""
    via: str = "etagproxy"
    """Pseudonym this proxy uses in Via (RFC 9110 §7.6.3)."""
    source: str = "<config>"
    """Name of the file the configuration came from."""


# ---------------------------------------------------------------------------
# Values: durations, sizes, addresses, URLs


class _Bad(ValueError):
    """A value that does not parse; `expected` completes "expected ..., got ..."."""

    def __init__(self, expected: str, value: object) -> None:
        self.expected = expected
        self.got = _describe(value)
        super().__init__(f"expected {expected}, got {self.got}")


def _describe(value: object) -> str:
    """How a found value is shown in a message: YAML spelling, strings quoted."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_DURATION_EXPECTED: Final = "a duration such as 2s, 250ms, 1.5m, 1h or 7d"
_DURATION = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(?P<unit>ms|s|m|h|d)?")
_DURATION_UNITS: Final[dict[str | None, float]] = {
    None: 1.0,  # a plain number is seconds
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_MAX_DURATION: Final = 3650 * 86400.0
"""Ten years: far above any sensible setting and far below what makes
event-loop timers or Redis expiries overflow."""


def parse_duration(value: object) -> float:
    """Seconds from `2s`, `250ms`, `1.5m`, `1h`, `7d` or a plain number of seconds.

    Raises ValueError ("expected ..., got ...") for anything else, for
    negative values, and for values above ten years.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(_DURATION_EXPECTED, value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise _Bad("a duration that is not negative", value)
        m = _DURATION.fullmatch(text)
        if m is None:
            raise _Bad(_DURATION_EXPECTED, value)
        seconds = float(m["num"]) * _DURATION_UNITS[m["unit"]]
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise _Bad("a duration of at most 3650d", value) from None
    if math.isnan(seconds):
        raise _Bad(_DURATION_EXPECTED, value)
    if seconds < 0:
        raise _Bad("a duration that is not negative", value)
    if seconds > _MAX_DURATION:
        raise _Bad("a duration of at most 3650d", value)
    return seconds


_SIZE_EXPECTED: Final = "a size such as 10MiB, 512KiB, 1GB or a number of bytes"
_SIZE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?) ?(?P<unit>B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?")
_SIZE_UNITS: Final[dict[str | None, int]] = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
_MAX_SIZE: Final = 2**63 - 1
"""What a signed 64-bit length (ssize_t, Content-Length in most stacks) holds."""


def parse_size(value: object) -> int:
    """Bytes from `10MiB`, `512KiB`, `1GB`, `1.5KiB` or a plain whole number of bytes.

    Units are case-sensitive (`Mb` would be megabits): B, KiB, MiB, GiB,
    TiB (powers of 1024) and KB, MB, GB, TB (powers of 1000). Raises
    ValueError for anything else, negative values, sizes that are not a
    whole number of bytes, and sizes beyond 2**63 - 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(_SIZE_EXPECTED, value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise _Bad("a size that is not negative", value)
        m = _SIZE.fullmatch(text)
        if m is None:
            raise _Bad(_SIZE_EXPECTED, value)
        # Decimal, so that 0.1MiB is found not to be whole rather than rounded.
        amount = Decimal(m["num"]) * _SIZE_UNITS[m["unit"]]
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(_SIZE_EXPECTED, value)
        amount = Decimal(value)
    if amount < 0:
        raise _Bad("a size that is not negative", value)
    if amount != amount.to_integral_value():
        raise _Bad("a whole number of bytes", value)
    if amount > _MAX_SIZE:
        raise _Bad("a size below 8EiB", value)
    return int(amount)


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


# The password of a URL's userinfo: everything after the first ":" up to the
# last "@" before the host, so an unencoded "@" or "/" in it is hidden too.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):(.*)@")


def _mask_url(url: str) -> str:
    return _USERINFO.sub(r"\1:***@", url, count=1)


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


# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _parse_bool(value: object) -> bool:
    if value is True or value is False:
        return value
    raise _Bad("true or false", value)


def _parse_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Bad("a string", value)


def _duration(*, positive: bool = False, why: str = "") -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise _Bad(f"a duration greater than 0{why}", value)
        return seconds

    return parse


def _size(*, minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        size = parse_size(value)
        if size < minimum:
            raise _Bad(f"a size of at least {minimum} bytes", value)
        return size

    return parse


def _count(*, minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"a whole number of at least {minimum}", value)
        if not minimum <= value <= _MAX_SIZE:
            raise _Bad(f"a whole number of at least {minimum}", value)
        return value

    return parse


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _Bad(" or ".join(choices), value)

    return parse


def _parse_template(value: object) -> str:
    """A route template, checked by the router's own compiler."""
    expected = "a path template such as /items/{id} or /files/{rest:path}"
    if not isinstance(value, str):
        raise _Bad(expected, value)
    # Imported here: routes.py depends on this module's RouteConfig shape,
    # not the other way round.
    from etagproxy.routes import TemplateError, compile_template

    try:
        compile_template(value)
    except TemplateError as exc:
        reason = str(exc).removeprefix(f"template {value!r}: ")
        raise _Bad(f"{expected} ({reason})", value) from None
    return value


def _parse_route_path(value: object) -> str:
    """A route's own path: a template whose variables are plain names."""
    template = _parse_template(value)
    dotted = [n for n in _template_names(template) if "." in n]
    if dotted:
        raise _Bad(
            "a path template with plain variable names ({body.x} and {response.x}"
            " belong in invalidates and created)",
            value,
        )
    return template


_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _parse_media_type(value: object) -> str:
    if isinstance(value, str) and _MEDIA_TYPE.fullmatch(value.strip()) and "*" not in value:
        return value.strip().lower()
    raise _Bad("a media type such as application/json (no parameters, no wildcards)", value)


def _parse_field_name(value: object) -> str:
    if isinstance(value, str) and value and all(part for part in value.split(".")) and value.isprintable():
        return value
    raise _Bad("a JSON field name such as id (dotted for a nested field)", value)


def _parse_header_name(value: object) -> str:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise _Bad("a header name such as ETag", value)


def _parse_member_count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10_000:
        return value
    raise _Bad("a whole number from 1 to 10000", value)


def _parse_method(value: object) -> str:
    # RFC 9110 §9.1: a method is a token.
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value.upper()
    raise _Bad("an HTTP method name such as GET or PUT", value)


def _parse_query_name(value: object) -> str:
    if isinstance(value, str) and value and value.isprintable():
        return value
    raise _Bad("a query parameter name", value)


def _parse_network(value: object) -> str:
    if isinstance(value, str):
        try:
            ipaddress.ip_network(value.strip(), strict=False)
            return value.strip()
        except ValueError:
            pass
    raise _Bad("an IP address or CIDR such as 10.0.0.0/8", value)


def _parse_via(value: object) -> str:
    # RFC 9110 §7.6.3: received-by = pseudonym [ ":" port ], pseudonym = token.
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise _Bad("a pseudonym of token characters (RFC 9110 §7.6.3) such as etagproxy", value)


# {name} or {name:kind}, for the variables an invalidates template uses.
_TEMPLATE_VARIABLE = re.compile(r"\{([^{}:]*)(:[^{}]*)?\}")


def _template_names(template: str) -> list[str]:
    return [m[1] for m in _TEMPLATE_VARIABLE.finditer(template)]


def _template_shape(template: str) -> str:
    """The template with variable names erased: /a/{id} and /a/{x} are one route."""
    return _TEMPLATE_VARIABLE.sub(lambda m: "{" + (m[2] or "") + "}", template)


# ---------------------------------------------------------------------------
# Reading YAML into located values


class _Invalid:
    """A value already reported as a problem; later checks skip it quietly."""

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Final = _Invalid()


@dataclass(slots=True)
class _Node:
    """A value and where it came from.

    `value` is a scalar, a list of `_Node`, a dict of key name to
    (key `_Node`, value `_Node`), or `_INVALID`.
    """

    value: Any
    where: str
    """"FILE:LINE" or "env NAME": the start of every message about this value."""
    line: int
    """1-based line in the file; 0 for a value from the environment."""


class _Problems:
    """Problems in file order, then by environment variable name."""

    def __init__(self) -> None:
        self._items: list[tuple[bool, int, str, int, str]] = []

    def add(self, node: _Node, path: str, expected: str, got: str | None = None) -> None:
        got = _describe(node.value) if got is None else got
        self.raw(node, f"{path or '(top level)'}: expected {expected}, got {got}")

    def raw(self, node: _Node, text: str) -> None:
        env = node.line == 0
        self._items.append(
            (env, node.line, node.where if env else "", len(self._items), f"{node.where}: {text}")
        )

    def __len__(self) -> int:
        return len(self._items)

    def messages(self) -> list[str]:
        return [text for *_, text in sorted(self._items)]


_ALIAS_TAG: Final = "!etagproxy/alias"
_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS: Final = frozenset(_CORE + t for t in ("null", "bool", "int", "float", "str"))


class _Loader(yaml.SafeLoader):
    """A SafeLoader that composes an alias into a marker instead of sharing the node."""

    def compose_node(  # type: ignore[override]
        self, parent: yaml.Node | None, index: object
    ) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()
            return yaml.ScalarNode(_ALIAS_TAG, "*" + event.anchor, event.start_mark, event.end_mark)
        return super().compose_node(parent, index)  # type: ignore[no-any-return]


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_ALIAS_EXPECTED: Final = (
    "a value (YAML aliases are not supported; use defaults: to share route settings)"
)
_MERGE_EXPECTED: Final = "a key name (YAML merge keys are not supported; use defaults:)"


class _Reader:
    """Turns YAML text into `_Node`s, reporting what YAML allows but a config must not."""

    def __init__(self, problems: _Problems) -> None:
        self.problems = problems

    def read(self, text: str, where: Callable[[int], str], env: bool, path: str) -> _Node | None:
        """The document's root node; None if the text is empty or not YAML (reported).

        `where(line)` names a location for messages; `env` values have no lines.
        """
        loader = _Loader(text)
        try:
            try:
                root = loader.get_single_node()
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line = 0 if env or mark is None else mark.line + 1
                problem = exc.problem or exc.context or "unreadable"
                self.problems.raw(_Node(None, where(line), line), f"invalid YAML: {problem}")
                return None
            except yaml.YAMLError as exc:
                line = 0 if env else 1
                self.problems.raw(_Node(None, where(line), line), f"invalid YAML: {exc}")
                return None
            if root is None:
                return None
            return _Document(self.problems, loader, where, env).convert(root, path)
        finally:
            loader.dispose()


@dataclass(slots=True)
class _Document:
    """One composed YAML document being converted into `_Node`s."""

    problems: _Problems
    loader: _Loader
    where: Callable[[int], str]
    env: bool

    def node(self, yaml_node: yaml.Node, value: Any = _INVALID) -> _Node:
        line = 0 if self.env else yaml_node.start_mark.line + 1
        return _Node(value, self.where(line), line)

    def convert(self, node: yaml.Node, path: str) -> _Node:
        out = self.node(node)
        tag = node.tag
        tagged = f"a value tagged {_short_tag(tag)}"
        if isinstance(node, yaml.ScalarNode):
            if tag == _ALIAS_TAG:
                self.problems.add(out, path, _ALIAS_EXPECTED, f"alias {node.value}")
            elif tag == _CORE + "timestamp":
                out.value = node.value  # a date-like string is just a string here
            elif tag in _SCALAR_TAGS:
                try:
                    out.value = self.loader.construct_object(node)
                except (ValueError, KeyError, yaml.YAMLError):  # !!int "x", !!bool "maybe"
                    expected = f"a value matching its tag {_short_tag(tag)}"
                    self.problems.add(out, path, expected, repr(node.value))
            else:
                self.problems.add(out, path, "a plain YAML value", tagged)
        elif isinstance(node, yaml.SequenceNode):
            if tag != _CORE + "seq":
                self.problems.add(out, path, "a plain YAML value", tagged)
            else:
                items = enumerate(node.value)
                out.value = [self.convert(item, f"{path}[{i}]") for i, item in items]
        elif isinstance(node, yaml.MappingNode):
            if tag != _CORE + "map":
                self.problems.add(out, path, "a plain YAML value", tagged)
            else:
                out.value = self.mapping(node, path)
        return out

    def mapping(self, node: yaml.MappingNode, path: str) -> dict[str, tuple[_Node, _Node]]:
        items: dict[str, tuple[_Node, _Node]] = {}
        for key_node, value_node in node.value:
            key = self.node(key_node, key_node.value)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _ALIAS_TAG:
                self.problems.add(key, path, "key names", "a key that is not a name")
                continue
            if key_node.tag == _CORE + "merge":
                self.problems.add(key, _join(path, "<<"), _MERGE_EXPECTED, "'<<'")
                continue
            name = str(key_node.value)
            if name in items:
                first = items[name][0].line
                earlier = f"first on line {first}" if first else "given earlier"
                self.problems.add(key, _join(path, name), f"each key once ({earlier})", "it again")
                continue
            items[name] = (key, self.convert(value_node, _join(path, name)))
        return items


# ---------------------------------------------------------------------------
# Checking located values


_TOP_KEYS: Final = (
    "listen",
    "admin_listen",
    "upstream",
    "store",
    "timeouts",
    "limits",
    "defaults",
    "routes",
    "trusted_proxies",
    "via",
)
_STORE_PARSERS: Final[dict[str, Callable[[object], Any]]] = {
    "prefix": _parse_str,
    "token_ttl": _duration(positive=True),
    "min_replicas": _count(minimum=0),
    # Redis WAIT with a timeout of 0 blocks forever.
    "min_replicas_timeout": _duration(positive=True, why=" (0 would make WAIT block forever)"),
}
_STORE_KEYS: Final = ("url", *_STORE_PARSERS)

_TIMEOUT_PARSERS: Final[dict[str, Callable[[object], float]]] = {
    "connect": _duration(positive=True),
    "upstream": _duration(positive=True),
    "write_wait": _duration(),
    "store": _duration(positive=True),
    "shutdown": _duration(),
    "header_read": _duration(positive=True),
    "body_read": _duration(positive=True),
    "keepalive": _duration(),
}
_LIMIT_PARSERS: Final[dict[str, Callable[[object], int]]] = {
    "max_body": _size(minimum=0),
    "max_header_size": _size(minimum=1),
    "max_headers": _count(minimum=1),
    "max_connections": _count(minimum=1),
    "max_in_flight": _count(minimum=1),
    "fingerprint_max": _size(minimum=0),
}

# Route keys that only mean something when the route tracks versions; setting
# one on a passthrough route is almost certainly a mistake about the mode.
_TRACK_ONLY: Final = frozenset(
    {
        "key_query",
        "created",
        "bulk",
        "plain_types",
        "computed",
        "version",
        "require_if_match",
        "invalidates",
        "short_circuit",
        "short_circuit_ttl",
        "fingerprint",
        "last_modified",
        "etag_on_write",
        "replay_ttl",
        "upstream_conditionals",
        "on_store_error",
        "etag_in_412",
        "public",
        "authorize",
    }
)
_SCALAR_ROUTE_PARSERS: Final[dict[str, Callable[[object], Any]]] = {
    "path": _parse_route_path,
    "mode": _choice("track", "passthrough"),
    "require_if_match": _parse_bool,
    "short_circuit": _parse_bool,
    "short_circuit_ttl": _duration(),
    "fingerprint": _parse_bool,
    "last_modified": _parse_bool,
    "etag_on_write": _parse_bool,
    "replay_ttl": _duration(),
    "upstream_conditionals": _parse_bool,
    "on_store_error": _choice("fail_closed", "fail_open"),
    "etag_in_412": _parse_bool,
    "public": _parse_bool,
    "allow_upgrade": _parse_bool,
    "authorize": _choice("none", "upstream"),
    "created": _parse_template,
    "computed": _parse_bool,
}
_ROUTE_KEYS: Final = tuple(f.name for f in dataclasses.fields(RouteConfig) if f.name != "line")
assert set(_ROUTE_KEYS) == {
    *_SCALAR_ROUTE_PARSERS, "methods", "upstream", "key_query", "invalidates", "bulk", "plain_types", "version"
}
_BULK_PARSERS: Final[dict[str, Callable[[object], Any]]] = {
    "field": _parse_field_name,
    "member": _parse_route_path,
    "max_members": _parse_member_count,
}


_RouteIdentity = tuple[str, "frozenset[str] | None"]


def _unknown_key(problems: _Problems, key: _Node, path: str, known: tuple[str, ...]) -> None:
    name = str(key.value)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "one of " + ", ".join(known)
    problems.add(key, _join(path, name), f"a known key ({hint})", "an unknown key")


class _Builder:
    """Checks located values and builds the dataclasses; every problem is recorded."""

    def __init__(self, problems: _Problems) -> None:
        self.problems = problems

    # -- generic shapes ------------------------------------------------------

    def scalar(self, node: _Node, path: str, parse: Callable[[object], Any]) -> Any:
        if node.value is _INVALID:
            return _INVALID
        try:
            return parse(node.value)
        except _Bad as exc:
            self.problems.add(node, path, exc.expected, exc.got)
            return _INVALID

    def items(self, node: _Node, path: str, what: str) -> list[tuple[_Node, str]] | None:
        """A list's items with their paths; a single scalar counts as a list of one."""
        if node.value is _INVALID:
            return None
        if isinstance(node.value, list):
            return [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if isinstance(node.value, dict):
            self.problems.add(node, path, f"a list of {what}")
            return None
        return [(node, path)]

    def sequence(
        self, node: _Node, path: str, what: str, parse: Callable[[object], Any]
    ) -> tuple[Any, ...] | _Invalid:
        items = self.items(node, path, what)
        if items is None:
            return _INVALID
        values = [self.scalar(item, item_path, parse) for item, item_path in items]
        return _INVALID if _INVALID in values else tuple(values)

    def mapping(self, node: _Node, path: str) -> dict[str, tuple[_Node, _Node]] | None:
        if node.value is _INVALID:
            return None
        if node.value is None:
            return {}
        if not isinstance(node.value, dict):
            self.problems.add(node, path, "a mapping")
            return None
        return node.value  # type: ignore[no-any-return]

    def section(
        self, node: _Node | None, path: str, parsers: Mapping[str, Callable[[object], Any]]
    ) -> dict[str, Any]:
        """A mapping of scalar settings (timeouts, limits) checked key by key."""
        out: dict[str, Any] = {}
        entries = {} if node is None else self.mapping(node, path)
        for name, (key, value) in (entries or {}).items():
            if name not in parsers:
                _unknown_key(self.problems, key, path, tuple(parsers))
                continue
            parsed = self.scalar(value, _join(path, name), parsers[name])
            if parsed is not _INVALID:
                out[name] = parsed
        return out

    # -- top level -----------------------------------------------------------

    def build(self, top: dict[str, tuple[_Node, _Node]], root: _Node, source: str) -> Config | None:
        for name, (key, _) in top.items():
            if name not in _TOP_KEYS:
                _unknown_key(self.problems, key, "", _TOP_KEYS)
        values: dict[str, Any] = {}

        def node(name: str) -> _Node | None:
            entry = top.get(name)
            return None if entry is None else entry[1]

        if (upstream_node := node("upstream")) is None:
            self.problems.add(root, "upstream", f"{_URL_EXPECTED} (the key is required)", "nothing")
            upstream: Any = _INVALID
        else:
            upstream = self.scalar(upstream_node, "upstream", _parse_upstream)
        values["upstream"] = upstream

        if (n := node("listen")) is not None:
            values["listen"] = self.scalar(n, "listen", _parse_listen)
        if (n := node("admin_listen")) is not None and n.value is not None:
            values["admin_listen"] = self.scalar(n, "admin_listen", _parse_listen)
            listen = values.get("listen", Config.__dataclass_fields__["listen"].default)
            if values["admin_listen"] == listen and listen[1] != 0:
                self.problems.add(n, "admin_listen", "an address other than listen's")
        if (n := node("via")) is not None:
            values["via"] = self.scalar(n, "via", _parse_via)
        if (n := node("store")) is not None:
            values["store"] = self.store(n)
        if (n := node("timeouts")) is not None:
            values["timeouts"] = Timeouts(**self.section(n, "timeouts", _TIMEOUT_PARSERS))
        if (n := node("limits")) is not None:
            values["limits"] = Limits(**self.section(n, "limits", _LIMIT_PARSERS))
        if (n := node("trusted_proxies")) is not None and n.value is not None:
            values["trusted_proxies"] = self.sequence(
                n, "trusted_proxies", "addresses or CIDRs", _parse_network
            )
        defaults = self.defaults(node("defaults"))
        if (n := node("routes")) is not None and n.value is not None:
            values["routes"] = self.routes(n, defaults, upstream)

        if self.problems or any(v is _INVALID for v in values.values()):
            return None
        return Config(**values, source=source)

    def store(self, node: _Node) -> StoreConfig | _Invalid:
        if node.value is _INVALID:
            return _INVALID
        if not isinstance(node.value, dict):
            return self.scalar(node, "store", parse_store_url)  # type: ignore[no-any-return]
        entries = node.value
        settings: dict[str, Any] = {}
        for name, (key, _) in entries.items():
            if name not in _STORE_KEYS:
                _unknown_key(self.problems, key, "store", _STORE_KEYS)
        if "url" not in entries:
            expected = f"{_STORE_EXPECTED} (the key is required)"
            self.problems.add(node, "store.url", expected, "nothing")
            base: Any = _INVALID
        else:
            base = self.scalar(entries["url"][1], "store.url", parse_store_url)
        for name, parse in _STORE_PARSERS.items():
            if name in entries:
                settings[name] = self.scalar(entries[name][1], f"store.{name}", parse)
        if base is _INVALID or _INVALID in settings.values():
            return _INVALID
        if base.kind == "memory" and settings.get("min_replicas", 0) > 0:
            expected = "0 for memory:// (it has no replicas)"
            self.problems.add(entries["min_replicas"][1], "store.min_replicas", expected)
            return _INVALID
        return dataclasses.replace(base, **settings)

    # -- routes --------------------------------------------------------------

    def route_value(self, name: str, node: _Node, path: str) -> Any:
        if name in _SCALAR_ROUTE_PARSERS:
            return self.scalar(node, path, _SCALAR_ROUTE_PARSERS[name])
        if name == "upstream":
            return None if node.value is None else self.scalar(node, path, _parse_upstream)
        if name == "methods":
            if node.value is None:
                return None
            methods = self.sequence(node, path, "method names", _parse_method)
            if methods == ():
                expected = "at least one method (leave methods out for all)"
                self.problems.add(node, path, expected, "an empty list")
                return _INVALID
            return methods if methods is _INVALID else frozenset(methods)
        if node.value is None:
            return ()
        if name == "key_query":
            return self.sequence(node, path, "query parameter names", _parse_query_name)
        if name == "invalidates":
            return self.sequence(node, path, "path templates", _parse_template)
        if name == "plain_types":
            return self.sequence(node, path, "media types", _parse_media_type)
        if name == "bulk":
            return self.bulk(node, path)
        if name == "version":
            return self.version(node, path)
        raise AssertionError(name)

    def version(self, node: _Node, path: str) -> VersionSource | None | _Invalid:
        expected = "token, or a mapping with from: field, header or body"
        if node.value == "token":
            return None
        entries = self.mapping(node, path) if isinstance(node.value, dict) else None
        if entries is None:
            self.problems.add(node, path, expected)
            return _INVALID
        if "from" not in entries:
            self.problems.add(node, _join(path, "from"), "field, header or body (the key is required)", "nothing")
            return _INVALID
        source = self.scalar(entries["from"][1], _join(path, "from"), _choice("token", "field", "header", "body"))
        if source is _INVALID:
            return _INVALID
        allowed = {"token": (), "field": ("field",), "header": ("header", "upstream_if_match"), "body": ()}[source]
        for name, (key, _) in entries.items():
            if name != "from" and name not in allowed:
                _unknown_key(self.problems, key, path, ("from", *allowed))
                return _INVALID
        if source == "token":
            return None
        if source == "body":
            return VersionSource("body")
        name = allowed[0]
        if name not in entries:
            example = "last_updated" if name == "field" else "ETag"
            self.problems.add(node, _join(path, name), f"a value such as {example} (the key is required)", "nothing")
            return _INVALID
        if source == "header":
            header = self.scalar(entries["header"][1], _join(path, "header"), _parse_header_name)
            checks: object = False
            if "upstream_if_match" in entries:
                checks = self.scalar(
                    entries["upstream_if_match"][1], _join(path, "upstream_if_match"), _parse_bool
                )
            if _INVALID in (header, checks):
                return _INVALID
            return VersionSource("header", header=header, upstream_if_match=bool(checks))
        fields = self.sequence(entries["field"][1], _join(path, "field"), "JSON field names", _parse_field_name)
        return _INVALID if fields is _INVALID else VersionSource("field", fields=fields)

    def bulk(self, node: _Node, path: str) -> Bulk | _Invalid:
        entries = self.mapping(node, path)
        if entries is None:
            return _INVALID
        values: dict[str, Any] = {}
        for name, (key, value) in entries.items():
            if name not in _BULK_PARSERS:
                _unknown_key(self.problems, key, path, tuple(_BULK_PARSERS))
                return _INVALID
            values[name] = self.scalar(value, _join(path, name), _BULK_PARSERS[name])
        if _INVALID in values.values():
            return _INVALID
        for required, example in (("field", "id"), ("member", "/api/sites/{id}/")):
            if required not in values:
                self.problems.add(node, _join(path, required), f"a value such as {example} (the key is required)", "nothing")
                return _INVALID
        member = values["member"]
        if len(_template_names(member)) != 1:
            self.problems.add(
                entries["member"][1], _join(path, "member"),
                "a member template with exactly one variable, filled by the field",
            )
            return _INVALID
        return Bulk(**values)

    def defaults(self, node: _Node | None) -> dict[str, tuple[Any, _Node]]:
        """`defaults:` checked once, so a bad default is reported once, not per route."""
        out: dict[str, tuple[Any, _Node]] = {}
        if node is None:
            return out
        for name, (key, value) in (self.mapping(node, "defaults") or {}).items():
            if name == "path":
                expected = "a route key other than path (each route has its own)"
                self.problems.add(key, "defaults.path", expected, "path")
            elif name not in _ROUTE_KEYS:
                _unknown_key(self.problems, key, "defaults", _ROUTE_KEYS)
            elif (parsed := self.route_value(name, value, f"defaults.{name}")) is not _INVALID:
                out[name] = (parsed, value)
        return out

    def routes(
        self, node: _Node, defaults: dict[str, tuple[Any, _Node]], upstream: Any
    ) -> tuple[RouteConfig, ...] | _Invalid:
        if node.value is _INVALID:
            return _INVALID
        if not isinstance(node.value, list):
            self.problems.add(node, "routes", "a list of routes")
            return _INVALID
        routes: list[RouteConfig | None] = []
        seen: dict[_RouteIdentity, tuple[int, _Node]] = {}
        for i, item in enumerate(node.value):
            route, identity = self.route(item, f"routes[{i}]", defaults, upstream)
            routes.append(route)
            if identity is None:
                continue
            if identity in seen:
                # The first matching route wins, so the later one could never match.
                j, first = seen[identity]
                where = f"line {first.line}" if first.line else first.where
                self.problems.add(
                    item.value["path"][1],
                    f"routes[{i}].path",
                    f"a route not already defined"
                    f" (routes[{j}] at {where} has the same path and methods)",
                )
            else:
                seen[identity] = (i, item)
        if any(route is None for route in routes):
            return _INVALID
        return tuple(r for r in routes if r is not None)

    def route(
        self, node: _Node, path: str, defaults: dict[str, tuple[Any, _Node]], upstream: Any
    ) -> tuple[RouteConfig | None, _RouteIdentity | None]:
        """The route (None if it has problems) and, when its path and methods
        are readable, what makes two routes the same for the duplicate check."""
        if node.value is _INVALID:
            return None, None
        if not isinstance(node.value, dict):
            self.problems.add(node, path, "a route mapping with at least path:")
            return None, None
        entries = node.value
        own: dict[str, tuple[Any, _Node]] = {}
        ok = True
        for name, (key, value) in entries.items():
            if name not in _ROUTE_KEYS:
                _unknown_key(self.problems, key, path, _ROUTE_KEYS)
                ok = False
            elif (parsed := self.route_value(name, value, _join(path, name))) is _INVALID:
                ok = False
            else:
                own[name] = (parsed, value)
        if "path" not in entries:
            self.problems.add(
                node,
                _join(path, "path"),
                "a path template such as /items/{id} (the key is required)",
                "nothing",
            )
            return None, None
        merged = {**defaults, **own}
        identity: _RouteIdentity | None = None
        if "path" in own and ("methods" in own or "methods" not in entries):
            methods = merged["methods"][0] if "methods" in merged else None
            identity = (_template_shape(own["path"][0]), methods)
        mode = merged["mode"][0] if "mode" in merged else "track"
        if mode == "passthrough":
            for name in own:
                if name in _TRACK_ONLY:
                    self.problems.add(
                        own[name][1],
                        _join(path, name),
                        "no tracking settings on a passthrough route",
                    )
                    ok = False
        elif "path" in own:
            template = own["path"][0]
            for name in ("invalidates", "created"):
                if name in merged:
                    ok = self.check_variables(path, name, template, merged[name][1], name in own) and ok
            if merged.get("version", (None,))[0] is not None:
                for name in ("short_circuit", "fingerprint"):
                    if merged.get(name, (False,))[0]:
                        self.problems.add(
                            merged[name][1], _join(path, name),
                            f"{name} false on a route whose version comes from the upstream", "true",
                        )
                        ok = False
            if merged.get("computed", (False,))[0] and merged.get("short_circuit", (False,))[0]:
                where = own.get("short_circuit", own.get("computed", merged["computed"]))[1]
                self.problems.add(
                    where, _join(path, "short_circuit"),
                    "short_circuit false on a computed route (its 304s need the upstream's body)",
                    "true",
                )
                ok = False
        if not ok or "path" not in own:
            return None, identity
        settings = {name: value for name, (value, _) in merged.items() if name != "path"}
        if settings.get("upstream") is None:
            settings["upstream"] = None if upstream is _INVALID else upstream
        return RouteConfig(path=own["path"][0], line=node.line, **settings), identity

    def check_variables(self, path: str, key: str, template: str, node: _Node, own: bool) -> bool:
        """`invalidates` and `created` templates may only use the variables the
        route's own path defines, and fields of the JSON bodies."""
        names = set(_template_names(template))
        listed = ", ".join(f"{{{n}}}" for n in _template_names(template)) or "none"
        ok = True
        prefix = path if own else "defaults"
        items = self.items(node, _join(prefix, key), "path templates") or []
        for item, item_path in items:
            if not isinstance(item.value, str):
                continue
            extra = [n for n in _template_names(item.value) if n not in names and not _body_variable(n)]
            if extra:
                whose = "the route's path" if own else f"the path of {path}"
                self.problems.add(
                    item, item_path,
                    f"only variables {whose} defines ({listed}), {{body.<field>}} or {{response.<field>}}",
                )
                ok = False
        return ok


def _body_variable(name: str) -> bool:
    source, dot, field_name = name.partition(".")
    return bool(dot) and source in ("body", "response") and all(field_name.split("."))


# ---------------------------------------------------------------------------
# The environment


_ENV_PREFIX: Final = "ETAGPROXY_"
# Values used as they are: YAML would turn `:8080`-like text into numbers.
_ENV_TEXT_KEYS: Final = frozenset({"listen", "admin_listen", "upstream", "via"})
# Mapping keys whose environment value is merged over the file's mapping.
_ENV_MERGED_KEYS: Final = frozenset({"timeouts", "limits", "defaults", "store"})


def _env_reserved(name: str) -> bool:
    return name == "ETAGPROXY_CONFIG" or name.startswith("ETAGPROXY_LOG_")


_SERVICE_LINK_NAME = re.compile(
    r"[A-Z0-9_]+?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_URL = re.compile(r"(tcp|udp|sctp)://[^\s/]+:\d+")


def service_link(name: str, value: str) -> bool:
    """Whether `name=value` is a variable Kubernetes injects for a Service
    (`<SVC>_SERVICE_HOST`, `<SVC>_PORT=tcp://host:port`, ...): a Service
    named etagproxy-redis gives ETAGPROXY_REDIS_*. Only names that are not a
    setting count, and `<SVC>_PORT` only with a tcp://-style value, so a
    typo in a real setting is still reported."""
    key = name[len(_ENV_PREFIX) :].lower()
    found = _SERVICE_LINK_NAME.fullmatch(name)
    if key in _TOP_KEYS or found is None:
        return False
    if found.group(1) == "PORT":
        return bool(_SERVICE_LINK_URL.fullmatch(value.strip()))
    return True


def _apply_env(
    top: dict[str, tuple[_Node, _Node]],
    env: Mapping[str, str],
    problems: _Problems,
    reader: _Reader,
) -> None:
    """Override top-level entries of `top` in place from `ETAGPROXY_*` variables."""
    for name in sorted(env):
        if not name.startswith(_ENV_PREFIX) or _env_reserved(name) or service_link(name, env[name]):
            continue
        where = f"env {name}"
        key = name[len(_ENV_PREFIX) :].lower()
        text = env[name]
        key_node = _Node(key, where, 0)
        if key not in _TOP_KEYS:
            # Compared without the common prefix, which would make every name look close.
            close = difflib.get_close_matches(key, _TOP_KEYS, n=1)
            hint = f" (did you mean {_ENV_PREFIX}{close[0].upper()}?)" if close else ""
            problems.raw(
                key_node,
                f"expected {_ENV_PREFIX} followed by a top-level key{hint}, got an unknown name",
            )
            continue
        value = _env_value(key, text, where, reader)
        if value is None:
            continue
        current = top.get(key)
        if current is not None and key in _ENV_MERGED_KEYS:
            value = _merge(key, current[1], value)
        top[key] = (key_node, value)


def _env_value(key: str, text: str, where: str, reader: _Reader) -> _Node | None:
    """The variable's value as a node; None when it overrides nothing."""
    stripped = text.strip()
    if not stripped:
        # `ETAGPROXY_X=${X:-}` in a compose file must not wipe the file's
        # setting; only the admin endpoints are turned off by an empty value.
        return _Node(None, where, 0) if key == "admin_listen" else None
    if key in _ENV_TEXT_KEYS:
        return _Node(text, where, 0)
    if key == "store" and not stripped.startswith("{"):
        return _Node(text, where, 0)
    if key == "trusted_proxies" and not stripped.startswith("["):
        parts = [part.strip() for part in stripped.split(",")]
        return _Node([_Node(part, where, 0) for part in parts if part], where, 0)
    node = reader.read(text, lambda _line: where, True, key)
    # None: unreadable YAML (reported), or only a comment.
    return node


def _merge(key: str, file_node: _Node, env_node: _Node) -> _Node:
    """The environment's entries over the file's, for mapping-valued keys."""
    file_value, env_value = file_node.value, env_node.value
    if key == "store":
        # A bare URL on either side stands for {url: ...}.
        if isinstance(file_value, str) and isinstance(env_value, dict):
            file_value = {"url": (_Node("url", file_node.where, file_node.line), file_node)}
        if isinstance(file_value, dict) and isinstance(env_value, str):
            env_value = {"url": (_Node("url", env_node.where, 0), env_node)}
    if isinstance(file_value, dict) and env_value is None:
        return file_node  # `{}`-like null: nothing to merge
    if isinstance(file_value, dict) and isinstance(env_value, dict):
        return _Node({**file_value, **env_value}, file_node.where, file_node.line)
    return env_node


# ---------------------------------------------------------------------------
# Entry points


def parse_config(
    text: str, *, filename: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Check `text` and build the `Config`; `env` (None: no overrides) overrides top-level keys.

    Raises `ConfigError` listing every problem found.
    """
    problems = _Problems()
    reader = _Reader(problems)
    root = reader.read(text, lambda line: f"{filename}:{line}", False, "")
    if root is None and problems:
        raise ConfigError(problems.messages())  # not YAML: nothing to check further
    if root is None:
        root = _Node({}, f"{filename}:1", 1)
    if not isinstance(root.value, dict):
        problems.add(root, "(top level)", "a mapping of settings such as upstream: and routes:")
        raise ConfigError(problems.messages())
    top = dict(root.value)
    if env:
        _apply_env(top, env, problems, reader)
    config = _Builder(problems).build(top, root, filename)
    if problems or config is None:
        raise ConfigError(problems.messages())
    return config


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and check a configuration file; `env` defaults to `os.environ`.

    Raises `ConfigError` listing every problem found, or why the file could
    not be read.
    """
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{filename}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{filename}:{line}: expected UTF-8 text, got byte 0x{data[exc.start]:02x}"]
        ) from None
    return parse_config(text, filename=filename, env=os.environ if env is None else env)


def dump_effective(config: Config) -> dict[str, Any]:
    """The configuration as plain JSON values, the store password masked (startup log)."""
    store = config.store
    return {
        "source": config.source,
        "upstream": config.upstream,
        "listen": _format_address(config.listen),
        "admin_listen": (
            None if config.admin_listen is None else _format_address(config.admin_listen)
        ),
        "store": {
            "url": store.masked_url,
            "kind": store.kind,
            "hosts": [_format_address(h) for h in store.hosts],
            "tls": store.tls,
            "db": store.db,
            "username": store.username,
            "password": None if store.password is None else "***",
            "service_name": store.service_name,
            "prefix": store.prefix,
            "token_ttl": store.token_ttl,
            "min_replicas": store.min_replicas,
            "min_replicas_timeout": store.min_replicas_timeout,
        },
        "timeouts": dataclasses.asdict(config.timeouts),
        "limits": dataclasses.asdict(config.limits),
        "routes": [_route_json(r) for r in config.routes],
        "trusted_proxies": list(config.trusted_proxies),
        "via": config.via,
    }


def _route_json(route: RouteConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(route):
        value = getattr(route, f.name)
        if isinstance(value, frozenset):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
