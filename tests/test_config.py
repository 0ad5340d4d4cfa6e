"""Configuration loading: values, every kind of problem message, environment overrides."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from etagproxy.config import (
    Config,
    ConfigError,
    Limits,
    RouteConfig,
    StoreConfig,
    Timeouts,
    dump_effective,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    parse_store_url,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "etagproxy.yaml"
UPSTREAM = "upstream: http://127.0.0.1:8000\n"


def doc(text: str) -> str:
    """Dedent a YAML literal so that its first line is line 1."""
    return textwrap.dedent(text).removeprefix("\n")


def problems(text: str, *, filename: str = "config.yaml", env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(text), filename=filename, env=env)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- a good file -------------------------------------------------------------

FULL = """
listen: 127.0.0.1:9000
admin_listen: "[::1]:9901"
upstream: https://api.internal:8443/base
store:
  url: redis://app:p%40ss@redis.internal:6380/3
  prefix: "svc:"
  token_ttl: 2d
  min_replicas: 1
  min_replicas_timeout: 50ms
timeouts: {connect: 1.5, upstream: 5s, write_wait: 250ms, store: 100ms, shutdown: 1m,
           header_read: 3s, body_read: 4s, keepalive: 0}
limits: {max_body: 512KiB, max_header_size: 4096, max_headers: 50, max_connections: 20,
         max_in_flight: 10, fingerprint_max: 1MB}
trusted_proxies: [10.0.0.0/8, "::1"]
via: edge-1
defaults:
  require_if_match: true
  replay_ttl: 0
routes:
  - path: /api/sites/{id}/
    methods: [put, PATCH]
    invalidates: [/api/sites/, "/api/sites/{id}/stats/"]
    key_query: [format]
    on_store_error: fail_open
    etag_in_412: yes
  - path: /api/sites/
    require_if_match: false
    short_circuit: true
    short_circuit_ttl: 30s
    public: true
    fingerprint: true
    last_modified: false
    etag_on_write: false
    upstream_conditionals: true
    upstream: http://other:81
  - path: /static/{rest:path}
    mode: passthrough
    allow_upgrade: true
