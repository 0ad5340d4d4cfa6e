"""The store's Lua scripts and how they are run on each kind of server.

Each script is `lua/prelude.lua` plus one `lua/*.lua` (each headed by what
its KEYS, ARGV and reply mean), with the script flags that decide what a
full store does. `redis_key` names a resource's keys so that all of them
share one cluster slot. The runners send a script and load it on NOSCRIPT:
`_LeanScript` through the pipelined RespClient (one server), `_ClusterScript`
on a RedisCluster, following its own redirections. No decisions about
versions: those are the scripts' own, and redis.py only encodes their
arguments and decodes their replies.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from importlib import resources
from typing import TYPE_CHECKING, Any

from etagproxy.store.epoch import NO_EPOCH
from etagproxy.store.resp import ReplyError, RespClient

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster


def _lua(name: str) -> str:
    return resources.files("etagproxy.store").joinpath("lua", name).read_text("utf-8")


# Script flags (Redis 7.0+, the first line of a script) decide what a full
# store does at maxmemory under `noeviction`. Without flags Redis checks
# memory only at a script's first write command, and one that starts with a
# command allowed when full (DEL, HDEL, PERSIST, PEXPIRE) may then grow a
# full store without bound; and an END refused halfway would strand a lease.
# - GROWS: refused whole when the store is full (OOM -> StoreError
#   "store-full" -> 503): BEGIN, OBSERVE and PUT_REPLAY add keys.
# - SETTLES: allowed when full: they change keys that exist, in place, and
#   a write in flight must be able to end and an invalidation to land, or
#   a stale tag could validate.
# - READS: writes nothing; runs anywhere.
GROWS = "#!lua\n"
SETTLES = "#!lua flags=allow-oom\n"
READS = "#!lua flags=no-writes,allow-oom\n"
_PRELUDE = _lua("prelude.lua")
OBSERVE = GROWS + _PRELUDE + _lua("observe.lua")
BEGIN = GROWS + _PRELUDE + _lua("begin.lua")
END = SETTLES + _PRELUDE + _lua("end.lua")
INVALIDATE = SETTLES + _PRELUDE + _lua("invalidate.lua")
FINGERPRINT = SETTLES + _PRELUDE + _lua("fingerprint.lua")
CONFIRM = SETTLES + _PRELUDE + _lua("confirm.lua")
PUT_REPLAY = GROWS + _lua("put_replay.lua")
INSPECT = READS + _PRELUDE + _lua("inspect.lua")


def redis_key(prefix: str, key: str) -> str:
    """The Redis key of resource `key`: the key, escaped, as the hash tag."""
    tag = key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    # "%00" is no escape's output, so the empty key cannot collide; an empty
    # tag would make Redis hash the whole name and split the resource's keys.
    return f"{prefix}{{{tag or '%00'}}}"


class _LeanScript:
    """A script run through the pipelined RespClient, shaped like redis-py's
    AsyncScript (`await script(keys, args)`, `.sha`, `.script`)."""

    def __init__(self, client: RespClient, script: str, *, epoch: bool = True) -> None:
        self._client = client
        self._epoch = epoch
        """Send the connection's epoch pair; False: NO_EPOCH, the script reads INFO."""
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()

    def __call__(self, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        # The client's coroutine itself, not one awaiting it: a layer less.
        # The epoch pair is the connection's own (store/epoch.py, read by RespClient on connect).
        if self._epoch:
            return self._client.evalsha(self.script, keys, args, epoch=True)
        return self._client.evalsha(self.script, keys, [*args, *NO_EPOCH])

    async def many(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """The script once per call, all in one write; loaded on NOSCRIPT.
        Everything within one deadline."""
        client = self._client
        until = client.deadline()
        tail = () if self._epoch else NO_EPOCH
        commands = [("EVALSHA", self.sha, len(keys), *keys, *args, *tail) for keys, args in calls]
        try:
            return (await client.pipeline(commands, until, epoch=self._epoch))[0]
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await client.execute("SCRIPT", "LOAD", self.script, until=until)
        return (await client.pipeline(commands, until, epoch=self._epoch))[0]


class _PlainScript:
    """redis-py's script on a plain client (Sentinel's master), shaped as the
    others: with no connection-read epoch, each call passes NO_EPOCH."""

    def __init__(self, client: Any, script: str) -> None:
        self._inner = client.register_script(script)
        self.script = script
        self.sha = self._inner.sha

    def __call__(self, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._inner(keys, [*args, *NO_EPOCH])


class _ClusterScript:
    """A script on a RedisCluster, shaped like redis-py's AsyncScript.

    redis-py (8.2, asyncio cluster) answers an ASK (a key already moved out
    of a migrating slot) by sending ASKING on one pooled connection of the
    importing node and the command on another: without its ASKING the
    command is answered MOVED back to the old owner, and a busy client
    bounces between the two until its redirections run out ("TTL
    exhausted"), for as long as the slot migrates. Here the script follows
    its own redirections: MOVED patches the slot map and goes to the new
    owner, ASK sends ASKING and the script in one pipeline on one connection,
    TRYAGAIN (a multi-key call split by a migration) goes round again,
    NOSCRIPT loads the script on that node. A node down, the cluster down or
    a slot uncovered go to redis-py's own path, which refreshes the
    topology. All of it within the caller's deadline (`_guard`)."""

    _HOPS = 16
    """Redirections before giving up, as redis-py (RedisClusterRequestTTL)."""

    def __init__(self, cluster: RedisCluster, script: str) -> None:
        self._cluster = cluster
        self._inner = cluster.register_script(script)
        self.script = script
        self.sha = self._inner.sha

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import AskError, MovedError, NoScriptError, TryAgainError

        cluster = self._cluster
        args = [*args, *NO_EPOCH]  # one epoch per node: each script reads its own
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        node = cluster.get_node_from_key(keys[0])
        asking = False
        for hop in range(self._HOPS):
            if node is None:
                break
            try:
                if asking:
                    return await self._asking(node, command)
                return await node.execute_command(*command)
            except NoScriptError:
                await node.execute_command("SCRIPT", "LOAD", self.script)
            except MovedError as exc:
                exc.host = exc.host or node.host
                await cluster.nodes_manager.move_slot(exc)
                node, asking = cluster.get_node_from_key(keys[0]), False
            except AskError as exc:
                host, port = cluster.nodes_manager.remap_host_port(exc.host or node.host, exc.port)
                node, asking = cluster.get_node(host, port), True
            except TryAgainError:
                await asyncio.sleep(0.001 * (hop + 1))
                node, asking = cluster.get_node_from_key(keys[0]), False
            except Exception as exc:
                if not self._node_trouble(exc):
                    raise
                break
        return await self._inner(keys, args)

    @staticmethod
    def _node_trouble(exc: Exception) -> bool:
        """Whether redis-py's own path should take over: it refreshes the
        topology on these."""
        from redis.exceptions import ClusterDownError, SlotNotCoveredError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ClusterDownError, SlotNotCoveredError))

    @staticmethod
    async def _asking(node: Any, command: tuple[Any, ...]) -> Any:
        """ASKING and `command` on one connection of `node`; the command's
        reply, or its error raised."""
        from redis.asyncio.cluster import PipelineCommand

        calls = [PipelineCommand(0, "ASKING"), PipelineCommand(1, *command)]
        await node.execute_pipeline(calls)
        for call in calls:
            if isinstance(call.result, Exception):
                raise call.result
        return calls[1].result
