"""Logging: the per-request access log on stdout, operational logs on stderr.

The access log is on the hot path, so it avoids the `logging` module
(a LogRecord, handler locks and a formatter per line): each request becomes
one pre-formatted line appended to an in-memory buffer, and the buffer goes
to stdout in one `write()` when it holds `max_buffer` bytes or `interval`
seconds after its first line, whichever comes first. An idle proxy
schedules no timer at all. A crash loses at most that buffer; a clean stop
flushes it.

Operational messages (startup, the effective configuration, reloads,
shutdown, unexpected errors) are rare and go through `logging` to stderr,
as JSON objects or as text for humans (`--log-format`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import stat
import sys
import time
from json.encoder import encode_basestring_ascii as _q
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etagproxy.exchange import Exchange

FORMATS = ("json", "text")

_stamp_second = -1
_stamp_prefix = ""


def _timestamp() -> str:
    """UTC time with milliseconds, ISO 8601; the seconds part is cached."""
    global _stamp_second, _stamp_prefix
    now = time.time()
    second = int(now)
    if second != _stamp_second:
        _stamp_second = second
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_stamp_prefix}.{int((now - second) * 1000):03d}Z"


def json_line(ex: Exchange, pid: int) -> str:
    """One access-log line as a JSON object.

    Assembled by hand: about 2.5 µs against 6.5 µs for `json.dumps` of a
    dict. Strings go through the C string encoder, so a request id, route
    or key can never break the line.
    """
    up = ex.upstream_status
    level = "error" if ex.status >= 500 else "info"
    line = (
        f'{{"time":"{_timestamp()}","level":"{level}","request_id":{_q(ex.rid)},"method":{_q(ex.method)},'
        f'"path":{_q(ex.target)},"route":{_q(ex.route)},"key":{_q(ex.key)},"status":{ex.status},'
        f'"upstream_status":{"null" if up is None else up},"decision":{_q(ex.decision)},'
        f'"store_ms":{ex.store_ms:.3f},"upstream_ms":{ex.upstream_ms:.3f},'
        f'"ms":{(time.perf_counter() - ex.start) * 1000:.3f},'
        f'"bytes_in":{ex.bytes_in},"bytes_out":{ex.bytes_out},"client":{_q(ex.client)},'
        f'"user_agent":{_q(ex.agent)},"trace_id":"{ex.trace_id}","span_id":"{ex.span_id}","pid":{pid}'
    )
    if ex.error:
        return f'{line},"error":{_q(ex.error)}}}\n'
    return line + "}\n"


def text_line(ex: Exchange, pid: int) -> str:
    """One access-log line for people reading a terminal."""
    up = "-" if ex.upstream_status is None else ex.upstream_status
    total = (time.perf_counter() - ex.start) * 1000
    line = (
        f"{_timestamp()} [{pid}] {ex.rid} {ex.client or '-'} {ex.method} {ex.target or '-'}"
        f" route={ex.route} key={ex.key or '-'} {ex.status}"
        f" upstream={up} decision={ex.decision or '-'} store={ex.store_ms:.1f}ms"
        f" upstream_time={ex.upstream_ms:.1f}ms total={total:.1f}ms"
        f" in={ex.bytes_in} out={ex.bytes_out} trace={ex.trace_id or '-'}/{ex.span_id or '-'}"
    )
    return f"{line} error={ex.error}\n" if ex.error else line + "\n"


class AccessLog:
    """Buffered access-log writer; call it with each finished `Exchange`."""

    def __init__(
        self,
        fd: int | None = None,
        *,
        fmt: str = "json",
        interval: float = 0.2,
        max_buffer: int = 64 * 1024,
    ) -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        # Writes of up to PIPE_BUF bytes to a pipe are atomic (POSIX), so
        # when workers share one stdout pipe each write carries whole lines
        # and no line is ever cut by another worker's.
        self._chunk = select.PIPE_BUF if stat.S_ISFIFO(os.fstat(self._fd).st_mode) else 0
        self._format = json_line if fmt == "json" else text_line
        self._pid = os.getpid()
        self._interval = interval
        self._max = max_buffer
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._broken = False

    def __call__(self, ex: Exchange) -> None:
        if self._broken:
            return
        line = self._format(ex, self._pid)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Write everything buffered now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        self._size = 0
        try:
            if self._chunk:
                batch: list[str] = []
                size = 0
                for line in lines:
                    if batch and size + len(line) > self._chunk:
                        self._write("".join(batch))
                        batch.clear()
                        size = 0
                    batch.append(line)
                    size += len(line)
                self._write("".join(batch))
            else:
                self._write("".join(lines))
        except BrokenPipeError:
            # Nobody reads stdout any more: keep serving, stop logging.
            self._broken = True
        except BlockingIOError:
            # A non-blocking stdout that is full: drop this batch rather
            # than stall every request behind the log reader.
            pass

    def _write(self, text: str) -> None:
        view = memoryview(text.encode("utf-8", "replace"))
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        self.flush()


class JsonFormatter(logging.Formatter):
    """Operational log records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """`time level [pid] message key=value...` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(
                f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'), default=str)}"
                for k, v in fields.items()
            )
        return text


def setup_logging(fmt: str = "json", *, level: int = logging.INFO) -> None:
    """Send the `etagproxy` logger to stderr in `fmt` ("json" or "text").

    Structured values go in `extra={"fields": {...}}`; JSON output merges
    them into the object, text output appends them as key=value.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("etagproxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
