"""Lost-update soak: minutes of skewed concurrent increments through replicas.

The long form of tests/test_lost_updates.py. Several etagproxy processes
share one Redis in front of the naive counter API of tests/fault_upstream.py
(last writer wins, counts every stale write it applies); many clients GET a
counter, PUT value + 1 with If-Match, and start over on anything but a 2xx.
Keys are picked with Zipf-skewed weights, so a few hot keys see heavy
contention while the long tail sees almost none. Optionally the upstream
injects faults (5xx before/after applying, resets after the body, answers
past the deadline) and Redis is killed and restarted on a timer.

At the end the run is audited (tests/counter_clients.audit) and a summary
printed: writes acknowledged, the final upstream total, lost updates, and the
412/409/503 and unknown-outcome counts. Exit status 1 if anything was lost or
the audit found any other inconsistency.

    python bench/soak.py --duration 300 --keys 2000 --clients 64 --faults
    python bench/soak.py --duration 300 --redis-restart-every 30

Redis is down for `--redis-down` seconds per restart, and after it comes
back the proxies hold writes back for one lease (409s); README.md, "The guarantee"
says why.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.counter_clients import Ledger, audit, increment_until  # noqa: E402
from tests.fault_upstream import Fault, FaultUpstream, running_upstream  # noqa: E402
from tests.metrics import metric  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.proxy_processes import ProxyProcess, counter_config, start_proxy  # noqa: E402
from tests.redis_fixtures import RedisServer  # noqa: E402

FAULTS = (Fault.ERROR_BEFORE, Fault.ERROR_AFTER, Fault.RESET_BEFORE, Fault.RESET_AFTER, Fault.SLOW_AFTER)


def zipf_picker(keys: list[str], s: float) -> Callable[[random.Random], str]:
    """Key k (rank r from 1) with probability proportional to 1 / r**s."""
    cum = list(itertools.accumulate(1.0 / (r**s) for r in range(1, len(keys) + 1)))

    def pick(rng: random.Random) -> str:
        return rng.choices(keys, cum_weights=cum)[0]

    return pick


def fault_plan(every: int) -> tuple[Fault, ...]:
    """One write in `every` faulty, each kind in turn."""
    return tuple(x for f in FAULTS for x in (*(Fault.NONE,) * (every - 1), f))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument("--proxies", type=int, default=2, help="proxy processes sharing Redis (default 2)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--keys", type=int, default=1000, help="counters (default 1000)")
    p.add_argument("--skew", type=float, default=1.1, help="Zipf exponent of key popularity (default 1.1)")
    p.add_argument("--faults", action="store_true", help="upstream faults, one write in --fault-every")
    p.add_argument("--fault-every", type=int, default=20)
    p.add_argument("--redis-restart-every", type=float, default=0.0, help="seconds; 0 = never (default)")
    p.add_argument("--redis-down", type=float, default=1.0, help="seconds down per restart (default 1)")
    p.add_argument("--upstream-timeout", default="500ms", help="proxies' timeouts.upstream (default 500ms)")
    p.add_argument("--write-wait", default="2s", help="proxies' timeouts.write_wait; shorter gives more 409s")
    p.add_argument("--report-every", type=float, default=10.0, help="progress line interval, seconds")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def progress(start: float, ledger: Ledger) -> str:
    o = ledger.outcomes
    unknown = sum(v for k, v in o.items() if k not in ("2xx", "412", "409", "428", "503"))
    return (
        f"[{time.monotonic() - start:7.1f}s] attempted={ledger.attempts} acked={ledger.acked()}"
        f" 412={o['412']} 409={o['409']} 503={o['503']} unknown={unknown}"
        f" reads={ledger.reads} reads-without-etag={ledger.reads_without_etag}"
    )


async def restart_redis_periodically(redis: RedisServer, every: float, down: float, stop: asyncio.Event) -> int:
    restarts = 0
    while True:
        try:
            async with asyncio.timeout(every):
                await stop.wait()
            return restarts
        except TimeoutError:
            pass
        redis.kill()
        await asyncio.sleep(down)
        await asyncio.to_thread(redis.start)
        restarts += 1
        print(f"redis restarted ({restarts})", flush=True)


async def soak(args: argparse.Namespace, workdir: Path) -> int:
    redis = RedisServer(workdir / "redis")
    await asyncio.to_thread(redis.start)
    keys = [f"c{i}" for i in range(args.keys)]
    plan = fault_plan(args.fault_every) if args.faults else (Fault.NONE,)
    upstream = FaultUpstream(plan=plan, slow_s=2.0)
    ledger = Ledger()
    procs: list[ProxyProcess] = []
    restarts = 0
    try:
        async with running_upstream(upstream) as up:
            for _ in range(args.proxies):
                text = counter_config(
                    up.url, redis.url, admin_port=free_port(),
                    upstream_timeout=args.upstream_timeout, write_wait=args.write_wait,
                )
                procs.append(await start_proxy(text, workdir / "proxies"))
            bases = [p.url for p in procs]
            print(
                f"soak: {args.proxies} proxies, {args.clients} clients, {args.keys} keys (zipf {args.skew}),"
                f" faults={'1/' + str(args.fault_every) if args.faults else 'off'},"
                f" redis restarts every {args.redis_restart_every or '-'} s, {args.duration:.0f} s",
                flush=True,
            )
            stop = asyncio.Event()
            pick = zipf_picker(keys, args.skew)
            clients = [
                asyncio.ensure_future(
                    increment_until(stop, ledger, bases, pick, name=f"c{i}", seed=args.seed * 1000 + i)
                )
                for i in range(args.clients)
            ]
            restarter = None
            if args.redis_restart_every > 0:
                restarter = asyncio.ensure_future(
                    restart_redis_periodically(redis, args.redis_restart_every, args.redis_down, stop)
                )
            start = time.monotonic()
            deadline = start + args.duration
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(args.report_every, left))
                print(progress(start, ledger), flush=True)
            stop.set()
            await asyncio.gather(*clients)
            if restarter is not None:
                restarts = await restarter
            lease_lost = 0.0
            for p in procs:
                try:
                    lease_lost += metric(await p.metrics(), "etagproxy_lease_lost_total")
                except Exception as exc:  # a missing admin endpoint must not hide the audit
                    print(f"metrics of {p.url}: {exc!r}", file=sys.stderr)
    finally:
        codes = [await p.stop() for p in procs]
        redis.kill()
    result = audit(upstream, ledger, whole_chain=not args.faults and not args.redis_restart_every)
    o = ledger.outcomes
    unknown = {k: v for k, v in sorted(o.items()) if k not in ("2xx", "412", "409", "428", "503")}
    print()
    print(f"writes attempted:         {result.attempts}")
    print(f"writes acknowledged:      {result.acknowledged}")
    print(f"landed, unacknowledged:   {result.landed_unacknowledged}")
    print(f"final upstream total:     {result.final_total}")
    print(f"lost updates:             {result.stale} ({result.erased} increments erased)")
    print(f"412 / 409 / 503:          {o['412']} / {o['409']} / {o['503']}")
    print(f"unknown outcomes:         {sum(unknown.values())} {unknown or ''}")
    print(f"faults injected:          {sum(v for f, v in upstream.injected.items() if f is not Fault.NONE)}")
    print(f"redis restarts:           {restarts}")
    print(f"leases lost (metric):     {lease_lost:.0f}")
    print(f"reads (without ETag):     {ledger.reads} ({ledger.reads_without_etag})")
    for problem in result.problems[:20]:
        print("PROBLEM:", problem)
    if len(result.problems) > 20:
        print(f"... and {len(result.problems) - 20} more problems")
    if any(codes):
        print(f"proxy exit codes: {codes}", file=sys.stderr)
    return 1 if result.problems or any(codes) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="etagproxy-soak-") as tmp:
        return asyncio.run(soak(args, Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
