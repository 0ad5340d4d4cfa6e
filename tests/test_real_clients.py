"""Real HTTP clients revalidate through the proxy and see writes at once.

Each client keeps its own cache and speaks to the proxy on loopback, with
its own defaults (Accept-Encoding, If-Modified-Since next to If-None-Match,
header spelling): requests + CacheControl, httpx + hishel, curl's
`--etag-save`/`--etag-compare`, and a browser's conditional GET. The
synchronous libraries run in a worker thread while the proxy serves on the
event loop. Same module-scoped upstream and proxy per store as
tests/test_conformance.py.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests
from cachecontrol import CacheControl
from hishel import CacheOptions, SqliteStorage
from hishel.httpx import CacheClient

from tests.test_conformance import World, world  # noqa: F401  (module-scoped fixture, one per store)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CURL = shutil.which("curl") or "/usr/bin/curl"


def statuses(w: World, path: str) -> list[int]:
    """What the proxy answered for `path`, in order."""
    return [ex.status for ex in w.exchanges if ex.key == path]


async def test_requests_with_cachecontrol(world: World) -> None:  # noqa: F811
    path = world.new("/t/")
    url = world.url + path

    def client() -> list[dict[str, Any]]:
        seen = []
        with CacheControl(requests.Session()) as cached, requests.Session() as plain:
            for step in ("first", "again", "write", "after"):
                if step == "write":
                    tag = seen[-1]["etag"]
                    r = plain.put(url, data=b'{"v": "written"}', headers={"If-Match": tag})
                else:
                    r = cached.get(url)
                seen.append(
                    {
                        "status": r.status_code,
                        "body": r.content,
                        "etag": r.headers.get("ETag"),
                        "from_cache": getattr(r, "from_cache", False),
                    }
                )
        return seen

    first, again, write, after = await asyncio.to_thread(client)
    assert first["status"] == 200 and not first["from_cache"]
    # Revalidated: the proxy answered 304 and the library used its copy.
    assert again["from_cache"] and again["body"] == first["body"]
    assert statuses(world, path)[:2] == [200, 304]
    assert write["status"] == 200
    assert after["status"] == 200 and not after["from_cache"]
    assert after["body"].startswith(b'{"v": "written"}')
    assert after["etag"] != first["etag"]
    assert world.origin.saw("GET", path) == 3


async def test_httpx_with_hishel(world: World) -> None:  # noqa: F811
    path = world.new("/t/")
    url = world.url + path

    def client() -> list[tuple[int, bytes, str | None, Any]]:
        storage = SqliteStorage(connection=sqlite3.connect(":memory:", check_same_thread=False))
        seen = []
        with CacheClient(storage=storage, rfc=CacheOptions(shared=False)) as cached:
            for step in ("first", "again", "write", "after"):
                if step == "write":
                    tag = seen[-1][2]
                    r = cached.put(url, content=b'{"v": "written"}', headers={"If-Match": str(tag)})
                else:
                    r = cached.get(url)
                seen.append((r.status_code, r.content, r.headers.get("ETag"), r.extensions.get("caching")))
        return seen

    first, again, write, after = await asyncio.to_thread(client)
    assert first[0] == 200
    assert again[0] == 200 and again[1] == first[1]
    assert again[3]["revalidated"] and again[3]["from_cache"]
    assert statuses(world, path)[:2] == [200, 304]
    assert write[0] == 200 and write[2] not in (None, first[2])
    assert after[0] == 200 and after[1].startswith(b'{"v": "written"}')
    assert not after[3]["from_cache"]
    assert world.origin.saw("GET", path) == 3


async def curl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        CURL, "--silent", "--show-error", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_curl_etag_save_and_compare(world: World, tmp_path: Path) -> None:  # noqa: F811
    path = world.new("/t/")
    url = world.url + path
    saved, body = tmp_path / "etag", tmp_path / "body"
    code = await curl("--etag-save", str(saved), "-o", str(body), "-w", "%{http_code}", url)
    assert code == "200"
    first = saved.read_text().strip()
    assert first.startswith('"') and body.read_bytes().startswith(b"{")
    code = await curl("--etag-compare", str(saved), "-o", str(tmp_path / "none"), "-w", "%{http_code}", url)
    assert code == "304"
    assert not (tmp_path / "none").exists() or (tmp_path / "none").read_bytes() == b""
    await world.call("PATCH", path, {"If-Match": first}, b'{"v": "written"}')
    code = await curl(
        "--etag-compare", str(saved), "--etag-save", str(saved), "-o", str(body), "-w", "%{http_code}", url
    )
    assert code == "200"
    assert body.read_bytes().startswith(b'{"v": "written"}')
    assert saved.read_text().strip() not in ("", first)


BROWSER = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Encoding": "gzip, deflate, br",
    "Accept-Language": "en-GB,en;q=0.5",
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Cache-Control": "max-age=0",
}


async def test_browser_conditional_get_after_a_write(world: World) -> None:  # noqa: F811
    path = world.new("/t/")
    first = await world.call("GET", path, BROWSER)
    assert first.status == 200 and first.headers["Content-Encoding"] == "gzip"
    # A reload: the browser sends both validators it holds.
    reload = {
        **BROWSER,
        "If-None-Match": str(first.etag),
        "If-Modified-Since": first.headers["Last-Modified"],
    }
    assert (await world.call("GET", path, reload)).status == 304
    # Another client writes; the same reload now gets the new document.
    other = await world.call("GET", path)
    assert (await world.call("PUT", path, {"If-Match": str(other.etag)}, b'{"v": "written"}')).status == 200
    r = await world.call("GET", path, reload)
    assert r.status == 200
    assert gzip.decompress(r.body).startswith(b'{"v": "written"}')
    assert r.etag not in (None, first.etag)
    # The write's Last-Modified may fall in the same second as the first
    # read's; If-None-Match, evaluated first, is what tells them apart.
    again = {**reload, "If-None-Match": str(r.etag), "If-Modified-Since": r.headers["Last-Modified"]}
    assert (await world.call("GET", path, again)).status == 304
