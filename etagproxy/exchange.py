"""What one request did (`Exchange`), and who asked (`credential_hash`).

Filled in as a request goes down its path; the access log and the request
metrics read it when the answer is out.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from multidict import MultiMapping

__all__ = ["Exchange", "credential_hash"]


@dataclass(slots=True)
class Exchange:
    """What one request did; feeds the access log and metrics."""

    rid: str
    method: str
    target: str = ""
    """The request target as received (path and query)."""
    client: str = ""
    """The peer's address."""
    agent: str = ""
    """The User-Agent."""
    start: float = field(default_factory=time.perf_counter)
    route: str = "-"
    key: str = ""
    status: int = 0
    upstream_status: int | None = None
    decision: str = ""
    store_ms: float = 0.0
    upstream_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str = ""
    creds: str | None = None
    """credential_hash of the request, computed at most once."""
    members: tuple[str, ...] = ()
    """Keys of the members a bulk write leased besides its own."""
    verified_at: float = 0.0
    """When the upstream's version was read for a write (perf_counter)."""
    upstream_validator: str | None = None
    """The validator the verify read found, to send on as If-Match
    (`version: {from: header, upstream_if_match: true}`)."""
    trace_id: str = ""
    """W3C trace-id: the client's, or a new trace's (`tracing.py`)."""
    span_id: str = ""
    """The proxy's span in that trace: the parent-id the upstream sees."""
    parent_id: str = ""
    """The client's parent-id; "" when the proxy started the trace."""
    trace_flags: str = "00"
    tracestate: str | None = None
    """The client's tracestate, passed on unchanged; None: none sent."""
    span: object = None
    """The OpenTelemetry server span (`tracing: {otel: true}`), else None."""


def credential_hash(headers: MultiMapping[str]) -> str:
    """Who is asking, as far as the upstream's authorisation can tell."""
    get = headers.getall
    h = hashlib.blake2b(digest_size=16, person=b"etagproxy-cred")
    for value in get("Authorization", ()):
        h.update(b"a" + value.encode("latin-1", "replace") + b"\0")
    for value in get("Cookie", ()):
        h.update(b"c" + value.encode("latin-1", "replace") + b"\0")
    return h.hexdigest()
