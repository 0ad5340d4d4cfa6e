"""Building the `Config`: the top-level keys, `store:`, `timeouts:` and
`limits:` checked into their dataclasses, with `defaults:` and `routes:`
handed to the route builder.

Owns the list of top-level keys and the parser tables of the sections.
Works on located values only: reading YAML is `yamlsource`'s and the
environment is `env`'s (which runs before this, on the same values).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

from etagproxy.config.addresses import (
    _STORE_EXPECTED,
    _URL_EXPECTED,
    _parse_listen,
    _parse_upstream,
    parse_store_url,
)
from etagproxy.config.build_routes import _RouteBuilder
from etagproxy.config.check import SECTIONS, _unknown_key
from etagproxy.config.scalars import (
    _choice,
    _count,
    _duration,
    _parse_bool,
    _parse_network,
    _parse_server,
    _parse_str,
    _parse_via,
    _size,
)
from etagproxy.config.schema import Config, Limits, StoreConfig, Timeouts, Tracing
from etagproxy.config.yamlsource import _INVALID, _Invalid, _Node

_TOP_KEYS: Final = (
    "listen",
    "admin_listen",
    "upstream",
    "store",
    "timeouts",
    "limits",
    "tracing",
    "defaults",
    "routes",
    "trusted_proxies",
    "via",
    "server",
    "watch_config",
)
_STORE_PARSERS: Final[dict[str, Callable[[object], Any]]] = {
    "prefix": _parse_str,
    "token_ttl": _duration(positive=True),
    "min_replicas": _count(minimum=0),
    # Redis WAIT with a timeout of 0 blocks forever.
    "min_replicas_timeout": _duration(positive=True, why=" (0 would make WAIT block forever)"),
    "epoch": _choice("connection", "script"),
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

_TRACING_PARSERS: Final[dict[str, Callable[[object], bool]]] = {
    "sampled": _parse_bool,
    "otel": _parse_bool,
}


def _otel_missing() -> str | None:
    """Why `tracing.otel: true` cannot work here, or None when it can."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return (
            "tracing.otel: true needs the OpenTelemetry SDK, which is not installed "
            "(pip install 'etagproxy[otel]')"
        )
    return None


SECTIONS.update(
    timeouts=tuple(_TIMEOUT_PARSERS), limits=tuple(_LIMIT_PARSERS), tracing=tuple(_TRACING_PARSERS),
    store=_STORE_KEYS,
)


class _Builder(_RouteBuilder):
    """Checks located values and builds the dataclasses; every problem is recorded."""

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
        if (n := node("watch_config")) is not None:
            values["watch_config"] = self.scalar(n, "watch_config", _duration())
        if (n := node("server")) is not None:
            values["server"] = self.scalar(n, "server", _parse_server)
        if (n := node("store")) is not None:
            values["store"] = self.store(n)
        if (n := node("timeouts")) is not None:
            values["timeouts"] = Timeouts(**self.section(n, "timeouts", _TIMEOUT_PARSERS))
        if (n := node("limits")) is not None:
            values["limits"] = Limits(**self.section(n, "limits", _LIMIT_PARSERS))
        if (n := node("tracing")) is not None:
            values["tracing"] = self.tracing(n)
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

    def tracing(self, node: _Node) -> Tracing:
        settings = self.section(node, "tracing", _TRACING_PARSERS)
        if settings.get("otel") and (why := _otel_missing()) is not None:
            entries = node.value if isinstance(node.value, dict) else {}
            self.problems.raw(entries["otel"][1], why)
        return Tracing(**settings)

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
        if base.kind in ("memory", "sentinel", "cluster") and settings.get("epoch") == "connection":
            expected = "script for this store (only redis:// reads the epoch per connection)"
            self.problems.add(entries["epoch"][1], "store.epoch", expected)
            return _INVALID
        if base.kind == "memory" and settings.get("min_replicas", 0) > 0:
            expected = "0 for memory:// (it has no replicas)"
            self.problems.add(entries["min_replicas"][1], "store.min_replicas", expected)
            return _INVALID
        return dataclasses.replace(base, **settings)
