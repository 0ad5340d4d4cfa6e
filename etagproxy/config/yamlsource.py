"""Reading YAML into located values: every value becomes a `_Node` that
remembers where it came from ("FILE:LINE" or "env NAME"), and `_Problems`
collects the messages about them in file order.

The YAML is composed with PyYAML's SafeLoader and never constructed into
arbitrary objects; aliases, merge keys, custom tags and repeated keys are
reported here. Knows nothing of what the keys mean (no setting names, no
dataclasses, no environment variable names); uses only `scalars._describe`
to show a found value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import yaml  # type: ignore[import-untyped]

from etagproxy.config.scalars import _describe


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


def _indent(line: str) -> int:
    """Where the line's first key starts (after any "- " of a list item)."""
    n = len(line) - len(line.lstrip(" "))
    while line[n : n + 2] == "- ":
        n += 2 + len(line[n + 2 :]) - len(line[n + 2 :].lstrip(" "))
    return n


def _spaces(n: int) -> str:
    return "1 space" if n == 1 else f"{n} spaces"


def _yaml_hint(text: str, index: int, problem: str) -> str:
    """What usually causes PyYAML's `problem` at line `index` (0-based), as a
    hint to append, or ""."""
    lines = text.splitlines()
    here = lines[index] if index < len(lines) else ""
    if "\t" in here[: len(here) - len(here.lstrip()) + 1] or "'\\t'" in problem:
        return " (YAML indents with spaces, not tabs)"
    if "[" in here and "{" in here.split("[", 1)[1]:
        return (
            " (a {name} inside [...] reads as a YAML mapping: quote each item,"
            " as in ['/sites/{id}/'], or write the list one item per line)"
        )
    if "block end" in problem or "mapping values are not allowed" in problem or "block mapping" in problem:
        above = next((line for line in reversed(lines[:index]) if line.strip() and not line.lstrip().startswith("#")), "")
        if above and _indent(above) != _indent(here):
            return (
                f" (check the indentation: this line's key starts after {_spaces(_indent(here))},"
                f" the line above's after {_spaces(_indent(above))}; keys of one mapping line up)"
            )
    return ""


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
                hint = "" if env or mark is None else _yaml_hint(text, mark.line, problem)
                self.problems.raw(_Node(None, where(line), line), f"invalid YAML: {problem}{hint}")
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
