"""The Django REST Framework test API (tests/drf_app) as a real process.

`drf_api` starts `python -m tests.drf_app.serve` once per session on a free
loopback port with a fresh sqlite file; the process counts as started when
it prints its port (an event, not a guess). Tests create their own rows
through the API, so they never depend on each other's data.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["drf_api"]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def drf_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the running DRF API, e.g. `http://127.0.0.1:40123`."""
    db = tmp_path_factory.mktemp("drf") / "db.sqlite3"
    env = {**os.environ, "DRF_APP_DB": str(db), "PYTHONUNBUFFERED": "1"}
    # stderr goes to a file: a pipe nobody reads could fill and stall the app.
    errors = db.with_name("stderr.txt")
    with errors.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.drf_app.serve"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    assert proc.stdout is not None
    line = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not line.startswith("listening on"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                proc.wait()
                proc.stdout.close()
                raise RuntimeError(f"the DRF app did not start: {errors.read_text()}")
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                proc.stdout.close()
                raise RuntimeError(f"the DRF app exited: {errors.read_text()}")
    try:
        yield "http://" + line.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
