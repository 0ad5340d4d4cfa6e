"""The Redis version store: `redis://`, `rediss://`, `redis+sentinel://`,
`redis+cluster://`.

Every operation on a resource is one Lua script (`lua/*.lua`, each headed by
what its KEYS, ARGV and reply mean; loaded and run by redis_scripts.py) on
the one cluster slot that holds the resource, so replicas of the proxy
sharing one Redis see one history. This module encodes each operation's
arguments, decodes its reply and turns every failure into StoreError;
redis_connect.py builds the redis-py clients.

Keys: `<prefix>{<key>}` is the resource (a hash: committed version, or
pending write over it, see `lua/prelude.lua`); `<prefix>{<key>}:r:<reader>`
and `<prefix>{<key>}:i:<idem>` are its reader and replay records. The resource
key goes inside the hash tag with `%`, `{` and `}` percent-escaped, so no key
can end the tag early or leave it empty, and all three keys share a slot.

Time and epoch are the server's: each script reads `TIME`, and the `run_id`
of `INFO server` (read by the lean client once per connection and passed as
the scripts' last two ARGV, store/epoch.py): proxies with skewed clocks agree
on deadlines, and a version restored from a snapshot or a lagging replica carries another
run_id, so it is treated as absent and re-minted (DESIGN §2, "Redis epoch").

Errors::

    StoreError   any redis-py or RespClient error, or a call longer than `timeout_s`,
                 translated in `RedisStore._store_error`, cause chained
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from etagproxy.store.base import (
    BeginResult,
    BeginStatus,
    Cause,
    EndResult,
    KeyInfo,
    Observation,
    Outcome,
    Replay,
    StoreError,
    Version,
    WriteCondition,
    new_token,
)
from etagproxy.store.redis_calls import RedisCalls
from etagproxy.store.redis_connect import redis_py_client
from etagproxy.store.redis_scripts import (
    BEGIN,
    CONFIRM,
    END,
    FINGERPRINT,
    INSPECT,
    INVALIDATE,
    OBSERVE,
    PUT_REPLAY,
    _ClusterScript,
    _LeanScript,
    _PlainScript,
    redis_key,
)
from etagproxy.store.resp import RespClient

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from etagproxy.config import StoreConfig

    RedisClient = Redis | RedisCluster

WEEK_MS = 7 * 86_400_000


# Waiting behind another write: poll BEGIN with exponential backoff. END in
# this process wakes local waiters at once; waiters in other processes notice
# within _POLL_CAP_S (pub/sub would save those milliseconds on a path that is
# already contended, for a subscriber connection per shard to keep alive).
_POLL_FIRST_S = 0.001
_POLL_CAP_S = 0.020


def _observation(reply: list[Any]) -> Observation:
    """OBSERVE's reply (lua/observe.lua)."""
    t, m, x, e, pending, cause, seen = reply
    return Observation(_version(t, m, x, e), pending == 1, Cause(cause.decode()) if cause else None, seen == 1)


def _version(token: bytes, minted: bytes | int, exists: bytes | int, epoch: bytes) -> Version:
    return Version(token.decode(), int(minted), int(exists) == 1, epoch.decode())


def _condition_args(cond: WriteCondition) -> tuple[list[str | int], list[str]]:
    """BEGIN's ARGV[6..9] and the token lists for `cond` (layout in lua/begin.lua)."""

    def kind(tokens: tuple[str, ...] | None) -> str:
        if tokens is None:
            return ""
        return "*" if tokens == ("*",) else "L"

    def listed(tokens: tuple[str, ...] | None) -> tuple[str, ...]:
        return () if tokens is None or tokens == ("*",) else tokens

    im, inm = listed(cond.if_match), listed(cond.if_none_match)
    # Lua reads If-Unmodified-Since as a double: exact below 2**53, and a
    # value beyond that is nowhere near a mint time, so rounding cannot flip
    # the comparison.
    ius = "" if cond.if_unmodified_since is None else cond.if_unmodified_since
    return [kind(cond.if_match), ius, kind(cond.if_none_match), len(im)], [*im, *inm]


