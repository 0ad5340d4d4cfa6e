"""`etagproxy inspect --config FILE URL`: what the store holds for one URL.

The URL is canonicalised and matched exactly as a request would be, so the
key shown is the key the proxy uses. Then the store is asked, read-only:
the state (committed, pending or absent), the token and the ETag it gives,
its epoch and age. A memory:// store lives inside the running proxy process
and cannot be read from here; the route and key are still shown.

`inspect_state` returns the lines instead of printing them; the admin
port's /inspect answers with it, using the running proxy's store.

Exit status: 0 when the URL falls in a tracked route, 1 when it does not or
the store cannot be reached.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from yarl import URL

from etagproxy.config import Config
from etagproxy.etag import make_etag
from etagproxy.routes import Router
from etagproxy.store import open_store
from etagproxy.store.base import KeyInfo, StoreError, VersionStore, now_ms
from etagproxy.target import TargetError, canonicalize


def _request_target(url: str) -> str:
    """The origin-form target (path and query) of an absolute URL or a path."""
    parsed = URL(url, encoded=True)
    if parsed.is_absolute():
        path = parsed.raw_path or "/"
        return path + ("?" + parsed.raw_query_string if parsed.raw_query_string else "")
    return url if url.startswith("/") else "/" + url


def _age(ms: int) -> str:
    seconds = max(0, ms) / 1000
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _stamp(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def describe(info: KeyInfo, *, now: int) -> list[tuple[str, str]]:
    """The store's view of a key as (label, value) lines."""
    rows = [("state", info.state)]
    version = info.version
    if version is not None:
        rows += [
            ("token", version.token),
            ("etag", str(make_etag(version.token))),
            ("exists", "yes" if version.exists else "not yet confirmed by a 2xx"),
            ("epoch", version.epoch or "-"),
            ("age", f"{_age(now - version.minted_ms)} (minted {_stamp(version.minted_ms)})"),
        ]
    if info.state == "pending":
        rows.append(("owner", info.owner or "-"))
        if info.deadline_ms is not None:
            left = info.deadline_ms - now
            rows.append(
                ("lease", f"expires in {_age(left)}" if left > 0 else f"expired {_age(-left)} ago")
            )
    rows += sorted(info.extra.items())
    return rows


@dataclass
class Inspection:
    """What `inspect` found for one URL: the lines to show and, when the
    URL has no live state to show, why (`problem` names the reason)."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None
    """None, "invalid-url", "not-tracked" or "store-unavailable"."""
    message: str = ""
    """What the CLI prints on stderr for `problem`."""


async def inspect_state(config: Config, url: str, *, store: VersionStore | None = None) -> Inspection:
    """The route, key and stored version of `url`; see module doc.

    `store` is a store that is already open (the admin endpoint passes the
    running proxy's); without one a store is opened for the call and closed.
    """
    try:
        target = canonicalize(_request_target(url))
    except (TargetError, ValueError) as exc:
        return Inspection([], "invalid-url", f"{url}: cannot be canonicalised: {exc}")
    match = Router(config.routes).key_for(target)
    rows: list[tuple[str, str]] = [("url", url), ("target", target.raw)]
    if match is None or not match.route.tracked:
        rows.append(("route", "-" if match is None else f"{match.route.template} (passthrough)"))
        return Inspection(
            rows, "not-tracked", f"{url}: not in a tracked route; the proxy keeps no version for it"
        )
    rows += [("route", match.route.template), ("key", match.key), ("store", config.store.masked_url)]
    if config.store.kind == "memory":
        rows.append(("state", "unknown: memory:// lives inside the running proxy process"))
        return Inspection(rows)
    opened = store is None
    if store is None:
        store = open_store(config.store, timeout_s=max(config.timeouts.store, 1.0))
    try:
        info = await store.inspect(match.key)
    except StoreError as exc:
        return Inspection(rows, "store-unavailable", f"store unavailable: {exc}")
    finally:
        if opened:
            await store.close()
    rows += describe(info, now=now_ms())
    return Inspection(rows)


async def inspect_url(config: Config, url: str, *, out: TextIO = sys.stdout) -> int:
    """Print the route, key and stored version of `url`; see module doc."""
    found = await inspect_state(config, url)
    if found.rows:
        _print(found.rows, out)
    if found.problem is not None:
        print(found.message, file=sys.stderr)
        return 1
    return 0


def format_rows(rows: list[tuple[str, str]]) -> str:
    """The rows as the CLI prints them: one aligned `label: value` a line."""
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label + ':':<{width + 1}} {value}\n" for label, value in rows)


def _print(rows: list[tuple[str, str]], out: TextIO) -> None:
    out.write(format_rows(rows))
