"""The proxy end to end: real upstream and proxy on loopback, real clients."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

import aiohttp
import pytest
from aiohttp import web

from tests.ports import free_port
from tests.raw_counter_upstream import RawCounterUpstream, RawFault, running_raw_upstream

TRACKED = """
upstream: {upstream}
timeouts: {{write_wait: 5s, upstream: 5s}}
routes:
  - path: /api/sites/{{id}}/
    invalidates: [/api/sites/]
  - path: /api/strict/{{id}}/
    require_if_match: true
  - path: /api/sites/
  - path: /static/{{rest:path}}
    mode: passthrough
"""


def cfg(text: str = TRACKED) -> str:
    # The templates above use doubled braces so that str.format leaves them.
    return text.replace("{upstream}", "@@UP@@").format().replace("@@UP@@", "{upstream}")


@pytest.fixture
async def proxy(make_proxy, recording_upstream):
    return await make_proxy(cfg(), upstream=recording_upstream.url)


async def test_tracked_get_carries_a_stable_strong_etag(proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r1:
            assert r1.status == 200
            tag1 = r1.headers["ETag"]
            await r1.read()
        async with s.get(proxy.url + "/api/sites/1/") as r2:
            tag2 = r2.headers["ETag"]
        async with s.get(proxy.url + "/api/sites/2/") as r3:
            other = r3.headers["ETag"]
    assert tag1.startswith('"') and tag1.endswith('"'), "strong tag, not W/"
    assert tag1 == tag2
    assert other != tag1
    assert len(recording_upstream.requests) == 3


async def test_upstream_etag_is_replaced_on_tracked_routes_only(make_proxy, recording_upstream):
    async def respond(request: web.BaseRequest, body: bytes) -> web.Response:
        return web.Response(text="x", headers={"ETag": '"upstream-tag"', "Last-Modified": "Sun, 06 Nov 1994 08:49:37 GMT"})

    recording_upstream.respond = respond
    proxy = await make_proxy(cfg(), upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            assert r.headers["ETag"] != '"upstream-tag"'
            assert r.headers["Last-Modified"] != "Sun, 06 Nov 1994 08:49:37 GMT"
        async with s.get(proxy.url + "/static/app.js") as r:
            assert r.headers["ETag"] == '"upstream-tag"'


async def test_if_none_match_with_current_tag_is_304_after_upstream_answered(proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            tag = r.headers["ETag"]
        async with s.get(proxy.url + "/api/sites/1/", headers={"If-None-Match": tag}) as r:
            assert r.status == 304
            assert r.headers["ETag"] == tag
            assert await r.read() == b""
        async with s.get(proxy.url + "/api/sites/1/", headers={"If-None-Match": '"stale"'}) as r:
            assert r.status == 200
            assert await r.read()
    # Default mode revalidates: the upstream was asked each time, without
    # the client's conditional header (the proxy evaluated it).
    assert len(recording_upstream.requests) == 3
    assert recording_upstream.requests[1].header("If-None-Match") is None


async def test_stale_if_match_gets_412_and_the_upstream_sees_nothing(proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            assert r.status == 200
        async with s.put(
            proxy.url + "/api/sites/1/", data=b'{"v": 1}', headers={"If-Match": '"not-the-current-one"'}
        ) as r:
            assert r.status == 412
            assert r.headers["Content-Type"] == "application/problem+json"
            doc = await r.json(content_type=None)
            assert doc["status"] == 412
            assert "ETag" not in r.headers
    assert recording_upstream.writes() == []


async def test_require_if_match_answers_428_without_forwarding(proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        async with s.put(proxy.url + "/api/strict/1/", data=b"{}") as r:
            assert r.status == 428
            assert r.headers["Content-Type"] == "application/problem+json"
            assert "If-Match" in (await r.json(content_type=None))["detail"]
            assert r.headers["Cache-Control"] == "no-store"
        async with s.get(proxy.url + "/api/strict/1/") as r:
            tag = r.headers["ETag"]
        async with s.put(proxy.url + "/api/strict/1/", data=b"{}", headers={"If-Match": tag}) as r:
            assert r.status == 200
    assert len(recording_upstream.writes()) == 1


async def test_successful_write_mints_a_new_tag_and_the_old_one_stops_working(proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            t1 = r.headers["ETag"]
        async with s.put(proxy.url + "/api/sites/1/", data=b'{"v": 2}', headers={"If-Match": t1}) as r:
            assert r.status == 200
            t2 = r.headers["ETag"]
        assert t2 != t1
        async with s.get(proxy.url + "/api/sites/1/") as r:
            assert r.headers["ETag"] == t2
            assert await r.read() == b'{"v": 2}'
        async with s.put(proxy.url + "/api/sites/1/", data=b'{"v": 3}', headers={"If-Match": t1}) as r:
            assert r.status == 412
    assert [w.body for w in recording_upstream.writes()] == [b'{"v": 2}']


async def test_a_member_write_invalidates_the_collection(proxy):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/") as r:
            c1 = r.headers["ETag"]
        async with s.get(proxy.url + "/api/sites/") as r:
            assert r.headers["ETag"] == c1
        async with s.patch(proxy.url + "/api/sites/7/", data=b"{}") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/api/sites/") as r:
            assert r.headers["ETag"] != c1


async def test_write_outcomes_decide_the_token(make_proxy, recording_upstream):
    """4xx keeps the token; 5xx replaces it and carries no ETag."""
    statuses = iter([422, 503])

    async def respond(request: web.BaseRequest, body: bytes) -> web.Response:
        if request.method == "GET":
            return web.Response(text="doc")
        return web.Response(status=next(statuses), text="nope")

    recording_upstream.respond = respond
    proxy = await make_proxy(cfg(), upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            t1 = r.headers["ETag"]
        async with s.put(proxy.url + "/api/sites/1/", data=b"x", headers={"If-Match": t1}) as r:
            assert r.status == 422
            assert "ETag" not in r.headers
            assert await r.text() == "nope"
        async with s.put(proxy.url + "/api/sites/1/", data=b"x", headers={"If-Match": t1}) as r:
            assert r.status == 503, "the 4xx left the token valid"
            assert "ETag" not in r.headers
        async with s.put(proxy.url + "/api/sites/1/", data=b"x", headers={"If-Match": t1}) as r:
            assert r.status == 412, "after a 5xx the outcome is unknown: the old token is dead"
    assert len(recording_upstream.writes()) == 2


async def test_concurrent_writers_with_one_tag_exactly_one_wins(make_proxy, recording_upstream):
    gate = asyncio.Event()
    arrived = asyncio.Event()

    async def respond(request: web.BaseRequest, body: bytes) -> web.Response:
        if request.method != "GET":
            arrived.set()
            await gate.wait()
        return await recording_upstream.default(request, body)

    recording_upstream.respond = respond
    proxy = await make_proxy(cfg(), upstream=recording_upstream.url)
    n = 24
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            tag = r.headers["ETag"]

        async def put(i: int) -> int:
            async with s.put(
                proxy.url + "/api/sites/1/", data=json.dumps({"writer": i}).encode(), headers={"If-Match": tag}
            ) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(put(i)) for i in range(n)]
        # The first write is held at the upstream while the others queue
        # behind its lease; once it commits they must all fail their
        # precondition instead of overwriting it.
        await arrived.wait()
        gate.set()
        statuses = await asyncio.gather(*tasks)
    assert sorted(statuses).count(200) == 1, statuses
    assert all(st == 412 for st in statuses if st != 200), statuses
    assert len(recording_upstream.writes()) == 1


async def test_forwarding_is_faithful_both_ways(make_proxy, recording_upstream):
    async def respond(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        resp = web.Response(status=418, body=gzip.compress(b"teapot" * 100))
        resp.headers["Content-Encoding"] = "gzip"
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["X-Custom"] = "kept"
        resp.headers["Connection"] = "X-Upstream-Private"
        resp.headers["X-Upstream-Private"] = "dropped"
        resp.headers["Keep-Alive"] = "timeout=5"
        return resp

    recording_upstream.respond = respond
    proxy = await make_proxy(cfg(), upstream=recording_upstream.url)
    raw = (
        b"POST /static/a/b?z=1&a=2 HTTP/1.1\r\n"
        b"Host: api.example\r\n"
        b"X-Mixed-Case: One\r\n"
        b"x-dup: 1\r\n"
        b"x-dup: 2\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"X-Request-ID: trace-123\r\n"
        b"Content-Length: 11\r\n"
        b"\r\n"
        b"hello\x00world"
    )
    status, headers, body = await raw_exchange(proxy.url, raw)
    assert status == 418
    assert gzip.decompress(body) == b"teapot" * 100, "body relayed compressed, as sent"
    assert headers.count(("set-cookie", "a=1")) == 1 and ("set-cookie", "b=2") in headers
    names = [k for k, _ in headers]
    assert ("x-custom", "kept") in headers
    assert "x-upstream-private" not in names and "keep-alive" not in names
    assert ("x-request-id", "trace-123") in headers
    assert any(k == "via" and "etagproxy" in v for k, v in headers)

    (seen,) = recording_upstream.requests
    assert seen.method == "POST"
    assert seen.raw_path == "/static/a/b?z=1&a=2"
    assert seen.body == b"hello\x00world"
    assert seen.header("Host") == "api.example"
    assert ("X-Mixed-Case", "One") in seen.raw_headers
    assert seen.headers_named("x-dup") == ["1", "2"]
    for hop in ("X-Hop", "Keep-Alive", "TE", "Proxy-Authorization"):
        assert seen.header(hop) is None, hop
    assert seen.header("Connection") in (None, "keep-alive")
    for added in ("User-Agent", "Accept", "Accept-Encoding"):
        assert seen.header(added) is None, f"proxy added {added}"
    assert seen.header("X-Request-ID") == "trace-123"
    assert "etagproxy" in (seen.header("Via") or "")
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "api.example"
    assert seen.header("Forwarded") == 'for=127.0.0.1;proto=http;host="api.example"'


async def test_untrusted_forwarding_headers_are_replaced(proxy, recording_upstream):
    async with aiohttp.ClientSession() as s:
        async with s.get(
            proxy.url + "/static/x", headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"}
        ) as r:
            rid = r.headers["X-Request-ID"]
    (seen,) = recording_upstream.requests
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert "6.6.6.6" not in (seen.header("Forwarded") or "")
    assert seen.header("X-Request-ID") == rid and len(rid) >= 16


async def test_bodies_stream_through_without_buffering(make_proxy, recording_upstream):
    """A 48 MiB request body and response pass a proxy whose max_body is 1 MiB,
    and the first response bytes reach the client before the upstream has
    finished sending."""
    size = 48 * 1024 * 1024
    chunk = bytes(range(256)) * 256
    first_seen = asyncio.Event()

    async def respond(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        await resp.write(chunk)
        await first_seen.wait()
        for _ in range(size // len(chunk) - 1):
            await resp.write(chunk)
        return resp

    recording_upstream.respond = respond
    proxy = await make_proxy(
        "upstream: {upstream}\nlimits: {max_body: 1MiB}\nroutes:\n  - path: /big\n    mode: passthrough\n",
        upstream=recording_upstream.url,
    )

    async def body_gen():
        for _ in range(size // len(chunk)):
            yield chunk

    digest = hashlib.sha256()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/big", data=body_gen()) as r:
            assert r.status == 200
            first = await r.content.readexactly(len(chunk))
            first_seen.set()
            digest.update(first)
            async for part in r.content.iter_chunked(1 << 16):
                digest.update(part)
    assert digest.hexdigest() == hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
    assert len(recording_upstream.requests[0].body) == size


async def test_write_body_over_max_body_is_413_and_not_forwarded(make_proxy, recording_upstream):
    proxy = await make_proxy(
        "upstream: {upstream}\nlimits: {max_body: 1KiB}\nroutes:\n  - path: /w/{id}\n",
        upstream=recording_upstream.url,
    )

    async def chunked():
        for _ in range(4):
            yield b"x" * 512

    async with aiohttp.ClientSession() as s:
        async with s.put(proxy.url + "/w/1", data=b"x" * 2048) as r:
            assert r.status == 413
            assert r.headers["Content-Type"] == "application/problem+json"
        async with s.put(proxy.url + "/w/1", data=chunked()) as r:
            assert r.status == 413
        async with s.put(proxy.url + "/w/1", data=b"x" * 1024) as r:
            assert r.status == 200
    assert len(recording_upstream.writes()) == 1


async def test_unreachable_upstream_is_502_problem(make_proxy):
    port = free_port()  # nothing listens on it
    proxy = await make_proxy(cfg(), upstream=f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/api/sites/1/"), ("PUT", "/api/sites/1/"), ("GET", "/other")):
            async with s.request(method, proxy.url + path, data=b"{}") as r:
                assert r.status == 502, (method, path)
                assert r.headers["Content-Type"] == "application/problem+json"
                assert (await r.json(content_type=None))["status"] == 502


async def test_a_small_read_body_that_breaks_is_502_not_a_truncated_200(make_proxy):
    async def truncating(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(truncating, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(cfg(), upstream=f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as s:
            for path in ("/api/sites/1/", "/other"):  # tracked and plain
                async with s.get(proxy.url + path) as r:
                    assert r.status == 502, path
                    assert "ETag" not in r.headers
                    assert (await r.json(content_type=None))["status"] == 502
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_upstream_is_504_and_a_write_loses_its_token(make_proxy, recording_upstream):
    never = asyncio.Event()

    async def respond(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.method == "GET" and not request.raw_path.endswith("slow"):
            return web.Response(text="ok")
        await never.wait()
        return web.Response(text="late")

    recording_upstream.respond = respond
    proxy = await make_proxy(
        "upstream: {upstream}\ntimeouts: {upstream: 300ms}\nroutes:\n  - path: /r/{id}\n",
        upstream=recording_upstream.url,
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/r/slow") as r:
            assert r.status == 504
            assert r.headers["Content-Type"] == "application/problem+json"
        async with s.get(proxy.url + "/r/1") as r:
            tag = r.headers["ETag"]
        async with s.put(proxy.url + "/r/1", data=b"x", headers={"If-Match": tag}) as r:
            assert r.status == 504
            assert "ETag" not in r.headers
        async with s.put(proxy.url + "/r/1", data=b"x", headers={"If-Match": tag}) as r:
            assert r.status == 412, "a timed-out write may have landed: its token must not validate"
    never.set()


async def test_a_timed_out_write_keeps_its_lease_so_a_late_landing_precedes_the_next_write(make_proxy):
    """An API that carries on after the proxy gave up applies the write
    late. Until the lease is nearly over no read gets a validator, so no
    write computed from the state before that landing can be validated."""
    up = RawCounterUpstream(late_s=0.6)
    async with running_raw_upstream(up):
        proxy = await make_proxy(
            "upstream: {upstream}\ntimeouts: {upstream: 300ms, write_wait: 3s}\n"
            "routes:\n  - path: /counters/{id}\n",
            upstream=up.url,
        )
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/counters/k") as r:
                tag = r.headers["ETag"]
            up.force["late"] = RawFault.LATE
            async with s.put(proxy.url + "/counters/k", json={"value": 1, "write": "late"}, headers={"If-Match": tag}) as r:
                assert r.status == 504 and "ETag" not in r.headers
            answered = loop.time()
            while True:
                async with s.get(proxy.url + "/counters/k") as r:
                    fresh, doc = r.headers.get("ETag"), await r.json()
                if fresh is not None:
                    break
                await asyncio.sleep(0.02)
            # The first validator after the 504 came once the late write had
            # landed, and describes it; the lease ran past the deadline.
            assert "late" in up.book.applied and doc["value"] == 1
            assert loop.time() - answered > 0.6
            async with s.put(proxy.url + "/counters/k", json={"value": 2, "write": "next"}, headers={"If-Match": fresh}) as r:
                assert r.status == 200
    assert up.book.stale == []


async def raw_exchange(url: str, request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send raw bytes, read one response (Content-Length framed)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = []
        for line in lines[1:]:
            if line:
                k, v = line.split(":", 1)
                headers.append((k.strip().lower(), v.strip()))
        length = int(dict(headers).get("content-length", "0"))
        body = await reader.readexactly(length)
        return status, headers, body
    finally:
        writer.close()


async def test_a_client_hanging_up_mid_body_is_not_an_internal_error(proxy, recording_upstream):
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PUT /api/sites/1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # The proxy logs the exchange once it has given up on the body.
    await asyncio.wait_for(proxy.exchanges.logged.wait(), 10)
    (ex,) = proxy.exchanges
    assert ex.status == 400 and ex.error == "client-body"
    assert recording_upstream.writes() == []


async def test_a_delete_with_unknown_outcome_does_not_open_create_only_writes(make_proxy, recording_upstream):
    async def respond(request: web.BaseRequest, body: bytes) -> web.Response:
        if request.method == "DELETE":
            return web.Response(status=502, text="upstream of the upstream broke")
        return await recording_upstream.default(request, body)

    recording_upstream.respond = respond
    proxy = await make_proxy(cfg(), upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/") as r:
            assert r.status == 200
        async with s.delete(proxy.url + "/api/sites/1/") as r:
            assert r.status == 502 and "ETag" not in r.headers
        # The DELETE may not have happened: a create-only PUT must not be
        # allowed to overwrite a resource that may still be there.
        async with s.put(proxy.url + "/api/sites/1/", data=b"{}", headers={"If-None-Match": "*"}) as r:
            assert r.status == 412


async def test_forwarding_lists_from_a_trusted_proxy_keep_every_line(make_proxy, recording_upstream):
    proxy = await make_proxy(
        "upstream: {upstream}\ntrusted_proxies: [127.0.0.1]\n", upstream=recording_upstream.url
    )
    raw = (
        b"GET /x HTTP/1.1\r\nHost: h\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n"
        b"Forwarded: for=10.0.0.1\r\nForwarded: for=10.0.0.2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    status, _, _ = await raw_exchange(proxy.url, raw)
    assert status == 200
    (seen,) = recording_upstream.requests
    assert seen.headers_named("X-Forwarded-For") == ["10.0.0.1, 10.0.0.2, 127.0.0.1"]
    assert seen.headers_named("Forwarded") == ['for=10.0.0.1, for=10.0.0.2, for=127.0.0.1;proto=http;host="h"']


async def test_several_vary_lines_all_count_for_the_representation_tag(make_proxy, recording_upstream):
    async def respond(request: web.BaseRequest, body: bytes) -> web.Response:
        kind = "application/xml" if "xml" in request.headers.get("Accept", "") else "application/json"
        resp = web.Response(body=b"<x/>" if "xml" in kind else b"{}", headers={"Content-Type": kind})
        resp.headers.add("Vary", "Origin")
        resp.headers.add("Vary", "Accept")
        return resp

    recording_upstream.respond = respond
    proxy = await make_proxy(cfg(), upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/sites/1/", headers={"Accept": "application/json"}) as r:
            as_json = r.headers["ETag"]
        async with s.get(proxy.url + "/api/sites/1/", headers={"Accept": "application/xml"}) as r:
            as_xml = r.headers["ETag"]
    assert as_json != as_xml, "two content types of one version share a strong tag"
