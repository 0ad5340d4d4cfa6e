"""One row per chaos scenario: what a run did and what it lost.

A scenario test ends with `report(name, audit, ...)`: the row is printed
(`pytest -s` shows it) and, when ETAGPROXY_CHAOS_RESULTS names a file,
appended to it as one JSON line. `python -m bench.chaos` runs the scenarios
and turns those lines into the table of docs/RELIABILITY.md.

A row's `lost` is the number of stale writes the upstream applied over a
proxied write (the audit's "lost update" problems; a stale write that only
erased writes made straight at the API, bypassing the proxy, is counted in
the run's notes instead); `problems` is every broken promise the audit
found (tests/counter_clients.py), and a scenario asserts it is empty. The
other columns are what make a 0 meaningful: how much was acknowledged,
what the clients saw, and how long recovery took.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import pytest

from tests.counter_clients import Audit

RESULTS_ENV = "ETAGPROXY_CHAOS_RESULTS"


@dataclass
class Row:
    scenario: str
    acked: int
    lost: int
    erased: int
    landed_unacknowledged: int
    chain_problems: int
    problems: int
    client_errors: dict[str, int]
    """Client-visible answers other than 2xx and 412, by status or exception name."""
    recovery_s: float | None = None
    """From the end of the fault to the first acknowledged write after it."""
    notes: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        errors = " ".join(f"{k}={v}" for k, v in sorted(self.client_errors.items())) or "-"
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        notes = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"CHAOS {self.scenario}: acked={self.acked} lost={self.lost} erased={self.erased} "
            f"landed-unacked={self.landed_unacknowledged} chain={self.chain_problems} problems={self.problems} "
            f"errors[{errors}] recovery={recovery} {notes}".rstrip()
        )


def report(
    scenario: str, result: Audit, *, recovery_s: float | None = None, **notes: object
) -> Row:
    """Print and record the row of one run; returns it for the test's asserts."""
    errors = {k: v for k, v in result.outcomes.items() if not (k.startswith("2") or k == "412")}
    row = Row(
        scenario=scenario,
        acked=result.acknowledged,
        lost=sum(1 for p in result.problems if p.startswith("lost update")),
        erased=result.erased,
        landed_unacknowledged=result.landed_unacknowledged,
        chain_problems=sum(1 for p in result.problems if "chain" in p or "validated" in p or "handed out" in p),
        problems=len(result.problems),
        client_errors=errors,
        recovery_s=recovery_s,
        notes=dict(notes),
    )
    print(row.line())
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(row)) + "\n")
    return row


long_scenario = pytest.mark.skipif(
    not os.environ.get("ETAGPROXY_CHAOS_LONG"),
    reason="a long chaos scenario: python -m bench.chaos --all (ETAGPROXY_CHAOS_LONG=1)",
)
"""Mark for a scenario too long for every CI run."""
