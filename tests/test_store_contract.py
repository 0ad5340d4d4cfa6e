"""The store contract (tests/store_contract.py) against every store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from etagproxy.store.base import BeginResult, BeginStatus, EndResult, Observation, Version, WriteCondition
from etagproxy.store.memory import MemoryStore
from tests.redis_fixtures import RedisClusterGroup, RedisSentinelGroup, RedisServer
from tests.store_contract import StoreContract


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryStore]:
        store = MemoryStore()
        yield store
        await store.close()


@pytest.mark.redis
class TestRedisStore(StoreContract):
    @pytest.fixture
    async def store(self, redis_server: RedisServer, redis_store: Any) -> Any:
        return await redis_store(redis_server)


@pytest.mark.redis
class TestRedisClusterStore(StoreContract):
    @pytest.fixture
    async def store(self, redis_cluster: RedisClusterGroup, redis_store: Any) -> Any:
        return await redis_store(redis_cluster)


@pytest.mark.redis
class TestRedisSentinelStore(StoreContract):
    @pytest.fixture
    async def store(self, redis_sentinel: RedisSentinelGroup, redis_store: Any) -> Any:
        return await redis_store(redis_sentinel)


def test_store_values_are_immutable() -> None:
    version = Version("tok", 1)
    for value, name in (
        (version, "token"), (WriteCondition(), "if_match"), (Observation(version, False), "pending"),
        (BeginResult(BeginStatus.OK, version), "current"), (EndResult(version), "committed"),
    ):
        with pytest.raises(AttributeError):
            setattr(value, name, None)
