"""Path templates as settings: a route's own path, `invalidates` and
`created` templates, and the variable names a template uses.

The grammar itself belongs to etagproxy.routes (its compiler checks each
template); this module only turns its verdict into `scalars._Bad`. Knows
nothing of YAML or of the dataclasses; uses only `scalars`.
"""

from __future__ import annotations

import re

from etagproxy.config.scalars import _Bad

# {name} or {name:kind}, for the variables an invalidates template uses.
_TEMPLATE_VARIABLE = re.compile(r"\{([^{}:]*)(:[^{}]*)?\}")


def _parse_template(value: object) -> str:
    """A route template, checked by the router's own compiler."""
    expected = "a path template such as /items/{id} or /files/{rest:path}"
    if not isinstance(value, str):
        raise _Bad(expected, value)
    # Imported here: the router works on RouteConfig's shape, and loading
    # the configuration package does not load the router.
    from etagproxy.routes import TemplateError, compile_template

    try:
        compile_template(value)
    except TemplateError as exc:
        reason = str(exc).removeprefix(f"template {value!r}: ")
        raise _Bad(f"{expected} ({reason})", value) from None
    return value


def _parse_route_path(value: object) -> str:
    """A route's own path: a template whose variables are plain names."""
    template = _parse_template(value)
    dotted = [n for n in _template_names(template) if "." in n]
    if dotted:
        raise _Bad(
            "a path template with plain variable names ({body.x} and {response.x}"
            " belong in invalidates and created)",
            value,
        )
    return template


def _template_names(template: str) -> list[str]:
    return [m[1] for m in _TEMPLATE_VARIABLE.finditer(template)]


def _template_shape(template: str) -> str:
    """The template with variable names erased: /a/{id} and /a/{x} are one route."""
    return _TEMPLATE_VARIABLE.sub(lambda m: "{" + (m[2] or "") + "}", template)


def _body_variable(name: str) -> bool:
    """Whether a template variable is {body.<field>} or {response.<field>}."""
    source, dot, field_name = name.partition(".")
    return bool(dot) and source in ("body", "response") and all(field_name.split("."))
