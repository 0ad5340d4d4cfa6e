"""Route templates, matching, and resource keys.

A template is a canonical path with variables: ``{name}`` matches one
non-empty run of characters inside a segment (``[^/]+`` on the canonical
path, so ``%2F`` stays inside it) and ``{name:path}`` matches the rest of
the path, one or more characters, slashes included; it must come last.
Literal parts are brought to the canonical spelling of `etagproxy.target`
when the template is compiled, so ``/caf%c3%a9/`` and ``/café/`` both match
the canonical ``/caf%C3%A9/``. A trailing ``/`` is significant.

Routes are compiled once, into one alternation per method, so matching a
request is a single regex search whatever the number of routes; the order
of the alternatives is the file order, so the first matching route wins
(DESIGN.md §3). Pure: no I/O, no aiohttp.

Errors::

    TemplateError (ValueError)   a template is malformed, or expand() lacks a variable
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote

from etagproxy.target import Target, TargetError, canonicalize, normalize_path_text

__all__ = [
    "CompiledTemplate",
    "Match",
    "Route",
    "Router",
    "TemplateError",
    "check_invalidates",
    "compile_template",
    "expand",
    "resource_key",
]


class TemplateError(ValueError):
    """A route template is malformed; the message says what is wrong."""


# Variables are written {name} or {name:path}; anything else between braces
# is reported by the parser below, not silently taken as a literal.
_VARIABLE = re.compile(r"\{([^{}]*)\}")
_SEGMENT = "[^/]+"
_REST = ".+"
# Non-ASCII in a template (YAML is Unicode) means its UTF-8 escape; visible
# ASCII is left to normalize_path_text, which decides what is allowed.
_ASCII_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))
# In a configured key_query name, "&", "=" and "#" mean themselves.
_QUERY_NAME_SAFE = _ASCII_VISIBLE.translate(str.maketrans("", "", "&=#"))


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A validated template: its canonical literal parts and variables."""

    template: str
    """As written in the configuration."""
    parts: tuple[str | tuple[str, bool], ...]
    """Canonical literal text, or ``(name, is_path)`` for a variable, in order."""
    names: tuple[str, ...]
    """Variable names in order of appearance."""
    pattern: str
    """Regex source without anchors; variable ``i`` is the ``i``-th capture group."""


@lru_cache(maxsize=512)
def compile_template(template: str) -> CompiledTemplate:
    """Validate a template and bring its literal parts to canonical form.

    Raises `TemplateError` naming the problem.
    """
    if not isinstance(template, str) or not template.startswith("/"):
        raise TemplateError(f"template {template!r} must start with '/'")
    parts: list[str | tuple[str, bool]] = []
    names: list[str] = []
    rest: str | None = None  # the {name:path} variable, once seen
    pos = 0
    for m in _VARIABLE.finditer(template):
        if rest is not None:
            raise _rest_not_last(template, rest)
        _add_literal(template, template[pos : m.start()], parts)
        name, colon, kind = m.group(1).partition(":")
        # Dotted names ({body.id}) name fields of a JSON body (bodyvars.py).
        if not all(piece.isidentifier() for piece in name.split(".")):
            raise TemplateError(
                f"template {template!r}: variable name {name!r} is not an identifier"
            )
        if colon and kind != "path":
            raise TemplateError(
                f"template {template!r}: unknown variable type {kind!r} in {m.group()!r}"
                " (only ':path' exists)"
            )
        if name in names:
            raise TemplateError(f"template {template!r}: variable {name!r} appears twice")
        if parts and isinstance(parts[-1], tuple):
            raise TemplateError(
                f"template {template!r}: variables {{{parts[-1][0]}}} and {{{name}}}"
                " must be separated by literal text"
            )
        parts.append((name, bool(colon)))
        names.append(name)
        if colon:
            rest = name
        pos = m.end()
    if rest is not None and pos < len(template):
        raise _rest_not_last(template, rest)
    _add_literal(template, template[pos:], parts)
    _check_structure(template, parts)
    pattern = "".join(
        re.escape(part) if isinstance(part, str) else f"({_REST if part[1] else _SEGMENT})"
        for part in parts
    )
    return CompiledTemplate(template, tuple(parts), tuple(names), pattern)


def _rest_not_last(template: str, name: str) -> TemplateError:
    return TemplateError(
        f"template {template!r}: {{{name}:path}} must be the last part of the template"
    )


