"""`etagproxy inspect --config FILE URL`: what the store holds for one URL.

The URL is canonicalised and matched exactly as a request would be, so the
key shown is the key the proxy uses. Then the store is asked, read-only:
the state (committed, pending or absent), the token and the ETag it gives,
its epoch and age. A memory:// store lives inside the running proxy process
and cannot be read from here; the route and key are still shown.

Exit status: 0 when the URL falls in a tracked route, 1 when it does not or
the store cannot be reached.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from yarl import URL

from etagproxy.config import Config
from etagproxy.etag import make_etag
from etagproxy.routes import Router
from etagproxy.store import open_store
from etagproxy.store.base import KeyInfo, StoreError, now_ms
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


async def inspect_url(config: Config, url: str, *, out: TextIO = sys.stdout) -> int:
    """Print the route, key and stored version of `url`; see module doc."""
    try:
        target = canonicalize(_request_target(url))
    except (TargetError, ValueError) as exc:
        print(f"{url}: cannot be canonicalised: {exc}", file=sys.stderr)
        return 1
    match = Router(config.routes).key_for(target)
    rows: list[tuple[str, str]] = [("url", url), ("target", target.raw)]
    if match is None or not match.route.tracked:
        rows.append(("route", "-" if match is None else f"{match.route.template} (passthrough)"))
        _print(rows, out)
        print(f"{url}: not in a tracked route; the proxy keeps no version for it", file=sys.stderr)
        return 1
    rows += [("route", match.route.template), ("key", match.key), ("store", config.store.masked_url)]
    if config.store.kind == "memory":
        rows.append(("state", "unknown: memory:// lives inside the running proxy process"))
        _print(rows, out)
        return 0
    store = open_store(config.store, timeout_s=max(config.timeouts.store, 1.0))
    try:
        info = await store.inspect(match.key)
    except StoreError as exc:
        _print(rows, out)
        print(f"store unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    rows += describe(info, now=now_ms())
    _print(rows, out)
    return 0


def _print(rows: list[tuple[str, str]], out: TextIO) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label + ':':<{width + 1}} {value}", file=out)
