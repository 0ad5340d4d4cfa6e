"""Environment overrides: `ETAGPROXY_<KEY>` replaces (or, for mapping keys,
is merged over) the top-level key `<key>` of the file, before anything is
checked, so an override is checked exactly like the file's value and its
problems name `env ETAGPROXY_<KEY>`.

Also tells Kubernetes service-link variables apart from settings
(`service_link`). Works on located values and never builds dataclasses;
uses `yamlsource` to read a value and only the top-level key names of
`build`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Final

from etagproxy.config.build import _TOP_KEYS
from etagproxy.config.yamlsource import _Node, _Problems, _Reader

_ENV_PREFIX: Final = "ETAGPROXY_"
# Values used as they are: YAML would turn `:8080`-like text into numbers.
_ENV_TEXT_KEYS: Final = frozenset({"listen", "admin_listen", "upstream", "via", "server"})
# Mapping keys whose environment value is merged over the file's mapping.
_ENV_MERGED_KEYS: Final = frozenset({"timeouts", "limits", "tracing", "defaults", "store"})


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