class _Wakeups:
    """Wakes BEGIN waiters of this process when END releases their key here."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, list[int]]] = {}

    async def wait(self, key: str, timeout_s: float) -> None:
        event, waiters = self._events.setdefault(key, (asyncio.Event(), [0]))
        waiters[0] += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await event.wait()
        finally:
            waiters[0] -= 1
            if not waiters[0] and self._events.get(key, (None,))[0] is event:
                del self._events[key]

    def notify(self, key: str) -> None:
        item = self._events.pop(key, None)
        if item is not None:
            item[0].set()


class RedisStore(RedisCalls):
    """A `VersionStore` in Redis, shared by every proxy process that uses it.

    The store owns its clients and closes them in `close()`. Every call is
    bounded by `timeout_s` (BEGIN by that per round trip, plus `wait_ms` in
    total). With `min_replicas`, a BEGIN is only granted once that many
    replicas acknowledged the lease (`WAIT`), so a failover cannot forget it.

    Clients: `lean` (the pipelined RespClient) serves a single server on its
    own; redis-py (`client`) is there for Cluster and Sentinel discovery and
    for BEGIN + WAIT, which must not hold up the shared connection. redis-py
    is imported only when a client of it is made: a proxy on one server
    does without its ~15 MB.
    """

    def __init__(
        self,
        client: RedisClient | None,
        *,
        prefix: str = "etagproxy:",
        token_ttl_ms: int = WEEK_MS,
        timeout_s: float = 0.2,
        min_replicas: int = 0,
        min_replicas_timeout_ms: int = 100,
        closing: Sequence[Redis] = (),
        lean: RespClient | None = None,
        connection_epoch: bool = True,
    ) -> None:
        """`connection_epoch`: on the lean client, the scripts and the read
        path take the epoch the connection read when it opened (store.epoch
        "connection"); False makes every call learn it on the server ("script")."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"store prefix {prefix!r} must not contain '{{' or '}}' (hash tags)")
        if client is None and (lean is None or min_replicas):
            raise ValueError("a store without a redis-py client needs the lean client and no min_replicas")
        self.epoch = ""
        """run_id of the server that answered the last OBSERVE or BEGIN."""
        self._restarted = ""
        """An epoch this process saw replace an older one: BEGIN is fenced
        there until one lease has passed since that server started."""
        self._client = client
        self._cluster: RedisCluster | None = None
        if client is not None:
            from redis.asyncio.cluster import RedisCluster

            self._cluster = client if isinstance(client, RedisCluster) else None
        self._closing = tuple(closing)
        self._prefix = prefix
        self._ttl_ms = token_ttl_ms
        self._timeout_s = timeout_s
        self._min_replicas = min_replicas
        self._min_replicas_timeout_ms = min_replicas_timeout_ms
        self._wakeups = _Wakeups()
        self._lean = lean
        self._read_lean = lean if connection_epoch else None
        """The lean client when reads may skip the script (they trust its epoch)."""
        # Every script goes through the one pipelined connection when there
        # is one (~11 us of client CPU per call instead of ~50 with
        # redis-py, bench/clients.py); BEGIN + WAIT stays on redis-py.
        register: Any = (
            (lambda script: _LeanScript(lean, script, epoch=connection_epoch)) if lean is not None
            else (lambda script: _ClusterScript(self._cluster, script)) if self._cluster is not None
            else (lambda script: _PlainScript(client, script))
        )
        self._observe = register(OBSERVE)
        self._begin = register(BEGIN)
        self._end = register(END)
        self._invalidate = register(INVALIDATE)
        self._fingerprint = register(FINGERPRINT)
        self._confirm = register(CONFIRM)
        self._put_replay = register(PUT_REPLAY)
        self._inspect = register(INSPECT)

    @classmethod
    def from_config(cls, cfg: StoreConfig, *, timeout_s: float) -> RedisStore:
        """Connect as `cfg` says (kind: redis | sentinel | cluster)."""
        lean = None
        if cfg.kind not in ("cluster", "sentinel"):
            host, port = cfg.hosts[0]
            lean = RespClient(
                host, port, db=cfg.db, username=cfg.username, password=cfg.password,
                tls=cfg.tls, connect_timeout=timeout_s, timeout=timeout_s,
            )
        client: RedisClient | None = None
        closing: list[Redis] = []
        if lean is None or cfg.min_replicas:
            client, closing = redis_py_client(cfg, timeout_s)
        return cls(
            client,
            prefix=cfg.prefix,
            token_ttl_ms=int(cfg.token_ttl * 1000),
            timeout_s=timeout_s,
            min_replicas=cfg.min_replicas,
            min_replicas_timeout_ms=int(cfg.min_replicas_timeout * 1000),
            closing=closing,
            lean=lean,
            connection_epoch=cfg.epoch_source == "connection",
        )

    def _saw_epoch(self, run_id: str) -> None:
        if self.epoch and run_id != self.epoch and self._cluster is None:
            self._restarted = run_id
        self.epoch = run_id

    def _rkey(self, key: str) -> str:
        return redis_key(self._prefix, key)

    # -- VersionStore --------------------------------------------------------

    def observe(self, key: str, *, reader: str | None = None) -> Awaitable[Observation]:
        # The coroutine that answers, returned rather than awaited here: one
        # coroutine layer less on every read.
        rkey = self._rkey(key)
        if self._read_lean is not None:
            return self._observe_committed(rkey, reader)
        return self._observe_script(rkey, reader)

    async def _observe_script(self, rkey: str, reader: str | None) -> Observation:
        """OBSERVE, the script (lua/observe.lua)."""
        keys = [rkey] if reader is None else [rkey, f"{rkey}:r:{reader}"]
        obs: Observation = await self._call(
            "observe", self._observe, keys, [new_token(), self._ttl_ms], _observation
        )
        self._saw_epoch(obs.version.epoch)
        return obs

    async def _observe_committed(self, rkey: str, reader: str | None) -> Observation:
        """OBSERVE without the script, for the usual case: a version of this
        epoch, no write in flight. Then the script would only read, and
        HMGET reads the same fields atomically (with the reader record in
        the same round trip), at a fraction of the server's time. The epoch
        is the run_id of the server this connection has talked to since it
        opened. Anything else (no version, a write in flight, an older
        epoch): the script decides."""
        commands: list[tuple[str, ...]] = [("HMGET", rkey, "s", "e", "t", "m", "x")]
        if reader is not None:
            commands.append(("EXISTS", f"{rkey}:r:{reader}"))
        assert self._lean is not None
        # The lean client awaited here rather than through `_answer`: one
        # coroutine layer less on every read.
        try:
            replies, run_id = await self._lean.pipeline(commands)
            # HMGET's fields; one the hash lacks is None, but only a committed
            # version's are used, and lua/prelude.lua writes those together.
            state: bytes
            epoch: bytes
            token: bytes
            minted: bytes
            exists: bytes
            state, epoch, token, minted, exists = replies[0]  # type: ignore[misc]
            committed = state == b"c" and run_id and epoch == run_id
            obs = None if not committed else Observation(
                _version(token, minted, exists, epoch), False, None, reader is not None and replies[1] == 1
            )
        except Exception as exc:
            raise self._store_error("observe", exc) from exc
        if obs is None:
            return await self._observe_script(rkey, reader)
        self._saw_epoch(obs.version.epoch)
        return obs

    async def confirm(self, key: str, token: str) -> None:
        """A 2xx read showed that the resource at `token` exists."""
        await self._call("confirm", self._confirm, [self._rkey(key)], [token])

    async def record_reader(self, key: str, reader: str, ttl_ms: int) -> None:
        # A plain SET: the record says who was served, which stays true
        # whatever happens to the version, so it needs no epoch.
        if ttl_ms <= 0:
            return
        name = f"{self._rkey(key)}:r:{reader}"
        if self._lean is not None:
            await self._answer("record_reader", self._lean.execute("SET", name, b"1", "PX", ttl_ms))
            return
        async with self._guard("record_reader"):
            await self._client.set(name, b"1", px=ttl_ms)  # type: ignore[union-attr]

    async def begin(self, key: str, cond: WriteCondition, owner: str, lease_ms: int, wait_ms: int) -> BeginResult:
        rkey = self._rkey(key)
        call_id = new_token()
        head, tokens = _condition_args(cond)
        start = time.monotonic()
        give_up = start + wait_ms / 1000
        delay = _POLL_FIRST_S
        while True:
            # A cluster has one epoch per shard and no single one to compare
            # with: the restart fence is for single servers and Sentinel.
            known = "" if self._cluster is not None else self.epoch
            args = [owner, lease_ms, new_token(), self._ttl_ms, call_id, *head, known, self._restarted, *tokens]
            reply, acked = await self._begin_once(rkey, args)
            status, busy_ms = reply[0].decode(), int(reply[1])
            current = _version(*reply[2:6]) if reply[2] else None
            self._saw_epoch(reply[6].decode())
            left = give_up - time.monotonic()
            if status != "busy" or left <= 0:
                break
            await self._wakeups.wait(rkey, min(delay, left, busy_ms / 1000 + _POLL_FIRST_S))
            delay = min(delay * 2, _POLL_CAP_S)
        waited_ms = int((time.monotonic() - start) * 1000)
        if status == "busy":
            return BeginResult(BeginStatus.BUSY, current, waited_ms)
        if status == "failed":
            return BeginResult(BeginStatus.PRECONDITION_FAILED, current, waited_ms)
        if acked is not None and acked < self._min_replicas:
            # The lease may not survive a failover: give it back, fail closed.
            await self.end(key, owner, Outcome.REJECTED)
            raise StoreError(
                f"redis begin: {acked} of {self._min_replicas} replicas acknowledged"
                f" within {self._min_replicas_timeout_ms} ms"
            )
        return BeginResult(BeginStatus.OK, current, waited_ms)

    async def _begin_once(self, rkey: str, args: list[Any]) -> tuple[list[Any], int | None]:
        """One BEGIN attempt; with min_replicas, also the WAIT acknowledgement
        count (sent after every attempt, read only after 'ok')."""
        if not self._min_replicas:
            return await self._call("begin", self._begin, [rkey], args), None
        async with self._guard("begin", self._min_replicas_timeout_ms / 1000):
            reply, acked = await self._pipelined(self._begin, [([rkey], args)], wait_for=self._min_replicas)
        return reply, int(acked)

    async def end(self, key: str, owner: str, outcome: Outcome, *, exists: bool = True) -> EndResult:
        rkey = self._rkey(key)
        args = [owner, outcome.value, int(exists), new_token(), self._ttl_ms]
        try:
            reply = await self._call("end", self._end, [rkey], args)
        finally:
            self._wakeups.notify(rkey)
        if not reply:
            return EndResult(None, lease_lost=True)
        return EndResult(_version(*reply))

    async def put_replay(self, key: str, idem: str, record: Replay, ttl_ms: int) -> None:
        headers = json.dumps([list(pair) for pair in record.headers])
        args: list[bytes | str | int] = [ttl_ms, record.fingerprint, record.status, headers, record.body]
        await self._call("put_replay", self._put_replay, [f"{self._rkey(key)}:i:{idem}"], args)

    async def invalidate(self, keys: list[str]) -> None:
        if not keys:
            return
        calls = [([self._rkey(key)], [new_token(), self._ttl_ms]) for key in keys]
        if self._lean is not None:
            await self._answer("invalidate", self._pipelined(self._invalidate, calls))
            return
        async with self._guard("invalidate"):
            if self._cluster is not None:
                # One call per key through `_ClusterScript`, which follows
                # ASK on one connection; a redis-py pipeline would not (its
                # ASKING and the script go out on different connections).
                await asyncio.gather(*(self._invalidate(keys, args) for keys, args in calls))
            else:
                await self._pipelined(self._invalidate, calls)

    async def fingerprint(self, key: str, token: str, digest: str) -> Version | None:
        reply = await self._call("fingerprint", self._fingerprint, [self._rkey(key)], [token, digest, new_token(), self._ttl_ms])
        return _version(*reply) if reply else None

    async def get_replay(self, key: str, idem: str) -> Replay | None:
        name = f"{self._rkey(key)}:i:{idem}"
        fields: dict[bytes, bytes]
        if self._lean is not None:
            flat: list[bytes] = await self._answer("get_replay", self._lean.execute("HGETALL", name))
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
        else:
            async with self._guard("get_replay"):
                fields = await self._client.hgetall(name)  # type: ignore[union-attr,assignment]
        if not fields:
            return None
        headers = tuple((name, value) for name, value in json.loads(fields[b"h"]))
        return Replay(fields[b"f"].decode(), int(fields[b"s"]), headers, fields[b"b"])

    async def inspect(self, key: str) -> KeyInfo:
        rkey = self._rkey(key)
        now, run_id, pttl, *flat = await self._call("inspect", self._inspect, [rkey], [])
        h = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        extra = {"redis_key": rkey, "run_id": run_id.decode()}
        if "d" in h:
            extra["digest"] = h["d"].decode()
        version = None
        if "t" in h:
            if h["e"] == run_id:
                version = _version(h["t"], h["m"], h["x"], h["e"])
            else:
                extra["stale_epoch"] = h["e"].decode()
        if h.get("s") == b"p":
            deadline = int(h["l"])
            if deadline <= int(now):
                extra["lease"] = "expired"
            if h.get("i") == b"1":
                extra["invalidated"] = "yes"
            return KeyInfo(key, "pending", version, h["o"].decode(), deadline, extra)
        if version is None:
            return KeyInfo(key, "absent", None, extra=extra)
        extra["ttl_ms"] = str(pttl)
        return KeyInfo(key, "committed", version, extra=extra)
