"""End-to-end benchmark: etagproxy against direct-to-origin and nginx proxy_pass.

    python bench/run.py              # ~8 minutes on 2 cores: 3 rounds, every scenario
    python bench/run.py --quick      # ~2 minutes: 1 round, shorter runs
    python bench/run.py --soak       # adds a 5-minute memory-growth run
    python bench/run.py --publish    # also refresh docs/PERFORMANCE.md, docs/perf.png,
                                     # bench/results-latest.json

One run starts its own origin (nginx, or bench/origin.py when nginx is not
installed), a front nginx (the proxy_pass baseline), redis-server and one
etagproxy per configuration, all on loopback ports chosen at start, and
stops every one of them on the way out. Targets are measured interleaved:
each round visits every scenario, and within it every target in an order
that rotates from round to round, so slow drift of the machine spreads over
all targets instead of landing on one. The summary takes the median of the
rounds.

Writes bench/results/latest.json (every run, the summary, the targets) and
bench/results/perf.png; prints a table of the numbers and of the targets.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs
import load
import procstat
import report
from stack import BENCH, REPO, Service, Stack, StartError

RESULTS = BENCH / "results"


@dataclass
class Target:
    """Something wrk points at: the origin itself, the nginx proxy, or an etagproxy."""

    name: str
    kind: str
    """"direct", "nginx" or "proxy"."""
    label: str
    service: Service
    workers: int = 0
    store: str = ""
    tags: dict[str, list[str]] = field(default_factory=dict)
    """Scenario name -> the tag for each key, for conditional scenarios."""
    checks: dict[str, str] = field(default_factory=dict)
    """Scenario name -> "" when the target answered as the scenario needs, else why not."""

    @property
    def if_match_header(self) -> str:
        # nginx's not-modified filter answers 412 to any If-Match on a
        # response without an ETag of its own (the origin's PUT answer), so
        # the baselines carry the same bytes under a name nginx ignores.
        return "If-Match" if self.kind == "proxy" else "X-If-Match"


@dataclass(frozen=True)
class Plan:
    rounds: int
    duration: int
    latency_duration: int
    connections: int
    memory_connections: int
    memory_duration: int
    soak_seconds: int
    keys: int
    body_size: int
    threads: int
    scenarios: tuple[str, ...]
    proxies: tuple[str, ...]


PROXY_CONFIGS: dict[str, tuple[int, str, str]] = {
    # name: (workers, store kind, label)
    "w1-memory": (1, "memory", "etagproxy 1 worker, memory://"),
    "w1-redis": (1, "redis", "etagproxy 1 worker, redis://"),
    "w2-redis": (2, "redis", "etagproxy 2 workers, redis://"),
}
TARGET_CONFIG = "w2-redis"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark etagproxy against direct-to-origin and nginx proxy_pass, on loopback.",
    )
    p.add_argument("--quick", action="store_true", help="1 round of short runs (~2 minutes)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--duration", type=int, help="seconds per throughput run (default 3, quick 2)")
    p.add_argument("--latency-duration", type=int, help="seconds per 1-connection run (default 2, quick 1)")
    p.add_argument("--connections", type=int, default=50, help="throughput concurrency (default 50)")
    p.add_argument("--memory-connections", type=int, default=1000, help="concurrency of the memory check")
    p.add_argument("--memory-duration", type=int, help="seconds of the memory check per target (default 5, quick 3)")
    p.add_argument("--soak", action="store_true", help="add a memory-growth run (--soak-seconds, default 300)")
    p.add_argument("--soak-seconds", type=int, default=300)
    p.add_argument("--scenarios", default=",".join(s.name for s in load.SCENARIOS),
                   help="comma-separated subset of: " + ", ".join(s.name for s in load.SCENARIOS))
    p.add_argument("--proxies", default=",".join(PROXY_CONFIGS),
                   help="comma-separated subset of: " + ", ".join(PROXY_CONFIGS))
    p.add_argument("--skip-memory", action="store_true", help="skip the many-connections memory check")
    p.add_argument("--threads", type=int, default=2, help="wrk threads at most (default 2)")
    p.add_argument("--keys", type=int, default=100, help="distinct resources the GET scenarios rotate over")
    p.add_argument("--body-size", type=int, default=20 * 1024, help="bytes per GET answer and PUT body")
    p.add_argument("--upstream", choices=("auto", "nginx", "builtin"), default="auto",
                   help="origin server: nginx when installed (auto), or bench/origin.py")
    p.add_argument("--origin-workers", type=int, default=2)
    p.add_argument("--nginx-workers", type=int, default=2, help="worker_processes of the front nginx")
    p.add_argument("--proxy-command", default=f"{sys.executable} -m etagproxy",
                   help="how to start etagproxy (default: this python -m etagproxy)")
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--publish", action="store_true",
                   help="also write docs/perf.png, bench/results-latest.json and the results block "
                   "of docs/PERFORMANCE.md")
    p.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs)")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    for s in scenarios:
        if s not in load.BY_NAME:
            raise SystemExit(f"unknown scenario {s!r}")
    proxies = tuple(s for s in args.proxies.split(",") if s)
    for s in proxies:
        if s not in PROXY_CONFIGS:
            raise SystemExit(f"unknown proxy configuration {s!r}")
    return Plan(
        rounds=args.rounds or (1 if args.quick else 3),
        duration=args.duration or (2 if args.quick else 3),
        latency_duration=args.latency_duration or (1 if args.quick else 2),
        connections=args.connections,
        memory_connections=args.memory_connections,
        memory_duration=0 if args.skip_memory else (args.memory_duration or (3 if args.quick else 5)),
        soak_seconds=args.soak_seconds if args.soak else 0,
        keys=args.keys,
        body_size=args.body_size,
        threads=max(1, min(2, args.threads)),
        scenarios=scenarios,
        proxies=proxies,
    )


# -- preparing targets ----------------------------------------------------------


def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def path_for(scenario: load.Scenario, k: int, tid: str = "{tid}") -> str:
    return scenario.path.replace("{k}", str(k)).replace("{tid}", tid)


def prepare(target: Target, plan: Plan, body: bytes) -> None:
    """Fetch the tags conditional scenarios send and check each scenario's answer.

    The GETs here are also what gives the proxies a version for every key,
    so the measured runs never mint.
    """
    port = target.service.port
    proxy = target.kind == "proxy"
    for name in plan.scenarios:
        scenario = load.BY_NAME[name]
        why = ""
        if scenario.conditional:
            tags = []
            for k in range(1, plan.keys + 1):
                status, headers, _ = _request(port, "GET", path_for(scenario, k))
                tags.append(headers.get("etag", ""))
                if status != 200 or not tags[-1]:
                    why = f"GET {path_for(scenario, k)}: {status}, ETag {tags[-1] or 'missing'}"
                    break
            target.tags[name] = tags
            if not why:
                status, _, data = _request(port, "GET", path_for(scenario, 1), {scenario.conditional: tags[0]})
                if status != 304:
                    why = f"If-None-Match on {path_for(scenario, 1)}: {status}, expected 304"
        elif scenario.method == "GET":
            status, headers, data = _request(port, "GET", path_for(scenario, 1))
            if status != 200 or len(data) != len(body):
                why = f"GET: {status}, {len(data)} bytes"
            elif proxy and "etag" not in headers:
                why = "GET: no ETag"
        elif scenario.script == "ifmatch":
            path = path_for(scenario, 1, tid="check")
            status, headers, _ = _request(port, "GET", path)
            tag = headers.get("etag", "")
            hdrs = {"Content-Type": "application/json", target.if_match_header: tag}
            status, headers, _ = _request(port, "PUT", path, hdrs, body)
            if status != 200:
                why = f"PUT with current tag: {status}"
            elif proxy:
                new = headers.get("etag", "")
                if not new or new == tag:
                    why = f"PUT: ETag {new or 'missing'} (was {tag})"
                else:
                    # The old tag must now be refused: the write really was checked.
                    status, _, _ = _request(port, "PUT", path, hdrs, body)
                    if status != 412:
                        why = f"PUT with the replaced tag: {status}, expected 412"
        else:
            status, headers, _ = _request(
                port, "PUT", path_for(scenario, 1, tid="check"), {"Content-Type": "application/json"}, body
            )
            if status != 200:
                why = f"PUT: {status}"
            elif proxy and "etag" not in headers:
                why = "PUT: no ETag"
        target.checks[name] = why


def script_for(
    target: Target, scenario: load.Scenario, connections: int, plan: Plan, body: bytes, workdir: Path
) -> Path:
    path = workdir / "scripts" / f"{target.name}-{scenario.name}-c{connections}.lua"
    if path.exists():
        return path
    path.parent.mkdir(exist_ok=True)
    text_body = body.decode() if scenario.body else None
    if scenario.script == "ifmatch":
        per_thread = -(-connections // load.threads_for(connections, plan.threads))
        data: dict[str, object] = {
            "path": scenario.path,
            "keys": 2 * per_thread + 8,
            "body": text_body,
            "tag_header": target.if_match_header,
        }
    else:
        # PUT keys: more than the requests one thread can have in flight, so a
        # key is never written twice at once (that would wait on the lease).
        count = plan.keys if scenario.method == "GET" else max(256, 4 * connections)
        data = {
            "method": scenario.method,
            "paths": [path_for(scenario, k) for k in range(1, count + 1)],
            "body": text_body,
        }
        if scenario.conditional:
            data["tags"] = target.tags[scenario.name]
            data["tag_header"] = scenario.conditional
    return load.write_script(path, scenario.script, data)


# -- measuring ----------------------------------------------------------------


def cpu_snapshot(services: dict[str, Service]) -> dict[str, float]:
    return {name: s.cpu() for name, s in services.items()}


def measure(
    target: Target,
    scenario: load.Scenario,
    connections: int,
    duration: int,
    plan: Plan,
    body: bytes,
    workdir: Path,
    shared: dict[str, Service],
) -> dict[str, Any]:
    """One wrk run against `target`, with the CPU every process spent on it."""
    script = script_for(target, scenario, connections, plan, body, workdir)
    watched = dict(shared)
    watched["target"] = target.service
    before = cpu_snapshot(watched)
    busy_before = procstat.machine_busy_seconds()
    result = load.run_wrk(
        port=target.service.port, script=script, connections=connections,
        duration_s=duration, threads=plan.threads,
    )
    busy = procstat.machine_busy_seconds() - busy_before
    after = cpu_snapshot(watched)
    cpu = {name: round(after[name] - before[name], 3) for name in watched}
    cpu["wrk"] = round(result.cpu_s, 3)
    # What the run's own processes used (the target is one of them, or is
    # the origin or the front nginx itself); the rest of the machine's busy
    # time went to something else.
    ours = sum(v for k, v in cpu.items() if k != "target")
    if target.kind == "proxy":
        ours += cpu["target"]
    cpu["other"] = round(max(0.0, busy - ours), 3)
    # The direct target is the origin itself; don't count it twice.
    if target.kind == "direct":
        cpu["target"] = cpu["origin"]
    elif target.kind == "nginx":
        cpu["target"] = cpu.pop("front", cpu["target"])
    cpu.pop("front", None)
    mem = target.service.memory()
    return {
        "target": target.name,
        "scenario": scenario.name,
        "connections": connections,
        "requests": result.requests,
        "duration_s": round(result.duration_s, 3),
        "rps": round(result.rps, 1),
        "p50_us": result.p50_us,
        "p90_us": result.p90_us,
        "p99_us": result.p99_us,
        "mean_us": result.mean_us,
        "max_us": result.max_us,
        "errors": result.errors,
        "cpu_s": cpu,
        "other_cores": round(cpu["other"] / result.duration_s, 2) if result.duration_s else 0.0,
        "rss_bytes": mem.rss,
        "pss_bytes": mem.pss,
    }


def memory_check(
    target: Target, plan: Plan, body: bytes, workdir: Path
) -> dict[str, Any]:
    """Peak memory of `target` while `memory_connections` clients GET through it."""
    scenario = load.BY_NAME["get"]
    script = script_for(target, scenario, plan.memory_connections, plan, body, workdir)
    idle = target.service.memory()
    proc = load.start_wrk(
        port=target.service.port, script=script, connections=plan.memory_connections,
        duration_s=plan.memory_duration, threads=plan.threads,
    )
    peak_pss = peak_rss = peak_max = 0
    samples = 0
    at_peak: list[dict[str, int | str]] = []
    deadline = time.monotonic() + plan.memory_duration + 30
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            m = target.service.memory()
            if m.pss > peak_pss:
                at_peak = procstat.memory_by_process(target.service.pid)
            peak_pss, peak_rss = max(peak_pss, m.pss), max(peak_rss, m.rss)
            peak_max = max(peak_max, m.max_rss)
            samples += 1
            time.sleep(0.2)
        data = load.finish_wrk(proc, plan.memory_duration)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = target.service.memory()
    duration = float(data["duration_us"]) / 1e6  # type: ignore[arg-type]
    return {
        "target": target.name,
        "connections": plan.memory_connections,
        "requests": data["requests"],
        "rps": round(float(data["requests"]) / duration, 1) if duration else 0.0,  # type: ignore[arg-type]
        "errors": {k: data[k] for k in ("connect", "read", "write", "status", "timeout")},
        "p99_us": data["p99_us"],
        "idle_pss_bytes": idle.pss,
        "peak_pss_bytes": peak_pss,
        "peak_rss_bytes": peak_rss,
        "peak_process_rss_bytes": peak_max,
        "after_pss_bytes": after.pss,
        "processes": after.processes,
        "by_process_at_peak": at_peak,
        "samples": samples,
    }


def soak(target: Target, plan: Plan, body: bytes, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Mixed load for `soak_seconds` in back-to-back wrk runs; memory sampled throughout.

    Each segment is a new wrk run, so connections are opened and closed over
    and over, and the scenarios alternate between reads, short-circuit 304s
    and If-Match writes.
    """
    mix = [s for s in ("get", "sc304", "put_ifmatch", "inm304", "put") if s in plan.scenarios] or ["get"]
    segment = 30
    start = time.monotonic()
    samples: list[tuple[float, int, int]] = []
    requests = 0
    errors: dict[str, int] = {}
    for i in range(plan.soak_seconds // 5 + 1):  # bounded: at least 5 s per segment
        left = plan.soak_seconds - (time.monotonic() - start)
        if left < 5:
            break
        scenario = load.BY_NAME[mix[i % len(mix)]]
        seconds = int(min(segment, left))
        script = script_for(target, scenario, plan.connections, plan, body, workdir)
        proc = load.start_wrk(
            port=target.service.port, script=script, connections=plan.connections,
            duration_s=seconds, threads=plan.threads,
        )
        deadline = time.monotonic() + seconds + 30
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                m = target.service.memory()
                samples.append((round(time.monotonic() - start, 2), m.pss, m.rss))
                time.sleep(2.0)
            data = load.finish_wrk(proc, seconds)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        requests += int(data["requests"])  # type: ignore[call-overload]
        for k in ("connect", "read", "write", "status", "timeout"):
            errors[k] = errors.get(k, 0) + int(data[k])  # type: ignore[call-overload]
        log(f"  soak {time.monotonic() - start:5.0f}s {scenario.name:12s} "
            f"pss {samples[-1][1] / report.MB if samples else 0:6.1f} MB")
    return report.soak_summary(target.name, samples, requests, errors)


# -- the run --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    if load.wrk_binary() is None:
        print("bench: wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    use_nginx = args.upstream == "nginx" or (args.upstream == "auto" and shutil.which("nginx"))
    if args.upstream == "nginx" and not shutil.which("nginx"):
        print("bench: nginx is not installed: apt-get install -y nginx-light", file=sys.stderr)
        return 2
    # Many connections need many descriptors; children inherit the limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every started process is stopped.
    def _unwind(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _unwind)
    signal.signal(signal.SIGHUP, _unwind)

    # Anything else running skews every number; say so up front.
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"bench: warning: load average {load_before[0]:.2f} before the run; other processes are "
              "competing for the CPU and the numbers will be noisy", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="etagproxy-bench-"))
    body = configs.item_document(plan.body_size)
    started = time.time()
    runs: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    soak_result: dict[str, Any] | None = None
    problems: list[str] = []
    targets: list[Target] = []

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        with Stack(workdir) as stack:
            origin = stack.origin(body=body, builtin=not use_nginx, workers=args.origin_workers)
            shared: dict[str, Service] = {"origin": origin}
            targets.append(Target("direct", "direct", f"origin ({origin.info['kind']}), no proxy", origin))
            if use_nginx:
                front = stack.front(origin.port, workers=args.nginx_workers)
                shared["front"] = front
                targets.append(Target("nginx", "nginx", "nginx proxy_pass, keep-alive pool", front))
            redis: Service | None = None
            if any(PROXY_CONFIGS[p][1] == "redis" for p in plan.proxies):
                try:
                    redis = stack.redis()
                    shared["redis"] = redis
                except StartError as exc:
                    problems.append(str(exc))
            command = args.proxy_command.split()
            for name in plan.proxies:
                workers, kind, label = PROXY_CONFIGS[name]
                if kind == "redis" and redis is None:
                    problems.append(f"{name}: skipped, no redis-server")
                    continue
                store = "memory://" if kind == "memory" else f"redis://127.0.0.1:{redis.port}/0"  # type: ignore[union-attr]
                try:
                    service = stack.proxy(
                        name, upstream_port=origin.port, store=store, workers=workers, command=command
                    )
                except StartError as exc:
                    problems.append(f"{name}: did not start: {exc}")
                    log(f"! {name} did not start:\n{exc}")
                    continue
                targets.append(Target(name, "proxy", label, service, workers=workers, store=kind))

            for t in targets:
                try:
                    prepare(t, plan, body)
                except OSError as exc:
                    problems.append(f"{t.name}: preparation failed: {exc}")
                    t.checks = {s: f"preparation failed: {exc}" for s in plan.scenarios}
                for s, why in t.checks.items():
                    if why:
                        problems.append(f"{t.name} {s}: {why}")
                        log(f"! {t.name} {s}: {why}")

            # Warm every target (connection pools, caches) before the first measured run.
            for t in targets:
                try:
                    load.run_wrk(port=t.service.port,
                                 script=script_for(t, load.BY_NAME["get"], plan.connections, plan, body, workdir),
                                 connections=plan.connections, duration_s=1, threads=plan.threads)
                except load.WrkError as exc:
                    problems.append(f"{t.name}: warm-up failed: {exc}")

            total = sum(
                1 for _ in range(plan.rounds) for _ in plan.scenarios for _ in (plan.connections, 1) for _ in targets
            )
            eta = plan.rounds * len(plan.scenarios) * len(targets) * (plan.duration + plan.latency_duration + 0.6)
            eta += (plan.memory_duration + 2) * len(targets) + plan.soak_seconds
            log(f"bench: {len(targets)} targets, {total} runs, about {eta / 60:.1f} minutes; workdir {workdir}")
            n = 0
            for rnd in range(plan.rounds):
                for sname in plan.scenarios:
                    scenario = load.BY_NAME[sname]
                    for connections, duration in ((plan.connections, plan.duration), (1, plan.latency_duration)):
                        shift = rnd % len(targets)
                        for t in targets[shift:] + targets[:shift]:
                            n += 1
                            for svc in [t.service, *shared.values()]:
                                if not svc.alive():
                                    raise StartError(f"{svc.name} died:\n{svc.log_tail()}")
                            try:
                                r = measure(t, scenario, connections, duration, plan, body, workdir, shared)
                            except load.WrkError as exc:
                                problems.append(f"round {rnd + 1} {t.name} {sname} c{connections}: {exc}")
                                log(f"! {t.name} {sname} c{connections}: {exc}")
                                continue
                            r["round"] = rnd + 1
                            runs.append(r)
                            log(report.progress_line(n, total, r))

            if plan.memory_duration:
                log(f"bench: memory at {plan.memory_connections} connections")
                for t in targets:
                    if t.kind == "direct":
                        continue
                    try:
                        m = memory_check(t, plan, body, workdir)
                    except load.WrkError as exc:
                        problems.append(f"{t.name} memory check: {exc}")
                        continue
                    memory.append(m)
                    log(report.memory_line(m))

            if plan.soak_seconds:
                pick = [t for t in targets if t.name == TARGET_CONFIG] or [t for t in targets if t.kind == "proxy"]
                if pick:
                    log(f"bench: soak {plan.soak_seconds}s against {pick[0].name}")
                    soak_result = soak(pick[0], plan, body, workdir, log)
                else:
                    problems.append("soak: no proxy running")
            for svc in stack.services:
                if not svc.alive():
                    problems.append(f"{svc.name} exited during the run:\n{svc.log_tail()}")
    except KeyboardInterrupt:
        log("bench: interrupted; every started process has been stopped")
        if not runs:
            return 130
        problems.append("interrupted")
    except StartError as exc:
        log(f"bench: {exc}")
        problems.append(str(exc))
        if not runs:
            return 1
    finally:
        if args.keep:
            log(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    result = report.build(
        plan=plan.__dict__,
        machine={**report.machine_info(use_nginx=bool(use_nginx)),
                 "load_before": [round(x, 2) for x in load_before],
                 "load_after": [round(x, 2) for x in os.getloadavg()]},
        targets=[{"name": t.name, "kind": t.kind, "label": t.label, "workers": t.workers,
                  "store": t.store, "checks": t.checks} for t in targets],
        runs=runs,
        memory=memory,
        soak=soak_result,
        problems=problems,
        started=started,
        target_config=TARGET_CONFIG,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    chart = args.output.with_name("perf.png")
    drew = report.chart(result, chart)
    print()
    print(report.text_tables(result))
    print(f"\nbench: wrote {args.output}" + (f" and {chart}" if drew else ""))
    if args.publish:
        report.publish(result, chart if drew else None, REPO)
        print("bench: published docs/PERFORMANCE.md, docs/perf.png, bench/results-latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
