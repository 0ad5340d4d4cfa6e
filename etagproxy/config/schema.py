"""The configuration's shape: `ConfigError` and the frozen dataclasses a
checked configuration is made of (`Config`, `RouteConfig`, `StoreConfig`,
`Timeouts`, `Limits`, `Tracing`, `Bulk`), with their defaults.

Owns the field names, types, defaults and documentation of every setting.
Imports nothing else of config/ (only `derived.VersionSource`, the shape of
a route's `version`): it knows no YAML, no parsing and no environment. `_mask_url` lives here because `StoreConfig.masked_url` needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from etagproxy.derived import VersionSource


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per reason."""

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# The password of a URL's userinfo: everything after the first ":" up to the
# last "@" before the host, so an unencoded "@" or "/" in it is hidden too.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):(.*)@")


def _mask_url(url: str) -> str:
    return _USERINFO.sub(r"\1:***@", url, count=1)


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
class Tracing:
    """W3C Trace Context and OpenTelemetry (docs/DEPLOYING.md, "Tracing")."""

    sampled: bool = False
    """The sampled flag of a trace the proxy starts (no valid traceparent
    came in): true sends trace-flags 01, false 00."""
    otel: bool = False
    """Emit OpenTelemetry spans (needs the `otel` extra): a server span per
    request with child spans for store and upstream calls, exported as the
    SDK's environment says (OTEL_TRACES_EXPORTER, ...)."""


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
    epoch: str | None = None
    """Where the store's scripts learn the server's epoch (run_id, start):
    "connection" (the default on redis://) reads `INFO server` once per
    connection, since a server process cannot change under a TCP connection;
    "script" makes every script call read it, for a Redis behind a proxy
    that keeps client connections open across a failover. None: the default
    for the kind ("script" on sentinel and cluster, where redis-py's
    connections read none; memory has no epoch)."""

    @property
    def epoch_source(self) -> str | None:
        """`epoch` as it applies: the kind's default when unset."""
        return self.epoch or {"redis": "connection", "memory": None}.get(self.kind, "script")

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
    """Where /healthz, /readyz, /metrics and the status page are served; None = not served."""
    store: StoreConfig = field(default_factory=_memory_store)
    """The version store."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    tracing: Tracing = field(default_factory=Tracing)
    routes: tuple[RouteConfig, ...] = ()
    """In file order; the first match wins, unmatched requests are passthrough."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDRs whose Forwarded / X-Forwarded-* headers are believed."""
    via: str = "etagproxy"
    """Pseudonym this proxy uses in Via (RFC 9110 §7.6.3)."""
    watch_config: float = 0.0
    """Seconds between checks of the config file for changes, which are then
    applied as SIGHUP would (a Kubernetes ConfigMap update); 0 = never."""
    server: str = "etagproxy"
    """The Server field of the proxy's own answers (RFC 9110 §10.2.4); no
    versions by default. A relayed answer keeps the upstream's."""
    source: str = "<config>"
    """Name of the file the configuration came from."""
