"""Routes from an OpenAPI 3.0/3.1 schema: `etagproxy routes --from-openapi`.

Owns the reading of a schema document (JSON or YAML text into a checked
dict), the classification of its paths into routes, the merging of a
hand-written overrides file, and the rendering of a commented routes YAML
document. Pure: text and dicts in, text out; no files, no network (cli.py
reads and writes). Every error is an `OpenAPIError` whose message is one
line naming the source and what is wrong.

How a path becomes a route::

    item        ends in a path parameter (/api/dcim/sites/{id}/) and has PUT,
                PATCH or DELETE: tracked, require_if_match: true, and
                invalidates its collection when that is a route too
    collection  the item's parent path (/api/dcim/sites/) when it is in the
                schema: tracked; with bulk: when it has PUT/PATCH/DELETE (an
                array body, NetBox's bulk edit) and created: when it has POST
    passthrough any other path a generated route would match first
                (/api/users/tokens/provision/ before /api/users/tokens/{id}/):
                mode: passthrough, placed before it
    omitted     everything else (read-only items and lists, actions such as
                /api/dcim/devices/{id}/render-config/): unmatched requests
                are forwarded untouched, and a read-only resource's token
                would never change, so tracking it would only risk a stale 304

Parameter names become identifiers (`{vm-id}` -> `{vm_id}`); routes.py has
no typed variables, so an integer `{id}` stays `{id}`. Routes are ordered
segment by segment, literal before variable, so the more specific of two
overlapping templates always comes first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml  # type: ignore[import-untyped]

__all__ = ["GeneratedRoute", "OpenAPIError", "merge_overrides", "parse_document", "parse_overrides",
           "render", "routes_from_schema"]

METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
_WRITES = ("put", "patch", "delete")
_PARAM = re.compile(r"\{([^{}]*)\}")
_TRACK_ONLY = ("require_if_match", "invalidates", "created", "bulk", "key_query")


class OpenAPIError(ValueError):
    """The schema or the overrides cannot be used; the message is one line."""


@dataclass
class GeneratedRoute:
    """One route entry to render: its path template, kind, settings and origin."""

    path: str
    kind: str
    """"item", "collection", "passthrough", or "override" (only in the overrides)."""
    settings: dict[str, Any] = field(default_factory=dict)
    operations: list[str] = field(default_factory=list)
    """"METHOD operationId" for each operation of the schema path."""
    source: str = ""
    """The schema's own spelling of the path, when renaming changed it."""
    overridden: bool = False


@dataclass
class Generated:
    """What a schema gave: the routes in match order and the paths left out."""

    routes: list[GeneratedRoute]
    omitted: list[tuple[str, list[str]]]
    info: dict[str, str]


def parse_document(text: str, source: str) -> dict[str, Any]:
    """JSON or YAML text into a dict, checked to be an OpenAPI 3.x document."""
    data = _load_text(text, source)
    if not isinstance(data, dict):
        raise OpenAPIError(f"{source}: not an OpenAPI 3.x document (the top level is not a mapping)")
    version = data.get("openapi")
    if version is None:
        hint = f" (it says swagger: {data['swagger']!r}; convert it to OpenAPI 3)" if "swagger" in data else ""
        raise OpenAPIError(f"{source}: not an OpenAPI 3.x document (no 'openapi' field){hint}")
    if not isinstance(version, str) or not re.fullmatch(r"3\.\d+(\.\d+)?(-.*)?", version):
        raise OpenAPIError(f"{source}: not an OpenAPI 3.x document (openapi: {version!r}; 3.0 and 3.1 are read)")
    paths = data.get("paths")
    if not isinstance(paths, dict) or not paths:
        raise OpenAPIError(f"{source}: OpenAPI {version} document without paths (a mapping of /path: operations)")
    return data


