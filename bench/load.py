"""Scenarios and the wrk runs that drive them.

wrk is a closed-loop generator: each connection sends its next request when
the previous answer is complete, so "connections" is the concurrency and
req/s is what the target sustains at it. Every run is bounded in time
(`-d`) and, through the subprocess timeout, in wall clock. Each script
ends with `lua/report.lua`, which prints the totals and latency percentiles
as one JSON line.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "lua"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    script: str
    """"rotate" (precomputed requests in turn) or "ifmatch" (PUT chains)."""
    method: str
    path: str
    """Path template: `{k}` is the key number, `{tid}` the wrk thread."""
    conditional: str = ""
    """Header carrying a per-target tag (If-None-Match), if any."""
    body: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("get", "GET forwarded (ETag attached)", "rotate", "GET", "/api/items/{k}"),
    Scenario(
        "inm304", "GET If-None-Match, revalidating (origin asked)", "rotate", "GET",
        "/api/items/{k}", conditional="If-None-Match",
    ),
    Scenario(
        "sc304", "GET If-None-Match, short_circuit (origin not asked)", "rotate", "GET",
        "/api/sc/{k}", conditional="If-None-Match",
    ),
    Scenario("put_ifmatch", "PUT 20 KB with current If-Match", "ifmatch", "PUT", "/api/items/m{tid}-{k}", body=True),
    Scenario("put", "PUT 20 KB without precondition", "rotate", "PUT", "/api/items/b{tid}-{k}", body=True),
)
BY_NAME = {s.name: s for s in SCENARIOS}


def lua_value(value: object) -> str:
    """Python data as a Lua expression (str, int, float, bool, None, list, dict)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in '\\"':
                out.append("\\" + ch)
            elif 32 <= ord(ch) < 127:
                out.append(ch)
            else:
                out.extend(f"\\{b}" for b in ch.encode())
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "{" + ",".join(lua_value(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"[{lua_value(k)}]={lua_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua form for {type(value).__name__}")


def write_script(path: Path, kind: str, bench: dict[str, object]) -> Path:
    """`BENCH = {...}` + lua/<kind>.lua + lua/report.lua, as one wrk script."""
    text = "BENCH = " + lua_value(bench) + "\n"
    text += (LUA / f"{kind}.lua").read_text() + "\n" + (LUA / "report.lua").read_text()
    path.write_text(text)
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int]
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    cpu_s: float
    """CPU used by wrk itself (user + system)."""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class WrkError(RuntimeError):
    pass


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def threads_for(connections: int, limit: int) -> int:
    return max(1, min(limit, connections))


def run_wrk(
    *,
    port: int,
    script: Path,
    connections: int,
    duration_s: int,
    threads: int,
    timeout_s: float = 5.0,
) -> WrkResult:
    """One wrk run; blocks for `duration_s` (plus wrk's start and stop)."""
    binary = wrk_binary()
    if binary is None:
        raise WrkError("wrk not found (apt-get install -y wrk)")
    argv = [
        binary, "-t", str(threads_for(connections, threads)), "-c", str(connections),
        "-d", f"{duration_s}s", "--timeout", f"{timeout_s:g}s", "-s", str(script),
        f"http://127.0.0.1:{port}/",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=duration_s + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {duration_s + 60}s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout.decode(errors="replace")
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise WrkError(f"wrk failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}{out[-500:]}")
    data = json.loads(line[len("WRKJSON "):])
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        errors={k: data[k] for k in ("connect", "read", "write", "status", "timeout")},
        p50_us=data["p50_us"],
        p90_us=data["p90_us"],
        p99_us=data["p99_us"],
        mean_us=data["mean_us"],
        max_us=data["max_us"],
        cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


def start_wrk(
    *, port: int, script: Path, connections: int, duration_s: int, threads: int
) -> subprocess.Popen[bytes]:
    """A wrk run in the background (memory sampling, soak); see `finish_wrk`."""
    binary = wrk_binary()
    if binary is None:
        raise WrkError("wrk not found (apt-get install -y wrk)")
    argv = [
        binary, "-t", str(threads_for(connections, threads)), "-c", str(connections),
        "-d", f"{duration_s}s", "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}/",
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_wrk(proc: subprocess.Popen[bytes], duration_s: int) -> dict[str, object]:
    try:
        out, err = proc.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise WrkError("wrk did not finish") from exc
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise WrkError(f"wrk failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    data: dict[str, object] = json.loads(line[len("WRKJSON "):])
    return data
