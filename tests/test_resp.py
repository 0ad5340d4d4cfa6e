"""The pipelined RESP client against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable

import pytest

from etagproxy.store.resp import ReplyError, RespClient, RespError, pack

SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"


def test_pack_is_resp_arrays_of_bulk_strings():
    assert pack(["SET", "k", 12, b"\x00v"]) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"


async def test_concurrent_commands_share_one_connection_and_get_their_own_replies(redis_server):
    client = RespClient(redis_server.host, redis_server.port)
    try:
        results = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(500)))
        assert results == [f"m{i}".encode() for i in range(500)]
        listed = redis_server.command("CLIENT", "LIST")
        text = listed.decode() if isinstance(listed, bytes) else str(listed)
        assert text.count("id=") == 2, "one pipelined connection, plus the admin's asking"
    finally:
        await client.close()


def _reads_processed(redis_server) -> int:
    with redis_server.admin() as admin:
        return int(admin.info("stats")["total_reads_processed"])


async def test_commands_of_one_loop_turn_reach_the_server_in_one_write(redis_server):
    client = RespClient(redis_server.host, redis_server.port)
    try:
        await client.execute("PING")  # connected
        first = _reads_processed(redis_server)
        before = _reads_processed(redis_server)
        asking = before - first  # what the admin connection's own asking costs
        results = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(200)))
        assert results == [f"m{i}".encode() for i in range(200)]
        # 200 commands, one write: the server reads them in a handful of
        # reads (a large write may arrive in pieces), not 200.
        assert _reads_processed(redis_server) - before - asking <= 5
    finally:
        await client.close()


async def test_error_replies_raise_and_do_not_desync(redis_server):
    client = RespClient(redis_server.host, redis_server.port)
    try:
        await client.execute("SET", "s", "x")
        bad, good = await asyncio.gather(client.execute("INCR", "s"), client.execute("GET", "s"), return_exceptions=True)
        assert isinstance(bad, ReplyError) and good == b"x"
    finally:
        await client.close()


async def test_evalsha_loads_the_script_after_a_flush(redis_server):
    client = RespClient(redis_server.host, redis_server.port)
    try:
        assert await client.evalsha(SCRIPT, ["k"], ["a"]) == [b"k", b"a", 1]
        redis_server.command("SCRIPT", "FLUSH")
        assert await client.evalsha(SCRIPT, ["k"], ["b"]) == [b"k", b"b", 2]
    finally:
        await client.close()


async def test_a_restart_fails_the_call_in_flight_then_reconnects(redis_server):
    client = RespClient(redis_server.host, redis_server.port, connect_timeout=0.5)
    try:
        assert await client.execute("PING") == b"PONG"
        redis_server.kill()
        with pytest.raises(RespError):
            await client.execute("PING")
        with pytest.raises(RespError):
            await client.execute("PING")
        redis_server.start()
        assert await client.execute("PING") == b"PONG"
    finally:
        redis_server.ensure_running()
        await client.close()


async def test_auth_and_db_are_set_up_on_connect(redis_server):
    redis_server.command("CONFIG", "SET", "requirepass", "s3cret")
    try:
        client = RespClient(redis_server.host, redis_server.port, password="s3cret", db=3)
        try:
            await client.execute("SET", "in-db-3", "1")
            assert await client.execute("EXISTS", "in-db-3") == 1
        finally:
            await client.close()
        wrong = RespClient(redis_server.host, redis_server.port, password="nope")
        with pytest.raises(RespError):
            await wrong.execute("PING")
        await wrong.close()
    finally:
        import redis

        with redis.Redis(redis_server.host, redis_server.port, password="s3cret") as admin:
            admin.execute_command("CONFIG", "SET", "requirepass", "")
            admin.flushall()


async def test_a_late_reply_times_out_its_command_and_is_dropped_without_desync(redis_server):
    client = RespClient(redis_server.host, redis_server.port, timeout=0.2)
    try:
        assert await client.execute("PING") == b"PONG"  # connected
        redis_server.command("CLIENT", "PAUSE", "500", "ALL")  # the server holds every reply
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = asyncio.ensure_future(client.execute("ECHO", "first"))
        behind = asyncio.ensure_future(client.execute("ECHO", "behind"))
        for call in (first, behind):
            with pytest.raises(TimeoutError):
                await call
        assert 0.15 < loop.time() - start < 0.45
        await asyncio.to_thread(redis_server.command, "PING")  # returns when the pause ends
        # The late replies are read and dropped: the next command gets its own.
        assert await client.execute("ECHO", "after") == b"after"
        assert await client.execute("ECHO", "again") == b"again"
    finally:
        await client.close()


async def test_a_kept_connection_found_dead_is_replaced_for_the_next_command(redis_server):
    client = RespClient(redis_server.host, redis_server.port, connect_timeout=0.5)
    try:
        assert await client.execute("PING") == b"PONG"
        redis_server.restart()
        # The kept connection died with the old server; the command goes out
        # again on a new one instead of failing the request that sent it.
        assert await client.execute("ECHO", "again") == b"again"
        assert (await client.pipeline([("ECHO", "a"), ("ECHO", "b")]))[0] == [b"a", b"b"]
    finally:
        await client.close()


async def test_a_command_that_cannot_be_packed_is_not_queued(redis_server):
    client = RespClient(redis_server.host, redis_server.port, timeout=2.0)
    try:
        await client.execute("SET", "a", "A")
        await client.execute("SET", "b", "B")
        with pytest.raises(TypeError):
            await client.execute("SET", "x", None)  # type: ignore[arg-type]
        # No reply is owed to it, so the next replies go to their own commands.
        assert await asyncio.gather(client.execute("GET", "a"), client.execute("GET", "b")) == [b"A", b"B"]
    finally:
        await client.close()


async def test_one_deadline_covers_the_second_attempt_and_its_reconnect():
    """A kept connection dies; the new one is accepted but never answered.
    The call fails within its own timeout, not the (longer) connect timeout."""
    connections = 0
    handled: list[asyncio.Event] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        done = asyncio.Event()
        handled.append(done)
        if connections == 1:
            await reader.readuntil(b"server\r\n")  # INFO server at connect
            writer.write(b"$19\r\nrun_id:0123456789ab\r\n")
            await reader.readuntil(b"PING\r\n")
            writer.write(b"+PONG\r\n")
            await writer.drain()
            await reader.read(1)  # the next command arrives on a connection about to die
            writer.transport.abort()
        else:
            await reader.read()  # accepted, never answered, until the client leaves
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient("127.0.0.1", port, connect_timeout=5.0, timeout=0.3)
    try:
        assert await client.execute("PING") == b"PONG"
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await client.execute("PING")
        assert loop.time() - start < 1.0
        assert connections == 2
    finally:
        await client.close()
        for done in handled:  # both ends of every connection closed before the loop goes
            await done.wait()
        server.close()
        await server.wait_closed()


async def _fake_server(answer: Callable[[int, int], float | None]) -> tuple[asyncio.Server, list[asyncio.StreamWriter]]:
    """A server that answers INFO at connect, then each PING (the n-th on
    connection c) with +PONG `answer(c, n)` seconds after it arrived, in
    order as Redis does, or never again (None)."""
    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        c = len(connections)
        await reader.readuntil(b"server\r\n")
        writer.write(b"$19\r\nrun_id:0123456789ab\r\n")
        loop = asyncio.get_running_loop()
        n, last = 0, 0.0
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"PING\r\n")
                n += 1
                delay = answer(c, n)
                if delay is None:
                    last = math.inf
                if last < math.inf:
                    last = max(last, loop.time() + delay)
                    loop.call_at(last, writer.write, b"+PONG\r\n")

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, connections


async def test_a_connection_gone_silent_is_abandoned_and_the_next_command_reconnects():
    """Nothing comes back on the first connection after its first reply, and
    nothing closes it (a network that dropped it silently): the command
    times out, and the next one goes out on a new connection."""
    server, connections = await _fake_server(lambda c, n: 0 if c > 1 or n == 1 else None)
    client = RespClient("127.0.0.1", server.sockets[0].getsockname()[1], timeout=0.2)
    try:
        assert await client.execute("PING") == b"PONG"
        with pytest.raises(TimeoutError):
            await client.execute("PING")
        assert await client.execute("PING") == b"PONG"
        assert len(connections) == 2
    finally:
        await client.close()
        server.close()
        for writer in connections:
            writer.transport.abort()


async def test_a_slow_server_still_answering_keeps_its_connection():
    """Two commands go out together; the first is answered in time, the
    second late: it times out, but the connection was heard from while it
    waited and is kept (reconnecting would not make a slow server faster).
    The third gets its own reply, after the second's late one."""
    server, connections = await _fake_server(lambda c, n: {2: 0.2, 3: 0.45}.get(n, 0))
    client = RespClient("127.0.0.1", server.sockets[0].getsockname()[1], timeout=0.3)
    try:
        assert await client.execute("PING") == b"PONG"  # connected
        first = asyncio.ensure_future(client.execute("PING"))
        second = asyncio.ensure_future(client.execute("PING"))
        assert await first == b"PONG"
        with pytest.raises(TimeoutError):
            await second
        assert await client.execute("PING") == b"PONG"
        assert len(connections) == 1
    finally:
        await client.close()
        server.close()
        for writer in connections:
            writer.transport.abort()
