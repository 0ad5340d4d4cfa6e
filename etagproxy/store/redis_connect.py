"""Connecting to Redis with redis-py, and reading what a server answers.

`redis_py_client` builds the client for a Sentinel, a Cluster, TLS or
`min_replicas` (the one server case uses the lean RespClient, resp.py).
`reply_kind` classifies an error reply for `StoreError.kind`; `per_node` and
`release` read INFO and CONFIG replies. Nothing here runs a script.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from etagproxy.config import StoreConfig

    RedisClient = Redis | RedisCluster


def per_node(reply: Any, name: str) -> list[str]:
    """`name` from a redis-py INFO or CONFIG GET reply: one mapping, or (a
    cluster) a mapping of node to mapping."""
    if not isinstance(reply, dict):
        return []
    if name in reply:
        return [str(reply[name])]
    return [str(v[name]) for v in reply.values() if isinstance(v, dict) and name in v]


def release(text: str) -> tuple[int, ...]:
    """"7.0.15" -> (7, 0, 15); parts that are not numbers count as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


def reply_kind(message: str) -> str:
    """StoreError.kind of an error reply."""
    return "store-full" if message.startswith("OOM") or "OOM command not allowed" in message else "store-error"


def redis_py_client(cfg: StoreConfig, timeout_s: float) -> tuple[RedisClient, list[Redis]]:
    """A redis-py client for `cfg` and the Sentinel clients to close with it."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "username": cfg.username,
        "password": cfg.password,
        "socket_connect_timeout": timeout_s,
        # One immediate retry on a fresh connection hides pooled
        # connections that died with a restarted server. Repeating a
        # script whose reply was lost is harmless: BEGIN recognises its
        # own call, a repeated END reports the lease lost (no ETag), the
        # others at worst mint once more.
        "retry": Retry(NoBackoff(), 1),
    }
    if cfg.tls:
        common["ssl"] = True
    if cfg.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in cfg.hosts]
        return RedisCluster(startup_nodes=nodes, **common), []
    if cfg.kind == "sentinel":
        if not cfg.service_name:
            raise ValueError("a sentinel store needs the master's service name")
        sentinel_kwargs = {"socket_connect_timeout": timeout_s, "ssl": cfg.tls}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # unannotated in redis-py
            list(cfg.hosts), sentinel_kwargs=sentinel_kwargs, db=cfg.db, **common
        )
        return sentinel.master_for(cfg.service_name), list(sentinel.sentinels)
    host, port = cfg.hosts[0]
    return Redis(host=host, port=port, db=cfg.db, **common), []