"""


def test_full_file_loads_into_the_expected_objects() -> None:
    config = parse_config(doc(FULL), filename="full.yaml")
    assert config.source == "full.yaml"
    assert config.upstream == "https://api.internal:8443/base"
    assert config.listen == ("127.0.0.1", 9000)
    assert config.admin_listen == ("::1", 9901)
    assert config.store == StoreConfig(
        url="redis://app:p%40ss@redis.internal:6380/3",
        kind="redis",
        hosts=(("redis.internal", 6380),),
        db=3,
        username="app",
        password="p@ss",
        prefix="svc:",
        token_ttl=2 * 86400.0,
        min_replicas=1,
        min_replicas_timeout=0.05,
    )
    assert config.timeouts == Timeouts(
        connect=1.5, upstream=5.0, write_wait=0.25, store=0.1, shutdown=60.0,
        header_read=3.0, body_read=4.0, keepalive=0.0,
    )  # fmt: skip
    assert config.limits == Limits(
        max_body=512 * 1024, max_header_size=4096, max_headers=50, max_connections=20,
        max_in_flight=10, fingerprint_max=1_000_000,
    )  # fmt: skip
    assert config.trusted_proxies == ("10.0.0.0/8", "::1")
    assert config.via == "edge-1"
    assert config.routes == (
        RouteConfig(
            path="/api/sites/{id}/",
            line=20,
            methods=frozenset({"PUT", "PATCH"}),
            upstream="https://api.internal:8443/base",
            invalidates=("/api/sites/", "/api/sites/{id}/stats/"),
            key_query=("format",),
            on_store_error="fail_open",
            etag_in_412=True,
            require_if_match=True,  # from defaults
            replay_ttl=0.0,  # from defaults
        ),
        RouteConfig(
            path="/api/sites/",
            line=26,
            upstream="http://other:81",
            require_if_match=False,  # the route's own value beats defaults
            short_circuit=True,
            short_circuit_ttl=30.0,
            public=True,
            fingerprint=True,
            last_modified=False,
            etag_on_write=False,
            upstream_conditionals=True,
            replay_ttl=0.0,
        ),
        RouteConfig(
            path="/static/{rest:path}",
            line=36,
            upstream="https://api.internal:8443/base",
            mode="passthrough",
            allow_upgrade=True,
            # defaults apply to passthrough routes too, without complaint
            require_if_match=True,
            replay_ttl=0.0,
        ),
    )


def test_minimal_file_gets_the_documented_defaults() -> None:
    config = parse_config(UPSTREAM)
    assert config == Config(upstream="http://127.0.0.1:8000", source="<config>")
    assert config.listen == ("0.0.0.0", 8080)
    assert config.admin_listen is None
    assert config.store.kind == "memory" and config.store.hosts == ()
    assert config.timeouts.upstream == 30.0 and config.limits.max_body == 10 * 1024 * 1024


def test_config_objects_are_frozen() -> None:
    config = parse_config(UPSTREAM)
    with pytest.raises(AttributeError):
        config.upstream = "http://elsewhere"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.timeouts.upstream = 1.0  # type: ignore[misc]


def test_empty_sections_mean_defaults() -> None:
    config = parse_config(UPSTREAM + "timeouts:\nlimits:\nroutes:\ndefaults:\ntrusted_proxies:\n")
    assert config.timeouts == Timeouts() and config.limits == Limits() and config.routes == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: :8080", ("0.0.0.0", 8080)),
        ("listen: 8081", ("0.0.0.0", 8081)),
        ("listen: '[::]:80'", ("::", 80)),
        ("listen: localhost:0", ("localhost", 0)),
        ("listen: proxy_1.internal:65535", ("proxy_1.internal", 65535)),
    ],
)
def test_listen_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_config(UPSTREAM + text).listen == expected


# --- every kind of problem, with its exact message ---------------------------


def test_the_documented_example_message() -> None:
    text = """
    # inventory API behind the proxy
    upstream: http://127.0.0.1:8000
    listen: 0.0.0.0:8080

    routes:
      # sites
      - path: /api/dcim/sites/{id}/
        require_if_match: true
      - path: /api/dcim/sites/
      # devices
      - path: /api/dcim/devices/{id}/
        require_if_match: yes please
    """
    assert problems(text) == [
        "config.yaml:12: routes[2].require_if_match: expected true or false, got 'yes please'"
    ]


KNOWN_TOP = (
    "listen, admin_listen, upstream, store, timeouts, limits, tracing, defaults, routes, trusted_proxies, via, server,"
    " watch_config"
)
DURATION = "a duration such as 2s, 250ms, 1.5m, 1h or 7d"
SIZE = "a size such as 10MiB, 512KiB, 1GB or a number of bytes"
ADDRESS = "host:port such as 0.0.0.0:8080, [::1]:8080 or :8080"
URL = "an http:// or https:// URL such as http://127.0.0.1:8000"
TEMPLATE = "a path template such as /items/{id} or /files/{rest:path}"
STORE = (
    "a store URL: memory://, redis://host:port/db, rediss://..., "
    "redis+sentinel://host:port,host:port/master or redis+cluster://host:port,host:port"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "listen: 0.0.0.0:8080\n",
            f"config.yaml:1: upstream: expected {URL} (the key is required), got nothing",
            id="upstream-missing",
        ),
        pytest.param(
            UPSTREAM + "lisen: :8080\n",
            "config.yaml:2: lisen: expected a known key (did you mean 'listen'?), got an unknown key",
            id="unknown-top-key-with-hint",
        ),
        pytest.param(
            UPSTREAM + "colour: blue\n",
            f"config.yaml:2: colour: expected a known key (one of {KNOWN_TOP}), got an unknown key",
            id="unknown-top-key",
        ),
        pytest.param(
            "upstream: ftp://files\n",
            f"config.yaml:1: upstream: expected {URL}, got 'ftp://files'",
            id="upstream-scheme",
        ),
        pytest.param(
            "upstream: http://api/?x=1\n",
            f"config.yaml:1: upstream: expected {URL} without a query or fragment, got 'http://api/?x=1'",
            id="upstream-query",
        ),
        pytest.param(
            "upstream: http:///nohost\n",
            f"config.yaml:1: upstream: expected {URL}, got 'http:///nohost'",
            id="upstream-no-host",
        ),
        pytest.param(
            "upstream: http://admin:hunter2@api/\n",
            f"config.yaml:1: upstream: expected {URL} without user:password@, got 'http://admin:***@api/'",
            id="upstream-credentials-masked",
        ),
        pytest.param(
            "upstream: 8000\n",
            f"config.yaml:1: upstream: expected {URL}, got 8000",
            id="upstream-type",
        ),
        pytest.param(
            UPSTREAM + "listen: 0.0.0.0\n",
            f"config.yaml:2: listen: expected {ADDRESS}, got '0.0.0.0'",
            id="listen-no-port",
        ),
        pytest.param(
            UPSTREAM + "listen: '::1:8080'\n",
            f"config.yaml:2: listen: expected {ADDRESS} (IPv6 addresses go in brackets), got '::1:8080'",
            id="listen-v6-brackets",
        ),
        pytest.param(
            UPSTREAM + "admin_listen: 127.0.0.1:70000\n",
            f"config.yaml:2: admin_listen: expected {ADDRESS} (port 0 to 65535), got '127.0.0.1:70000'",
            id="listen-port-range",
        ),
        pytest.param(
            UPSTREAM + "listen: 300.1.2.3:80\n",
            f"config.yaml:2: listen: expected {ADDRESS}, got '300.1.2.3:80'",
            id="listen-bad-ipv4",
        ),
        pytest.param(
            UPSTREAM + "listen: :8080\nadmin_listen: 0.0.0.0:8080\n",
            "config.yaml:3: admin_listen: expected an address other than listen's, got '0.0.0.0:8080'",
            id="admin-same-as-listen",
        ),
        pytest.param(
            UPSTREAM + "timeouts:\n  connect: fast\n",
            f"config.yaml:3: timeouts.connect: expected {DURATION}, got 'fast'",
            id="duration-format",
        ),
        pytest.param(
            UPSTREAM + "timeouts:\n  write_wait: -1s\n",
            "config.yaml:3: timeouts.write_wait: expected a duration that is not negative, got '-1s'",
            id="duration-negative",
        ),
        pytest.param(
            UPSTREAM + "timeouts:\n  upstream: 0s\n",
            "config.yaml:3: timeouts.upstream: expected a duration greater than 0, got '0s'",
            id="upstream-timeout-zero",
        ),
        pytest.param(
            UPSTREAM + "timeouts:\n  upstrem: 1s\n",
            "config.yaml:3: timeouts.upstrem: expected a known key (did you mean 'upstream'?), got an unknown key",
            id="timeouts-unknown-key",
        ),
        pytest.param(
            UPSTREAM + "timeouts: 5s\n",
            "config.yaml:2: timeouts: expected a mapping, got '5s'",
            id="timeouts-not-mapping",
        ),
        pytest.param(
            UPSTREAM + "limits:\n  max_body: 10mb\n",
            f"config.yaml:3: limits.max_body: expected {SIZE}, got '10mb'",
            id="size-unit-case",
        ),
        pytest.param(
            UPSTREAM + "limits:\n  max_headers: 0\n",
            "config.yaml:3: limits.max_headers: expected a whole number of at least 1, got 0",
            id="count-minimum",
        ),
        pytest.param(
            UPSTREAM + "limits:\n  max_connections: 10k\n",
            "config.yaml:3: limits.max_connections: expected a whole number of at least 1, got '10k'",
            id="count-type",
        ),
        pytest.param(
            UPSTREAM + "store: mysql://db\n",
            f"config.yaml:2: store: expected {STORE}, got 'mysql://db'",
            id="store-scheme",
        ),
        pytest.param(
            UPSTREAM + "store: redis://:topsecret@h1,h2/0\n",
            "config.yaml:2: store: expected one host in a redis:// URL (several hosts need"
            " redis+sentinel:// or redis+cluster://), got 'redis://:***@h1,h2/0'",
            id="store-password-masked",
        ),
        pytest.param(
            UPSTREAM + "store:\n  url: memory://\n  min_replicas: 1\n",
            "config.yaml:4: store.min_replicas: expected 0 for memory:// (it has no replicas), got 1",
            id="store-replicas-memory",
        ),
        pytest.param(
            UPSTREAM + "store:\n  url: redis://r\n  epoch: run_id\n",
            "config.yaml:4: store.epoch: expected connection or script, got 'run_id'",
            id="store-epoch-choice",
        ),
        pytest.param(
            UPSTREAM + "store:\n  url: redis+cluster://a,b\n  epoch: connection\n",
            "config.yaml:4: store.epoch: expected script for this store (only redis:// reads the epoch"
            " per connection), got 'connection'",
            id="store-epoch-cluster",
        ),
        pytest.param(
            UPSTREAM + "store:\n  prefix: x\n",
            f"config.yaml:3: store.url: expected {STORE} (the key is required), got nothing",
            id="store-url-missing",
        ),
        pytest.param(
            UPSTREAM + "store:\n  url: redis://r\n  min_replicas_timeout: 0\n",
            "config.yaml:4: store.min_replicas_timeout: expected a duration greater than 0"
            " (0 would make WAIT block forever), got 0",
            id="store-wait-zero",
        ),
        pytest.param(
            UPSTREAM + "trusted_proxies: [10.0.0.0/8, 10.0.0.300]\n",
            "config.yaml:2: trusted_proxies[1]: expected an IP address or CIDR such as 10.0.0.0/8,"
            " got '10.0.0.300'",
            id="trusted-proxy",
        ),
        pytest.param(
            UPSTREAM + "via: 'my proxy'\n",
            "config.yaml:2: via: expected a pseudonym of token characters (RFC 9110 §7.6.3)"
            " such as etagproxy, got 'my proxy'",
            id="via-token",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - methods: [GET]\n",
            "config.yaml:3: routes[0].path: expected a path template such as /items/{id}"
            " (the key is required), got nothing",
            id="route-path-missing",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: api/{id}\n",
            f"config.yaml:3: routes[0].path: expected {TEMPLATE} (template 'api/{{id}}' must start"
            " with '/'), got 'api/{id}'",
            id="route-template",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/{id}\n    invalidates: ['/a/', '/b/{']\n",
            f"config.yaml:4: routes[0].invalidates[1]: expected {TEMPLATE} (unbalanced '{{'"
            " (variables are {name} or {name:path})), got '/b/{'",
            id="invalidates-template",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/{id}/\n    invalidates: [/a/, '/b/{id}/{other}']\n",
            "config.yaml:4: routes[0].invalidates[1]: expected only variables the route's path"
            " defines ({id}), {body.<field>} or {response.<field>}, got '/b/{id}/{other}'",
            id="invalidates-variable",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    invalidates: '/b/{x}'\n",
            "config.yaml:4: routes[0].invalidates: expected only variables the route's path"
            " defines (none), {body.<field>} or {response.<field>}, got '/b/{x}'",
            id="invalidates-single-string",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    methods: [GET, 'GET /']\n",
            "config.yaml:4: routes[0].methods[1]: expected an HTTP method name such as GET or PUT, got 'GET /'",
            id="method-token",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    methods: []\n",
            "config.yaml:4: routes[0].methods: expected at least one method (leave methods out for all),"
            " got an empty list",
            id="methods-empty",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    key_query: [page, '']\n",
            "config.yaml:4: routes[0].key_query[1]: expected a query parameter name, got ''",
            id="key-query-empty",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    mode: cache\n",
            "config.yaml:4: routes[0].mode: expected track or passthrough, got 'cache'",
            id="mode",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    on_store_error: ignore\n",
            "config.yaml:4: routes[0].on_store_error: expected fail_closed or fail_open, got 'ignore'",
            id="on-store-error",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    short_circuit_ttl: -5s\n",
            "config.yaml:4: routes[0].short_circuit_ttl: expected a duration that is not negative, got '-5s'",
            id="short-circuit-ttl-negative",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    upstream: https://x/?q\n",
            f"config.yaml:4: routes[0].upstream: expected {URL} without a query or fragment, got 'https://x/?q'",
            id="route-upstream",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /s/{p:path}\n    mode: passthrough\n    require_if_match: false\n",
            "config.yaml:5: routes[0].require_if_match: expected no tracking settings on a passthrough"
            " route, got false",
            id="passthrough-track-key",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    require_if_macth: true\n",
            "config.yaml:4: routes[0].require_if_macth: expected a known key (did you mean"
            " 'require_if_match'?), got an unknown key",
            id="route-unknown-key",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - /a/\n",
            "config.yaml:3: routes[0]: expected a route mapping with at least path:, got '/a/'",
            id="route-not-mapping",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  path: /a/\n",
            "config.yaml:3: routes: expected a list of routes, got a mapping",
            id="routes-not-list",
        ),
        pytest.param(
            UPSTREAM + "defaults:\n  replay_ttl: soon\n",
            f"config.yaml:3: defaults.replay_ttl: expected {DURATION}, got 'soon'",
            id="defaults-value",
        ),
        pytest.param(
            UPSTREAM + "defaults:\n  fingerprnt: true\n",
            "config.yaml:3: defaults.fingerprnt: expected a known key (did you mean 'fingerprint'?),"
            " got an unknown key",
            id="defaults-unknown-key",
        ),
        pytest.param(
            UPSTREAM + "defaults:\n  path: /x/\n",
            "config.yaml:3: defaults.path: expected a route key other than path (each route has its own),"
            " got path",
            id="defaults-path",
        ),
        pytest.param(
            UPSTREAM + "listen: :80\nlisten: :81\n",
            "config.yaml:3: listen: expected each key once (first on line 2), got it again",
            id="yaml-duplicate-key",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    require_if_match: !!python/object/apply:os.system [id]\n",
            "config.yaml:4: routes[0].require_if_match: expected a plain YAML value, got a value tagged"
            " !!python/object/apply:os.system",
            id="yaml-python-tag",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    replay_ttl: !!int five\n",
            "config.yaml:4: routes[0].replay_ttl: expected a value matching its tag !!int, got 'five'",
            id="yaml-bad-tagged-value",
        ),
        pytest.param(
            UPSTREAM + "defaults: &d {public: true}\nroutes:\n  - path: /a/\n    short_circuit: *d\n",
            "config.yaml:5: routes[0].short_circuit: expected a value (YAML aliases are not supported;"
            " use defaults: to share route settings), got alias *d",
            id="yaml-alias",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - <<: {path: /a/}\n",
            "config.yaml:3: routes[0].<<: expected a key name (YAML merge keys are not supported;"
            " use defaults:), got '<<'",
            id="yaml-merge-key",
        ),
        pytest.param(
            UPSTREAM + "via: a: b\nlisten: :80\n",
            "config.yaml:2: invalid YAML: mapping values are not allowed here",
            id="yaml-syntax",
        ),
        pytest.param(
            "- upstream: http://x\n",
            "config.yaml:1: (top level): expected a mapping of settings such as upstream: and routes:,"
            " got a list",
            id="top-level-list",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    bulk: {field: id, member: '/a/{id}/{x}/'}\n",
            "config.yaml:4: routes[0].bulk.member: expected a member template with exactly one"
            " variable, filled by the field, got '/a/{id}/{x}/'",
            id="bulk-member-variables",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    bulk: {member: '/a/{id}/'}\n",
            "config.yaml:4: routes[0].bulk.field: expected a value such as id (the key is required), got nothing",
            id="bulk-field-missing",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    bulk: {field: id, member: '/a/{id}/', max_members: 0}\n",
            "config.yaml:4: routes[0].bulk.max_members: expected a whole number from 1 to 10000, got 0",
            id="bulk-max-members",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    bulk: {field: id, members: '/a/{id}/'}\n",
            "config.yaml:4: routes[0].bulk.members: expected a known key (did you mean 'member'?),"
            " got an unknown key",
            id="bulk-unknown-key",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/{id}\n    computed: true\n    short_circuit: true\n",
            "config.yaml:5: routes[0].short_circuit: expected short_circuit false on a computed route"
            " (its 304s need the upstream's body), got true",
            id="computed-short-circuit",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    plain_types: [application/*]\n",
            "config.yaml:4: routes[0].plain_types[0]: expected a media type such as application/json"
            " (no parameters, no wildcards), got 'application/*'",
            id="plain-types-wildcard",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/{body.id}\n",
            "config.yaml:3: routes[0].path: expected a path template with plain variable names"
            " ({body.x} and {response.x} belong in invalidates and created), got '/a/{body.id}'",
            id="path-dotted-variable",
        ),
        pytest.param(
            UPSTREAM + "routes:\n  - path: /a/\n    created: '/a/{other}/'\n",
            "config.yaml:4: routes[0].created: expected only variables the route's path defines (none),"
            " {body.<field>} or {response.<field>}, got '/a/{other}/'",
            id="created-variable",
        ),
    ],
)
def test_problem_message(text: str, message: str) -> None:
    found = problems(text)
    assert message in found, "\n".join(found)
    # One mistake, one message (a missing route path also makes no route).
    assert len(found) == 1 or (len(found) == 2 and "<<" in message)


def test_route_with_merge_key_also_reports_its_missing_path() -> None:
    assert problems(UPSTREAM + "routes:\n  - <<: {path: /a/}\n")[1] == (
        "config.yaml:3: routes[0].path: expected a path template such as /items/{id}"
        " (the key is required), got nothing"
    )


def test_message_names_the_file() -> None:
    (message,) = problems("upstream: ftp://x\n", filename="/etc/etagproxy/prod.yaml")
    assert message.startswith("/etc/etagproxy/prod.yaml:1: upstream: expected ")


def test_duplicate_routes_name_both_lines() -> None:
    text = """
    upstream: http://127.0.0.1:8000
    routes:
      - path: /items/{id}
        methods: [GET, PUT]
      - path: /items/{id}
        methods: [GET]
      - path: /items/{item}
        methods: [put, get]
      - path: /items/{id}
    """
    assert problems(text) == [
        "config.yaml:7: routes[2].path: expected a route not already defined (routes[0] at line 3"
        " has the same path and methods), got '/items/{item}'"
    ]


def test_duplicate_route_is_reported_even_if_the_first_has_other_problems() -> None:
    text = UPSTREAM + "routes:\n  - path: /a/\n    fingerprint: maybe\n  - path: /a/\n"
    assert problems(text) == [
        "config.yaml:4: routes[0].fingerprint: expected true or false, got 'maybe'",
        "config.yaml:5: routes[1].path: expected a route not already defined (routes[0] at line 3"
        " has the same path and methods), got '/a/'",
    ]


def test_all_problems_of_a_file_are_reported_in_file_order() -> None:
    text = """
    listen: nowhere
    timeouts:
      upstream: 0
      store: 1x
    limits: {max_body: -1}
    routes:
      - path: /a/{id}
        require_if_match: 'yes please'
        invalidates: ['/b/{other}']
      - path: /s/{rest:path}
        mode: passthrough
        short_circuit: true
      - path: /a/{id}
    bogus: 1
    """
    assert problems(text) == [
        "config.yaml:1: upstream: expected an http:// or https:// URL such as http://127.0.0.1:8000"
        " (the key is required), got nothing",
        f"config.yaml:1: listen: expected {ADDRESS}, got 'nowhere'",
        "config.yaml:3: timeouts.upstream: expected a duration greater than 0, got 0",
        f"config.yaml:4: timeouts.store: expected {DURATION}, got '1x'",
        "config.yaml:5: limits.max_body: expected a size that is not negative, got -1",
        "config.yaml:8: routes[0].require_if_match: expected true or false, got 'yes please'",
        "config.yaml:9: routes[0].invalidates[0]: expected only variables the route's path defines"
        " ({id}), {body.<field>} or {response.<field>}, got '/b/{other}'",
        "config.yaml:12: routes[1].short_circuit: expected no tracking settings on a passthrough"
        " route, got true",
        "config.yaml:13: routes[2].path: expected a route not already defined (routes[0] at line 7"
        " has the same path and methods), got '/a/{id}'",
        f"config.yaml:14: bogus: expected a known key (one of {KNOWN_TOP}), got an unknown key",
    ]


def test_every_message_has_the_documented_shape() -> None:
    text = UPSTREAM + "listen: x\nvia: ''\nroutes:\n  - path: /a\n    public: 1\n"
    shape = re.compile(r"config\.yaml:\d+: [a-z_\[\]0-9.]+: expected .+, got .+")
    found = problems(text)
    assert len(found) == 3
    assert all(shape.fullmatch(m) for m in found), found


def test_python_tags_are_never_constructed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = UPSTREAM + f"via: !!python/object/apply:os.system ['touch {marker}']\n"
    problems(text)
    assert not marker.exists()


def test_self_referencing_alias_is_refused_without_recursing() -> None:
    found = problems(UPSTREAM + "routes: &r [*r]\n")
    assert found[0].startswith("config.yaml:2: routes[0]: expected a value (YAML aliases")


# --- defaults ------------------------------------------------------------------


def test_defaults_merge_into_every_route_and_routes_win() -> None:
    text = """
    upstream: http://127.0.0.1:8000
    defaults:
      require_if_match: true
      methods: [PUT]
      short_circuit_ttl: 10s
      upstream: http://shared:9000
    routes:
      - path: /a/
      - path: /b/
        require_if_match: false
        methods: [GET, PUT]
        upstream: http://b:1
    """
    a, b = parse_config(doc(text)).routes
    assert (a.require_if_match, a.methods, a.short_circuit_ttl, a.upstream) == (
        True, frozenset({"PUT"}), 10.0, "http://shared:9000",
    )  # fmt: skip
    assert (b.require_if_match, b.methods, b.short_circuit_ttl, b.upstream) == (
        False, frozenset({"GET", "PUT"}), 10.0, "http://b:1",
    )  # fmt: skip


def test_a_bad_default_is_reported_once_not_per_route() -> None:
    text = UPSTREAM + "defaults:\n  etag_on_write: sometimes\nroutes:\n  - path: /a/\n  - path: /b/\n"
    assert problems(text) == [
        "config.yaml:3: defaults.etag_on_write: expected true or false, got 'sometimes'"
    ]


def test_default_invalidates_must_fit_each_route() -> None:
    text = """
    upstream: http://127.0.0.1:8000
    defaults:
      invalidates: ['/index/{id}']
    routes:
      - path: /items/{id}
      - path: /other/{name}
    """
    assert problems(text) == [
        "config.yaml:3: defaults.invalidates[0]: expected only variables the path of routes[1]"
        " defines ({name}), {body.<field>} or {response.<field>}, got '/index/{id}'"
    ]


def test_passthrough_route_may_inherit_tracking_defaults() -> None:
    text = UPSTREAM + "defaults:\n  require_if_match: true\nroutes:\n  - path: /s/\n    mode: passthrough\n"
    (route,) = parse_config(text).routes
    assert route.mode == "passthrough"


def test_routes_without_upstream_get_the_top_level_one() -> None:
    text = UPSTREAM + "routes:\n  - path: /a/\n  - path: /b/\n    upstream: null\n"
    assert [r.upstream for r in parse_config(text).routes] == ["http://127.0.0.1:8000"] * 2


# --- environment ---------------------------------------------------------------

FILE = """
upstream: http://file:8000
listen: 0.0.0.0:8080
admin_listen: 127.0.0.1:9901
store:
  url: redis://file-redis:6379/0
  prefix: "file:"
