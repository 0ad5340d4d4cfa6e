"""RFC 9457 problem details: every error the proxy itself produces.

Each problem has a stable `type` URI under PROBLEM_BASE, a human title, and a
`detail` that tells the client what to do next (re-read, retry later, add a
precondition). The upstream's body is never mixed into these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from aiohttp import web

PROBLEM_BASE = "https://etagproxy.dev/problems/"
CONTENT_TYPE = "application/problem+json"

TITLES: Mapping[int, str] = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Write In Progress",
    412: "Precondition Failed",
    413: "Content Too Large",
    417: "Expectation Failed",
    428: "Precondition Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def problem_body(status: int, kind: str, detail: str, **extra: object) -> bytes:
    doc: dict[str, object] = {
        "type": PROBLEM_BASE + kind,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    doc.update(extra)
    return json.dumps(doc, separators=(",", ":")).encode()


def problem(
    status: int,
    kind: str,
    detail: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    **extra: object,
) -> web.Response:
    """A complete problem+json response; `extra` becomes extension members."""
    resp = web.Response(
        status=status,
        body=problem_body(status, kind, detail, **extra),
        content_type=CONTENT_TYPE,
    )
    # Errors made by the proxy are about this request only: never stored.
    resp.headers["Cache-Control"] = "no-store"
    for name, value in headers:
        resp.headers.add(name, value)
    return resp
