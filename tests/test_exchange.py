"""exchange.py: who is asking, as the upstream's authorisation can tell."""

from __future__ import annotations

from multidict import CIMultiDict

from etagproxy.exchange import credential_hash


def test_credentials_are_told_apart_by_authorization_and_cookie_only():
    alice = credential_hash(CIMultiDict([("Authorization", "Token a"), ("User-Agent", "x")]))
    assert alice == credential_hash(CIMultiDict([("Authorization", "Token a"), ("User-Agent", "y")]))
    assert alice != credential_hash(CIMultiDict([("Authorization", "Token b")]))
    assert alice != credential_hash(CIMultiDict([("Cookie", "Token a")])), "a cookie is not an Authorization"
    anonymous = credential_hash(CIMultiDict())
    assert anonymous != alice and len(anonymous) == 32
    assert "Token" not in alice