def _add_literal(template: str, text: str, parts: list[str | tuple[str, bool]]) -> None:
    if not text:
        return
    for brace in "{}":
        if brace in text:
            raise TemplateError(
                f"template {template!r}: unbalanced {brace!r}"
                " (variables are {name} or {name:path})"
            )
    try:
        parts.append(normalize_path_text(quote(text, safe=_ASCII_VISIBLE)))
    except TargetError as exc:
        raise TemplateError(f"template {template!r}: {exc}") from None


def _check_structure(template: str, parts: Sequence[str | tuple[str, bool]]) -> None:
    """Refuse literal ``//`` and dot segments: no canonical path contains them."""
    # A variable stands for at least one character other than "/" at its
    # start, so "x" is a faithful stand-in for checking the literal shape.
    shape = "".join(part if isinstance(part, str) else "x" for part in parts)
    if "//" in shape:
        raise TemplateError(f"template {template!r}: empty path segment ('//')")
    segments = shape.split("/")
    if any(segment in (".", "..") for segment in segments):
        raise TemplateError(f"template {template!r}: dot segments ('.', '..') are not allowed")


def expand(template: str, params: dict[str, str]) -> str:
    """Fill a template's variables with values in canonical encoded form.

    Raises `TemplateError` naming a missing variable, or a ``{name}`` value
    that is not a non-empty piece of one segment.
    """
    compiled = compile_template(template)
    out: list[str] = []
    for part in compiled.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        name, is_path = part
        try:
            value = params[name]
        except KeyError:
            raise TemplateError(
                f"template {template!r}: no value for variable {{{name}}}"
            ) from None
        if not value or (not is_path and "/" in value):
            raise TemplateError(
                f"template {template!r}: value {value!r} for {{{name}}} is not one path segment"
            )
        out.append(value)
    return "".join(out)


class Route:
    """One configured route: its compiled template and its configuration.

    ``config`` is a `etagproxy.config.RouteConfig`; only ``path``,
    ``methods``, ``mode``, ``key_query`` and ``invalidates`` are read here.
    """

    __slots__ = (
        "_regex", "body_names", "compiled", "config", "index", "key_query", "reads_request", "reads_response",
        "template", "tracked",
    )

    def __init__(self, template: str, config: Any, *, index: int) -> None:
        self.template = template
        self.config = config
        self.index = index
        self.compiled = compile_template(template)
        self.tracked: bool = config.mode == "track"
        # `{body.x}` / `{response.x}` variables of invalidates and created,
        # found once here rather than on every write.
        templates = (*getattr(config, "invalidates", ()), getattr(config, "created", None))
        self.body_names: tuple[str, ...] = tuple(dict.fromkeys(
            name for t in templates if t is not None for name in compile_template(t).names if "." in name
        ))
        self.reads_request: bool = any(n.startswith("body.") for n in self.body_names)
        self.reads_response: bool = any(n.startswith("response.") for n in self.body_names)
        # Compared with the canonical encoded names of the request's query,
        # so the configured names get the same spelling.
        self.key_query: frozenset[str] = frozenset(
            _canonical_query_name(name) for name in config.key_query
        )
        self._regex = re.compile(self.compiled.pattern)

    def match_path(self, path: str) -> dict[str, str] | None:
        """The template variables if the canonical ``path`` matches, else None."""
        m = self._regex.fullmatch(path)
        if m is None:
            return None
        return dict(zip(self.compiled.names, m.groups(), strict=True))

    def allows(self, method: str) -> bool:
        # RFC 9110 §9.1: method names are case-sensitive.
        methods = self.config.methods
        return methods is None or method in methods

    def __repr__(self) -> str:
        return f"Route({self.template!r}, index={self.index}, mode={self.config.mode!r})"


def _canonical_query_name(name: str) -> str:
    try:
        target = canonicalize("/?" + quote(name, safe=_QUERY_NAME_SAFE))
    except TargetError as exc:
        raise TemplateError(f"key_query name {name!r}: {exc}") from None
    return target.query


class Match(NamedTuple):
    """The route a request matched, and what follows from it (a NamedTuple,
    as `Target`: one per request)."""

    route: Route
    params: dict[str, str]
    """Template variables, in canonical encoded form."""
    key: str
    """The resource key (`resource_key`); ``""`` for passthrough routes."""


def resource_key(route: Route, target: Target) -> str:
    """The store key of the resource ``target`` names under ``route``.

    The canonical path, plus the query parameters the route lists in
    ``key_query`` sorted by name. Repeated names keep the order sent:
    ``?tag=b&tag=a`` may be a different list than ``?tag=a&tag=b``.
    """
    if not route.key_query or not target.query:
        return target.path
    kept = [(n, v) for n, v in target.params() if n in route.key_query]
    if not kept:
        return target.path
    kept.sort(key=lambda pair: pair[0])  # stable: repeated names keep their order
    return target.path + "?" + "&".join(f"{n}={v}" for n, v in kept)


