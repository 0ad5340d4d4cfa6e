"""Route entries: `defaults:` and the `routes:` list checked into
`RouteConfig`s, and the table saying how each route key is read.

Adding a route setting is one `RouteConfig` field (schema.py) plus one
`_ROUTE_SETTINGS` entry here: the key's reader (usually `_one(parser)`) and
whether it only means something on a tracked route. Unknown-key hints,
`defaults:` merging, file:line messages and the passthrough check follow
from the table; only rules between several keys are code (`route`).

Knows nothing of the top-level keys, the store or the environment; uses
`schema`, `scalars`, `addresses`, `templates`, `yamlsource` and `check`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from etagproxy.config.addresses import _parse_upstream
from etagproxy.config.check import SECTIONS, _Checker, _unknown_key
from etagproxy.config.scalars import (
    _choice,
    _duration,
    _parse_bool,
    _parse_field_name,
    _parse_header_name,
    _parse_media_type,
    _parse_member_count,
    _parse_method,
    _parse_query_name,
)
from etagproxy.config.schema import Bulk, RouteConfig
from etagproxy.config.templates import (
    _body_variable,
    _parse_route_path,
    _parse_template,
    _template_names,
    _template_shape,
)
from etagproxy.config.yamlsource import _INVALID, _Invalid, _join, _Node
from etagproxy.derived import VersionSource

_Read = Callable[[_Checker, _Node, str], Any]
"""Reads one route key's value at `path`: the value, or `_INVALID` (reported)."""


@dataclass(frozen=True, slots=True)
class _Setting:
    """How one route key is read, and where it is allowed."""

    read: _Read
    track_only: bool = True
    """Only means something when the route tracks versions; setting it on a
    passthrough route is almost certainly a mistake about the mode."""


def _one(parse: Callable[[object], Any]) -> _Read:
    """One scalar; null is checked like any other value."""

    def read(checker: _Checker, node: _Node, path: str) -> Any:
        return checker.scalar(node, path, parse)

    return read


def _optional(parse: Callable[[object], Any]) -> _Read:
    """One scalar, or null for None (not set)."""

    def read(checker: _Checker, node: _Node, path: str) -> Any:
        return None if node.value is None else checker.scalar(node, path, parse)

    return read


def _each(what: str, parse: Callable[[object], Any]) -> _Read:
    """A tuple of scalars (a single scalar counts as a list of one); null is ()."""

    def read(checker: _Checker, node: _Node, path: str) -> Any:
        return () if node.value is None else checker.sequence(node, path, what, parse)

    return read


def _or_empty(read_value: _Read) -> _Read:
    """`read_value`, except that null gives ()."""

    def read(checker: _Checker, node: _Node, path: str) -> Any:
        return () if node.value is None else read_value(checker, node, path)

    return read


def _or_none(read_value: _Read) -> _Read:
    """`read_value`, except that null gives None: the setting's default."""

    def read(checker: _Checker, node: _Node, path: str) -> Any:
        return None if node.value is None else read_value(checker, node, path)

    return read


def _read_methods(checker: _Checker, node: _Node, path: str) -> frozenset[str] | None | _Invalid:
    if node.value is None:
        return None
    methods = checker.sequence(node, path, "method names", _parse_method)
    if methods == ():
        expected = "at least one method (leave methods out for all)"
        checker.problems.add(node, path, expected, "an empty list")
        return _INVALID
    return methods if methods is _INVALID else frozenset(cast("tuple[str, ...]", methods))


def _read_version(checker: _Checker, node: _Node, path: str) -> VersionSource | None | _Invalid:
    expected = "token, or a mapping with from: field, header or body"
    if node.value == "token":
        return None
    entries = checker.mapping(node, path) if isinstance(node.value, dict) else None
    if entries is None:
        checker.problems.add(node, path, expected)
        return _INVALID
    if "from" not in entries:
        checker.problems.add(node, _join(path, "from"), "field, header or body (the key is required)", "nothing")
        return _INVALID
    source = checker.scalar(entries["from"][1], _join(path, "from"), _choice("token", "field", "header", "body"))
    if source is _INVALID:
        return _INVALID
    allowed = {"token": (), "field": ("field",), "header": ("header", "upstream_if_match"), "body": ()}[source]
    for name, (key, _) in entries.items():
        if name != "from" and name not in allowed:
            _unknown_key(checker.problems, key, path, ("from", *allowed))
            return _INVALID
    if source == "token":
        return None
    if source == "body":
        return VersionSource("body")
    name = allowed[0]
    if name not in entries:
        example = "last_updated" if name == "field" else "ETag"
        checker.problems.add(node, _join(path, name), f"a value such as {example} (the key is required)", "nothing")
        return _INVALID
    if source == "header":
        header = checker.scalar(entries["header"][1], _join(path, "header"), _parse_header_name)
        checks: object = False
        if "upstream_if_match" in entries:
            checks = checker.scalar(
                entries["upstream_if_match"][1], _join(path, "upstream_if_match"), _parse_bool
            )
        if _INVALID in (header, checks):
            return _INVALID
        return VersionSource("header", header=header, upstream_if_match=bool(checks))
    fields = checker.sequence(entries["field"][1], _join(path, "field"), "JSON field names", _parse_field_name)
    return _INVALID if fields is _INVALID else VersionSource("field", fields=cast("tuple[str, ...]", fields))


