"""The Redis epoch as a connection learns it, and as the scripts take it.

The epoch is the server process's `run_id` (DESIGN §2, "Redis epoch"). The
lean client reads `INFO server` once per connection, since a server process
cannot change under a TCP connection (a restart or a failover ends it), and
every script call ends its ARGV with the pair `epoch_tail` gives
(lua/prelude.lua). A caller without one sends NO_EPOCH and the script reads
INFO itself.
"""

from __future__ import annotations

import re

_RUN_ID = re.compile(rb"run_id:([0-9a-f]+)")
_UPTIME = re.compile(rb"uptime_in_seconds:(\d+)")
_SERVER_TIME = re.compile(rb"server_time_usec:(\d+)")

NO_EPOCH = (b"", b"")
"""The epoch pair of a caller that has no connection-read epoch: the script
then reads INFO itself."""


def run_id(info: bytes) -> bytes:
    """The run_id of an `INFO server` reply, or b"" if it has none."""
    found = _RUN_ID.search(info)
    return found.group(1) if found else b""


def epoch_tail(info: bytes) -> tuple[bytes, bytes]:
    """(run_id, the server process's start in ms of its own clock) from an
    `INFO server` reply, or NO_EPOCH if it lacks either. The start is taken
    as the server's time at the reply less its whole seconds of uptime: no
    later than the real start, so an uptime computed from it is never
    longer than the one INFO would give (the restart fence in begin.lua is
    never shortened)."""
    rid, up, now = _RUN_ID.search(info), _UPTIME.search(info), _SERVER_TIME.search(info)
    if rid is None or up is None or now is None:
        return NO_EPOCH
    return rid.group(1), str(int(now.group(1)) // 1000 - int(up.group(1)) * 1000).encode()
