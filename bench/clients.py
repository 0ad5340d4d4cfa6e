"""Micro-benchmark of the client libraries on the proxy's two hot paths.

The proxy is CPU-bound: on a forwarded request most of its time goes into
Python code, and a good part of that is the client talking to the upstream
and to Redis. This measures, in isolation, what each candidate client costs:

- upstream HTTP (GET of the same 20 KB document from the nginx origin):
  aiohttp ClientSession tuned as the proxy uses it (no cookie jar, no
  decompression, no auto headers, keep-alive pool); a minimal keep-alive
  client on an asyncio Protocol with the httptools (llhttp) parser; aiosonic.
- store (Redis): redis-py asyncio with the hiredis parser, and coredis, on
  GET of a small value and EVALSHA of a small script shaped like the proxy's
  (read a key, set it when absent); and, for scale, the floor: one
  connection on a bare asyncio Protocol with hiredis's reader, commands
  pipelined in order with a future each.

Each (client, operation, concurrency) runs in a fresh interpreter, on
uvloop when installed, for a bounded time and count. Reported: wall
microseconds per operation at concurrency 1 (latency), operations per second
at concurrency 50 (throughput), and the client process's CPU microseconds
per operation -- the number that matters most, since every CPU microsecond
the client spends is one the proxy cannot spend on another request.

    python bench/clients.py [--seconds 2] [--repeat 3] [--publish]   # about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

KEYS = 100
SCRIPT = """
-- KEYS[1]: the resource key; ARGV[1]: a token to store when absent;
-- ARGV[2]: its lifetime in ms. Returns the stored value.
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

HTTP_CLIENTS = ("aiohttp", "httptools", "aiosonic")
STORE_CLIENTS = ("redis-py", "coredis", "hiredis-protocol")
STORE_OPS = ("get", "evalsha")


# -- one measurement (runs in a child interpreter) ---------------------------------


async def _drive(
    op: Callable[[int], Awaitable[None]], concurrency: int, seconds: float, max_ops: int
) -> dict[str, Any]:
    for i in range(200):  # warm-up: pools filled, scripts loaded
        await op(i)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal done
        i = n
        # Bounded by time and by count.
        while done < max_ops and time.perf_counter() < deadline:
            await op(i)
            done += 1
            i += concurrency

    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "ops": done,
        "seconds": round(wall, 3),
        "wall_us_per_op": round(wall / done * 1e6 * concurrency, 1) if done else 0.0,
        "ops_per_s": round(done / wall, 1) if wall else 0.0,
        "cpu_us_per_op": round(cpu / done * 1e6, 1) if done else 0.0,
    }


class _HttptoolsConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.chunks: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed the connection"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), b"".join(self.chunks)))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.chunks, self.headers = [], []
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


class _HttptoolsPool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_HttptoolsConnection] = []

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            transport, conn = await asyncio.get_running_loop().create_connection(
                _HttptoolsConnection, self.host, self.port
            )
            # uvloop may call connection_made only on the next loop turn.
            conn.transport = transport
        try:
            return await conn.request(raw)
        finally:
            if conn.reusable:
                self.idle.append(conn)
            elif conn.transport is not None:
                conn.transport.close()


