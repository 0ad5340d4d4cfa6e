"""Instructions per request: etagproxy next to the floor servers, counted by callgrind.

    python bench/instructions.py                      # about 4 minutes on 2 cores
    python bench/instructions.py --compare before=DIR # also etagproxy from tree DIR

`cpu_floor.py` measures CPU time per request under load, and CPU time moves
with the machine: on the same commit its fixed 304 has cost 48 µs in one
run and 69 in the next, so a change of a few per cent cannot be seen in it.
This benchmark counts instead. Every Python server -- etagproxy (1 worker,
Redis store, uvloop, the route config of run.py), the aiohttp, httptools
and features floors of floors.py and the fixed 304 -- runs under valgrind's
callgrind; the origin (nginx, or bench/origin.py) and redis-server run
natively. For each target and scenario (the three of cpu_floor.py):

1. `--warmup` requests (pools, caches, the code paths' first use);
2. the counters zeroed (`callgrind_control -z`);
3. exactly `--requests` requests on one keep-alive connection, one at a
   time, each checked (304, 200 with the body, or 200 with a new ETag);
4. the counters dumped (`callgrind_control -d`): instructions ÷ requests.

What it counts: the instructions the server process executes in user space
-- the interpreter, uvloop, httptools, hiredis, the C parts of aiohttp --
and not the kernel's share of its system calls, nor redis-server's (that
is `script_cpu.py --instructions`). One request at a time means one event
loop wake-up per request, which a loaded server shares between requests.
So the figures are a model of the CPU per request, not a measure of it: what
they are for is comparing builds and the distance to the floors, which they
show to a fraction of a per cent from run to run.

Writes bench/results/instructions.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs  # noqa: E402
from cpu_floor import LAYERS, SCENARIOS, start_floor  # noqa: E402
from stack import BENCH, REPO, Service, Stack, StartError  # noqa: E402

RESULTS = BENCH / "results"
KEYS = 20
READY_S = 180.0  # a Python server's start-up under callgrind: imports at ~50x
TITLES = {
    "etagproxy": "etagproxy",
    "floor-aiohttp": "aiohttp floor",
    "floor-httptools": "httptools floor",
    "floor-features": "httptools + etagproxy's work",
    "fixed304": "fixed 304 (aiohttp)",
}
ROWS = {
    "sc304": "store-answered 304",
    "get": "forwarded GET, 20 KB",
    "put_ifmatch": "PUT 20 KB with If-Match",
}
_TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.M)


class CheckFailed(RuntimeError):
    """A target answered a measured request wrongly: its count would be of the wrong work."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Instructions per request of etagproxy and the floors (callgrind).")
    p.add_argument("--requests", type=int, default=300, help="measured requests per target and scenario (default 300)")
    p.add_argument("--warmup", type=int, default=60, help="requests before the counters are zeroed (default 60)")
    p.add_argument("--rounds", type=int, default=1, help="measurements per target and scenario (default 1)")
    p.add_argument("--targets", default=",".join(TITLES),
                   help=f"comma-separated subset of {', '.join(TITLES)} (default: all)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                   help="also count etagproxy from source tree DIR as target NAME (repeatable)")
    p.add_argument("--layers", action="store_true",
                   help="also count the store-answered 304 on the features floor cut after each layer "
                        "of etagproxy's work (floor_features.py --upto)")
    p.add_argument("--upstream", choices=("auto", "builtin"), default="auto",
                   help="origin: nginx when installed (auto) or bench/origin.py")
    p.add_argument("--output", type=Path, default=RESULTS / "instructions.json")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 5000 or not 0 <= args.warmup <= 5000 or not 1 <= args.rounds <= 10:
        p.error("--requests must be 1..5000, --warmup 0..5000, --rounds 1..10")
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TITLES]
    if unknown or not targets:
        p.error(f"--targets: unknown {', '.join(unknown) or '(none given)'}; expected some of {', '.join(TITLES)}")
    args.targets = targets
    args.scenarios = tuple(s for s in SCENARIOS if s in args.scenarios.split(","))
    if not args.scenarios:
        p.error(f"--scenarios: expected some of {', '.join(SCENARIOS)}")
    compare = []
    for item in args.compare:
        name, sep, where = item.partition("=")
        source = Path(where).resolve()
        if not sep or not name.isidentifier() or name in TITLES:
            p.error(f"--compare {item!r}: expected NAME=DIR with NAME a new identifier")
        if not (source / "etagproxy" / "__init__.py").is_file():
            p.error(f"--compare {item!r}: {source} holds no etagproxy package")
        compare.append((name, source))
    args.compare = compare
    return args


# -- the client --------------------------------------------------------------------


