"""leases.py: how long a write holds its resource, and the late hold."""

from __future__ import annotations

import pytest

from etagproxy.config import parse_config
from etagproxy.leases import LATE_HOLD_S, lease_ms

UPSTREAM = "upstream: http://127.0.0.1:1\n"


@pytest.mark.parametrize("upstream, store", [("500ms", "200ms"), ("5s", "200ms"), ("30s", "1s")])
def test_the_lease_outlives_the_upstream_deadline_by_the_store_round_trips(upstream: str, store: str):
    config = parse_config(UPSTREAM + f"timeouts: {{upstream: {upstream}, store: {store}}}\n")
    t = config.timeouts
    lease = lease_ms(config) / 1000
    # BEGIN's answer and END's request both fit, with a margin: the lease
    # never runs out on a write whose API answered within its deadline.
    assert lease > t.upstream + 2 * t.store
    # The late hold of a timed-out write ends inside that margin.
    assert t.upstream + LATE_HOLD_S < lease - 2 * t.store


def test_min_replicas_lengthens_the_lease_by_the_wait_for_replicas():
    base = "timeouts: {upstream: 5s, store: 200ms}\n"
    plain = parse_config(UPSTREAM + base)
    replicated = parse_config(
        UPSTREAM + base + "store: {url: 'redis://127.0.0.1:1/0', min_replicas: 1, min_replicas_timeout: 3s}\n"
    )
    assert lease_ms(replicated) == lease_ms(plain) + 3000
