"""HTTP-date parsing and formatting (RFC 9110 §5.6.7)."""

from __future__ import annotations

import calendar
import datetime
import email.utils
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from etagproxy.httpdate import format_http_date, parse_http_date

RFC_EXAMPLE = 784111777  # 1994-11-06 08:49:37 UTC, the RFC's own example instant
FIRST = calendar.timegm((1, 1, 1, 0, 0, 0))
LAST = calendar.timegm((9999, 12, 31, 23, 59, 59))
# 2025-06-15 12:00:00 UTC: anchors the two-digit-year window of RFC 850 dates.
NOW_2025 = calendar.timegm((2025, 6, 15, 12, 0, 0))

_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_LONG_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def utc(*fields: int) -> int:
    return calendar.timegm((*fields, 0, 0, 0)[:6])


# The obsolete forms are written out here, independently of the code under
# test (and without strftime, whose names follow the locale).


def rfc850(moment: datetime.datetime) -> str:
    return (
        f"{_LONG_DAYS[moment.weekday()]}, {moment.day:02d}-{_MONTHS[moment.month - 1]}-"
        f"{moment.year % 100:02d} {moment:%H:%M:%S} GMT"
    )


def asctime(moment: datetime.datetime) -> str:
    """Day of month is space-padded."""
    return (
        f"{_DAYS[moment.weekday()]} {_MONTHS[moment.month - 1]} {moment.day:2d} "
        f"{moment:%H:%M:%S} {moment.year:04d}"
    )


# --- the RFC's examples -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850 format
        "Sun Nov  6 08:49:37 1994",  # ANSI C's asctime() format
    ],
)
def test_rfc_examples(text: str) -> None:
    assert parse_http_date(text, now=NOW_2025) == RFC_EXAMPLE


def test_format_rfc_example() -> None:
    assert format_http_date(RFC_EXAMPLE) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert format_http_date(RFC_EXAMPLE + 0.999) == "Sun, 06 Nov 1994 08:49:37 GMT"


# --- accepted variations ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Chosen: the day name is not checked against the date (module docstring).
        ("Mon, 06 Nov 1994 08:49:37 GMT", RFC_EXAMPLE),
        ("Monday, 06-Nov-94 08:49:37 GMT", RFC_EXAMPLE),
        ("Mon Nov  6 08:49:37 1994", RFC_EXAMPLE),
        # asctime also allows a two-digit day.
        ("Sun Nov 06 08:49:37 1994", RFC_EXAMPLE),
        ("Thu Nov 24 08:49:37 1994", utc(1994, 11, 24, 8, 49, 37)),
        # A leap second is the first second of the next minute.
        ("Wed, 31 Dec 2008 23:59:60 GMT", utc(2009, 1, 1, 0, 0, 0)),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0),
        ("Wed, 31 Dec 1969 23:59:59 GMT", -1),
        ("Tue, 29 Feb 2000 00:00:00 GMT", utc(2000, 2, 29, 0, 0, 0)),
        ("Mon, 01 Jan 0001 00:00:00 GMT", FIRST),
        ("Fri, 31 Dec 9999 23:59:59 GMT", LAST),
        # Leading and trailing OWS is not part of the field value (RFC 9110 §5.5).
        (" \tSun, 06 Nov 1994 08:49:37 GMT\t ", RFC_EXAMPLE),
    ],
)
def test_accepted(text: str, expected: int) -> None:
    assert parse_http_date(text, now=NOW_2025) == expected


# --- rejected -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        # Names are case-sensitive (RFC 9110 §5.6.7: "HTTP-date is case sensitive").
        "sun, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 06 NOV 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 gmt",
        "sunday, 06-Nov-94 08:49:37 GMT",
        "Sun nov  6 08:49:37 1994",
        # Bad names.
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 06 November 1994 08:49:37 GMT",
        "Xyz, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06 Nov 1994 08:49:37 GMT",  # long day name is RFC 850 only
        "Sun, 06-Nov-94 08:49:37 GMT",  # short day name is not RFC 850
        "Sunday Nov  6 08:49:37 1994",
        # The zone must be literally GMT.
        "Sun, 06 Nov 1994 08:49:37",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Sun, 06 Nov 1994 08:49:37 GMT+1",
        "Sunday, 06-Nov-94 08:49:37",
        "Sun Nov  6 08:49:37 1994 GMT",
        # Field widths and spacing.
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sun, 06 Nov 01994 08:49:37 GMT",
        "Sun, 06 Nov 1994 8:49:37 GMT",
        "Sun,06 Nov 1994 08:49:37 GMT",
        "Sun,  06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994  08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37  GMT",
        "Sun Nov 6 08:49:37 1994",  # a one-digit day needs a leading space
        "Sun Nov   6 08:49:37 1994",
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49 GMT",
        "Sun, 06 Nov 1994 08:49:37.5 GMT",
        "Sun, \u0660\u0666 Nov 1994 08:49:37 GMT",  # non-ASCII digits
        # Out-of-range values.
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun, 31 Nov 1994 08:49:37 GMT",
        "Sun, 29 Feb 1900 08:49:37 GMT",
        "Sun, 06 Nov 0000 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun Nov 31 08:49:37 1994",
        "Sunday, 31-Nov-94 08:49:37 GMT",
        # Lists of dates (RFC 9110 §13.1.3/§13.1.4: more than one member is invalid).
        "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT,",
        ", Sun, 06 Nov 1994 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994, Sun Nov  6 08:49:37 1994",
        # Not dates at all.
        "",
        " ",
        "garbage",
        "784111777",
        "1994-11-06T08:49:37Z",
        "-1",
        "*",
        "Sun, 06 Nov 1994 08:49:37 GMT\x00",
        "Sun, 06 Nov 1994 08:49:37 GMT\n",
    ],
)
def test_rejected(text: str) -> None:
    assert parse_http_date(text, now=NOW_2025) is None


