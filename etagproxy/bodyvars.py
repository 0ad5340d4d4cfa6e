"""Values for `{body.<field>}` and `{response.<field>}` template variables,
and the member keys of a bulk write. Pure: no I/O.

A write's JSON bodies can name resources its path does not: a comment's
`postId`, a device's `site`, the `id` of a created row, the `id` of every
object in a bulk edit. Only a JSON object's string or whole-number fields
count (dotted names walk nested objects); anything else names no resource,
so the template that needs it is skipped. Values are percent-encoded as one
path segment, so a body cannot smuggle a `/` or a dot segment into a key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

__all__ = ["BulkError", "bulk_values", "field_value", "fields_for", "json_document"]

# RFC 3986 pchar minus "%" (a value's "%" is data and gets encoded).
_SEGMENT_SAFE = "-._~!$&'()*+,;=:@"


class BulkError(ValueError):
    """A bulk body whose members cannot all be named; the message says why
    and `status` what to answer (400, or 413 past the member bound)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def json_document(raw: bytes | None) -> Any:
    """The parsed JSON document, or None when `raw` is not JSON."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def field_value(document: Any, name: str) -> str | None:
    """`name` (dotted for nested objects) of a JSON object, as one encoded
    path segment; None unless it is a non-empty string or a whole number."""
    value = document
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    if not text or text in (".", ".."):
        return None
    return quote(text, safe=_SEGMENT_SAFE)


def fields_for(names: Iterable[str], documents: dict[str, Any]) -> dict[str, str]:
    """`{"body.postId": "1", ...}`: the values the dotted variable `names`
    (`Route.body_names`) take in `documents` (`{"body": ..., "response": ...}`)."""
    out: dict[str, str] = {}
    for name in names:
        source, _, rest = name.partition(".")
        if source in documents:
            value = field_value(documents[source], rest)
            if value is not None:
                out[name] = value
    return out


def bulk_values(document: Any, field: str, max_members: int) -> list[str] | None:
    """The members a bulk body names, in order, without repeats; None when
    the body is not a JSON array (not a bulk request).

    Raises `BulkError` when an item is not an object with `field`, or when
    there are more than `max_members` items.
    """
    if not isinstance(document, list):
        return None
    if len(document) > max_members:
        raise BulkError(
            f"The body names {len(document)} objects; at most {max_members} are allowed per request.", 413
        )
    values: list[str] = []
    for i, item in enumerate(document):
        value = field_value(item, field)
        if value is None:
            raise BulkError(f"Item {i} of the body is not an object with a string or whole-number {field!r}.")
        if value not in values:
            values.append(value)
    return values
