"""Turn the raw runs into medians, ratios, target verdicts, tables and a chart.

A target is judged on the configuration the targets name (2 workers, Redis
store); the other configurations are shown next to it for comparison.
Baselines, per scenario:

- direct: wrk against the origin itself. For the 304 scenarios this is the
  origin answering the 304 from its own ETag.
- nginx: wrk against nginx proxy_pass in front of the same origin. For the
  short-circuit 304 scenario nginx answers from the file itself, as the
  proxy answers from its store: "nginx serving the same 304".
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1_000_000
DISTURBED_CORES = 0.2
"""CPU (in cores) taken by other processes above which a run counts as disturbed."""

SCENARIO_TITLES = {
    "get": "GET forwarded, 20 KB (ETag attached)",
    "inm304": "GET If-None-Match -> 304, revalidating (origin asked)",
    "sc304": "GET If-None-Match -> 304, short_circuit + public",
    "put_ifmatch": "PUT 20 KB, current If-Match (BEGIN / forward / END)",
    "put": "PUT 20 KB, no precondition (BEGIN / forward / END)",
}


# -- summary ------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds for every (scenario, connections, target)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["connections"], r["target"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (scenario, conns, target), rs in groups.items():
        row: dict[str, Any] = {
            "scenario": scenario,
            "connections": conns,
            "target": target,
            "rounds": len(rs),
            "rps": round(_median([r["rps"] for r in rs]), 1),
            "p50_us": round(_median([r["p50_us"] for r in rs]), 1),
            "p99_us": round(_median([r["p99_us"] for r in rs]), 1),
            "errors": sum(sum(r["errors"].values()) for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "pss_bytes": max(r["pss_bytes"] for r in rs),
            "other_cores": round(_median([r.get("other_cores", 0.0) for r in rs]), 2),
        }
        cpu: dict[str, float] = {}
        for part in rs[0]["cpu_s"]:
            per = [r["cpu_s"][part] / r["requests"] * 10_000 for r in rs if r["requests"]]
            cpu[part] = round(_median(per), 3)
        row["cpu_per_10k"] = cpu
        rows.append(row)
    index = {(r["scenario"], r["connections"], r["target"]): r for r in rows}
    for row in rows:
        for ref in ("direct", "nginx"):
            base = index.get((row["scenario"], row["connections"], ref))
            row[f"x_{ref}"] = round(row["rps"] / base["rps"], 3) if base and base["rps"] else None
            row[f"added_p50_us_vs_{ref}"] = round(row["p50_us"] - base["p50_us"], 1) if base else None
    order = {name: i for i, name in enumerate(SCENARIO_TITLES)}
    rows.sort(key=lambda r: (order.get(r["scenario"], 99), -r["connections"]))
    return rows


def soak_summary(
    target: str, samples: list[tuple[float, int, int]], requests: int, errors: dict[str, int]
) -> dict[str, Any]:
    """Growth of the proxy's PSS from early in the run (after warm-up) to its end.

    The first tenth of the run is warm-up (pools fill, allocator arenas grow);
    the baseline is the median of the second tenth, the end value the median
    of the last tenth, and the slope a least-squares fit after warm-up.
    """
    if len(samples) < 5:
        return {"target": target, "samples": samples, "requests": requests, "errors": errors,
                "pass": None, "why": "too few samples"}
    span = samples[-1][0]
    warm = [s for s in samples if s[0] >= 0.1 * span]
    base = [s[1] for s in samples if 0.1 * span <= s[0] < 0.2 * span] or [warm[0][1]]
    end = [s[1] for s in samples if s[0] >= 0.9 * span] or [samples[-1][1]]
    baseline, final = _median([float(b) for b in base]), _median([float(e) for e in end])
    xs = [s[0] / 60 for s in warm]
    ys = [s[1] / MB for s in warm]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    allowed = max(5 * MB, 0.05 * baseline)
    return {
        "target": target,
        "seconds": round(span, 1),
        "requests": requests,
        "errors": errors,
        "baseline_pss_bytes": int(baseline),
        "final_pss_bytes": int(final),
        "growth_bytes": int(final - baseline),
        "allowed_growth_bytes": int(allowed),
        "slope_mb_per_min": round(slope, 3),
        "pass": (final - baseline) <= allowed,
        "samples": samples,
    }


@dataclass(frozen=True)
class Goal:
    key: str
    title: str
    scenario: str
    connections: str
    """"tput" (the configured concurrency), "1", or "" for memory goals."""
    measure: str
    """"x_nginx", "added_p50_us_vs_direct", "memory", "soak"."""
    limit: float
    higher_is_better: bool


GOALS: tuple[Goal, ...] = (
    Goal("get_rps", "forwarded GET req/s vs nginx proxy_pass", "get", "tput", "x_nginx", 0.25, True),
    Goal("sc_rps", "short-circuit 304 req/s vs nginx serving the 304", "sc304", "tput", "x_nginx", 0.5, True),
    Goal("put_rps", "PUT with If-Match req/s vs nginx proxy_pass", "put_ifmatch", "tput", "x_nginx", 0.2, True),
    Goal("get_p50", "added p50 at 1 connection, forwarded GET (us)", "get", "1", "added_p50_us_vs_direct", 250, False),
    Goal(
        "sc_p50", "added p50 at 1 connection, short-circuit 304 (us)", "sc304", "1",
        "added_p50_us_vs_direct", 150, False,
    ),
    Goal("memory", "proxy memory (PSS) at many connections (MB)", "get", "", "memory", 100, False),
    Goal("soak", "memory growth over the soak run (MB)", "", "", "soak", 0, False),
)


def evaluate(
    rows: list[dict[str, Any]],
    memory: list[dict[str, Any]],
    soak: dict[str, Any] | None,
    targets: list[dict[str, Any]],
    target_config: str,
    tput_connections: int,
) -> list[dict[str, Any]]:
    index = {(r["scenario"], r["connections"], r["target"]): r for r in rows}
    mem_index = {m["target"]: m for m in memory}
    checks = {t["name"]: t["checks"] for t in targets}
    proxies = [t["name"] for t in targets if t["kind"] == "proxy"]
    names = [target_config] + [p for p in proxies if p != target_config]
    out = []
    for goal in GOALS:
        values: dict[str, float | None] = {}
        invalid: dict[str, str] = {}
        for name in names:
            if goal.measure == "soak":
                ok = soak is not None and soak.get("target") == name and "growth_bytes" in soak
                values[name] = soak["growth_bytes"] / MB if ok else None  # type: ignore[index]
                continue
            if goal.measure == "memory":
                m = mem_index.get(name)
                values[name] = m["peak_pss_bytes"] / MB if m else None
                continue
            conns = tput_connections if goal.connections == "tput" else int(goal.connections)
            row = index.get((goal.scenario, conns, name))
            values[name] = row.get(goal.measure) if row else None
            why = (checks.get(name) or {}).get(goal.scenario)
            if why:
                invalid[name] = why
        value = values.get(target_config)
        if goal.measure == "soak":
            limit = soak["allowed_growth_bytes"] / MB if soak and "allowed_growth_bytes" in soak else 5.0
        else:
            limit = goal.limit
        if value is None:
            verdict = "not run"
        elif target_config in invalid:
            verdict = "INVALID"
        elif goal.higher_is_better:
            verdict = "PASS" if value >= limit else "FAIL"
        else:
            verdict = "PASS" if value <= limit else "FAIL"
        out.append({
            "key": goal.key,
            "title": goal.title,
            "config": target_config,
            "value": value,
            "limit": limit,
            "direction": ">=" if goal.higher_is_better else "<=",
            "verdict": verdict,
            "others": {k: v for k, v in values.items() if k != target_config},
            "invalid": invalid,
        })
    return out


def build(
    *,
    plan: dict[str, Any],
    machine: dict[str, Any],
    targets: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    memory: list[dict[str, Any]],
    soak: dict[str, Any] | None,
    problems: list[str],
    started: float,
    target_config: str,
) -> dict[str, Any]:
    rows = summarize(runs)
    disturbed = [r for r in runs if r.get("other_cores", 0.0) > DISTURBED_CORES]
    if disturbed:
        problems = [*problems, (
            f"{len(disturbed)} of {len(runs)} runs had more than {DISTURBED_CORES} cores taken by processes "
            "outside the benchmark (column 'other cores'); their numbers are noisy")]
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "plan": plan,
        "machine": machine,
        "targets": targets,
        "summary": rows,
        "goals": evaluate(rows, memory, soak, targets, target_config, plan["connections"]),
        "memory": memory,
        "soak": soak,
        "problems": problems,
        "runs": runs,
    }


# -- machine ------------------------------------------------------------------


def _version(argv: list[str], pattern: str) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(pattern, (proc.stdout + proc.stderr).decode(errors="replace"))
    return m.group(1) if m else "unknown"


def machine_info(*, use_nginx: bool) -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    repo = Path(__file__).resolve().parent.parent
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (repo / "etagproxy" / "__init__.py").read_text())
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod, key in (("aiohttp", "aiohttp"), ("redis", "redis_py"), ("uvloop", "uvloop")):
        try:
            versions[key] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[key] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "os": _os_name(),
        "origin": "nginx" if use_nginx else "bench/origin.py",
        "etagproxy": m.group(1) if m else "unknown",
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (?:debian/)?([0-9]\S*)"),
        "redis_server": _version(["redis-server", "--version"], r"v=(\S+)"),
        **versions,
    }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


# -- text -----------------------------------------------------------------------


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def progress_line(n: int, total: int, r: dict[str, Any]) -> str:
    errors = sum(r["errors"].values())
    cpu = r["cpu_s"]["target"] / r["requests"] * 10_000 if r["requests"] else 0.0
    return (
        f"[{n:3d}/{total}] r{r['round']} {r['scenario']:11s} c{r['connections']:<3d} {r['target']:9s} "
        f"{r['rps']:9.0f} req/s  p50 {_ms(r['p50_us']):>6s} ms  p99 {_ms(r['p99_us']):>6s} ms  "
        f"cpu {cpu:5.2f} s/10k" + (f"  errors {errors}" if errors else "")
    )


def memory_line(m: dict[str, Any]) -> str:
    errors = sum(m["errors"].values())
    return (
        f"  {m['target']:9s} c{m['connections']}: {m['rps']:8.0f} req/s, PSS idle "
        f"{m['idle_pss_bytes'] / MB:.1f} MB, peak {m['peak_pss_bytes'] / MB:.1f} MB "
        f"(RSS sum {m['peak_rss_bytes'] / MB:.1f} MB, largest process {m['peak_process_rss_bytes'] / MB:.1f} MB, "
        f"{m['processes']} processes)" + (f", errors {errors}" if errors else "")
        + _per_process(m)
    )


def _per_process(m: dict[str, Any]) -> str:
    procs = m.get("by_process_at_peak") or []
    if len(procs) < 2:
        return ""
    return "\n      at peak, PSS per process: " + ", ".join(
        f"{p['role']} {p['pss'] / MB:.1f}" for p in procs) + " MB"


def _errors(errors: dict[str, int] | int) -> str:
    """`{"status": 3, "timeout": 0}` as "3 (status 3)", or "0"."""
    if isinstance(errors, int):
        return str(errors)
    total = sum(errors.values())
    parts = ", ".join(f"{k} {v}" for k, v in errors.items() if v)
    return f"{total} ({parts})" if total else "0"


def _fmt_value(goal: dict[str, Any], v: float | None) -> str:
    if v is None:
        return "-"
    if goal["key"].endswith("_rps"):
        return f"{v:.2f}x"
    if goal["key"].endswith("_p50"):
        return f"{v:.0f} us"
    return f"{v:.1f} MB"


def _fmt_limit(goal: dict[str, Any]) -> str:
    lim = goal["limit"]
    if goal["key"].endswith("_rps"):
        return f">= {lim:.2f}x"
    if goal["key"].endswith("_p50"):
        return f"<= {lim:.0f} us"
    return f"<= {lim:.1f} MB" if goal["key"] == "soak" else f"< {lim:.0f} MB"


def scenario_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the main table (header first), shared by the text and markdown forms."""
    labels = {t["name"]: t["name"] for t in result["targets"]}
    header = ["scenario", "conns", "target", "req/s", "x direct", "x nginx", "p50 ms", "p99 ms",
              "+p50 us", "CPU s/10k self", "origin", "redis", "wrk", "other cores", "errors"]
    out = [header]
    for r in result["summary"]:
        cpu = r["cpu_per_10k"]
        added = r.get("added_p50_us_vs_direct")
        out.append([
            r["scenario"], str(r["connections"]), labels.get(r["target"], r["target"]),
            f"{r['rps']:.0f}", _x(r["x_direct"]), _x(r["x_nginx"]),
            _ms(r["p50_us"]), _ms(r["p99_us"]),
            "-" if added is None or r["target"] == "direct" else f"{added:+.0f}",
            f"{cpu.get('target', 0):.2f}", f"{cpu.get('origin', 0):.2f}",
            f"{cpu['redis']:.2f}" if "redis" in cpu else "-", f"{cpu.get('wrk', 0):.2f}",
            f"{r.get('other_cores', 0.0):.2f}", str(r["errors"]),
        ])
    return out


