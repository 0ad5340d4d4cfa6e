"""Run the chaos scenarios and print (or publish) their results table.

    python -m bench.chaos            the scenarios CI runs (marker `chaos`)
    python -m bench.chaos --all      also the long ones (ETAGPROXY_CHAOS_LONG=1)
    python -m bench.chaos --write    and rewrite the table in docs/RELIABILITY.md

Each scenario is a pytest test under tests/ that starts and stops its own
processes on loopback and ends with `tests.chaos_rows.report()`; this runner
collects those rows (one JSON line each) and renders one Markdown table,
stamped with the date and the commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- chaos-table:begin -->", "<!-- chaos-table:end -->"


def table(rows: list[dict], *, commit: str, when: str, command: str) -> str:
    lines = [
        f"Measured {when} at commit `{commit}` with `{command}`.",
        "",
        "| scenario | acked | lost | erased | landed, unacked | chain problems | client errors | recovery | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["client_errors"].items())) or "–"
        recovery = "–" if r["recovery_s"] is None else f"{r['recovery_s']:.2f} s"
        notes = "; ".join(f"{k} {v}" for k, v in r["notes"].items()) or "–"
        lines.append(
            f"| {r['scenario']} | {r['acked']} | {r['lost']} | {r['erased']} | {r['landed_unacknowledged']}"
            f" | {r['chain_problems']} | {errors} | {recovery} | {notes} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also run the long scenarios")
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/RELIABILITY.md")
    parser.add_argument("-k", default=None, help="only scenarios matching this pytest -k expression")
    args = parser.parse_args(argv)

    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as results:
        path = results.name
    env = dict(os.environ, ETAGPROXY_CHAOS_RESULTS=path, PYTHONPATH=str(REPO))
    if args.all:
        env["ETAGPROXY_CHAOS_LONG"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "chaos", "tests"]
    if args.k:
        command += ["-k", args.k]
    code = subprocess.call(command, cwd=REPO, env=env)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    os.unlink(path)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip() or "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = "python -m bench.chaos" + (" --all" if args.all else "")
    text = table(rows, commit=commit, when=when, command=shown)
    print(text)
    if args.write:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    if code != 0:
        print(f"pytest exited with {code}: a scenario failed", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
