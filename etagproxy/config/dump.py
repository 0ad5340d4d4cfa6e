"""The effective configuration as plain JSON values (`dump_effective`), as
logged at startup: every setting with its default filled in, the store
password masked.

Reads the dataclasses only; uses `schema` and `addresses._format_address`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etagproxy.config.addresses import _format_address
from etagproxy.config.schema import Config, RouteConfig


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
            "epoch": store.epoch_source,
        },
        "timeouts": dataclasses.asdict(config.timeouts),
        "limits": dataclasses.asdict(config.limits),
        "tracing": dataclasses.asdict(config.tracing),
        "routes": [_route_json(r) for r in config.routes],
        "trusted_proxies": list(config.trusted_proxies),
        "via": config.via,
        "server": config.server,
        "watch_config": config.watch_config,
    }


def _route_json(route: RouteConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(route):
        value = getattr(route, f.name)
        if isinstance(value, frozenset):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        out[f.name] = value
    return out
