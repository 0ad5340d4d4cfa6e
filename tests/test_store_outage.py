"""The proxy while its Redis store is down or slow, and after it returns."""

from __future__ import annotations

import asyncio

import aiohttp

from etagproxy.config import parse_store_url
from etagproxy.store.redis import RedisStore

CONFIG = """
upstream: {upstream}
timeouts: {store: 100ms, write_wait: 200ms}
routes:
  - path: /open/{id}
    on_store_error: fail_open
  - path: /items/{id}
"""


async def _proxy(make_proxy, recording_upstream, redis_server):
    store = RedisStore.from_config(parse_store_url(redis_server.url), timeout_s=0.1)
    return await make_proxy(CONFIG, upstream=recording_upstream.url, store=store), store


async def test_store_down_fails_writes_closed_serves_reads_without_etag_and_recovers(
    make_proxy, recording_upstream, redis_server
):
    proxy, store = await _proxy(make_proxy, recording_upstream, redis_server)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/items/1") as r:
                tag = r.headers["ETag"]
            redis_server.kill()

            async with s.put(proxy.url + "/items/1", data=b"x", headers={"If-Match": tag}) as r:
                assert r.status == 503
                assert r.headers["Retry-After"]
                assert r.headers["Content-Type"] == "application/problem+json"
            async with s.put(proxy.url + "/items/1", data=b"blind") as r:
                assert r.status == 503
            assert recording_upstream.writes() == [], "nothing is forwarded while the store is down"

            async with s.get(proxy.url + "/items/1", headers={"If-None-Match": tag}) as r:
                assert r.status == 200, "no conditional answer can be given without the store"
                assert "ETag" not in r.headers
                assert await r.read()

            async with s.put(proxy.url + "/open/1", data=b"open") as r:
                assert r.status == 200, "fail_open forwards the write unchecked"
                assert "ETag" not in r.headers
            assert [w.body for w in recording_upstream.writes()] == [b"open"]

            redis_server.start()
            async with s.get(proxy.url + "/items/1") as r:
                assert r.status == 200
                fresh = r.headers["ETag"]
            assert fresh != tag, "the restarted store has another epoch: the old tag is gone"
            async with s.put(proxy.url + "/items/1", data=b"y", headers={"If-Match": tag}) as r:
                assert r.status == 412
    finally:
        redis_server.ensure_running()
        await proxy.server.stop()
        await store.close()


async def test_a_store_slower_than_its_timeout_counts_as_down(make_proxy, recording_upstream, redis_server):
    proxy, store = await _proxy(make_proxy, recording_upstream, redis_server)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/items/1") as r:
                tag = r.headers["ETag"]
            async with s.get(proxy.url + "/open/1") as r:
                open_tag = r.headers["ETag"]
            # Every command now waits up to 1.5 s: far past timeouts.store.
            redis_server.command("CLIENT", "PAUSE", "1500", "ALL")
            async with s.put(proxy.url + "/open/1", data=b"unchecked") as r:
                assert r.status == 200 and "ETag" not in r.headers
            async with s.put(proxy.url + "/items/1", data=b"x", headers={"If-Match": tag}) as r:
                assert r.status == 503
            async with s.get(proxy.url + "/items/1") as r:
                assert r.status == 200 and "ETag" not in r.headers
            assert [w.body for w in recording_upstream.writes()] == [b"unchecked"]
            redis_server.command("CLIENT", "UNPAUSE")
            # The proxy settles what it could not record: the lease of the
            # BEGIN whose answer was lost, and the token the unchecked write
            # outdated.
            await asyncio.wait(set(proxy.server.proxy.tasks))
            async with s.put(proxy.url + "/open/1", data=b"stale", headers={"If-Match": open_tag}) as r:
                assert r.status == 412, "the unchecked write must have outdated the old token"
            async with s.put(proxy.url + "/items/1", data=b"x", headers={"If-Match": tag}) as r:
                assert r.status == 200, "back to normal once the store answers in time"
    finally:
        await proxy.server.stop()
        await store.close()