def _load_text(text: str, source: str) -> Any:
    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise OpenAPIError(f"{source}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # a safe loader: no tags build objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OpenAPIError(f"{source}{where}: invalid YAML: {what}") from None


def _identifier(name: str) -> str:
    out = re.sub(r"\W", "_", name, flags=re.ASCII) or "param"
    return "_" + out if out[0].isdigit() else out


def _template(path: str, base: str) -> str | None:
    """The proxy's template for a schema path, or None if it cannot be one."""
    from etagproxy.routes import TemplateError, compile_template

    template = base + _PARAM.sub(lambda m: "{" + _identifier(m[1]) + "}", path)
    try:
        compile_template(template)
    except TemplateError:
        return None
    return template


def _base_path(schema: dict[str, Any]) -> str:
    """The path of the first server URL ('' for none or '/'); paths are relative to it."""
    servers = schema.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        return ""
    url = str(servers[0].get("url", ""))
    for name, var in (servers[0].get("variables") or {}).items():
        if isinstance(var, dict) and "default" in var:
            url = url.replace("{" + name + "}", str(var["default"]))
    return urlsplit(url).path.rstrip("/") if "{" not in url else ""


def _operations(item: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(item, dict):
        return {}
    return {m: op for m in METHODS if isinstance(op := item.get(m), dict)}


def _describe(ops: dict[str, dict[str, Any]]) -> list[str]:
    return [f"{m.upper()} {op.get('operationId', '(no operationId)')}" for m, op in ops.items()]


def _resolve(schema: dict[str, Any], node: Any) -> Any:
    for _ in range(10):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/")):
            return node
        target: Any = schema
        for part in node["$ref"][2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        node = target
    return node


def _array_body(schema: dict[str, Any], op: dict[str, Any]) -> bool:
    """Whether a write's JSON body is (or may be) an array: a bulk write."""
    body = _resolve(schema, op.get("requestBody"))
    if not isinstance(body, dict):
        return True  # no body described (a bulk DELETE often has none in the schema)
    content = body.get("content") or {}
    media = next((v for k, v in content.items() if "json" in k), None)
    if not isinstance(media, dict):
        return False
    shape = _resolve(schema, media.get("schema"))
    if not isinstance(shape, dict):
        return True
    kinds = shape.get("type")
    return kinds == "array" or (isinstance(kinds, list) and "array" in kinds) or any(
        isinstance(r := _resolve(schema, s), dict) and r.get("type") == "array"
        for s in (*shape.get("oneOf", ()), *shape.get("anyOf", ()))
    )


def routes_from_schema(schema: dict[str, Any]) -> Generated:
    """Classify every path of a checked schema (see the module docstring)."""
    base = _base_path(schema)
    paths: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {}
    omitted: list[tuple[str, list[str]]] = []
    for raw, item in schema["paths"].items():
        ops = _operations(item)
        template = _template(str(raw), base) if str(raw).startswith("/") else None
        if template is None:
            omitted.append((str(raw), ["not a template the proxy can match"] + _describe(ops)))
        elif ops:
            paths[template] = (str(raw), ops)
    routes: dict[str, GeneratedRoute] = {}
    for template, (raw, ops) in paths.items():
        parent, var = _split_item(template)
        if parent is None or not any(m in ops for m in _WRITES):
            continue
        item = routes[template] = GeneratedRoute(template, "item", {"require_if_match": True}, _describe(ops), raw)
        if parent not in paths:
            continue
        coll_raw, coll_ops = paths[parent]
        coll = routes.get(parent) or GeneratedRoute(parent, "collection", {}, _describe(coll_ops), coll_raw)
        if coll.kind != "collection" or "created" in coll.settings or "bulk" in coll.settings:
            continue  # a second item template under one collection: the first one is used
        routes[parent] = coll
        item.settings["invalidates"] = [parent]
        if "post" in coll_ops:
            coll.settings["created"] = template.replace("{" + var + "}", "{response." + var + "}")
        if any(m in coll_ops and _array_body(schema, coll_ops[m]) for m in _WRITES):
            coll.settings["bulk"] = {"field": var, "member": template}
    for template, (raw, ops) in paths.items():
        if template in routes:
            continue
        shadow = _first_match(template, routes.values())
        if shadow is not None:
            routes[template] = GeneratedRoute(template, "passthrough", {"mode": "passthrough"}, _describe(ops), raw)
        else:
            omitted.append((raw, _describe(ops)))
    info = schema["info"] if isinstance(schema.get("info"), dict) else {}
    meta = {"title": str(info.get("title", "")), "version": str(info.get("version", "")),
            "openapi": str(schema.get("openapi")), "base": base}
    return Generated(sorted(routes.values(), key=lambda r: _order(r.path)), omitted, meta)


def _split_item(template: str) -> tuple[str | None, str]:
    """(/a/, id) for /a/{id}/ or /a/{id}; (None, '') when the last segment is not one variable."""
    m = re.fullmatch(r"(.*/)\{(\w+)\}(/?)", template)
    if m is None:
        return None, ""
    parent = m[1] if m[3] else (m[1].rstrip("/") or "/")
    return parent, m[2]


def _first_match(path: str, routes: Any) -> GeneratedRoute | None:
    """The first of `routes` (in match order) that the literal-ised `path` would hit."""
    from etagproxy.routes import compile_template

    probe = _PARAM.sub("x", path)
    for route in sorted(routes, key=lambda r: _order(r.path)):
        if route.path != path and re.fullmatch(compile_template(route.path).pattern, probe):
            return route
    return None


def _order(template: str) -> tuple[Any, ...]:
    """Match order: segment by segment, literal before partly variable before variable."""
    key: list[tuple[Any, ...]] = []
    for segment in template.split("/"):
        literal = _PARAM.sub("", segment)
        if ":path}" in segment:
            key.append((3, segment))
        elif literal == segment:
            key.append((0, segment))
        elif literal:
            key.append((1, -len(literal), segment))
        else:
            key.append((2, segment))
    return tuple(key)


def parse_overrides(text: str, source: str) -> dict[str, dict[str, Any] | None]:
    """An overrides file: a mapping of path template -> route settings (null drops the route)."""
    data = _load_text(text, source) if text.strip() else {}
    if isinstance(data, dict) and set(data) == {"routes"} and isinstance(data["routes"], list):
        data = {e.get("path"): {k: v for k, v in e.items() if k != "path"}
                for e in data["routes"] if isinstance(e, dict)}
    if not isinstance(data, dict):
        raise OpenAPIError(f"{source}: expected a mapping of route paths to settings, got {type(data).__name__}")
    out: dict[str, dict[str, Any] | None] = {}
    for path, settings in data.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise OpenAPIError(f"{source}: key {path!r}: expected a route path starting with '/'")
        if settings is not None and not isinstance(settings, dict):
            raise OpenAPIError(f"{source}: {path}: expected a mapping of route settings or null,"
                               f" got {type(settings).__name__}")
        if settings and "path" in settings:
            raise OpenAPIError(f"{source}: {path}: 'path' is the key, not a setting")
        out[path] = settings
    return out


def _shape(template: str) -> str:
    return _PARAM.sub(lambda m: "{" + m[1].partition(":")[2] + "}", template)


def merge_overrides(generated: Generated, overrides: dict[str, dict[str, Any] | None]) -> Generated:
    """Override settings merged over the generated ones (a mapping value one level
    deep; null removes a setting, a null entry removes the route). Paths the
    schema did not give are added, in match order, marked as overrides."""
    by_shape = {_shape(r.path): r for r in generated.routes}
    routes = list(generated.routes)
    for path, settings in overrides.items():
        route = by_shape.get(_shape(path))
        if settings is None:
            if route is not None:
                routes.remove(route)
            continue
        if route is None:
            route = GeneratedRoute(path, "override")
            routes.append(route)
        elif settings.get("mode", route.settings.get("mode")) == "passthrough":
            route.settings = {k: v for k, v in route.settings.items() if k not in _TRACK_ONLY}
        route.overridden = True
        for key, value in settings.items():
            if value is None:
                route.settings.pop(key, None)
            elif isinstance(value, dict) and isinstance(route.settings.get(key), dict):
                route.settings[key] = {**route.settings[key], **value}
            else:
                route.settings[key] = value
    routes.sort(key=lambda r: _order(r.path))
    return Generated(routes, generated.omitted, generated.info)


def _scalar(value: Any) -> str:
    if isinstance(value, str) and "{" in value:
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("\n...").strip()


def counts(generated: Generated) -> dict[str, int]:
    out = {"item": 0, "collection": 0, "passthrough": 0, "override": 0}
    for route in generated.routes:
        out[route.kind] += 1
    out["omitted"] = len(generated.omitted)
    return out


def render(generated: Generated, *, source: str, upstream: str | None = None, command: str = "") -> str:
    """The routes YAML document, with a comment on each route saying where it came from."""
    info, n = generated.info, counts(generated)
    base = f", server base path {info['base']}" if info["base"] else ""
    lines = [
        f"# Routes generated from {source}",
        f"#   {info['title'] or '(untitled)'} {info['version']}, OpenAPI {info['openapi']}{base}",
    ]
    if command:
        lines.append(f"# Regenerate with: {command}")
    lines += [
        (f"# {n['item']} item routes, {n['collection']} collection routes, {n['passthrough']} passthrough"
         f" route(s), {n['override']} from overrides only; {n['omitted']} schema paths omitted (listed at the end)."),
        "# Hand edits belong in the overrides file (--overrides), so they survive regeneration.",
        "# Check with: etagproxy check-config FILE",
        "",
        f"upstream: {upstream}" if upstream else "upstream: http://127.0.0.1:8000  # set this",
        "",
        "# Tried in order, the first match wins: more specific paths come first.",
        "routes:",
    ]
    for route in generated.routes:
        origin = ", ".join(route.operations) if route.operations else "not in the schema"
        note = {"item": "item", "collection": "collection",
                "passthrough": "passthrough: a route below would match it otherwise",
                "override": "from overrides"}[route.kind]
        lines.append(f"  # {note}: {origin}")
        if route.source and route.source != route.path and route.kind != "override":
            lines.append(f"  # schema path: {route.source}")
        if route.overridden and route.kind != "override":
            lines.append("  # settings merged from overrides")
        lines.append(f"  - path: {_scalar(route.path)}")
        lines += [f"    {key}: {_scalar(value)}" for key, value in route.settings.items()]
    if not generated.routes:
        lines[-1] = "routes: []"
    if generated.omitted:
        lines += ["", "# Omitted schema paths (forwarded untouched, as every unmatched request is):"]
        lines += [f"#   {path}  {', '.join(ops)}" for path, ops in generated.omitted]
    return "\n".join(lines) + "\n"
