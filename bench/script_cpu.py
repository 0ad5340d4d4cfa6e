"""redis-server's CPU per request for the store's scripts, mode against mode.

Runs the scripts a PUT with If-Match costs the server (BEGIN, then END),
and the read path's HMGET, straight through etagproxy's RespClient, with
`--concurrency` callers pipelined on one connection as the proxy does,
and charges redis-server's CPU (from /proc) to each request:

- `epoch`: the scripts take the run_id and start time the connection read
  when it opened (their last two ARGV; what the proxy sends on one server);
- `info`: the same scripts told to read `INFO server` themselves (what
  Cluster and Sentinel connections do, and what every call did before);
- `empty`: two scripts that return at once: the floor of two EVALSHA
  round trips on this server;
- `hmget`: the read path's one HMGET (a 304 or a forwarded GET);
- `fcall`: BEGIN and END as the functions of one Redis function library
  (FUNCTION LOAD, then FCALL), built from the same Lua files: the prelude
  runs once, when the library loads, instead of in every call;
- `floor`: two scripts that each read the clock, GET one key and SET it,
  sent BEGIN's and END's arguments and answering replies of their size:
  the least a write protocol of two scripts costs this server.

Modes rotate within each round on one redis-server, medians of the rounds.
With `--instructions`, each mode instead runs on its own redis-server under
valgrind's callgrind, once with `--requests` requests and once with twice
as many, and the difference of the servers' instruction counts is charged
to the extra requests: a count that does not depend on what else the
machine is doing, for days when CPU time does.

    python bench/script_cpu.py [--requests 20000] [--rounds 3] [--concurrency 50]
    python bench/script_cpu.py --instructions [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack import Stack  # noqa: E402

from etagproxy.store.epoch import NO_EPOCH  # noqa: E402
from etagproxy.store.redis_scripts import BEGIN, END, _lua, redis_key  # noqa: E402
from etagproxy.store.resp import RespClient  # noqa: E402

EMPTY = "#!lua\nreturn 1\n"
TTL_MS, LEASE_MS = 86_400_000, 10_000
MODES = ("epoch", "info", "empty", "hmget", "fcall", "floor")
FLOOR_BEGIN = ("#!lua\nlocal t = redis.call('TIME')\nlocal v = redis.call('GET', KEYS[1])\n"
               "redis.call('SET', KEYS[1], ARGV[1])\nreturn {'ok', 0, v or '', t[1], '1', t[2], ''}\n")
FLOOR_END = ("#!lua flags=allow-oom\nlocal t = redis.call('TIME')\nlocal v = redis.call('GET', KEYS[1])\n"
             "redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])\nreturn {ARGV[4], t[1], '1', v or ''}\n")


def function_library() -> str:
    """BEGIN and END as `bench_begin` and `bench_end` of one library: the
    prelude's helpers are made once, at load; each call sets the epoch pair
    and the KEYS/ARGV the helpers read, then runs the script's body."""
    prelude = _lua("prelude.lua").replace(
        "local ARGC = #ARGV - 2\nlocal EPOCH, STARTED = ARGV[ARGC + 1], ARGV[ARGC + 2]\n",
        "local ARGC, EPOCH, STARTED, KEYS, ARGV\n",
    )
    assert "local ARGC, EPOCH" in prelude, "prelude.lua changed: update function_library()"

    def function(name: str, body: str, flags: str) -> str:
        return (f"redis.register_function{{function_name='{name}', flags={{{flags}}}, callback=function(keys, argv)\n"
                "KEYS, ARGV = keys, argv\nARGC = #ARGV - 2\nEPOCH, STARTED = ARGV[ARGC + 1], ARGV[ARGC + 2]\n"
                f"{body}\nend}}\n")

    return ("#!lua name=etagproxy_bench\n" + prelude + function("bench_begin", _lua("begin.lua"), "")
            + function("bench_end", _lua("end.lua"), "'allow-oom'"))


_tokens: dict[str, str] = {}
"""Each key's token as the last END of `epoch` and `info` set it."""