_BULK_PARSERS: Final[dict[str, Callable[[object], Any]]] = {
    "field": _parse_field_name,
    "member": _parse_route_path,
    "max_members": _parse_member_count,
}


def _read_bulk(checker: _Checker, node: _Node, path: str) -> Bulk | _Invalid:
    entries = checker.mapping(node, path)
    if entries is None:
        return _INVALID
    values: dict[str, Any] = {}
    for name, (key, value) in entries.items():
        if name not in _BULK_PARSERS:
            _unknown_key(checker.problems, key, path, tuple(_BULK_PARSERS))
            return _INVALID
        values[name] = checker.scalar(value, _join(path, name), _BULK_PARSERS[name])
    if _INVALID in values.values():
        return _INVALID
    for required, example in (("field", "id"), ("member", "/api/sites/{id}/")):
        if required not in values:
            expected = f"a value such as {example} (the key is required)"
            checker.problems.add(node, _join(path, required), expected, "nothing")
            return _INVALID
    member = values["member"]
    if len(_template_names(member)) != 1:
        checker.problems.add(
            entries["member"][1], _join(path, "member"),
            "a member template with exactly one variable, filled by the field",
        )
        return _INVALID
    return Bulk(**values)


# One entry per RouteConfig field (but line), in the same order.
_ROUTE_SETTINGS: Final[dict[str, _Setting]] = {
    "path": _Setting(_one(_parse_route_path), track_only=False),
    "methods": _Setting(_read_methods, track_only=False),
    "upstream": _Setting(_optional(_parse_upstream), track_only=False),
    "mode": _Setting(_one(_choice("track", "passthrough")), track_only=False),
    "key_query": _Setting(_each("query parameter names", _parse_query_name)),
    "require_if_match": _Setting(_one(_parse_bool)),
    "invalidates": _Setting(_each("path templates", _parse_template)),
    "created": _Setting(_one(_parse_template)),
    "bulk": _Setting(_or_none(_read_bulk)),
    "plain_types": _Setting(_each("media types", _parse_media_type)),
    "version": _Setting(_or_none(_read_version)),
    "computed": _Setting(_one(_parse_bool)),
    "short_circuit": _Setting(_one(_parse_bool)),
    "short_circuit_ttl": _Setting(_one(_duration())),
    "fingerprint": _Setting(_one(_parse_bool)),
    "last_modified": _Setting(_one(_parse_bool)),
    "etag_on_write": _Setting(_one(_parse_bool)),
    "replay_ttl": _Setting(_one(_duration())),
    "upstream_conditionals": _Setting(_one(_parse_bool)),
    "on_store_error": _Setting(_one(_choice("fail_closed", "fail_open"))),
    "etag_in_412": _Setting(_one(_parse_bool)),
    "public": _Setting(_one(_parse_bool)),
    "allow_upgrade": _Setting(_one(_parse_bool), track_only=False),
    "authorize": _Setting(_one(_choice("none", "upstream"))),
}
_ROUTE_KEYS: Final = tuple(f.name for f in dataclasses.fields(RouteConfig) if f.name != "line")
SECTIONS["routes"] = _ROUTE_KEYS
if set(_ROUTE_KEYS) != set(_ROUTE_SETTINGS):
    raise AssertionError(
        "RouteConfig fields and _ROUTE_SETTINGS differ: "
        + ", ".join(sorted(set(_ROUTE_KEYS) ^ set(_ROUTE_SETTINGS)))
    )

_RouteIdentity = tuple[str, "frozenset[str] | None"]


class _RouteBuilder(_Checker):
    """Checks `defaults:` and `routes:` and builds the `RouteConfig`s."""

    def route_value(self, name: str, node: _Node, path: str) -> Any:
        return _ROUTE_SETTINGS[name].read(self, node, path)

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
                if _ROUTE_SETTINGS[name].track_only:
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
