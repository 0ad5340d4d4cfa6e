"""A TCP relay on loopback whose network can be made slow or partitioned.

    relay = TcpRelay(redis.port)          # listens on 127.0.0.1:<relay.port>
    await relay.start()
    relay.delay(up=0.3, down=0.3)         # +300 ms each way
    relay.blackhole()                     # both ways; blackhole(down=False): client->server only
    relay.heal()                          # no delay, nothing held
    relay.sever()                         # today's connections go silent for good
    await relay.close()

`up` is client -> server (commands to Redis), `down` server -> client
(replies). Both can change at any time, per direction, for every
connection through the relay at once.

- Latency: a chunk read at time t is written at t + the delay set when it
  was read. Chunks stay in order (TCP does not reorder), so lowering the
  delay does not let later bytes overtake earlier ones.
- Blackhole: bytes read are held, nothing is written on, and no
  connection is closed or reset, so the endpoints see silence, as behind a
  partition that drops packets. On `heal()` the held bytes are delivered:
  TCP retransmits what a partition dropped, so a connection that outlives
  the partition gets every byte, late. (Dropping bytes out of the middle of
  a live TCP stream is not something a network can do; a partition that
  outlasts TCP's retries ends in a reset, which is a different fault.)
- A connection opened during a blackhole is accepted, and its bytes are
  held like the others'.
- `sever()`: the network forgets the connections open now, as a NAT or
  stateful firewall does when it drops its state for them: from then on
  their bytes are dropped both ways, for good, and still nothing is closed
  or reset. Connections opened later flow.

Held bytes are buffered in the relay without bound, which is fine for the
seconds a test holds them. `stats` counts what went through, per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Flow", "TcpRelay"]

HOST = "127.0.0.1"
_CHUNK = 1 << 16


@dataclass
class Flow:
    """One direction's settings and counters."""

    delay_s: float = 0.0
    blocked: bool = False
    relayed: int = 0
    """Bytes written on."""
    held: int = 0
    """Bytes that arrived while the direction was blackholed."""
    dropped: int = 0
    """Bytes of severed connections, dropped."""
    _open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._open.set()

    def block(self, blocked: bool) -> None:
        self.blocked = blocked
        if blocked:
            self._open.clear()
        else:
            self._open.set()


class _Pipe:
    """One direction of one connection: a reader that timestamps chunks and
    a writer that delivers them when due and not blocked."""

    def __init__(self, flow: Flow, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        self.flow = flow
        self.src, self.dst = src, dst
        self.queue: deque[tuple[float, bytes]] = deque()  # b"" is EOF
        self.ready = asyncio.Event()
        self.severed = False

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.src.read(_CHUNK)
            except OSError:
                data = b""
            if self.flow.blocked:
                self.flow.held += len(data)
            self.queue.append((loop.time() + self.flow.delay_s, data))
            self.ready.set()
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            due, data = self.queue[0]
            await self.flow._open.wait()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)  # the delay itself
                continue  # re-check the blackhole after sleeping
            await self.flow._open.wait()
            self.queue.popleft()
            if self.severed:
                self.flow.dropped += len(data)
                continue
            if not data:
                with contextlib.suppress(OSError):
                    if self.dst.can_write_eof():
                        self.dst.write_eof()
                return
            self.dst.write(data)
            self.flow.relayed += len(data)
            await self.dst.drain()


class TcpRelay:
    """Listens on loopback and relays each connection to `target_port`."""

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.up = Flow()
        """client -> server"""
        self.down = Flow()
        """server -> client"""
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[_Pipe] = set()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def delay(self, *, up: float | None = None, down: float | None = None) -> None:
        """Seconds added to each direction (None: leave it as it is)."""
        if up is not None:
            self.up.delay_s = up
        if down is not None:
            self.down.delay_s = down

    def blackhole(self, *, up: bool = True, down: bool = True) -> None:
        """Hold the bytes of the directions named; the others flow."""
        self.up.block(up)
        self.down.block(down)

    def heal(self) -> None:
        """No delay, and every held byte delivered."""
        self.delay(up=0.0, down=0.0)
        self.blackhole(up=False, down=False)

    def sever(self) -> int:
        """Drop every byte of the connections open now, from now on, both
        ways, without closing them; returns how many there were."""
        for pipe in self._pipes:
            pipe.severed = True
        return len(self._pipes) // 2

    @property
    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "up_bytes": self.up.relayed, "down_bytes": self.down.relayed,
            "up_held": self.up.held, "down_held": self.down.held,
            "up_dropped": self.up.dropped, "down_dropped": self.down.dropped,
        }

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(cwriter)
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.transport.abort()
            return
        self._writers.add(swriter)
        pipes = (_Pipe(self.up, creader, swriter), _Pipe(self.down, sreader, cwriter))
        self._pipes.update(pipes)
        tasks = [asyncio.ensure_future(job) for pipe in pipes for job in (pipe.read(), pipe.write())]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._pipes.difference_update(pipes)
            for writer in (cwriter, swriter):
                writer.transport.abort()
                self._writers.discard(writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