async def drive(client: RespClient, mode: str, requests: int, concurrency: int, budget_s: float) -> int:
    """`requests` requests of `mode` from `concurrency` callers; how many
    completed within `budget_s`."""
    done = 0
    stop_at = time.monotonic() + budget_s
    if mode == "fcall":
        await client.execute("FUNCTION", "LOAD", "REPLACE", function_library())

    async def caller(me: int) -> None:
        nonlocal done
        key = redis_key("bench:", f"/r/{me}")
        seq = 0
        while done < requests and time.monotonic() < stop_at:
            seq += 1
            owner = f"{me}-{seq}"
            if mode == "hmget":
                await client.execute("HMGET", key, "s", "e", "t", "m", "x")
            elif mode == "empty":
                await client.evalsha(EMPTY, [key], [])
                await client.evalsha(EMPTY, [key], [])
            elif mode in ("fcall", "floor"):
                begin_args = [owner, LEASE_MS, "t0", TTL_MS, owner, "", "", "", 0, "", ""]
                end_args = [owner, "success", 1, f"t{seq}", TTL_MS]
                if mode == "fcall":
                    begun = await client.execute("FCALL", "bench_begin", 1, key, *begin_args, epoch=True)
                    assert begun[0] == b"ok", begun  # type: ignore[index]
                    assert await client.execute("FCALL", "bench_end", 1, key, *end_args, epoch=True)
                else:
                    await client.evalsha(FLOOR_BEGIN, [key], begin_args, epoch=True)
                    await client.evalsha(FLOOR_END, [key], end_args, epoch=True)
            else:
                tail = () if mode == "epoch" else NO_EPOCH
                # A PUT with If-Match naming the current token (the first
                # write of a key has none to name).
                current = _tokens.get(key)
                cond = ["L", "", "", 1, "", "", current] if current else ["", "", "", 0, "", ""]
                begun = await client.evalsha(
                    BEGIN, [key], [owner, LEASE_MS, "t0", TTL_MS, owner, *cond, *tail], epoch=mode == "epoch")
                assert begun[0] == b"ok", begun  # type: ignore[index]
                token = _tokens[key] = f"t{me}-{time.monotonic_ns()}"
                ended = await client.evalsha(
                    END, [key], [owner, "success", 1, token, TTL_MS, *tail], epoch=mode == "epoch")
                assert ended, ended
            done += 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done


async def measure(port: int, pid_cpu, args: argparse.Namespace, modes: list[str]) -> dict[str, list[float]]:
    client = RespClient("127.0.0.1", port, timeout=5.0)
    per_mode: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for mode in modes:  # warm: scripts loaded, keys exist
            await drive(client, mode, 200, args.concurrency, 10.0)
        for r in range(args.rounds):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                before = pid_cpu()
                n = await drive(client, mode, args.requests, args.concurrency, args.budget)
                per_mode[mode].append((pid_cpu() - before) / n * 1e6)
                print(f"  [{r + 1}] {mode:6s} {per_mode[mode][-1]:6.2f} us/request  ({n} requests)", flush=True)
    finally:
        await client.close()
    return per_mode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _ready(port: int, proc: subprocess.Popen[bytes], within_s: float = 60.0) -> None:
    stop_at = time.monotonic() + within_s
    while time.monotonic() < stop_at:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server under valgrind exited with {proc.returncode}")
        client = RespClient("127.0.0.1", port, connect_timeout=1.0, timeout=5.0)
        try:
            if await client.execute("PING") == b"PONG":
                return
        except Exception:
            await asyncio.sleep(0.2)  # valgrind still starting the server: poll again
        finally:
            await client.close()
    raise RuntimeError("redis-server under valgrind did not answer PING")


def instructions(mode: str, requests: int, args: argparse.Namespace, workdir: Path) -> int:
    """Instructions a fresh redis-server under callgrind executes from start
    to shutdown when served `requests` requests of `mode`."""
    port, out = _free_port(), workdir / f"callgrind.{mode}.{requests}"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", shutil.which("redis-server") or "redis-server",
         "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    _tokens.clear()  # a fresh server: no key has a token

    async def run() -> None:
        await _ready(port, proc)
        client = RespClient("127.0.0.1", port, timeout=30.0)
        try:
            done = await drive(client, mode, requests, args.concurrency, args.budget)
            if done < requests:
                # Under callgrind a request costs ~50x: a run cut short by the
                # budget would charge the difference to requests never sent.
                raise RuntimeError(f"{mode}: {done} of {requests} requests within {args.budget} s; "
                                   "use fewer --requests or a larger --budget")
            try:
                await client.execute("SHUTDOWN", "NOSAVE")
            except Exception:
                pass  # the server closes the connection instead of answering
        finally:
            await client.close()

    try:
        asyncio.run(run())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    if found is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, help="requests per mode and round (default 20,000; 1,000 with --instructions)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds at most per mode and round")
    ap.add_argument("--instructions", action="store_true", help="count redis-server's instructions under callgrind")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 1_000 if args.instructions else 20_000
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: expected some of {', '.join(MODES)}")
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("script_cpu: --instructions needs valgrind (apt-get install -y valgrind)")
        with tempfile.TemporaryDirectory() as tmp:
            print(f"redis-server instructions per request ({args.requests} vs {2 * args.requests} requests):")
            counts = {}
            for mode in modes:
                low, high = (instructions(mode, n, args, Path(tmp)) for n in (args.requests, 2 * args.requests))
                counts[mode] = (high - low) / args.requests
                print(f"  {mode:6s} {counts[mode]:9,.0f}", flush=True)
            for mode in modes:
                if mode != "epoch" and "epoch" in counts:
                    print(f"  {mode} / epoch: {counts[mode] / counts['epoch']:.2f}")
        return
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp)) as stack:
        redis = stack.redis()
        per_mode = asyncio.run(measure(redis.port, redis.cpu, args, modes))
    print("redis-server CPU per request, median of", args.rounds, "rounds:")
    for mode in modes:
        print(f"  {mode:6s} {statistics.median(per_mode[mode]):6.2f} us")
    for mode in modes:
        if mode != "epoch" and "epoch" in per_mode:
            ratio = statistics.median(per_mode[mode]) / statistics.median(per_mode["epoch"])
            print(f"  {mode} / epoch: {ratio:.2f}")


if __name__ == "__main__":
    main()