class Driver:
    """One keep-alive connection to one target, and the scenarios' requests
    on it, each checked. It keeps the ETags the target handed out, so every
    conditional request carries the current one."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port = port
        self.body = body
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.tags: dict[str, str] = {}
        self.n = 0

    def close(self) -> None:
        self.conn.close()

    def _call(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers, data

    def _tag(self, path: str) -> str:
        if path not in self.tags:
            status, headers, _ = self._call("GET", path, {})
            tag = headers.get("ETag", "")
            if status != 200 or not tag:
                raise CheckFailed(f"GET {path}: {status}, ETag {tag or 'missing'}")
            self.tags[path] = tag
        return self.tags[path]

    def prepare(self, scenario: str) -> None:
        """The tags a scenario sends, fetched before anything is counted."""
        for k in range(1, KEYS + 1):
            if scenario == "sc304":
                self._tag(f"/api/sc/{k}")
            elif scenario == "put_ifmatch":
                self._tag(f"/api/items/i-{k}")

    def request(self, scenario: str) -> None:
        self.n += 1
        k = self.n % KEYS + 1
        if scenario == "sc304":
            path = f"/api/sc/{k}"
            status, _, _ = self._call("GET", path, {"If-None-Match": self.tags[path]})
            if status != 304:
                raise CheckFailed(f"GET {path} with its current If-None-Match: {status}, expected 304")
        elif scenario == "get":
            path = f"/api/items/{k}"
            status, _, data = self._call("GET", path, {})
            if status != 200 or len(data) != len(self.body):
                raise CheckFailed(f"GET {path}: {status}, {len(data)} bytes")
        else:
            path = f"/api/items/i-{k}"
            status, headers, _ = self._call(
                "PUT", path, {"Content-Type": "application/json", "If-Match": self.tags[path]}, self.body
            )
            tag = headers.get("ETag", "")
            if status != 200 or not tag or tag == self.tags[path]:
                raise CheckFailed(f"PUT {path} with its current If-Match: {status}, ETag {tag or 'missing'}")
            self.tags[path] = tag


# -- callgrind ---------------------------------------------------------------------


def valgrind(out: Path) -> tuple[str, ...]:
    """The command prefix that runs a server under callgrind, dumping to `out`.N."""
    return ("valgrind", "--tool=callgrind", "--vgdb=yes", f"--callgrind-out-file={out}")


class Counted:
    """A server under callgrind: zero its counters, dump them, read the dump."""

    def __init__(self, service: Service, out: Path) -> None:
        self.service = service
        self.out = out
        self.dumps = 0

    def _control(self, flag: str) -> None:
        done = subprocess.run(["callgrind_control", flag, str(self.service.pid)],
                              capture_output=True, timeout=60, check=False)
        if done.returncode != 0 or b"OK" not in done.stdout:
            raise StartError(f"callgrind_control {flag} {self.service.name}: "
                             f"{(done.stdout + done.stderr).decode(errors='replace')[-300:]}")

    def zero(self) -> None:
        self._control("-z")

    def dump(self) -> int:
        """Instructions since the last zero."""
        self._control("-d")
        self.dumps += 1
        path = Path(f"{self.out}.{self.dumps}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # bounded: the dump is written when the process next runs
            if path.exists():
                found = _TOTALS.search(path.read_bytes())
                if found:
                    return int(found.group(1))
            if not self.service.alive():
                break
            time.sleep(0.05)  # polling a file another process writes: no event to await
        raise StartError(f"{self.service.name}: no callgrind dump {path} within 60 s:\n{self.service.log_tail()}")


def measure(counted: Counted, scenario: str, body: bytes, requests: int, warmup: int) -> dict[str, Any]:
    driver = Driver(counted.service.port, body)
    try:
        driver.prepare(scenario)
        for _ in range(warmup):
            driver.request(scenario)
        counted.zero()
        t0 = time.monotonic()
        for _ in range(requests):
            driver.request(scenario)
        wall = time.monotonic() - t0
        total = counted.dump()
    finally:
        driver.close()
    return {"target": counted.service.name, "scenario": scenario, "requests": requests,
            "instructions": total, "per_request": round(total / requests), "wall_s": round(wall, 1)}


# -- the report --------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """scenario -> target -> median, min and max instructions per request."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for r in runs:
        out.setdefault(r["scenario"], {}).setdefault(r["target"], {"values": []})["values"].append(r["per_request"])  # type: ignore[dict-item]
    for targets in out.values():
        for name, cell in targets.items():
            values = cell.pop("values")  # type: ignore[arg-type]
            targets[name] = {"median": round(statistics.median(values)), "min": min(values), "max": max(values)}  # type: ignore[type-var]
    return out


