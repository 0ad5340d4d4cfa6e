"""What a version from the upstream costs per write (the route's `version`).

A route with `version: {from: field}` or `{from: header}` reads the
resource from the upstream under the lease before forwarding each
conditional write, so that a write made behind the proxy's back outdates the
tags. This measures that price in one run, on loopback, against the default
(proxy-minted tokens) and against the upstream alone:

- proxy CPU per write (µs, from /proc), upstream requests per write,
- write latency p50 / p99, and the ratio to the same write sent direct.

    python bench/verify_cost.py [--writes 2000] [--rounds 3] [--chains 8] [--publish]

The upstream is a small aiohttp server in its own process: every
`/api/<route>/<k>` is a JSON record with a `rev` field and a weak
`ETag: W/"<rev>"` that PUT bumps (checking If-Match weakly, the way NetBox
4.6 does). The proxy runs one worker on a Redis started for the run.
Each mode runs `--chains` clients, each on its own resource, doing
GET once and then PUT with the last ETag, `--writes` in all per round and
mode, bounded by `--max-seconds`; modes alternate within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench import procstat  # noqa: E402
from bench.stack import REPO, Stack, free_port, wait_http  # noqa: E402

MODES = {
    "direct": "",
    "token": "",
    "field": "    version: {from: field, field: rev}\n",
    "checked": "    version: {from: header, header: ETag, upstream_if_match: true}\n",
}
TITLES = {
    "direct": "upstream alone (no proxy)",
    "token": "version: token (default)",
    "field": "version: {from: field, field: rev}",
    "checked": "version: {from: header, header: ETag, upstream_if_match: true}",
}
NOTES = "x" * 1000


# -- the upstream ------------------------------------------------------------------


def serve_origin(port: int) -> None:
    from aiohttp import web

    revs: dict[str, int] = {}
    counts = {"GET": 0, "PUT": 0}

    def document(path: str) -> web.Response:
        rev = revs.get(path, 0)
        body = json.dumps({"id": path.rsplit("/", 1)[-1], "rev": rev, "notes": NOTES}).encode()
        return web.Response(body=body, content_type="application/json", headers={"ETag": f'W/"{rev}"'})

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/stats":
            return web.json_response(counts)
        if request.method in ("GET", "HEAD"):
            counts["GET"] += 1
            return document(request.path)
        if request.method != "PUT":
            return web.Response(status=405)
        counts["PUT"] += 1
        await request.read()
        seen = request.headers.get("If-Match")
        if seen is not None and seen.removeprefix("W/") != f'"{revs.get(request.path, 0)}"':
            return web.Response(status=412)
        revs[request.path] = revs.get(request.path, 0) + 1
        return document(request.path)

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        runner = web.ServerRunner(server, handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def proxy_yaml(port: int, upstream_port: int, store: str) -> str:
    routes = "".join(
        f"  - path: /api/{mode}/{{id}}\n    require_if_match: true\n{extra}"
        for mode, extra in MODES.items() if mode != "direct"
    )
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"upstream: http://127.0.0.1:{upstream_port}\n"
        f"store: {store}\n"
        f"routes:\n{routes}"
    )


# -- the load ----------------------------------------------------------------------


async def chain(session: aiohttp.ClientSession, url: str, count: int, deadline: float, lat: list[float]) -> int:
    """GET, then `count` PUTs each with the ETag the last answer gave."""
    async with session.get(url) as resp:
        await resp.read()
        tag = resp.headers.get("ETag", "")
    body = json.dumps({"notes": NOTES})
    done = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        headers = {"If-Match": tag} if tag else {}
        async with session.put(url, data=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise SystemExit(f"PUT {url}: {resp.status} {resp.headers.get('Content-Type')}")
            tag = resp.headers.get("ETag", "") if "ETag" in resp.headers else ""
        lat.append(time.perf_counter() - t0)
        done += 1
        if not tag and "direct" not in url:
            raise SystemExit(f"PUT {url}: no ETag")
    return done


async def stats(port: int) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/stats") as r:
        return await r.json()  # type: ignore[no-any-return]


async def run_mode(
    mode: str, base: str, origin_port: int, proxy_pid: int | None, writes: int, chains: int,
    max_seconds: float, round_no: int,
) -> dict[str, float]:
    before = await stats(origin_port)
    cpu0 = procstat.cpu_seconds(proxy_pid) if proxy_pid else 0.0
    lat: list[float] = []
    deadline = time.monotonic() + max_seconds
    path = "token" if mode == "direct" else mode
    connector = aiohttp.TCPConnector(limit=chains)
    async with aiohttp.ClientSession(connector=connector) as session:
        done = await asyncio.gather(*(
            chain(session, f"{base}/api/{path}/r{round_no}-{mode}-{i}", writes // chains, deadline, lat)
            for i in range(chains)
        ))
    total = sum(done)
    cpu = (procstat.cpu_seconds(proxy_pid) - cpu0) if proxy_pid else 0.0
    after = await stats(origin_port)
    lat.sort()
    return {
        "writes": total,
        "cpu_us": cpu / total * 1e6 if proxy_pid else 0.0,
        "upstream_per_write": (after["GET"] + after["PUT"] - before["GET"] - before["PUT"] - chains) / total,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=2000, help="writes per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chains", type=int, default=8, help="concurrent clients, one resource each")
    p.add_argument("--max-seconds", type=float, default=60.0, help="bound on each mode's run")
    p.add_argument("--serve-origin", type=int, help=argparse.SUPPRESS)
    p.add_argument("--publish", action="store_true", help="write bench/results-verify.json")
    args = p.parse_args(argv)
    if args.serve_origin:
        serve_origin(args.serve_origin)
        return 0
    workdir = BENCH / "results" / "verify"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with Stack(workdir) as stack:
        redis = stack.redis()
        origin_port = free_port()
        origin = stack.spawn("origin", [sys.executable, __file__, "--serve-origin", str(origin_port)], origin_port)
        stack.ready(origin, lambda s: wait_http(s, "/stats", expect=(200,)))
        port = free_port()
        cfg = workdir / "proxy.yaml"
        cfg.write_text(proxy_yaml(port, origin_port, f"redis://127.0.0.1:{redis.port}/0"))
        proxy = stack.spawn(
            "proxy", [sys.executable, "-m", "etagproxy", "run", "--config", str(cfg), "--no-access-log"],
            port, cwd=REPO,
        )
        stack.ready(proxy, lambda s: wait_http(s, "/api/token/warm", expect=(200,), timeout=30.0))
        for round_no in range(args.rounds):
            order = list(MODES) if round_no % 2 == 0 else list(reversed(MODES))
            for mode in order:
                base = f"http://127.0.0.1:{origin_port if mode == 'direct' else port}"
                pid = None if mode == "direct" else proxy.pid
                r = asyncio.run(run_mode(mode, base, origin_port, pid, args.writes, args.chains,
                                         args.max_seconds, round_no))
                results[mode].append(r)
                print(f"round {round_no + 1} {mode:8s} " + " ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
    direct_p50 = statistics.median(r["p50_ms"] for r in results["direct"])
    rows = []
    print()
    print(f"{'mode':64s} {'CPU µs/write':>12s} {'upstream req/write':>18s} {'p50 ms':>7s} {'p99 ms':>7s} {'p50 / direct':>12s}")
    for mode, runs in results.items():
        row = {
            "mode": TITLES[mode],
            "cpu_us": statistics.median(r["cpu_us"] for r in runs),
            "upstream_per_write": statistics.median(r["upstream_per_write"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        }
        row["p50_ratio"] = row["p50_ms"] / direct_p50
        rows.append(row)
        cpu = "-" if mode == "direct" else f"{row['cpu_us']:.0f}"
        print(f"{row['mode']:64s} {cpu:>12s} {row['upstream_per_write']:>18.2f} "
              f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['p50_ratio']:>12.2f}")
    if args.publish:
        out = {"date": time.strftime("%Y-%m-%d"), "writes": args.writes, "rounds": args.rounds,
               "chains": args.chains, "rows": rows}
        (BENCH / "results-verify.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
