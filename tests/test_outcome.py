"""The outcome rule: which upstream answers to a write leave the old token
valid. Only a refusal before processing (4xx) may; everything that might
have applied the change mints (etagproxy/outcome.py)."""

from __future__ import annotations

import pytest

from etagproxy.outcome import validators_allowed, write_outcome
from etagproxy.store.base import Outcome


@pytest.mark.parametrize("status", [200, 201, 202, 204, 206, 299, 303])
def test_applied_answers_are_success(status: int) -> None:
    assert write_outcome(status) is Outcome.SUCCESS


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 412, 422, 428, 499])
def test_refusals_are_rejected(status: int) -> None:
    assert write_outcome(status) is Outcome.REJECTED


@pytest.mark.parametrize("status", [100, 101, 199, 300, 301, 302, 304, 307, 308, 500, 502, 503, 504, 599])
def test_everything_else_is_unknown(status: int) -> None:
    # A 302 is what Django's redirect() answers after a form write succeeded;
    # keeping the token on it would let the pre-write tag validate again.
    assert write_outcome(status) is Outcome.UNKNOWN


def test_no_3xx_keeps_the_old_token() -> None:
    assert all(write_outcome(s) is not Outcome.REJECTED for s in range(300, 400))


@pytest.mark.parametrize(
    ("status", "allowed"),
    [(200, True), (201, True), (204, True), (299, True), (303, False), (302, False), (404, False), (500, False)],
)
def test_only_2xx_carries_validators(status: int, allowed: bool) -> None:
    assert validators_allowed(status) is allowed
