"""replay.py: the name of an Idempotency-Key record."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request

from etagproxy.replay import idempotency_key


def key_of(value: str | None) -> str | None:
    headers = {} if value is None else {"Idempotency-Key": value}
    return idempotency_key(make_mocked_request("PUT", "/a", headers=headers))


def test_a_key_names_one_record_and_only_its_own():
    first = key_of("8e03978e-40d5-43e8-bc93-6894a57f9324")
    assert first is not None and len(first) == 32 and first == key_of("8e03978e-40d5-43e8-bc93-6894a57f9324")
    assert key_of("8e03978e-40d5-43e8-bc93-6894a57f9325") != first
    # Hashed: a client's text never becomes part of a store key as it is.
    assert "8e03978e" not in first


def test_no_key_an_empty_one_or_an_overlong_one_is_no_record():
    assert key_of(None) is None
    assert key_of("") is None
    assert key_of("k" * 255) is not None
    assert key_of("k" * 256) is None