timeouts: {connect: 3s, upstream: 20s}
limits: {max_body: 1MiB}
routes:
  - path: /a/
"""


def test_env_overrides_scalars_and_merges_mappings() -> None:
    env = {
        "ETAGPROXY_LISTEN": "127.0.0.1:9000",
        "ETAGPROXY_UPSTREAM": "https://env-api",
        "ETAGPROXY_STORE": "redis+sentinel://:pw@s1:26379,s2/primary",
        "ETAGPROXY_TIMEOUTS": "{upstream: 5s}",
        "ETAGPROXY_LIMITS": "{max_headers: 7}",
        "ETAGPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1",
        "ETAGPROXY_ADMIN_LISTEN": "",
        "ETAGPROXY_CONFIG": "/ignored.yaml",
        "ETAGPROXY_LOG_LEVEL": "debug",
        "PATH": "/usr/bin",
    }
    config = parse_config(doc(FILE), env=env)
    assert config.listen == ("127.0.0.1", 9000)
    assert config.upstream == "https://env-api"
    assert config.routes[0].upstream == "https://env-api"
    assert config.admin_listen is None
    assert config.store.kind == "sentinel"
    assert config.store.hosts == (("s1", 26379), ("s2", 26379))
    assert config.store.service_name == "primary" and config.store.password == "pw"
    assert config.store.prefix == "file:"  # the file's store settings stay
    assert config.timeouts.upstream == 5.0 and config.timeouts.connect == 3.0
    assert config.limits.max_headers == 7 and config.limits.max_body == 1024 * 1024
    assert config.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")


def test_env_routes_replace_the_files_and_defaults_merge() -> None:
    env = {
        "ETAGPROXY_ROUTES": "[{path: '/x/{id}'}, {path: /y/}]",
        "ETAGPROXY_DEFAULTS": "{require_if_match: true}",
    }
    config = parse_config(doc(FILE), env=env)
    assert [(r.path, r.line, r.require_if_match) for r in config.routes] == [
        ("/x/{id}", 0, True),
        ("/y/", 0, True),
    ]


def test_env_store_mapping_merges_over_a_file_url() -> None:
    config = parse_config(UPSTREAM + "store: redis://r:6379/1\n", env={"ETAGPROXY_STORE": "{prefix: 'e:'}"})
    assert (config.store.hosts, config.store.db, config.store.prefix) == ((("r", 6379),), 1, "e:")


def test_empty_env_values_override_nothing_except_admin_listen() -> None:
    env = {name: "" for name in ("ETAGPROXY_UPSTREAM", "ETAGPROXY_ROUTES", "ETAGPROXY_TIMEOUTS",
                                  "ETAGPROXY_STORE", "ETAGPROXY_LISTEN")}  # fmt: skip
    config = parse_config(doc(FILE), env=env)
    assert config == parse_config(doc(FILE), env={})
    assert config.admin_listen == ("127.0.0.1", 9901)
    assert parse_config(doc(FILE), env={"ETAGPROXY_ADMIN_LISTEN": " "}).admin_listen is None


def test_env_supplies_a_missing_upstream() -> None:
    assert parse_config("", env={"ETAGPROXY_UPSTREAM": "http://u"}).upstream == "http://u"


def test_env_problems_name_the_variable() -> None:
    env = {
        "ETAGPROXY_LISTEN": "localhost",
        "ETAGPROXY_TIMEOUTS": "{upstream: 0, retry: 1s}",
        "ETAGPROXY_LIMITS": "{max_body: [}",
        "ETAGPROXY_STORE": "redis://:s3cret@/0",
        "ETAGPROXY_LISTN": ":1",
        "ETAGPROXY_WHATEVER": "1",
    }
    assert problems(UPSTREAM + "timeouts: {upstream: 9s}\n", env=env) == [
        "env ETAGPROXY_LIMITS: invalid YAML: expected the node content, but found '}'",
        "env ETAGPROXY_LISTEN: listen: expected host:port such as 0.0.0.0:8080, [::1]:8080 or :8080,"
        " got 'localhost'",
        "env ETAGPROXY_LISTN: expected ETAGPROXY_ followed by a top-level key (did you mean"
        " ETAGPROXY_LISTEN?), got an unknown name",
        f"env ETAGPROXY_STORE: store: expected {STORE}, with host or host:port for each host,"
        " got 'redis://:***@/0'",
        "env ETAGPROXY_TIMEOUTS: timeouts.upstream: expected a duration greater than 0, got 0",
        "env ETAGPROXY_TIMEOUTS: timeouts.retry: expected a known key (one of connect, upstream,"
        " write_wait, store, shutdown, header_read, body_read, keepalive), got an unknown key",
        "env ETAGPROXY_WHATEVER: expected ETAGPROXY_ followed by a top-level key, got an unknown name",
    ]


def test_env_problems_come_after_file_problems() -> None:
    found = problems("upstream: x\n", env={"ETAGPROXY_VIA": "a b"})
    assert [m.split(":")[0] for m in found] == ["config.yaml", "env ETAGPROXY_VIA"]


def test_parse_config_ignores_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETAGPROXY_LISTEN", "127.0.0.1:1")
    assert parse_config(UPSTREAM).listen == ("0.0.0.0", 8080)


def test_load_config_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(UPSTREAM)
    monkeypatch.setenv("ETAGPROXY_LISTEN", "127.0.0.1:1")
    assert load_config(path).listen == ("127.0.0.1", 1)
    assert load_config(path, env={}).listen == ("0.0.0.0", 8080)
    assert load_config(str(path), env={}).source == str(path)


def test_load_config_unreadable_and_undecodable(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert info.value.problems == [f"{missing}: cannot read the file: No such file or directory"]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(UPSTREAM.encode() + b"via: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(latin, env={})
    assert info.value.problems == [f"{latin}:2: expected UTF-8 text, got byte 0xe9"]


# --- the example file -----------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.upstream == "http://127.0.0.1:8000"
    assert config.store.kind == "memory"
    assert config.routes and all(r.upstream for r in config.routes)


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = (
        [f.name for f in Config.__dataclass_fields__.values() if f.name != "source"]
        + list(Timeouts.__dataclass_fields__)
        + list(Limits.__dataclass_fields__)
        + ["url", "prefix", "token_ttl", "min_replicas", "min_replicas_timeout", "epoch"]
        + [f for f in RouteConfig.__dataclass_fields__ if f != "line"]
    )
    missing = [k for k in keys if not re.search(rf"^\s*(?:#\s*|- )?{k}\b", text, re.M)]
    assert missing == []


# --- durations, sizes, store URLs -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2s", 2.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        (".5s", 0.5),
        ("3", 3.0),
        (" 10 s ", 10.0),
        (0, 0.0),
        (2, 2.0),
        (0.1, 0.1),
        ("3650d", 3650 * 86400.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1s", "not negative"),
        (-0.5, "not negative"),
        ("-0s", "not negative"),
        ("1.5 ms s", "such as"),
        ("5sec", "such as"),
        ("1m30s", "such as"),
        ("s", "such as"),
        ("", "such as"),
        ("1e3", "such as"),
        ("1S", "such as"),
        (True, "such as"),
        (None, "such as"),
        (float("nan"), "such as"),
        (float("inf"), "at most"),
        ("3651d", "at most"),
        (10**400, "at most"),
        ("9" * 400, "at most"),
    ],
)
def test_parse_duration_rejects(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("10MiB", 10 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GB", 10**9),
        ("1GiB", 2**30),
        ("2KB", 2000),
        ("3MB", 3_000_000),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("4096", 4096),
        ("10 MiB", 10 * 1024 * 1024),
        (0, 0),
        (8190, 8190),
        (2048.0, 2048),
        ("8388607TiB", 8388607 * 2**40),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1KiB", "not negative"),
        (-1, "not negative"),
        ("1.5", "whole number of bytes"),
        ("0.1MiB", "whole number of bytes"),
        (1.5, "whole number of bytes"),
        ("10mb", "such as"),
        ("10 MiBs", "such as"),
        ("MiB", "such as"),
        ("1e6", "such as"),
        (True, "such as"),
        (float("inf"), "such as"),
        ("8388608TiB", "below 8EiB"),
        (2**63, "below 8EiB"),
        ("9" * 40, "below 8EiB"),
    ],
)
def test_parse_size_rejects(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_size(value)


def test_parse_size_largest() -> None:
    assert parse_size(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize(
    ("url", "fields"),
    [
        ("memory://", {"kind": "memory", "hosts": ()}),
        ("redis://localhost", {"kind": "redis", "hosts": (("localhost", 6379),), "db": 0}),
        ("redis://r:7000/5", {"kind": "redis", "hosts": (("r", 7000),), "db": 5}),
        ("rediss://u:p%2Fw@[::1]:6380/2", {
            "kind": "redis", "tls": True, "hosts": (("::1", 6380),), "db": 2,
            "username": "u", "password": "p/w",
        }),
        ("redis://:only-pw@r", {"username": None, "password": "only-pw"}),
        ("redis://only-user@r", {"username": "only-user", "password": None}),
        ("redis+sentinel://s1,s2:26380/mymaster", {
            "kind": "sentinel", "hosts": (("s1", 26379), ("s2", 26380)), "service_name": "mymaster", "db": 0,
        }),
        ("rediss+sentinel://s1/mymaster/3", {"kind": "sentinel", "tls": True, "db": 3}),
        ("redis+cluster://c1:7000,c2:7001,c3", {
            "kind": "cluster", "hosts": (("c1", 7000), ("c2", 7001), ("c3", 6379)),
        }),
        ("REDISS+CLUSTER://c1/0", {"kind": "cluster", "tls": True, "db": 0}),
    ],
)  # fmt: skip
def test_parse_store_url(url: str, fields: dict[str, object]) -> None:
    store = parse_store_url(url)
    assert store.url == url
    assert {k: getattr(store, k) for k in fields} == fields


@pytest.mark.parametrize(
    "url",
    [
        "memory://x",
        "redis://",
        "redis://a,b",
        "redis://r/x",
        "redis://r/0/1",
        "redis://r:0",
        "redis://r?db=1",
        "redis+sentinel://s1,s2",
        "redis+sentinel://s1/m/x",
        "redis+cluster://c1/1",
        "unix:///tmp/redis.sock",
        "redis:/r",
    ],
)
def test_parse_store_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="^expected "):
        parse_store_url(url)


def test_store_password_never_shows() -> None:
    config = parse_config(UPSTREAM + "store: 'redis://me:p%40ss:w0rd@r:6379/0'\n")
    assert config.store.password == "p@ss:w0rd"
    assert config.store.masked_url == "redis://me:***@r:6379/0"
    for text in (repr(config), repr(config.store), json.dumps(dump_effective(config))):
        assert "w0rd" not in text and "p%40ss" not in text


def test_dump_effective_is_json_and_complete() -> None:
    config = parse_config(doc(FULL), filename="full.yaml")
    dumped = json.loads(json.dumps(dump_effective(config)))
    assert dumped["listen"] == "127.0.0.1:9000"
    assert dumped["admin_listen"] == "[::1]:9901"
    assert dumped["store"]["url"] == "redis://app:***@redis.internal:6380/3"
    assert dumped["store"]["password"] == "***"
    assert dumped["store"]["hosts"] == ["redis.internal:6380"]
    assert dumped["timeouts"]["write_wait"] == 0.25
    assert dumped["limits"]["max_body"] == 512 * 1024
    assert dumped["routes"][0]["methods"] == ["PATCH", "PUT"]
    assert dumped["routes"][0]["invalidates"] == ["/api/sites/", "/api/sites/{id}/stats/"]
    assert dumped["routes"][2]["methods"] is None
    assert set(dumped["routes"][1]) == set(RouteConfig.__dataclass_fields__)


def test_dump_effective_shows_a_route_s_bulk_and_version_settings() -> None:
    config = parse_config(
        UPSTREAM + "routes:\n  - path: /a/{id}\n    version: {from: field, field: rev}\n"
        "  - path: /a/\n    bulk: {field: id, member: '/a/{id}'}\n"
    )
    dumped = json.loads(json.dumps(dump_effective(config)))
    assert dumped["routes"][1]["bulk"] == {"field": "id", "member": "/a/{id}", "max_members": 100}
    assert dumped["routes"][0]["version"]["source"] == "field"


def test_a_null_version_or_bulk_is_the_default() -> None:
    config = parse_config(UPSTREAM + "routes:\n  - path: /a/{id}\n    version: ~\n    bulk: ~\n")
    assert config.routes[0].version is None
    assert config.routes[0].bulk is None
    assert config.routes[0] == parse_config(UPSTREAM + "routes:\n  - path: /a/{id}\n").routes[0]


# --- authorize ------------------------------------------------------------------


def test_authorize_is_none_or_upstream_on_tracked_routes() -> None:
    config = parse_config(
        UPSTREAM + "defaults:\n  authorize: upstream\nroutes:\n  - path: /a/\n  - path: /b/\n    authorize: none\n"
    )
    assert [r.authorize for r in config.routes] == ["upstream", "none"]
    assert parse_config(UPSTREAM + "routes:\n  - path: /a/\n").routes[0].authorize == "none"
    assert problems(UPSTREAM + "routes:\n  - path: /a/\n    authorize: always\n") == [
        "config.yaml:4: routes[0].authorize: expected none or upstream, got 'always'"
    ]
    assert problems(
        UPSTREAM + "routes:\n  - path: /s/{p:path}\n    mode: passthrough\n    authorize: upstream\n"
    ) == [
        "config.yaml:5: routes[0].authorize: expected no tracking settings on a passthrough route,"
        " got 'upstream'"
    ]


def test_server_names_products_and_nothing_else() -> None:
    assert parse_config(UPSTREAM).server == "etagproxy"
    assert parse_config(UPSTREAM + "server: 'gw/2 (internal)'\n").server == "gw/2 (internal)"
    assert problems(UPSTREAM + "server: 'me@host'\n") == [
        "config.yaml:2: server: expected products such as etagproxy or etagproxy/1.0 (RFC 9110 §10.2.4),"
        " got 'me@host'"
    ]


# --- hints for the usual YAML slips ------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "routes:\n  - path: /x/{id}/\n    invalidates: [/x/{id}/]\n",
            "config.yaml:4: invalid YAML: expected ',' or ']', but got '{' (a {name} inside [...] reads as a"
            " YAML mapping: quote each item, as in ['/sites/{id}/'], or write the list one item per line)",
        ),
        (
            "routes:\n  - path: /x/{id}/\n   require_if_match: true\n",
            "config.yaml:4: invalid YAML: expected <block end>, but found '<block mapping start>' (check the"
            " indentation: this line's key starts after 3 spaces, the line above's after 4 spaces;"
            " keys of one mapping line up)",
        ),
        (
            "timeouts:\n\tupstream: 1s\n",
            "config.yaml:3: invalid YAML: found character '\\t' that cannot start any token"
            " (YAML indents with spaces, not tabs)",
        ),
    ],
    ids=["unquoted-template-in-flow-list", "indentation", "tab"],
)
def test_a_yaml_slip_gets_a_hint(text: str, message: str) -> None:
    assert problems(UPSTREAM + text) == [message]


@pytest.mark.parametrize(
    "text, where, moved",
    [
        ("limits:\n  upstream_timeout: 1s\n", "limits.upstream_timeout", "timeouts.upstream"),
        ("timeouts:\n  max_body: 1MiB\n", "timeouts.max_body", "limits.max_body"),
        ("routes:\n  - path: /x/\n    upstream_timeout: 1s\n", "routes[0].upstream_timeout", "timeouts.upstream"),
        ("timeouts:\n  token_ttl: 1d\n", "timeouts.token_ttl", "store.token_ttl"),
        ("store:\n  url: memory://\n  require_if_match: true\n", "store.require_if_match",
         "require_if_match on a route (or in defaults)"),
    ],
)
def test_a_key_in_the_wrong_section_names_the_right_one(text: str, where: str, moved: str) -> None:
    found = problems(UPSTREAM + text)
    assert len(found) == 1 and found[0].endswith(
        f"{where}: expected a known key (this belongs elsewhere: {moved}), got an unknown key"
    ), found