def table(summary: dict[str, dict[str, dict[str, int]]], names: list[str]) -> list[list[str]]:
    """Thousands of instructions per request, and etagproxy's distance to each floor."""
    head = ["per request, thousands of instructions", *(_title(n) for n in names)]
    rows = [head]
    for s in SCENARIOS:
        cells = summary.get(s, {})
        row = [ROWS[s]]
        for n in names:
            c = cells.get(n)
            if c is None:
                row.append("-")
                continue
            spread = f" ({c['min'] / 1000:,.0f}-{c['max'] / 1000:,.0f})" if c["max"] != c["min"] else ""
            row.append(f"{c['median'] / 1000:,.0f}{spread}")
        rows.append(row)
    ours = [n for n in names if n not in TITLES and not n.startswith("layer-") or n == "etagproxy"]
    for floor in ("floor-aiohttp", "floor-httptools", "floor-features"):
        if floor not in names:
            continue
        for n in ours:
            row = [f"{_title(n)} / {TITLES[floor]}"]
            for s in SCENARIOS:
                a, b = summary.get(s, {}).get(n), summary.get(s, {}).get(floor)
                row.append(f"{a['median'] / b['median']:.2f}x" if a and b else "-")
            rows.append(row)
    return rows


def _title(name: str) -> str:
    if name.startswith("layer-"):
        return f"features floor up to {name.removeprefix('layer-')}"
    return TITLES.get(name, f"etagproxy ({name})")


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(map(len, rows)))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# -- main --------------------------------------------------------------------------


def _start_all(stack: Stack, args: argparse.Namespace, workdir: Path, body: bytes, log: Callable[[str], None]
               ) -> dict[str, Counted]:
    use_nginx = args.upstream == "auto" and shutil.which("nginx") is not None
    origin = stack.origin(body=body, builtin=not use_nginx, workers=2)
    redis = stack.redis()
    python = Path(sys.executable)
    counted: dict[str, Counted] = {}
    sources = [(n, REPO) for n in args.targets if n == "etagproxy"] + list(args.compare)
    for name, source in sources:
        out = workdir / f"callgrind.{name}"
        svc = stack.proxy(name, upstream_port=origin.port, workers=1, source=source,
                          store=f"redis://127.0.0.1:{redis.port}/0",
                          command=[*valgrind(out), str(python), "-m", "etagproxy"], ready_timeout=READY_S)
        counted[name] = Counted(svc, out)
        log(f"  {name} ready under callgrind")
    for name in args.targets:
        if name == "etagproxy":
            continue
        kind = name.removeprefix("floor-")
        out = workdir / f"callgrind.{name}"
        svc = start_floor(stack, kind, origin, redis, wrap=valgrind(out), timeout=READY_S)
        counted[name] = Counted(svc, out)
        log(f"  {name} ready under callgrind")
    for upto in LAYERS if args.layers else ():
        out = workdir / f"callgrind.layer-{upto}"
        svc = start_floor(stack, "features", origin, redis, upto, wrap=valgrind(out), timeout=READY_S)
        counted[svc.name] = Counted(svc, out)
        log(f"  {svc.name} ready under callgrind")
    return counted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"instructions: {tool} is not installed: apt-get install -y valgrind", file=sys.stderr)
            return 2

    def _unwind(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _unwind)
    signal.signal(signal.SIGHUP, _unwind)

    def log(line: str) -> None:
        print(line, flush=True)

    # The same hash seed in every server: dict layouts, and so their
    # instruction counts, do not vary between runs.
    os.environ["PYTHONHASHSEED"] = "0"
    workdir = Path(tempfile.mkdtemp(prefix="etagproxy-instructions-"))
    body = configs.item_document(20 * 1024)
    started = time.time()
    runs: list[dict[str, Any]] = []
    try:
        with Stack(workdir) as stack:
            log("instructions: starting the servers under callgrind (a minute or two)")
            counted = _start_all(stack, args, workdir, body, log)
            names = list(counted)
            for rnd in range(args.rounds):
                for s in args.scenarios:
                    for name in names:
                        if (name == "fixed304" or name.startswith("layer-")) and s != "sc304":
                            continue
                        r = measure(counted[name], s, body, args.requests, args.warmup)
                        r["round"] = rnd + 1
                        runs.append(r)
                        log(f"  [{rnd + 1}] {s:12s} {name:16s} {r['per_request']:>10,} instructions/request "
                            f"({r['wall_s']} s)")
    except KeyboardInterrupt:
        log("instructions: interrupted; every started process has been stopped")
        return 130
    except (StartError, CheckFailed, OSError) as exc:
        log(f"instructions: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "plan": {"requests": args.requests, "warmup": args.warmup, "rounds": args.rounds, "keys": KEYS},
        "compared": [[n, str(s)] for n, s in args.compare],
        "summary": summary,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    log("")
    log(render(table(summary, names)))
    log(f"\ninstructions: {result['elapsed_s']} s; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