async def _http(client: str, port: int, concurrency: int, seconds: float, max_ops: int, size: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    if client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        from yarl import URL

        urls = [URL(f"{base}/api/items/{k}", encoded=True) for k in range(KEYS)]

        async def op(i: int) -> None:
            async with session.get(urls[i % KEYS]) as resp:
                body = await resp.read()
            assert resp.status == 200 and len(body) == size

        try:
            return await _drive(op, concurrency, seconds, max_ops)
        finally:
            await session.close()
    if client == "httptools":
        pool = _HttptoolsPool("127.0.0.1", port)
        raws = [f"GET /api/items/{k} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode() for k in range(KEYS)]

        async def op(i: int) -> None:
            status, body = await pool.request(raws[i % KEYS])
            assert status == 200 and len(body) == size

        try:
            return await _drive(op, concurrency, seconds, max_ops)
        finally:
            for conn in pool.idle:
                if conn.transport is not None:
                    conn.transport.close()
    if client == "aiosonic":
        import aiosonic
        from aiosonic.pools import PoolConfig

        sonic = aiosonic.HTTPClient(
            connector=aiosonic.TCPConnector(
                pool_configs={":default": PoolConfig(size=max(concurrency, 1), max_conn_requests=None)}
            )
        )
        urls_s = [f"{base}/api/items/{k}" for k in range(KEYS)]

        async def op(i: int) -> None:
            resp = await sonic.get(urls_s[i % KEYS])
            body = await resp.content()
            assert resp.status_code == 200 and len(body) == size

        try:
            return await _drive(op, concurrency, seconds, max_ops)
        finally:
            await sonic.aclose()
    raise SystemExit(f"unknown HTTP client {client!r}")


class _RespConnection(asyncio.Protocol):
    """One Redis connection on a bare asyncio Protocol with hiredis's RESP reader.

    Commands are written as they come and answered in order (RESP is
    ordered per connection), so many callers share one connection, each
    waiting on its own future: pipelining without batching.
    """

    def __init__(self) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[object]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        # Bounded by the replies in the buffer; gets() returns False when none is complete.
        while (reply := self.reader.gets()) is not False:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("redis closed the connection"))

    def call(self, *args: bytes | str | int) -> asyncio.Future[object]:
        assert self.transport is not None
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.transport.write(b"".join(parts))
        return fut


async def _store(
    client: str, operation: str, port: int, concurrency: int, seconds: float, max_ops: int
) -> dict[str, Any]:
    keys = [f"bench:clients:{k}" for k in range(KEYS)]
    if client == "redis-py":
        import redis.asyncio as aioredis
        from redis.utils import HIREDIS_AVAILABLE

        r = aioredis.Redis(host="127.0.0.1", port=port, max_connections=max(concurrency, 1) + 4)
        script = r.register_script(SCRIPT)
        for k in keys:
            await r.set(k, "v" * 40)

        async def op(i: int) -> None:
            if operation == "get":
                await r.get(keys[i % KEYS])
            else:
                await script(keys=[keys[i % KEYS]], args=["t" * 24, 600000])

        try:
            out = await _drive(op, concurrency, seconds, max_ops)
            out["parser"] = "hiredis" if HIREDIS_AVAILABLE else "python"
            return out
        finally:
            await r.aclose()
    if client == "hiredis-protocol":
        import hashlib

        transport, conn = await asyncio.get_running_loop().create_connection(_RespConnection, "127.0.0.1", port)
        conn.transport = transport
        sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
        assert await conn.call("SCRIPT", "LOAD", SCRIPT) == sha.encode()
        for k in keys:
            await conn.call("SET", k, "v" * 40)
        bkeys = [k.encode() for k in keys]

        async def op(i: int) -> None:
            if operation == "get":
                await conn.call(b"GET", bkeys[i % KEYS])
            else:
                await conn.call(b"EVALSHA", sha, b"1", bkeys[i % KEYS], b"t" * 24, b"600000")

        try:
            return await _drive(op, concurrency, seconds, max_ops)
        finally:
            transport.close()
    if client == "coredis":
        import coredis

        async with coredis.Redis(host="127.0.0.1", port=port, max_connections=max(concurrency, 1) + 4) as c:
            cscript = c.register_script(SCRIPT)
            for k in keys:
                await c.set(k, "v" * 40)

            async def op(i: int) -> None:
                if operation == "get":
                    await c.get(keys[i % KEYS])
                else:
                    await cscript(keys=[keys[i % KEYS]], args=["t" * 24, 600000])

            return await _drive(op, concurrency, seconds, max_ops)
    raise SystemExit(f"unknown store client {client!r}")


def _one(spec: str, port: int, concurrency: int, seconds: float, max_ops: int, size: int) -> int:
    kind, client, operation = spec.split(":")
    if kind == "http":
        coro = _http(client, port, concurrency, seconds, max_ops, size)
    else:
        coro = _store(client, operation, port, concurrency, seconds, max_ops)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    print("CLIENTJSON " + json.dumps(result))
    return 0


# -- the driver -------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("aiohttp", "httptools", "aiosonic", "redis", "coredis", "hiredis", "uvloop"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except (ImportError, AttributeError):
            try:
                from importlib.metadata import version

                out[mod] = version(mod)
            except Exception:
                out[mod] = "not installed"
    return out


def _child(spec: str, port: int, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--one", spec, "--port", str(port), "--concurrency", str(concurrency),
            "--seconds", str(args.seconds), "--max-ops", str(args.max_ops), "--body-size", str(args.body_size)]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=args.seconds + 60, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    line = next((ln for ln in proc.stdout.decode().splitlines() if ln.startswith("CLIENTJSON ")), None)
    if proc.returncode != 0 or line is None:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:200]}
    result: dict[str, Any] = json.loads(line[len("CLIENTJSON "):])
    return result


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over repeated cells; an error if any repeat failed."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Measured {result['started']} on {result['machine']}; each figure from a fresh interpreter on "
        f"uvloop, median of {result['repeat']} runs of {result['seconds']} s per cell. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "| client | operation | µs/op at 1 (wall) | CPU µs/op at 1 | ops/s at {c} | CPU µs/op at {c} |".format(
            c=result["concurrency"]),
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        one, many = row["c1"], row["cN"]

        def cell(d: dict[str, Any], key: str) -> str:
            return d["error"] if "error" in d else f"{d[key]:,.0f}" if key == "ops_per_s" else f"{d[key]:.1f}"

        lines.append(f"| {row['client']} | {row['operation']} | {cell(one, 'wall_us_per_op')} | "
                     f"{cell(one, 'cpu_us_per_op')} | {cell(many, 'ops_per_s')} | {cell(many, 'cpu_us_per_op')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compare upstream HTTP clients and Redis clients.")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    p.add_argument("--max-ops", type=int, default=2_000_000)
    p.add_argument("--repeat", type=int, default=3, help="fresh runs per cell; the median is shown")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--body-size", type=int, default=20 * 1024)
    p.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "clients.json")
    p.add_argument("--publish", action="store_true", help="also write the Choices block of docs/PERFORMANCE.md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return _one(args.one, args.port, args.concurrency, args.seconds, args.max_ops, args.body_size)

    import configs
    import report
    from stack import REPO, Stack

    workdir = Path(tempfile.mkdtemp(prefix="etagproxy-clients-"))
    rows: list[dict[str, Any]] = []
    started = time.time()
    try:
        with Stack(workdir) as stack:
            import shutil

            origin = stack.origin(body=configs.item_document(args.body_size), builtin=shutil.which("nginx") is None,
                                  workers=2)
            redis = stack.redis()
            specs = [(f"http:{c}:get", origin.port, c, "GET 20 KB") for c in HTTP_CLIENTS]
            specs += [(f"store:{c}:{op}", redis.port, c, op.upper()) for op in STORE_OPS for c in STORE_CLIENTS]
            for spec, port, client, operation in specs:
                row: dict[str, Any] = {
                    "client": client,
                    "operation": operation,
                    "c1": _median_of([_child(spec, port, 1, args) for _ in range(args.repeat)]),
                    "cN": _median_of([_child(spec, port, args.concurrency, args) for _ in range(args.repeat)]),
                }
                rows.append(row)
                c1, cn = row["c1"], row["cN"]
                print(f"{client:16s} {operation:9s} "
                      + (f"c1 {c1['wall_us_per_op']:7.1f} us/op (cpu {c1['cpu_us_per_op']:6.1f})"
                         if "error" not in c1 else f"c1 error: {c1['error']}")
                      + "   "
                      + (f"c{args.concurrency} {cn['ops_per_s']:9.0f} ops/s (cpu {cn['cpu_us_per_op']:6.1f} us/op)"
                         if "error" not in cn else f"c{args.concurrency} error: {cn['error']}"),
                      flush=True)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    machine = report.machine_info(use_nginx=True)
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}",
        "seconds": args.seconds,
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "versions": _versions(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nbench: wrote {args.output}")
    if args.publish:
        doc = REPO / "docs" / "PERFORMANCE.md"
        doc.write_text(report.replace_block(doc.read_text(), "<!-- bench:clients:begin -->",
                                            "<!-- bench:clients:end -->", markdown(result)))
        print(f"bench: published {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