def test_absent() -> None:
    assert parse_http_date(None) is None


# --- RFC 850 two-digit years (RFC 9110 §5.6.7) --------------------------------------


@pytest.mark.parametrize(
    ("text", "now", "year"),
    [
        ("Sunday, 06-Nov-94 08:49:37 GMT", NOW_2025, 1994),
        ("Saturday, 01-Jan-00 00:00:00 GMT", NOW_2025, 2000),
        ("Sunday, 15-Jun-25 12:00:00 GMT", NOW_2025, 2025),
        ("Thursday, 01-Jan-60 00:00:00 GMT", NOW_2025, 2060),
        # Up to exactly 50 years ahead is read as the future ...
        ("Saturday, 15-Jun-75 12:00:00 GMT", NOW_2025, 2075),
        # ... one second more is "more than 50 years in the future": the past.
        ("Sunday, 15-Jun-75 12:00:01 GMT", NOW_2025, 1975),
        ("Sunday, 01-Dec-75 00:00:00 GMT", NOW_2025, 1975),
        ("Friday, 01-Jan-76 00:00:00 GMT", NOW_2025, 1976),
        # Near the end of a century a small year is in the next one.
        ("Friday, 01-Jan-01 00:00:00 GMT", utc(2099, 1, 1, 0, 0, 0), 2101),
        ("Friday, 01-Jan-98 00:00:00 GMT", utc(2099, 1, 1, 0, 0, 0), 2098),
        # Early in a century a large year is in the previous one.
        ("Friday, 01-Jan-99 00:00:00 GMT", utc(2001, 1, 1, 0, 0, 0), 1999),
    ],
)
def test_two_digit_years(text: str, now: int, year: int) -> None:
    parsed = parse_http_date(text, now=now)
    assert parsed is not None
    assert datetime.datetime.fromtimestamp(parsed, datetime.timezone.utc).year == year


def test_two_digit_leap_day_depends_on_the_resolved_century() -> None:
    leap_day = "Tuesday, 29-Feb-00 00:00:00 GMT"
    assert parse_http_date(leap_day, now=NOW_2025) == utc(2000, 2, 29, 0, 0, 0)
    # Seen from 2080 the year is 2100, which is not a leap year.
    assert parse_http_date(leap_day, now=utc(2080, 1, 1, 0, 0, 0)) is None


# --- properties ---------------------------------------------------------------------

moments = st.datetimes(
    min_value=datetime.datetime(1800, 1, 1), max_value=datetime.datetime(9900, 12, 31, 23, 59, 59)
).map(lambda moment: moment.replace(microsecond=0))


@given(st.floats(min_value=FIRST, max_value=LAST + 0.999, allow_nan=False))
def test_format_then_parse_round_trips(seconds: float) -> None:
    assert parse_http_date(format_http_date(seconds)) == math.floor(seconds)


@given(st.integers(min_value=0, max_value=LAST))
def test_format_agrees_with_the_standard_library(seconds: int) -> None:
    # email.utils writes the same IMF-fixdate (RFC 5322 with GMT).
    assert format_http_date(seconds) == email.utils.formatdate(seconds, usegmt=True)


@given(moments, st.integers(min_value=-49 * 365, max_value=49 * 365))
def test_obsolete_forms_parse_to_the_same_instant(moment: datetime.datetime, days: int) -> None:
    expected = calendar.timegm(moment.timetuple())
    assert parse_http_date(asctime(moment)) == expected
    # Seen from less than 50 years away, an RFC 850 date names the same instant.
    assert parse_http_date(rfc850(moment), now=expected + days * 86400) == expected


@given(st.integers(min_value=-(10**12), max_value=10**12))
@example(FIRST - 1)
@example(LAST + 1)
@example(FIRST)
@example(LAST)
def test_dates_outside_four_digit_years_cannot_be_formatted(seconds: int) -> None:
    if FIRST <= seconds <= LAST:
        assert parse_http_date(format_http_date(seconds)) == seconds
    else:
        with pytest.raises(ValueError):
            format_http_date(seconds)


@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    result = parse_http_date(text)
    assert result is None or isinstance(result, int)


@given(
    st.text(st.sampled_from(list("SunNovGMT ,-:0123456789")), max_size=40),
)
def test_date_like_text_never_raises(text: str) -> None:
    result = parse_http_date(text, now=NOW_2025)
    # Whatever parses is a calendar instant within four-digit years.
    if result is not None:
        assert FIRST <= result <= LAST + 1