def goal_table(result: dict[str, Any]) -> list[list[str]]:
    goals = result["goals"]
    others = list(goals[0]["others"]) if goals else []
    header = ["target", "limit", goals[0]["config"] if goals else "value", "verdict", *others]
    out = [header]
    for g in goals:
        out.append([
            g["title"], _fmt_limit(g), _fmt_value(g, g["value"]), g["verdict"],
            *[_fmt_value(g, g["others"].get(o)) for o in others],
        ])
    return out


def _text(rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text_tables(result: dict[str, Any]) -> str:
    parts = [
        "Medians of {rounds} round(s); CPU is seconds per 10,000 requests of each process tree "
        "('self' = the target: origin for direct, nginx, or etagproxy); 'other cores' is CPU taken by "
        "processes outside the benchmark during the run, in cores.".format(rounds=result["plan"]["rounds"]),
        _text(scenario_table(result), right_from=3),
    ]
    if result["memory"]:
        parts.append("Memory at {} connections (forwarded GET):\n".format(result["memory"][0]["connections"])
                     + "\n".join(memory_line(m) for m in result["memory"]))
    if result["soak"]:
        s = result["soak"]
        if "growth_bytes" in s:
            parts.append(
                f"Soak {s['target']} {s['seconds']:.0f}s, {s['requests']} requests, "
                f"errors {_errors(s['errors'])}: PSS "
                f"{s['baseline_pss_bytes'] / MB:.1f} -> {s['final_pss_bytes'] / MB:.1f} MB, "
                f"slope {s['slope_mb_per_min']:+.2f} MB/min"
            )
    parts.append("Targets (judged on {}):".format(result["goals"][0]["config"] if result["goals"] else "-"))
    parts.append(_text(goal_table(result), right_from=1))
    for g in result["goals"]:
        for name, why in g["invalid"].items():
            parts.append(f"  {g['key']} {name}: scenario check failed: {why}")
    if result["problems"]:
        parts.append("Problems:\n" + "\n".join("  " + p.replace("\n", "\n    ") for p in result["problems"]))
    return "\n\n".join(parts)


def _markdown(rows: list[list[str]], right_from: int) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def markdown_block(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["plan"]
    lines = [
        f"Run {result['started']} ({result['wall_seconds'] / 60:.1f} min): {p['rounds']} round(s) of "
        f"{p['duration']} s ({p['connections']} connections) and {p['latency_duration']} s (1 connection) per "
        f"scenario and target, medians shown.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, {m['os']}, "
        f"Linux {m['kernel']}; Python {m['python']}, aiohttp {m['aiohttp']}, redis-py {m['redis_py']}, "
        f"uvloop {m['uvloop']}; nginx {m['nginx']}, redis-server {m['redis_server']}, wrk {m['wrk']}. "
        f"Origin: {m['origin']}. Everything (wrk, origin, nginx, Redis, etagproxy) shares the same cores"
        + (f"; load average before the run {m['load_before'][0]:.2f}." if m.get("load_before") else "."),
        "",
        "**Targets** (judged on {}; other configurations for comparison):".format(
            result["goals"][0]["config"] if result["goals"] else "-"),
        "",
        _markdown(goal_table(result), right_from=1),
        "",
        "**All scenarios** (`+p50 us` is the p50 added over direct; CPU is seconds per 10,000 "
        "requests of each process tree, `self` being the target itself; `other cores` is the CPU that "
        "processes outside the benchmark took during the run, in cores — anything above ~0.1 means "
        "the row was disturbed):",
        "",
        _markdown(scenario_table(result), right_from=3),
    ]
    if result["memory"]:
        lines += ["", f"**Memory** at {result['memory'][0]['connections']} connections (forwarded GET):", ""]
        mem_rows = [["target", "req/s", "PSS idle MB", "PSS peak MB", "PSS per process at peak MB",
                     "RSS sum MB", "largest process RSS MB", "errors"]]
        for mm in result["memory"]:
            procs = mm.get("by_process_at_peak") or []
            mem_rows.append([
                mm["target"], f"{mm['rps']:.0f}", f"{mm['idle_pss_bytes'] / MB:.1f}",
                f"{mm['peak_pss_bytes'] / MB:.1f}",
                " + ".join(f"{p['pss'] / MB:.1f}" for p in procs) or "-",
                f"{mm['peak_rss_bytes'] / MB:.1f}",
                f"{mm['peak_process_rss_bytes'] / MB:.1f}",
                str(sum(mm["errors"].values())),
            ])
        lines.append(_markdown(mem_rows, right_from=1))
    s = result["soak"]
    if s and "growth_bytes" in s:
        lines += ["", (
            f"**Soak**: {s['target']}, {s['seconds']:.0f} s, {s['requests']} requests, "
            f"errors {_errors(s['errors'])}; "
            f"PSS {s['baseline_pss_bytes'] / MB:.1f} MB after warm-up, {s['final_pss_bytes'] / MB:.1f} MB at the "
            f"end, slope {s['slope_mb_per_min']:+.2f} MB/min.")]
    if result["problems"]:
        lines += ["", "Problems during the run:", ""]
        lines += ["- " + p.splitlines()[0] for p in result["problems"]]
    return "\n".join(lines)


# -- chart --------------------------------------------------------------------


COLORS = {"direct": "#9e9e9e", "nginx": "#2e7d32", "w1-memory": "#90caf9", "w1-redis": "#42a5f5",
          "w2-redis": "#1565c0"}


def chart(result: dict[str, Any], path: Path) -> bool:
    """Three panels: req/s at the throughput concurrency, p50 at 1 connection,
    and where the CPU goes for the judged configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no chart", file=sys.stderr)
        return False
    rows = result["summary"]
    if not rows:
        return False
    scenarios = [s for s in SCENARIO_TITLES if any(r["scenario"] == s for r in rows)]
    targets = [t["name"] for t in result["targets"]]
    tput = result["plan"]["connections"]
    index = {(r["scenario"], r["connections"], r["target"]): r for r in rows}
    fig, axes = plt.subplots(3, 1, figsize=(11, 12))
    width = 0.8 / max(1, len(targets))
    xs = range(len(scenarios))
    for panel, (conns, field, title, scale) in enumerate([
        (tput, "rps", f"requests/s at {tput} connections (higher is better; labels: ratio to nginx)", 1.0),
        (1, "p50_us", "p50 latency at 1 connection, ms (lower is better)", 1e-3),
    ]):
        ax = axes[panel]
        for i, t in enumerate(targets):
            vals = [(index.get((s, conns, t)) or {}).get(field, 0) * scale for s in scenarios]
            bars = ax.bar([x + i * width for x in xs], vals, width, label=t, color=COLORS.get(t))
            if field == "rps":
                for b, s in zip(bars, scenarios, strict=True):
                    r = index.get((s, conns, t))
                    if r and r["x_nginx"] is not None and t not in ("nginx", "direct"):
                        ax.annotate(f"{r['x_nginx']:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=6)
        ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in xs])
        ax.set_xticklabels(scenarios)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(targets))
    # Where the CPU goes, per 10k requests, for every target of each scenario.
    ax = axes[2]
    parts = ["target", "origin", "redis", "wrk"]
    part_colors = {"target": "#1565c0", "origin": "#9e9e9e", "redis": "#c62828", "wrk": "#ffb300"}
    labels = []
    pos = 0.0
    ticks = []
    for s in scenarios:
        for t in targets:
            r = index.get((s, tput, t))
            if not r:
                continue
            bottom = 0.0
            for part in parts:
                v = r["cpu_per_10k"].get(part, 0.0)
                if t == "direct" and part == "origin":
                    continue  # the origin is the target itself
                ax.bar(pos, v, 0.8, bottom=bottom, color=part_colors[part])
                bottom += v
            labels.append(t)
            ticks.append(pos)
            pos += 1
        pos += 0.8
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_title(f"CPU seconds per 10,000 requests at {tput} connections, by process "
                 f"(groups left to right: {', '.join(scenarios)})", fontsize=10)
    from matplotlib.patches import Patch

    names = {"target": "the target itself", "origin": "origin", "redis": "redis", "wrk": "wrk (load)"}
    ax.legend(handles=[Patch(color=part_colors[p], label=names[p]) for p in parts], fontsize=8, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"etagproxy benchmark, {result['machine']['cores']} cores, {result['started']}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- publishing -------------------------------------------------------------------


BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    a, b = text.find(begin), text.find(end)
    if a < 0 or b < a:
        raise ValueError(f"markers {begin} ... {end} not found")
    return text[: a + len(begin)] + "\n" + body.strip() + "\n" + text[b:]


def publish(result: dict[str, Any], chart_path: Path | None, repo: Path) -> None:
    """Committed copies: the summary JSON, the chart, the results block of the doc."""
    summary = {k: v for k, v in result.items() if k != "runs"}
    if summary.get("soak"):
        summary["soak"] = {k: v for k, v in summary["soak"].items() if k != "samples"}
    (repo / "bench" / "results-latest.json").write_text(json.dumps(summary, indent=1) + "\n")
    if chart_path is not None:
        shutil.copyfile(chart_path, repo / "docs" / "perf.png")
    doc = repo / "docs" / "PERFORMANCE.md"
    doc.write_text(replace_block(doc.read_text(), BEGIN, END, markdown_block(result)))
