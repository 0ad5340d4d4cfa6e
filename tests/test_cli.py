"""The command line as a user runs it: real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PY = [sys.executable, "-m", "etagproxy"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_plays_the_story_and_exits_0():
    done = run("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "This is a lost update." in out
    assert "412 Precondition Failed" in out
    assert "428 Precondition Required" in out
    assert "Both changes survived" in out


def test_check_config_reports_every_problem_with_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            listen: 0.0.0.0:99999
            upstream: ftp://example
            timeouts: {upstream: soon}
            routes:
              - path: /a/{id
              - path: /b/
                require_if_match: maybe
                colour: blue
            """
        )
    )
    done = run("check-config", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 5, done.stderr
    for line in lines:
        assert line.startswith(f"{bad}:"), line
    joined = done.stderr
    assert f"{bad}:1: listen" in joined
    assert f"{bad}:2: upstream" in joined
    assert f"{bad}:3: timeouts.upstream" in joined
    assert f"{bad}:5: routes[0].path" in joined
    assert f"{bad}:7: routes[1].require_if_match" in joined
    assert f"{bad}:8: routes[1].colour" in joined


def test_check_config_accepts_the_example():
    done = run("check-config", "config/etagproxy.yaml")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_run_refuses_a_broken_config_and_serves_nothing(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: http://127.0.0.1:1\nroutes: [{path: nope}]\n")
    done = run("run", "--config", str(bad))
    assert done.returncode == 2
    assert f"{bad}:2: routes[0].path" in done.stderr


def test_memory_store_with_several_workers_is_refused(tmp_path: Path):
    conf = tmp_path / "c.yaml"
    conf.write_text("upstream: http://127.0.0.1:1\nlisten: 127.0.0.1:0\nstore: memory://\n")
    done = run("run", "--config", str(conf), "--workers", "2")
    assert done.returncode == 2
    assert "memory://" in done.stderr and "redis" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_cleanly_on_signal(tmp_path: Path, sig: signal.Signals):
    conf = tmp_path / "c.yaml"
    conf.write_text("upstream: http://127.0.0.1:1\nlisten: 127.0.0.1:0\n")
    with subprocess.Popen(
        [*PY, "run", "--config", str(conf), "--log-format", "text"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stderr is not None
            # Wait for the process to say it listens (an event, not a guess).
            for line in proc.stderr:
                if "listening on" in line:
                    break
            else:
                pytest.fail("proxy exited before listening")
            proc.send_signal(sig)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
