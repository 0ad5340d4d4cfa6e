"""W3C Trace Context (https://www.w3.org/TR/trace-context/) at the proxy
boundary (pure: no I/O).

The proxy is an intermediary that takes part in the trace: a valid
`traceparent` from the client keeps its trace-id and flags and gets the
proxy's own span id as parent-id on the way upstream; `tracestate` is passed
on unchanged when it is well formed and at most `TRACESTATE_MAX` bytes.
Without a valid `traceparent` (absent, malformed, or sent more than once;
the spec says to treat an invalid one as absent) the proxy starts a new
trace and drops any `tracestate`. Responses carry neither field.

Parsing is one regular expression; a request costs it one match and eight
(or, for a new trace, 24) random bytes from `randomness.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from etagproxy.randomness import random_hex

__all__ = [
    "TRACESTATE_MAX",
    "clean_tracestate",
    "incoming",
    "new_span_id",
    "parse_traceparent",
    "traceparent",
]

# version "-" trace-id "-" parent-id "-" trace-flags, lower-case hex only.
# Version ff is invalid; version 00 has nothing after the flags; a later
# version may append "-" and more, which is ignored (§3.2.4 "Versioning").
_TRACEPARENT = re.compile(
    r"(?!ff)([0-9a-f]{2})-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})(-.*)?",
    re.DOTALL,
)

# tracestate list-member: key "=" value (§3.3.1.3.1, .2); keys are simple
# or multi-tenant (tenant@system). Empty members (",,") are allowed.
_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = f"{_KEY}={_VALUE}"
_TRACESTATE = re.compile(rf"[ \t]*(?:{_MEMBER})?(?:[ \t]*,[ \t]*(?:{_MEMBER})?)*[ \t]*")

TRACESTATE_MAX = 512
"""Longest combined tracestate passed on (the spec asks for at least 512)."""
TRACESTATE_MEMBERS = 32

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace-id, parent-id, flags) of a valid traceparent, else None."""
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if rest is not None and version == "00":
        return None
    return trace_id, parent_id, flags


def clean_tracestate(values: Sequence[str]) -> str | None:
    """The tracestate field lines as one value to pass on, or None when
    there is none, it is malformed, too long, or has too many members."""
    if not values:
        return None
    value = values[0] if len(values) == 1 else ",".join(values)
    if len(value) > TRACESTATE_MAX or not value.strip(" \t,"):
        return None
    if value.count("=") > TRACESTATE_MEMBERS or _TRACESTATE.fullmatch(value) is None:
        return None
    return value


def new_span_id() -> str:
    span = random_hex(8)
    while span == _ZERO_SPAN:  # pragma: no cover - 2**-64
        span = random_hex(8)
    return span


def new_trace_id() -> str:
    trace = random_hex(16)
    while trace == _ZERO_TRACE:  # pragma: no cover - 2**-128
        trace = random_hex(16)
    return trace


def incoming(
    parents: Sequence[str] | None, states: Sequence[str] | None, *, sampled: bool
) -> tuple[str, str, str, str | None, str]:
    """(trace-id, parent-id or "", flags, tracestate, span-id) for a request
    whose traceparent and tracestate field lines are `parents` and `states`;
    span-id is new, the proxy's own span.

    A new trace (no single valid traceparent) has parent-id "", flags "01"
    when `sampled` else "00", and no tracestate; its trace-id and the span-id
    come from one draw of random bytes.
    """
    if parents is not None and len(parents) == 1:
        parsed = parse_traceparent(parents[0])
        if parsed is not None:
            trace_id, parent_id, flags = parsed
            return trace_id, parent_id, flags, clean_tracestate(states or ()), new_span_id()
    both = random_hex(24)
    trace_id, span_id = both[:32], both[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # pragma: no cover - 2**-64
        trace_id, span_id = new_trace_id(), new_span_id()
    return trace_id, "", "01" if sampled else "00", None, span_id


def traceparent(trace_id: str, span_id: str, flags: str) -> str:
    """A version-00 traceparent value."""
    return f"00-{trace_id}-{span_id}-{flags}"
