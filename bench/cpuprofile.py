"""Where one etagproxy configuration spends its CPU under one scenario.

Starts the same origin / Redis / proxy as `run.py`, drives one scenario
with wrk, samples the proxy (every worker) with py-spy, and attributes each
sample to a component: the proxy's own logic, its upstream client, its store
code, redis-py, the aiohttp server, multidict/yarl, metrics. Frames of the
standard library (asyncio, contextlib, ...) are charged to the nearest
caller outside it, so the time redis-py spends in asyncio's streams counts
as redis-py. Samples with no such caller are the event loop itself.

    python bench/cpuprofile.py get --store redis [--workers 1] [--seconds 8]

Needs py-spy (`pip install py-spy`) and permission to ptrace the proxy
(root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs
import load
import run
from stack import BENCH, Stack

# (path prefix as py-spy prints it, component); first match wins.
COMPONENTS = (
    ("etagproxy/upstream.py", "etagproxy upstream client"),
    ("etagproxy/store/", "etagproxy store"),
    ("etagproxy/metrics.py", "metrics"),
    ("etagproxy/", "etagproxy request handling"),
    ("redis/", "redis-py"),
    ("hiredis", "redis-py"),
    ("aiohttp/", "aiohttp server"),
    ("multidict/", "multidict / yarl"),
    ("yarl/", "multidict / yarl"),
    ("prometheus_client/", "metrics"),
)


def _file(frame: str) -> str:
    # "function (path/file.py:123)"
    if frame.endswith(")") and "(" in frame:
        return frame[frame.rfind("(") + 1 : -1].rsplit(":", 1)[0]
    return frame


# Frames that only start the event loop: a sample whose innermost
# attributable frame is one of these is the loop's own work (polling, socket
# reads inside uvloop), which Python cannot see into.
LOOP_STARTERS = ("etagproxy/cli.py", "etagproxy/__main__.py", "etagproxy/workers.py")


def owner(frames: list[str]) -> tuple[str, str]:
    """(component, function) of the innermost frame outside the standard library."""
    for frame in reversed(frames):
        path = _file(frame)
        if path.endswith(LOOP_STARTERS):
            break
        for prefix, name in COMPONENTS:
            if path.startswith(prefix) or f"/{prefix}" in path:
                function = frame[: frame.rfind("(")].strip() if "(" in frame else frame
                return name, f"{function} ({path})"
    return "event loop / other", "(event loop, socket reads and polling inside uvloop)"


def analyse(raw: str) -> dict[str, Any]:
    total = 0
    by_component: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    by_owner: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        total += n
        name, function = owner(frames)
        by_component[name] += n
        by_owner[function] += n
        if frames:
            by_leaf[frames[-1]] += n
    return {
        "samples": total,
        "components": {k: round(v / total * 100, 1) for k, v in by_component.most_common()} if total else {},
        "top_functions": [(k, round(v / total * 100, 1)) for k, v in by_leaf.most_common(20)] if total else [],
        "top_owners": [(k, round(v / total * 100, 1)) for k, v in by_owner.most_common(25)] if total else [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Profile one etagproxy configuration under one scenario.")
    p.add_argument("scenario", choices=list(load.BY_NAME))
    p.add_argument("--store", choices=("memory", "redis"), default="redis")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--output", type=Path, help="JSON result (default bench/results/profile-<scenario>-<store>.json)")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks here (one line per stack and count)")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("bench: py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    if load.wrk_binary() is None:
        print("bench: wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="etagproxy-profile-"))
    body = configs.item_document(20 * 1024)
    plan = run.make_plan(run.parse_args(["--quick", "--connections", str(args.connections)]))
    try:
        with Stack(workdir) as stack:
            origin = stack.origin(body=body, builtin=shutil.which("nginx") is None, workers=2)
            store = "memory://"
            if args.store == "redis":
                store = f"redis://127.0.0.1:{stack.redis().port}/0"
            proxy = stack.proxy(
                "profiled", upstream_port=origin.port, store=store, workers=args.workers,
                command=[sys.executable, "-m", "etagproxy"],
            )
            target = run.Target("profiled", "proxy", "profiled", proxy)
            run.prepare(target, plan, body)
            if target.checks.get(args.scenario):
                print(f"bench: scenario check failed: {target.checks[args.scenario]}", file=sys.stderr)
            script = run.script_for(target, load.BY_NAME[args.scenario], args.connections, plan, body, workdir)
            wrk = load.start_wrk(port=proxy.port, script=script, connections=args.connections,
                                 duration_s=args.seconds + 3, threads=2)
            try:
                time.sleep(1.0)  # let wrk connect and the proxy reach steady state
                raw_path = workdir / "profile.txt"
                cmd = [spy, "record", "-p", str(proxy.pid), "-d", str(args.seconds), "-r", str(args.rate),
                       "--format", "raw", "-o", str(raw_path), "--nonblocking"]
                if args.workers > 1:
                    cmd.append("--subprocesses")
                spy_run = subprocess.run(cmd, capture_output=True, timeout=args.seconds + 60, check=False)
                data = load.finish_wrk(wrk, args.seconds + 3)
            finally:
                if wrk.poll() is None:
                    wrk.kill()
                    wrk.wait()
            if not raw_path.exists():
                print(f"bench: py-spy failed: {spy_run.stderr.decode(errors='replace')[-500:]}", file=sys.stderr)
                return 1
            result = analyse(raw_path.read_text())
            if args.raw:
                shutil.copyfile(raw_path, args.raw)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    duration = float(data["duration_us"]) / 1e6  # type: ignore[arg-type]
    result.update(scenario=args.scenario, store=args.store, workers=args.workers,
                  connections=args.connections, rps=round(float(data["requests"]) / duration, 1))  # type: ignore[arg-type]
    print(f"{args.scenario}, {args.store}, {args.workers} worker(s), {args.connections} connections: "
          f"{result['rps']:.0f} req/s, {result['samples']} samples")
    print("\nShare of the proxy's busy CPU by component:")
    for name, pct in result["components"].items():
        print(f"  {pct:5.1f}%  {name}")
    print("\nFunctions charged with the most samples (their own code plus the standard library they call):")
    for name, pct in result["top_owners"]:
        print(f"  {pct:5.1f}%  {name}")
    out = args.output or BENCH / "results" / f"profile-{args.scenario}-{args.store}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
