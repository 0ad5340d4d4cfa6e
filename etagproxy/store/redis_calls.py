"""How RedisStore talks to its server: every round trip bounded, every
failure a StoreError, scripts pipelined, and the operations that run no
script (PING, the server's settings, close).

`RedisCalls` is RedisStore's base: it owns the translation of redis-py and
RespClient errors (`_store_error`: store-timeout, store-unreachable,
store-full, store-error) and the deadline of each call; it knows nothing of
versions, leases or keys (redis.py), nor of the scripts' text
(redis_scripts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from etagproxy.store.base import StoreError
from etagproxy.store.epoch import NO_EPOCH
from etagproxy.store.redis_connect import per_node, release, reply_kind
from etagproxy.store.redis_scripts import _LeanScript
from etagproxy.store.resp import ReplyError, RespClient, RespError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.commands.core import AsyncScript

    RedisClient = Redis | RedisCluster


def _as_is(reply: Any) -> Any:
    return reply


class RedisCalls:
    """Set by RedisStore.__init__."""

    _client: RedisClient | None
    _cluster: RedisCluster | None
    _lean: RespClient | None
    _closing: Sequence[Redis]
    _timeout_s: float
    _min_replicas_timeout_ms: int

    @contextlib.asynccontextmanager
    async def _guard(self, op: str, extra_s: float = 0.0) -> AsyncIterator[None]:
        """Bound one redis-py round trip and translate every failure to StoreError."""
        try:
            async with asyncio.timeout(self._timeout_s + extra_s):
                if self._cluster is not None:
                    # redis-py's cluster client can break connections when
                    # its first commands run concurrently (AttributeError on
                    # a closed writer, redis-py 8.1); connecting before any
                    # command goes out avoids it. A no-op once connected.
                    await self._cluster.initialize()
                yield
        except Exception as exc:
            raise self._store_error(op, exc, extra_s) from exc

    async def _call(
        self, op: str, script: Any, keys: list[str], args: list[Any],
        then: Callable[[Any], Any] = _as_is,
    ) -> Any:
        """Run one script and `then` on its reply: through the lean client
        when there is one (it bounds the call by `timeout_s` itself), else
        guarded. A reply of the wrong shape is a StoreError too."""
        if self._lean is None:
            async with self._guard(op):
                return then(await script(keys, args))
        # `_answer` inlined: one coroutine layer less on every script call.
        try:
            return then(await script(keys, args))
        except Exception as exc:
            raise self._store_error(op, exc) from exc

    async def _answer(self, op: str, call: Awaitable[Any], then: Callable[[Any], Any] = _as_is) -> Any:
        """Await a call of the lean client and `then` on its reply,
        translating every failure to StoreError."""
        try:
            return then(await call)
        except Exception as exc:
            raise self._store_error(op, exc) from exc

    def _store_error(self, op: str, exc: Exception, extra_s: float = 0.0) -> StoreError:
        if isinstance(exc, TimeoutError):
            ms = round((self._timeout_s + extra_s) * 1000)
            return StoreError(f"redis {op}: no answer within {ms} ms", "store-timeout")
        if isinstance(exc, RespError):
            return StoreError(f"redis {op}: unreachable: {exc}", "store-unreachable")
        if isinstance(exc, ReplyError):
            return StoreError(f"redis {op}: {exc}", reply_kind(str(exc)))
        if self._client is not None:
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError

            if isinstance(exc, RedisConnectionError):
                return StoreError(f"redis {op}: unreachable: {exc}", "store-unreachable")
            if isinstance(exc, OutOfMemoryError):
                # redis-py strips the "OOM" code from the message.
                return StoreError(f"redis {op}: OOM {exc}", "store-full")
            if isinstance(exc, (RedisError, RedisClusterException)):
                return StoreError(f"redis {op}: {exc}", reply_kind(str(exc)))
        # A client-internal failure (races like the one in `_guard`) or a
        # reply of the wrong shape: the store did not answer usably either
        # way, and callers fail closed on StoreError.
        return StoreError(f"redis {op}: client failure: {exc!r}")

    async def _pipelined(
        self, script: AsyncScript | _LeanScript, calls: list[tuple[list[str], list[Any]]], *, wait_for: int = 0
    ) -> list[Any]:
        """Run `script` once per call in one round trip per node, followed by
        `WAIT wait_for` on the same connection when `wait_for` > 0. Sends
        EVALSHA itself: a pipeline given Script objects asks SCRIPT EXISTS
        first every time."""
        if not wait_for and isinstance(script, _LeanScript):
            return await script.many(calls)
        assert self._client is not None
        from redis.exceptions import NoScriptError

        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                # redis-py's connections read no epoch: the scripts read INFO.
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, *NO_EPOCH)
            if wait_for:
                target: dict[str, Any] = {}
                if self._cluster is not None:
                    # WAIT counts the replicas of the node the script ran on.
                    target["target_nodes"] = self._cluster.get_node_from_key(calls[0][0][0])
                pipe.execute_command("WAIT", wait_for, self._min_replicas_timeout_ms, **target)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                await self._client.script_load(script.script)
                continue
            break
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def ping(self) -> None:
        if self._lean is not None:
            await self._answer("ping", self._lean.execute("PING"))
            return
        async with self._guard("ping"):
            await self._client.ping()  # type: ignore[union-attr]

    async def server_settings(self) -> dict[str, str]:
        """`redis_version` (INFO server) and `maxmemory_policy` (CONFIG GET,
        absent where CONFIG is renamed or refused, as on managed services).
        A cluster answers per node: the first node that says, with an
        `allkeys-*` policy of any node winning."""
        settings: dict[str, str] = {}
        if self._lean is not None:
            info = await self._answer("info", self._lean.execute("INFO", "server"))
            text = info.decode() if isinstance(info, bytes) else str(info)
            line = re.search(r"^redis_version:(\S+)", text, re.M)
            if line:
                settings["redis_version"] = line.group(1)
            try:
                reply = await self._answer("config", self._lean.execute("CONFIG", "GET", "maxmemory-policy"))
            except StoreError as exc:
                if exc.kind in ("store-timeout", "store-unreachable"):
                    raise
                return settings
            values = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
            if len(values) >= 2:
                settings["maxmemory_policy"] = values[1]
            return settings
        async with self._guard("info"):
            info = await self._client.info("server")  # type: ignore[union-attr]
        versions = per_node(info, "redis_version")
        if versions:
            settings["redis_version"] = min(versions, key=release)
        try:
            async with self._guard("config"):
                found = await self._client.config_get("maxmemory-policy")  # type: ignore[union-attr]
        except StoreError as exc:
            if exc.kind in ("store-timeout", "store-unreachable"):
                raise
            return settings
        policies = per_node(found, "maxmemory-policy")
        if policies:
            settings["maxmemory_policy"] = sorted(policies, key=lambda v: not v.startswith("allkeys-"))[0]
        return settings

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        if self._client is not None:
            await self._client.aclose()
        for client in self._closing:
            await client.aclose()