class _Alternation:
    """Several routes' templates as one anchored regex, tried in file order."""

    __slots__ = ("_regex", "_routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        # Group layout: each route's whole template is one group, followed
        # by its variables; `lastindex` names the route's group because the
        # enclosing group closes last.
        self._routes: dict[int, tuple[Route, int]] = {}
        sources: list[str] = []
        group = 0
        for route in routes:
            group += 1
            self._routes[group] = (route, group)
            group += len(route.compiled.names)
            sources.append(f"({route.compiled.pattern})")
        self._regex = re.compile("|".join(sources)) if sources else None

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        if self._regex is None:
            return None
        m = self._regex.fullmatch(path)
        if m is None or m.lastindex is None:
            return None
        route, first = self._routes[m.lastindex]
        names = route.compiled.names
        if not names:
            return route, {}
        # groups() is 0-based while group numbers start at 1, so the
        # variables following group `first` start at index `first`.
        return route, dict(zip(names, m.groups()[first : first + len(names)], strict=True))


class Router:
    """All routes of a configuration, compiled once, in file order."""

    def __init__(self, routes: Sequence[Any]) -> None:
        self.routes: tuple[Route, ...] = tuple(
            Route(config.path, config, index=i) for i, config in enumerate(routes)
        )
        for route in self.routes:
            for template in route.config.invalidates:
                compile_template(template)  # refuse a malformed template now, not per write
        named = sorted({m for r in self.routes if r.config.methods for m in r.config.methods})
        self._by_method = {
            method: _Alternation([r for r in self.routes if r.allows(method)]) for method in named
        }
        # Methods no route names explicitly see only the routes open to all methods.
        self._other_methods = _Alternation([r for r in self.routes if r.config.methods is None])
        self._any_method = _Alternation(self.routes)
        self._tracked = _Alternation([r for r in self.routes if r.tracked])

    def match(self, method: str, target: Target) -> Match | None:
        """The first route that matches ``target.path`` and allows ``method``.

        None means no route matched: the request is forwarded as passthrough.
        """
        found = self._by_method.get(method, self._other_methods).match(target.path)
        return None if found is None else _make_match(found, target)

    def key_for(self, target: Target) -> Match | None:
        """Like `match`, for any method: which route and key a URL has."""
        found = self._any_method.match(target.path)
        return None if found is None else _make_match(found, target)

    def invalidation_keys(self, match: Match, fields: dict[str, str] | None = None) -> list[str]:
        """Keys a successful write on ``match`` makes stale, besides its own.

        Each ``invalidates`` template is expanded with the match's variables
        (and ``fields``, the ``body.x``/``response.x`` values of the write's
        JSON bodies) and canonicalised; it is kept only if a tracked route
        matches it, and its key is that path (no query). A template naming a
        variable without a value is skipped here: a body without the field
        names no related resource; `check_invalidates` reports a route
        variable the match lacks when the configuration is loaded.
        """
        keys: list[str] = []
        params = {**match.params, **fields} if fields else match.params
        for template in match.route.config.invalidates:
            try:
                path = canonicalize(expand(template, params)).path
            except (TemplateError, TargetError):
                continue
            if path != match.key and path not in keys and self.is_tracked(path):
                keys.append(path)
        return keys

    def is_tracked(self, path: str) -> bool:
        """Whether some tracked route matches the canonical ``path``, for any method."""
        return self._tracked.match(path) is not None


def _make_match(found: tuple[Route, dict[str, str]], target: Target) -> Match:
    route, params = found
    return Match(route, params, resource_key(route, target) if route.tracked else "")


def check_invalidates(route: Route, router: Router) -> list[str]:
    """Configuration errors in ``route``'s ``invalidates`` list, one message each.

    A template may only use variables the route's own template defines; a
    template without variables must be matched by some tracked route, or it
    would never invalidate anything.
    """
    errors: list[str] = []
    own = set(route.compiled.names)
    for template in route.config.invalidates:
        try:
            compiled = compile_template(template)
        except TemplateError as exc:
            errors.append(str(exc))
            continue
        missing = [name for name in compiled.names if name not in own and "." not in name]
        if missing:
            listed = ", ".join(f"{{{name}}}" for name in missing)
            errors.append(
                f"invalidates template {template!r} uses {listed}, which route"
                f" {route.template!r} does not define"
            )
        elif not compiled.names and not router.is_tracked(expand(template, {})):
            errors.append(f"invalidates template {template!r} is not matched by any tracked route")
    return errors
