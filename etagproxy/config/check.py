"""Checking located values against parsers: the generic shapes (a scalar,
a list of scalars, a mapping, a section of scalar settings) every part of
the builder is made of, and the "unknown key, did you mean ..." message.

A parser's `_Bad` becomes a problem at the value's location and the value
becomes `_INVALID`, so later checks skip it quietly. Knows no setting names
and no dataclasses; uses only `scalars` and `yamlsource`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from etagproxy.config.scalars import _Bad
from etagproxy.config.yamlsource import _INVALID, _Invalid, _join, _Node, _Problems

# Keys of the sections a key may have been meant for, for "did you mean
# timeouts.upstream?" when a key is put in the wrong section. Filled by
# build.py and build_routes.py as they define their sections.
SECTIONS: dict[str, tuple[str, ...]] = {}


def _elsewhere(name: str, path: str) -> str | None:
    """`section.key` another section has that `name` means: the same key,
    or the key with the section's name joined to it (upstream_timeout)."""
    here = path.split("[", 1)[0].split(".", 1)[0]
    parts = name.lower().split("_")
    for section, keys in SECTIONS.items():
        if section == here or (section == "routes" and path.startswith("routes")):
            continue
        names = (section, section.removesuffix("s"))
        joined = {
            "_".join(parts[:-1]) if parts[-1] in names else None,
            "_".join(parts[1:]) if parts[0] in names else None,
        }
        for key in keys:
            if name == key or (len(parts) > 1 and key in joined):
                return f"{section}.{key}" if section != "routes" else f"{key} on a route (or in defaults)"
    return None


def _unknown_key(problems: _Problems, key: _Node, path: str, known: tuple[str, ...]) -> None:
    name = str(key.value)
    close = difflib.get_close_matches(name, known, n=1)
    moved = _elsewhere(name, path)
    if moved is not None:
        hint = f"this belongs elsewhere: {moved}"
    elif close:
        hint = f"did you mean {close[0]!r}?"
    else:
        hint = "one of " + ", ".join(known)
    problems.add(key, _join(path, name), f"a known key ({hint})", "an unknown key")


class _Checker:
    """Checks located values; every problem is recorded in `problems`."""

    def __init__(self, problems: _Problems) -> None:
        self.problems = problems

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
