"""Scalar values: durations, sizes, counts, booleans, strings, choices and
the token-like names a configuration holds (methods, header names, media
types, JSON field names, query parameter names, networks, the Via pseudonym).

Each parser takes a plain Python value and returns the checked value or
raises `_Bad` ("expected ..., got ..."), which is a ValueError; `_describe`
is how a found value is shown in every message. Knows nothing of YAML, of
where a value came from (file lines, environment) or of the dataclasses;
imports nothing else of this package.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Final


class _Bad(ValueError):
    """A value that does not parse; `expected` completes "expected ..., got ..."."""

    def __init__(self, expected: str, value: object) -> None:
        self.expected = expected
        self.got = _describe(value)
        super().__init__(f"expected {expected}, got {self.got}")


def _describe(value: object) -> str:
    """How a found value is shown in a message: YAML spelling, strings quoted."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_DURATION_EXPECTED: Final = "a duration such as 2s, 250ms, 1.5m, 1h or 7d"
_DURATION = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(?P<unit>ms|s|m|h|d)?")
_DURATION_UNITS: Final[dict[str | None, float]] = {
    None: 1.0,  # a plain number is seconds
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_MAX_DURATION: Final = 3650 * 86400.0
"""Ten years: far above any sensible setting and far below what makes
event-loop timers or Redis expiries overflow."""


def parse_duration(value: object) -> float:
    """Seconds from `2s`, `250ms`, `1.5m`, `1h`, `7d` or a plain number of seconds.

    Raises ValueError ("expected ..., got ...") for anything else, for
    negative values, and for values above ten years.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(_DURATION_EXPECTED, value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise _Bad("a duration that is not negative", value)
        m = _DURATION.fullmatch(text)
        if m is None:
            raise _Bad(_DURATION_EXPECTED, value)
        seconds = float(m["num"]) * _DURATION_UNITS[m["unit"]]
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise _Bad("a duration of at most 3650d", value) from None
    if math.isnan(seconds):
        raise _Bad(_DURATION_EXPECTED, value)
    if seconds < 0:
        raise _Bad("a duration that is not negative", value)
    if seconds > _MAX_DURATION:
        raise _Bad("a duration of at most 3650d", value)
    return seconds


_SIZE_EXPECTED: Final = "a size such as 10MiB, 512KiB, 1GB or a number of bytes"
_SIZE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?) ?(?P<unit>B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?")
_SIZE_UNITS: Final[dict[str | None, int]] = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
_MAX_SIZE: Final = 2**63 - 1
"""What a signed 64-bit length (ssize_t, Content-Length in most stacks) holds."""


def parse_size(value: object) -> int:
    """Bytes from `10MiB`, `512KiB`, `1GB`, `1.5KiB` or a plain whole number of bytes.

    Units are case-sensitive (`Mb` would be megabits): B, KiB, MiB, GiB,
    TiB (powers of 1024) and KB, MB, GB, TB (powers of 1000). Raises
    ValueError for anything else, negative values, sizes that are not a
    whole number of bytes, and sizes beyond 2**63 - 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(_SIZE_EXPECTED, value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise _Bad("a size that is not negative", value)
        m = _SIZE.fullmatch(text)
        if m is None:
            raise _Bad(_SIZE_EXPECTED, value)
        # Decimal, so that 0.1MiB is found not to be whole rather than rounded.
        amount = Decimal(m["num"]) * _SIZE_UNITS[m["unit"]]
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(_SIZE_EXPECTED, value)
        amount = Decimal(value)
    if amount < 0:
        raise _Bad("a size that is not negative", value)
    if amount != amount.to_integral_value():
        raise _Bad("a whole number of bytes", value)
    if amount > _MAX_SIZE:
        raise _Bad("a size below 8EiB", value)
    return int(amount)


# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _parse_bool(value: object) -> bool:
    if value is True or value is False:
        return value
    raise _Bad("true or false", value)


def _parse_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Bad("a string", value)


def _duration(*, positive: bool = False, why: str = "") -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise _Bad(f"a duration greater than 0{why}", value)
        return seconds

    return parse


def _size(*, minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        size = parse_size(value)
        if size < minimum:
            raise _Bad(f"a size of at least {minimum} bytes", value)
        return size

    return parse


def _count(*, minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"a whole number of at least {minimum}", value)
        if not minimum <= value <= _MAX_SIZE:
            raise _Bad(f"a whole number of at least {minimum}", value)
        return value

    return parse


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _Bad(" or ".join(choices), value)

    return parse


_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _parse_media_type(value: object) -> str:
    if isinstance(value, str) and _MEDIA_TYPE.fullmatch(value.strip()) and "*" not in value:
        return value.strip().lower()
    raise _Bad("a media type such as application/json (no parameters, no wildcards)", value)


def _parse_field_name(value: object) -> str:
    if isinstance(value, str) and value and all(part for part in value.split(".")) and value.isprintable():
        return value
    raise _Bad("a JSON field name such as id (dotted for a nested field)", value)


def _parse_header_name(value: object) -> str:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise _Bad("a header name such as ETag", value)


def _parse_member_count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10_000:
        return value
    raise _Bad("a whole number from 1 to 10000", value)


def _parse_method(value: object) -> str:
    # RFC 9110 §9.1: a method is a token.
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value.upper()
    raise _Bad("an HTTP method name such as GET or PUT", value)


def _parse_query_name(value: object) -> str:
    if isinstance(value, str) and value and value.isprintable():
        return value
    raise _Bad("a query parameter name", value)


def _parse_network(value: object) -> str:
    if isinstance(value, str):
        try:
            ipaddress.ip_network(value.strip(), strict=False)
            return value.strip()
        except ValueError:
            pass
    raise _Bad("an IP address or CIDR such as 10.0.0.0/8", value)


def _parse_via(value: object) -> str:
    # RFC 9110 §7.6.3: received-by = pseudonym [ ":" port ], pseudonym = token.
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise _Bad("a pseudonym of token characters (RFC 9110 §7.6.3) such as etagproxy", value)


# RFC 9110 §10.2.4: Server = product *( RWS ( product / comment ) ), product =
# token [ "/" product-version ]; a comment is kept simple (no nesting).
_SERVER = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?"
                     r"(?: (?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?|\([ -'*-~]*\)))*")


def _parse_server(value: object) -> str:
    if isinstance(value, str) and _SERVER.fullmatch(value):
        return value
    raise _Bad("products such as etagproxy or etagproxy/1.0 (RFC 9110 §10.2.4)", value)
