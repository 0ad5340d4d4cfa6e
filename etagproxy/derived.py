"""Versions derived from the upstream's answer (the route's `version`).

The default version is a token the proxy mints and keeps in its store, so
it moves only when a write goes through the proxy. A route can instead
derive the version from what the upstream says about the resource, so a
write that bypasses the proxy (a web UI, a batch job) changes it too:

- `field`: a field of the JSON representation, e.g. NetBox's
  `last_updated` (dotted for nested fields; the first present one counts).
- `header`: a response header, e.g. the upstream's own `ETag` (weak or not:
  a version-exact weak tag is still exact enough to derive a strong one
  from, since the proxy compares it byte for byte).
- `body`: a hash of the representation's bytes.

The token is a hash of the resource key and that value, in the alphabet of
minted tokens, so it survives a store wipe or restore and never matches
another resource's. Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from etagproxy.bodyvars import json_document

__all__ = ["VersionSource", "derive_token"]


@dataclass(frozen=True, slots=True)
class VersionSource:
    """`version:` of a route."""

    source: str
    """"field", "header" or "body"."""
    fields: tuple[str, ...] = ()
    """For "field": the JSON fields tried in order (dotted for nested)."""
    header: str = ""
    """For "header": the response header's name."""
    upstream_if_match: bool = False
    """For "header": send the validator the verify read found on to the
    upstream as If-Match with the write, for an upstream that checks it
    itself under a lock (NetBox 4.6 does, weak tags included). The upstream
    then refuses a write that a bypass edit outdated after the proxy's
    check, which closes the window the check alone leaves open."""

    @property
    def needs_body(self) -> bool:
        return self.source in ("field", "body")


def _field(document: Any, name: str) -> Any:
    value = document
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def derive_token(source: VersionSource, key: str, headers: Mapping[str, str], body: bytes | None) -> str | None:
    """The version token of `key` in this answer; None when the answer does
    not say (no such field or header, or no body to hash)."""
    if source.source == "header":
        value = headers.get(source.header)
        material = None if not value else value.strip().encode("latin-1", "replace")
    elif source.source == "body":
        material = body
    else:
        document = json_document(body)
        material = None
        for name in source.fields:
            found = _field(document, name)
            if found is not None and found != "":
                material = (name + "\0" + json.dumps(found, sort_keys=True)).encode()
                break
    if material is None:
        return None
    h = hashlib.blake2b(digest_size=15, person=b"etagproxy-vers")
    h.update(key.encode("utf-8", "surrogateescape") + b"\0" + source.source.encode() + b"\0")
    h.update(material)
    return base64.b32encode(h.digest()).decode("ascii").lower()
