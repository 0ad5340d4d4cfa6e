"""CPU time and memory of a process tree, read from /proc (Linux only).

The benchmark charges each process tree (nginx master + workers, the proxy
supervisor + workers, redis-server) with the CPU it used during one load
run, so the numbers say where the time went, not only how fast the whole
machine was. Counters are read from /proc/<pid>/stat (utime + stime, in
clock ticks) for every live process of the tree; children that exited and
were reaped are added through the parent's cutime + cstime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK = float(os.sysconf("SC_CLK_TCK"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name sits in parentheses and may itself contain spaces or ')'.
    return raw[raw.rfind(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    seen: set[int] = set()
    todo = [root]
    while todo:  # bounded: every pid is visited at most once
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by `root`'s tree (live and reaped)."""
    total = 0.0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # stat(5): utime=14 stime=15 cutime=16 cstime=17 (1-based, from pid).
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime + cutime + cstime
    return total / _TICK


@dataclass(frozen=True, slots=True)
class Memory:
    """Memory of a process tree, in bytes."""

    rss: int
    """Sum of resident set sizes (counts pages shared between workers twice)."""
    pss: int
    """Sum of proportional set sizes: shared pages split between sharers, so
    this is what the tree costs the machine (what a container limit sees)."""
    max_rss: int
    """Largest single process."""
    processes: int


def _one_memory(pid: int) -> tuple[int, int] | None:
    """(rss, pss) of one process, or None when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
        return rss, pss
    except OSError:
        pass
    # smaps_rollup needs Linux 4.14; fall back to statm (no PSS).
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except OSError:
        return None
    return rss, rss


def memory(root: int) -> Memory:
    rss = pss = max_rss = count = 0
    for pid in tree(root):
        one = _one_memory(pid)
        if one is None:
            continue
        rss += one[0]
        pss += one[1]
        max_rss = max(max_rss, one[0])
        count += 1
    return Memory(rss=rss, pss=pss, max_rss=max_rss, processes=count)


def memory_by_process(root: int) -> list[dict[str, int | str]]:
    """Each process of the tree: pid, role (root or child), rss and pss in bytes."""
    out: list[dict[str, int | str]] = []
    for pid in tree(root):
        one = _one_memory(pid)
        if one is not None:
            out.append({"pid": pid, "role": "root" if pid == root else "child", "rss": one[0], "pss": one[1]})
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait).

    Compared with what the benchmark's own processes used in the same
    interval, it shows how much CPU something else took during a run.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]
    # (guest time is already counted in user).
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK
