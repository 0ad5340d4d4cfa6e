"""HTTP-date parsing and formatting (RFC 9110 §5.6.7).

The parser is strict on purpose. `If-Unmodified-Since` and
`If-Modified-Since` must be ignored when their value is not a valid
HTTP-date (RFC 9110 §13.1.3, §13.1.4), so a lenient parser such as
`email.utils.parsedate` (which takes lower-case names, missing zones, other
zones, and the first of two dates) would make the proxy act on values the
RFC says carry no meaning.

Choice: the day name must be one of the grammar's names, but it is not
checked against the date. The grammar does not tie the two together, and
rejecting a mismatch would silently drop a client's `If-Unmodified-Since`,
letting a write through that the client meant to guard.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import math
import re
import time

__all__ = ["format_http_date", "parse_http_date"]

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY_NAMES_LONG = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name: number for number, name in enumerate(_MONTHS, start=1)}

# Digits are spelled [0-9]: `\d` would also accept non-ASCII digits.
_DAY = "|".join(_DAY_NAMES)
_DAY_L = "|".join(_DAY_NAMES_LONG)
_MONTH = "|".join(_MONTHS)
# RFC 9110 §5.6.7: time-of-day = hour ":" minute ":" second (00:00:00 - 23:59:60).
_TIME = "([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9]|60)"
# RFC 9110 §5.6.7: IMF-fixdate = day-name "," SP day SP month SP 4DIGIT SP time-of-day SP "GMT".
_IMF_FIXDATE = re.compile(f"(?:{_DAY}), ([0-9]{{2}}) ({_MONTH}) ([0-9]{{4}}) {_TIME} GMT")
# RFC 9110 §5.6.7: rfc850-date = day-name-l "," SP day "-" month "-" 2DIGIT SP time-of-day SP GMT.
_RFC850_DATE = re.compile(f"(?:{_DAY_L}), ([0-9]{{2}})-({_MONTH})-([0-9]{{2}}) {_TIME} GMT")
# RFC 9110 §5.6.7: asctime-date = day-name SP month SP ( 2DIGIT / ( SP DIGIT ) ) SP time-of-day SP year.
_ASCTIME_DATE = re.compile(f"(?:{_DAY}) ({_MONTH}) ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")
# RFC 9110 §5.5: leading and trailing OWS is not part of a field value.
_OWS = " \t"


def parse_http_date(value: str | None, *, now: float | None = None) -> int | None:
    """Seconds since the epoch, or None if `value` is absent or not one HTTP-date.

    A list of dates (several field lines joined with ", ") is invalid, as RFC
    9110 §13.1.3/§13.1.4 require. `now` (seconds since the epoch, default the
    current time) anchors the century of two-digit RFC 850 years.
    """
    if not isinstance(value, str):
        return None
    text = value.strip(_OWS)
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
        return _to_seconds(int(year), _MONTH_NUMBER[month], day, hour, minute, second)
    if match := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
        return _to_seconds(int(year), _MONTH_NUMBER[month], day, hour, minute, second)
    if match := _RFC850_DATE.fullmatch(text):
        day, month, year2, hour, minute, second = match.groups()
        fields = (_MONTH_NUMBER[month], int(day), int(hour), int(minute), int(second))
        year = _rfc850_year(int(year2), fields, time.time() if now is None else now)
        if year is None:
            return None
        return _to_seconds(year, fields[0], day, hour, minute, second)
    return None


def _rfc850_year(two_digits: int, rest: tuple[int, int, int, int, int], now: float) -> int | None:
    """The full year of an RFC 850 date, in the 100-year window ending 50 years from now.

    RFC 9110 §5.6.7: a timestamp that appears to be more than 50 years in the
    future is the most recent past year with the same last two digits; so
    every other timestamp within the century around now is read as is.
    """
    try:
        current = time.gmtime(now)
    except (OverflowError, OSError, ValueError):
        return None
    now_fields = (current.tm_mon, current.tm_mday, current.tm_hour, current.tm_min, current.tm_sec)
    year = current.tm_year - current.tm_year % 100 + two_digits
    if (year, *rest) > (current.tm_year + 50, *now_fields):
        year -= 100
    elif (year, *rest) <= (current.tm_year - 50, *now_fields):
        year += 100
    return year


def _to_seconds(year: int, month: int, day: str, hour: str, minute: str, second: str) -> int | None:
    try:
        # Rejects day 00, 31 Apr, 29 Feb of common years and year 0000.
        datetime.date(year, month, int(day))
    except ValueError:
        return None
    # A leap second (:60) counts as the first second of the next minute.
    return calendar.timegm((year, month, int(day), int(hour), int(minute), int(second), 0, 0, 0))


@functools.lru_cache(maxsize=1024)
def _format_second(second: int) -> str:
    return _format_http_date(second)


def format_http_date(seconds: float) -> str:
    """IMF-fixdate for `seconds` (cached per whole second: the same few
    mint times are formatted on every read of a hot resource)."""
    return _format_second(math.floor(seconds))


def _format_http_date(seconds: float) -> str:
    """IMF-fixdate for `seconds` since the epoch (fraction dropped), e.g. for Last-Modified.

    Spelled out by hand rather than with `strftime`, whose day and month
    names follow the process locale. Raises ValueError outside years 1-9999,
    which IMF-fixdate's four-digit year cannot express.
    """
    try:
        tm = time.gmtime(math.floor(seconds))
    except (OverflowError, OSError) as exc:
        raise ValueError(f"time {seconds!r} cannot be an HTTP-date") from exc
    if not 1 <= tm.tm_year <= 9999:
        raise ValueError(f"time {seconds!r} cannot be an HTTP-date")
    return (
        f"{_DAY_NAMES[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year:04d} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT"
    )
