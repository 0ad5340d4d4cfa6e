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

The package, each module saying what it owns and what it may not use::

    schema.py        ConfigError and the frozen dataclasses (imports nothing else here)
    scalars.py       durations, sizes, counts, booleans, tokens and names
    addresses.py     host:port, upstream URLs, store URLs
    templates.py     path templates as settings
    yamlsource.py    YAML into located values (_Node), problems in file order
    check.py         generic shapes: scalar, list, mapping, section
    build_routes.py  defaults: and routes:; the table of route settings
    build.py         the top level, store:, timeouts:, limits:
    env.py           ETAGPROXY_* overrides
    dump.py          the effective configuration as JSON values
    __init__.py      parse_config and load_config, and the names importable from here
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from etagproxy.config.addresses import parse_store_url
from etagproxy.config.build import _Builder
from etagproxy.config.dump import dump_effective
from etagproxy.config.env import _apply_env, service_link
from etagproxy.config.scalars import parse_duration, parse_size
from etagproxy.config.schema import Bulk, Config, ConfigError, Limits, RouteConfig, StoreConfig, Timeouts, Tracing
from etagproxy.config.yamlsource import _Node, _Problems, _Reader

__all__ = [
    "Bulk",
    "Config",
    "ConfigError",
    "Limits",
    "RouteConfig",
    "StoreConfig",
    "Timeouts",
    "Tracing",
    "dump_effective",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "parse_store_url",
    "service_link",
]


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
