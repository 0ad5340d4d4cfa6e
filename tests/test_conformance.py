"""RFC 9110 conformance end to end: real proxy, real upstream, both stores.

Every test runs once on the memory store and once on a Redis store (the
session's redis-server), against one upstream and one proxy per store for
the whole module; tests keep apart by using resource paths nobody else
uses. The upstream is a legacy JSON API with no validators of its own.

The table tests at the end send a pairwise-covering set of precondition
header combinations (matching/stale/weak/star/malformed/absent, as in
tests/test_preconditions.py) for each method and resource state, and check
the proxy's HTTP answer (status; for writes, whether the upstream saw the
request) against the oracle transcribed there from RFC 9110 §13.2.2.
docs/CONFORMANCE.md maps each RFC rule to the test here that proves it.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy.app import ProxyServer
from etagproxy.config import parse_config, parse_store_url
from etagproxy.etag import EntityTag, parse_etag
from etagproxy.exchange import Exchange, credential_hash
from etagproxy.store.base import VersionStore
from etagproxy.store.memory import MemoryStore
from tests.proxy_fixtures import RecordingUpstream
from tests.test_preconditions import (
    KINDS,
    Resource,
    Sent,
    date_header,
    oracle,
    render_date,
    tag_header,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONFIG = """
upstream: {upstream}
timeouts: {write_wait: 5s, upstream: 5s}
routes:
  - path: /t/{id}
  - path: /nodate/{id}
    last_modified: false
  - path: /strict/{id}
    require_if_match: true
  - path: /items
    key_query: [id]
  - path: /spaced/items
    key_query: ["item id"]
  - path: /neg/{id}
  - path: /api/{tenant}/regions/{region}/sites/{id}/
    invalidates:
      - /api/{tenant}/sites/
      - /api/{tenant}/regions/{region}/sites/
      - /api/{tenant}/sites/{id}/
  - path: /api/{tenant}/regions/{region}/sites/
  - path: /api/{tenant}/sites/{id}/
    invalidates: ["/api/{tenant}/sites/"]
  - path: /api/{tenant}/sites/
  - path: /pub/{id}
    short_circuit: true
    public: true
  - path: /sc/{id}
    short_circuit: true
  - path: /sc-brief/{id}
    short_circuit: true
    short_circuit_ttl: 50ms
  - path: /fp/{id}
    fingerprint: true
"""

Handler = Callable[[web.BaseRequest, bytes], Awaitable[web.StreamResponse]]
WRITE_STATUS = {"PUT": 200, "PATCH": 200, "POST": 200, "DELETE": 204}


# -- the upstream: a legacy API ----------------------------------------------------


class Origin:
    """A JSON API without validators: per-path documents, gzip when asked,
    content negotiation under /neg/, 201 + Location for POST to a collection.
    `hooks[path]` replaces the answer for one path; `extra[path]` adds
    response fields to its reads."""

    def __init__(self) -> None:
        self.rec = RecordingUpstream(respond=self.respond)
        self.docs: dict[str, bytes] = {}
        self.gone: set[str] = set()
        self.hooks: dict[str, Handler] = {}
        self.extra: dict[str, dict[str, str]] = {}
        self.created = itertools.count(1000)

    def saw(self, method: str, path: str) -> int:
        """How many `method` requests reached the upstream for `path` (no query)."""
        return sum(1 for r in self.rec.requests if r.method == method and r.raw_path.split("?")[0] == path)

    async def respond(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        path = request.raw_path.split("?")[0]
        hook = self.hooks.get(path)
        if hook is not None:
            return await hook(request, body)
        return await self.default(request, body)

    async def default(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        if request.method in ("GET", "HEAD"):
            return self.read(request, path, query)
        if request.method == "DELETE":
            self.gone.add(path)
            self.docs.pop(path, None)
            return web.Response(status=204)
        if request.method == "POST" and path.endswith("/"):
            created = f"{path}{next(self.created)}/"
            self.docs[created] = body
            return web.Response(status=201, body=body, headers={"Location": created})
        self.docs[path] = body
        self.gone.discard(path)
        return web.Response(body=body or b"{}", content_type="application/json")

    def read(self, request: web.BaseRequest, path: str, query: str) -> web.Response:
        if path in self.gone:
            return web.Response(status=404, text="no such resource")
        doc = self.docs.get(path) or json.dumps({"path": path}).encode()
        doc += b"\n" + query.encode()  # other query parameters: another representation
        vary = ["Accept-Encoding"]
        ctype = "application/json"
        if path.startswith("/neg/"):
            vary.append("Accept")
            if "application/xml" in request.headers.get("Accept", ""):
                ctype, doc = "application/xml", b"<doc>" + doc + b"</doc>"
        headers = {"Vary": ", ".join(vary), "Cache-Control": "no-cache", **self.extra.get(path, {})}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            doc = gzip.compress(doc, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=doc, content_type=ctype, headers=headers)


# -- one proxy per store --------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")


@dataclass
class World:
    """The proxy, its upstream and its store, plus a client for the tests."""

    kind: str
    origin: Origin
    server: ProxyServer
    store: VersionStore
    url: str
    http: aiohttp.ClientSession
    exchanges: list[Exchange]
    ids: Iterator[int] = field(default_factory=itertools.count)

    def new(self, prefix: str) -> str:
        """A path (prefix + a fresh number) no other test uses."""
        return f"{prefix}{next(self.ids)}"

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, data: bytes | None = None
    ) -> Reply:
        async with self.http.request(method, self.url + path, headers=headers or {}, data=data) as r:
            body = await r.read()
            return Reply(r.status, r.headers, body)

    async def settle(self) -> None:
        """Wait for the proxy's background tasks (reader records) to finish."""
        assert self.server.proxy is not None
        while self.server.proxy.tasks:
            await asyncio.gather(*list(self.server.proxy.tasks))


STORES = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=STORES)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    origin = Origin()
    server = web.Server(origin.rec.handle, access_log=None, auto_decompress=False)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        origin.rec.url = f"http://127.0.0.1:{port}"
        store: Any
        if request.param == "memory":
            store = MemoryStore()
        else:
            from etagproxy.store.redis import RedisStore

            redis = request.getfixturevalue("redis_server_session")
            redis.ensure_running()
            redis.flush()
            store = RedisStore.from_config(parse_store_url(redis.url), timeout_s=2.0)
        text = "listen: 127.0.0.1:0\n" + CONFIG.replace("{upstream}", origin.rec.url)
        exchanges: list[Exchange] = []
        config = parse_config(text, filename="conformance.yaml")
        proxy = ProxyServer(config, store=store, access_log=exchanges.append)
        await proxy.start()
        # No automatic Accept-Encoding and no decoding: tests choose the
        # representation and see the bytes the proxy sent.
        async with aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            connector=aiohttp.TCPConnector(limit=64),
        ) as http:
            yield World(request.param, origin, proxy, store, f"http://127.0.0.1:{proxy.port}", http, exchanges)
        await proxy.stop()
        await store.close()
    finally:
        await runner.cleanup()


def token_of(tag: str | None) -> str:
    parsed = parse_etag(tag or "")
    assert parsed is not None and not parsed.weak, f"not a strong entity-tag: {tag!r}"
    return parsed.token


def seconds(http_date: str) -> int:
    return int(email.utils.parsedate_to_datetime(http_date).timestamp())


GZIP = {"Accept-Encoding": "gzip"}


# -- representations (RFC 9110 §8.8.3) ----------------------------------------------


async def test_each_representation_has_its_own_strong_tag(world: World) -> None:
    path = world.new("/neg/")
    plain = await world.call("GET", path)
    zipped = await world.call("GET", path, GZIP)
    paged = await world.call("GET", path + "?page=2")
    xml = await world.call("GET", path, {"Accept": "application/xml"})
    xml_zipped = await world.call("GET", path, {"Accept": "application/xml", **GZIP})
    replies = [plain, zipped, paged, xml, xml_zipped]
    assert [r.status for r in replies] == [200] * 5
    assert len({r.body for r in replies}) == 5, "the upstream sent five different representations"
    tags = [r.etag for r in replies]
    # §8.8.3.3: a strong validator differs between representations, gzip vs
    # identity of the same version included; all name the same version.
    assert len(set(tags)) == 5, tags
    assert len({token_of(t) for t in tags}) == 1
    # Asked again, each representation keeps its tag.
    again = await world.call("GET", path, {"Accept": "application/xml", **GZIP})
    assert again.etag == xml_zipped.etag


async def test_if_none_match_compares_whole_tags(world: World) -> None:
    path = world.new("/t/")
    plain = await world.call("GET", path)
    zipped = await world.call("GET", path, GZIP)
    # RFC 9110 §13.1.2 (weak comparison of the whole tag): the gzip tag
    # does not describe the identity representation, and vice versa.
    r = await world.call("GET", path, {"If-None-Match": str(zipped.etag)})
    assert (r.status, r.body) == (200, plain.body)
    r = await world.call("GET", path, {"If-None-Match": str(plain.etag), **GZIP})
    assert (r.status, r.body) == (200, zipped.body)
    r = await world.call("GET", path, {"If-None-Match": str(zipped.etag), **GZIP})
    assert (r.status, r.body, r.etag) == (304, b"", zipped.etag)
    r = await world.call("GET", path, {"If-None-Match": f'"x", W/{plain.etag}'})
    assert (r.status, r.etag) == (304, plain.etag)


async def test_if_match_validates_the_version_whatever_the_representation(world: World) -> None:
    path = world.new("/t/")
    zipped = await world.call("GET", path, GZIP)
    r = await world.call("PUT", path, {"If-Match": str(zipped.etag)}, b'{"v": 2}')
    assert r.status == 200
    written = r.etag
    assert written is not None and token_of(written) != token_of(zipped.etag)
    # DESIGN §1: the plain representation's tag is the tag the write returned.
    plain = await world.call("GET", path)
    assert plain.etag == written
    assert plain.body.startswith(b'{"v": 2}')
    # The old version's tag fails for every representation, weak or not.
    for stale in (zipped.etag, f"W/{written}"):
        r = await world.call("PATCH", path, {"If-Match": str(stale)}, b"{}")
        assert r.status == 412, stale
    assert world.origin.saw("PATCH", path) == 0


async def test_vary_and_not_modified_fields_match_the_200(world: World) -> None:
    path = world.new("/t/")
    world.origin.extra[path] = {
        "Cache-Control": "private, max-age=0, must-revalidate",
        "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
        "Content-Location": path + ".json",
    }
    full = await world.call("GET", path, GZIP)
    assert full.headers["Vary"] == "Accept-Encoding"
    r = await world.call("GET", path, {"If-None-Match": str(full.etag), **GZIP})
    assert r.status == 304
    # RFC 9110 §15.4.5: the fields a 200 would carry, and no content.
    for name in ("ETag", "Cache-Control", "Expires", "Vary", "Content-Location"):
        assert r.headers.getall(name) == full.headers.getall(name), name
    assert email.utils.parsedate_to_datetime(r.headers["Date"])
    assert r.body == b""
    for name in ("Content-Length", "Content-Encoding", "Content-Type", "Transfer-Encoding"):
        assert name not in r.headers, name


async def test_304_has_no_content_length_on_the_wire(world: World) -> None:
    path = world.new("/t/")
    tag = (await world.call("GET", path)).etag
    host, port = world.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nIf-None-Match: {tag}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await reader.read()
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 304 ")
    assert b"\r\ncontent-length:" not in head.lower()
    assert rest == b""


# -- key_query ---------------------------------------------------------------------


async def test_key_query_names_the_resource_other_parameters_the_representation(world: World) -> None:
    a, b = next(world.ids), next(world.ids)
    one = await world.call("GET", f"/items?id={a}")
    other = await world.call("GET", f"/items?id={b}")
    assert token_of(one.etag) != token_of(other.etag), "two resources never share a token"
    # Parameter order and extra parameters do not change the resource.
    sorted_ = await world.call("GET", f"/items?fmt=short&id={a}")
    assert token_of(sorted_.etag) == token_of(one.etag)
    assert sorted_.etag != one.etag, "another representation of the same version"
    r = await world.call("PUT", f"/items?id={a}&fmt=short", {"If-Match": str(sorted_.etag)}, b"{}")
    assert r.status == 200
    # The write moved resource a only.
    r = await world.call("GET", f"/items?id={a}", {"If-None-Match": str(one.etag)})
    assert r.status == 200
    r = await world.call("GET", f"/items?id={b}", {"If-None-Match": str(other.etag)})
    assert r.status == 304
    r = await world.call("PUT", f"/items?id={b}", {"If-Match": str(other.etag)}, b"{}")
    assert r.status == 200


async def test_key_query_names_that_need_encoding_still_select_the_plain_representation(world: World) -> None:
    n = next(world.ids)
    target = f"/spaced/items?item%20id={n}"
    r = await world.call("PUT", target, data=b"{}")
    assert r.status == 200
    # The key parameter is no "other" parameter: the plain tag, as the write returned.
    got = await world.call("GET", target)
    assert got.etag == r.etag


# -- Last-Modified (RFC 9110 §8.8.2, §13.1.3, §13.1.4) ---------------------------------


async def test_last_modified_is_the_mint_time_with_second_precision(world: World) -> None:
    path = world.new("/t/")
    first = await world.call("GET", path)
    info = await world.store.inspect(path)
    assert info.version is not None and info.version.token == token_of(first.etag)
    lm = seconds(first.headers["Last-Modified"])
    assert lm == info.version.minted_ms // 1000
    for ims, status in ((lm, 304), (lm + 1, 304), (lm - 1, 200)):
        r = await world.call("GET", path, {"If-Modified-Since": render_date(ims)})
        assert r.status == status, ims
    # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2 step 4).
    r = await world.call("GET", path, {"If-Modified-Since": render_date(lm), "If-None-Match": '"x"'})
    assert r.status == 200
    r = await world.call("PUT", path, {"If-Unmodified-Since": render_date(lm - 1)}, b"{}")
    assert r.status == 412
    r = await world.call("PUT", path, {"If-Unmodified-Since": render_date(lm)}, b"{}")
    assert r.status == 200
    written = await world.store.inspect(path)
    assert written.version is not None and written.version.token == token_of(r.etag)
    assert seconds(r.headers["Last-Modified"]) == written.version.minted_ms // 1000
    got = await world.call("GET", path)
    assert got.headers["Last-Modified"] == r.headers["Last-Modified"]


async def test_without_last_modified_dates_are_not_compared_on_reads(world: World) -> None:
    path = world.new("/nodate/")
    r = await world.call("GET", path)
    assert r.status == 200 and "Last-Modified" not in r.headers
    r = await world.call("GET", path, {"If-Modified-Since": render_date(int(time.time()) + 3600)})
    assert r.status == 200, "no modification date: If-Modified-Since is ignored (§13.1.3)"
    r = await world.call("PUT", path, {"If-Match": str(r.etag)}, b"{}")
    assert r.status == 200 and r.etag and "Last-Modified" not in r.headers


# -- collections and relations ----------------------------------------------------------


async def test_member_writes_bump_every_invalidated_key(world: World) -> None:
    t = world.new("tenant")
    keys = {
        "all": f"/api/{t}/sites/",
        "region": f"/api/{t}/regions/r1/sites/",
        "other_region": f"/api/{t}/regions/r2/sites/",
        "member": f"/api/{t}/sites/7/",
        "other_member": f"/api/{t}/sites/8/",
    }
    before = {name: (await world.call("GET", path)).etag for name, path in keys.items()}
    for name, path in keys.items():
        r = await world.call("GET", path, {"If-None-Match": str(before[name])})
        assert r.status == 304, f"{name}: collections carry ETags like any resource"
    r = await world.call("PATCH", f"/api/{t}/regions/r1/sites/7/", data=b'{"name": "x"}')
    assert r.status == 200
    changed = {
        name
        for name, path in keys.items()
        if (await world.call("GET", path, {"If-None-Match": str(before[name])})).status == 200
    }
    assert changed == {"all", "region", "member"}


async def test_a_rejected_member_write_leaves_the_collection_alone(world: World) -> None:
    t = world.new("tenant")
    member, collection = f"/api/{t}/sites/1/", f"/api/{t}/sites/"

    async def refuse(request: web.BaseRequest, body: bytes) -> web.Response:
        return web.Response(status=422, text="invalid")

    tag = (await world.call("GET", collection)).etag
    world.origin.hooks[member] = refuse
    assert (await world.call("PUT", member, data=b"{}")).status == 422
    assert (await world.call("GET", collection, {"If-None-Match": str(tag)})).status == 304


async def test_created_resource_gets_its_token_on_201(world: World) -> None:
    t = world.new("tenant")
    collection = f"/api/{t}/sites/"
    before = (await world.call("GET", collection)).etag
    r = await world.call("POST", collection, data=b'{"name": "new"}')
    assert r.status == 201
    location = r.headers["Location"]
    assert location.startswith(collection)
    # RFC 9110 §15.3.2: a 201's validators are those of the created resource.
    info = await world.store.inspect(location)
    assert info.version is not None and r.etag == f'"{info.version.token}"'
    assert seconds(r.headers["Last-Modified"]) == info.version.minted_ms // 1000
    got = await world.call("GET", location)
    assert got.etag == r.etag
    assert (await world.call("PUT", location, {"If-Match": str(r.etag)}, b"{}")).status == 200
    # The POST changed the collection too.
    assert (await world.call("GET", collection, {"If-None-Match": str(before)})).status == 200


@pytest.mark.parametrize("spelling", ["relative", "absolute-host"])
async def test_created_resource_token_for_other_location_spellings(world: World, spelling: str) -> None:
    t = world.new("tenant")
    collection = f"/api/{t}/sites/"

    async def create(request: web.BaseRequest, body: bytes) -> web.Response:
        # RFC 9110 §10.2.2: Location is a URI-reference, resolved against
        # the target URI; an API behind a proxy builds it from Host.
        loc = "55/" if spelling == "relative" else f"http://{request.headers['Host']}{collection}55/"
        return web.Response(status=201, headers={"Location": loc})

    world.origin.hooks[collection] = create
    r = await world.call("POST", collection, data=b"{}")
    assert r.status == 201
    info = await world.store.inspect(collection + "55/")
    assert info.version is not None and r.etag == f'"{info.version.token}"'


async def test_201_elsewhere_carries_no_validator_of_the_target(world: World) -> None:
    t = world.new("tenant")
    collection = f"/api/{t}/sites/"

    async def create(request: web.BaseRequest, body: bytes) -> web.Response:
        return web.Response(status=201, headers={"Location": "https://elsewhere.example/objects/9"})

    world.origin.hooks[collection] = create
    r = await world.call("POST", collection, data=b"{}")
    assert r.status == 201
    # The collection's new tag would be read as the created resource's (§15.3.2).
    assert "ETag" not in r.headers


# -- writes: 412, 428, outcomes ------------------------------------------------------------


async def test_stale_if_match_is_412_problem_and_never_reaches_the_upstream(world: World) -> None:
    path = world.new("/t/")
    tag = (await world.call("GET", path)).etag
    assert (await world.call("PUT", path, {"If-Match": str(tag)}, b"{}")).status == 200
    r = await world.call("DELETE", path, {"If-Match": str(tag)})
    assert r.status == 412
    assert r.headers["Content-Type"] == "application/problem+json"
    assert json.loads(r.body)["status"] == 412
    assert world.origin.saw("DELETE", path) == 0


async def test_require_if_match_is_428_problem(world: World) -> None:
    path = world.new("/strict/")
    r = await world.call("PATCH", path, data=b"{}")
    # RFC 6585 §3.
    assert r.status == 428
    assert r.headers["Content-Type"] == "application/problem+json"
    assert r.headers["Cache-Control"] == "no-store"
    assert world.origin.saw("PATCH", path) == 0
    tag = (await world.call("GET", path)).etag
    assert (await world.call("PATCH", path, {"If-Match": str(tag)}, b"{}")).status == 200


async def test_write_outcome_decides_the_token(world: World) -> None:
    path = world.new("/t/")
    statuses = iter([409, 500])

    async def answer(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.method == "GET":
            return await world.origin.default(request, body)
        return web.Response(status=next(statuses), text="no")

    world.origin.hooks[path] = answer
    tag = (await world.call("GET", path)).etag
    r = await world.call("PUT", path, {"If-Match": str(tag)}, b"{}")
    assert (r.status, r.etag) == (409, None)
    r = await world.call("PUT", path, {"If-Match": str(tag)}, b"{}")
    assert (r.status, r.etag) == (500, None), "the 4xx kept the token; the 5xx sends none"
    r = await world.call("PUT", path, {"If-Match": str(tag)}, b"{}")
    assert r.status == 412, "after an unknown outcome the old token is dead"


async def test_unknown_member_outcome_bumps_the_collection(world: World) -> None:
    t = world.new("tenant")
    member, collection = f"/api/{t}/sites/3/", f"/api/{t}/sites/"

    async def fail(request: web.BaseRequest, body: bytes) -> web.Response:
        return web.Response(status=502, text="upstream of the upstream failed")

    tag = (await world.call("GET", collection)).etag
    world.origin.hooks[member] = fail
    assert (await world.call("DELETE", member)).status == 502
    # The member may have changed, so the list may have too: no false 304.
    assert (await world.call("GET", collection, {"If-None-Match": str(tag)})).status == 200


async def test_methods_without_preconditions_ignore_them(world: World) -> None:
    path = world.new("/t/")
    await world.call("GET", path)
    # RFC 9110 §13.2.1: CONNECT, OPTIONS and TRACE evaluate no preconditions.
    r = await world.call("OPTIONS", path, {"If-Match": '"stale"', "If-None-Match": "*"})
    assert r.status == 200
    assert world.origin.saw("OPTIONS", path) == 1


async def test_preconditions_are_ignored_when_the_answer_is_not_2xx(world: World) -> None:
    path = world.new("/t/")
    world.origin.gone.add(path)
    # RFC 9110 §13.2.1: the 404 stands, whatever the preconditions say.
    for headers in ({"If-Match": '"x"'}, {"If-None-Match": "*"}, {"If-Unmodified-Since": render_date(0)}):
        r = await world.call("GET", path, headers)
        assert r.status == 404, headers


# -- Range and If-Range (RFC 9110 §13.1.5, §14.2) ---------------------------------------------


async def test_range_passes_and_if_range_never_yields_a_wrong_part(world: World) -> None:
    path = world.new("/t/")

    async def ranged(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        doc = b"0123456789"
        if request.headers.get("Range") == "bytes=0-3":
            return web.Response(status=206, body=doc[:4], headers={"Content-Range": "bytes 0-3/10"})
        return web.Response(body=doc)

    world.origin.hooks[path] = ranged
    full = await world.call("GET", path)
    part = await world.call("GET", path, {"Range": "bytes=0-3"})
    assert (part.status, part.body, part.etag) == (206, b"0123", full.etag)
    # A stale If-Range must yield the whole representation (§13.1.5); with a
    # current one the proxy may too (§14.2 lets a server ignore Range).
    for validator in ('"stale"', str(full.etag), full.headers["Last-Modified"]):
        r = await world.call("GET", path, {"Range": "bytes=0-3", "If-Range": validator})
        assert r.status in (200, 206), validator
        if r.status == 206:
            assert validator != '"stale"' and r.etag == full.etag
        else:
            assert r.body == b"0123456789"
    r = await world.call("GET", path, {"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert (r.status, r.body) == (200, b"0123456789")


# -- reads overlapping writes ---------------------------------------------------------------


def hold_writes(world: World, path: str, method: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold `method` requests to `path` at the upstream until `held` is set;
    `arrived` is set when one got there."""
    held, arrived = asyncio.Event(), asyncio.Event()

    async def slow_write(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.method == method:
            arrived.set()
            await held.wait()
        return await world.origin.default(request, body)

    world.origin.hooks[path] = slow_write
    return held, arrived


async def test_a_read_during_a_write_in_flight_gets_no_etag(world: World) -> None:
    path = world.new("/t/")
    held, arrived = hold_writes(world, path, "PUT")
    before = (await world.call("GET", path)).etag
    write = asyncio.create_task(world.call("PUT", path, {"If-Match": str(before)}, b'{"v": 2}'))
    await arrived.wait()
    during = await world.call("GET", path, {"If-None-Match": str(before)})
    # It may have seen either version: no validator, and no 304 either.
    assert during.status == 200 and during.etag is None
    assert "Last-Modified" not in during.headers
    held.set()
    done = await write
    assert done.status == 200
    after = await world.call("GET", path)
    assert after.etag == done.etag != before


async def test_a_read_that_a_write_overtakes_keeps_the_older_tag(world: World) -> None:
    """The read's tag was current when it started; once the write commits
    that tag no longer validates, so the newer body can never be mistaken
    for the version the write replaced."""
    path = world.new("/t/")
    read_held, read_arrived = asyncio.Event(), asyncio.Event()

    async def slow_read(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.method == "GET" and request.headers.get("X-Slow"):
            read_arrived.set()
            await read_held.wait()
        return await world.origin.default(request, body)

    world.origin.hooks[path] = slow_read
    first = (await world.call("GET", path)).etag
    read = asyncio.create_task(world.call("GET", path, {"X-Slow": "1"}))
    await read_arrived.wait()
    write = await world.call("PUT", path, {"If-Match": str(first)}, b'{"v": 2}')
    assert write.status == 200
    read_held.set()
    seen = await read
    assert seen.body.startswith(b'{"v": 2}') and seen.etag == first
    r = await world.call("PUT", path, {"If-Match": str(seen.etag)}, b'{"v": 3}')
    assert r.status == 412


# -- short_circuit -----------------------------------------------------------------------------


async def test_short_circuit_on_a_public_route_skips_the_upstream(world: World) -> None:
    path = world.new("/pub/")
    world.origin.extra[path] = {"Cache-Control": "public, no-cache", "Content-Location": path + ".json"}
    full = await world.call("GET", path, GZIP)
    await world.settle()
    # Anyone may learn a public route's token: no reader is recorded.
    assert not (await world.store.observe(path, reader=credential_hash(CIMultiDict()))).reader_seen
    r = await world.call("GET", path, {"If-None-Match": f'"other", W/{full.etag}', **GZIP})
    assert r.status == 304
    assert world.origin.saw("GET", path) == 1, "answered from the store"
    # RFC 9110 §15.4.5: the fields the 200 carried; the strong tag itself.
    assert r.etag == full.etag
    for name in ("Cache-Control", "Vary", "Content-Location"):
        assert r.headers.getall(name) == full.headers.getall(name), name
    assert "Date" in r.headers and r.body == b""
    # A stale tag, or a request that selects another representation
    # (Vary: Accept-Encoding), goes to the upstream.
    r = await world.call("GET", path, {"If-None-Match": '"stale"', **GZIP})
    assert r.status == 200
    r = await world.call("GET", path, {"If-None-Match": str(full.etag)})
    assert r.status == 200 and r.etag != full.etag
    r = await world.call("GET", path, {"If-None-Match": str(full.etag), "Accept-Encoding": "br"})
    assert r.status == 200
    assert world.origin.saw("GET", path) == 4
    # The identity tag, current, from a client that now accepts gzip: the
    # upstream would select the gzip representation, so it is asked.
    plain = await world.call("GET", path)
    await world.settle()
    assert (await world.call("GET", path, {"If-None-Match": str(plain.etag)})).status == 304
    assert world.origin.saw("GET", path) == 5
    r = await world.call("GET", path, {"If-None-Match": str(plain.etag), **GZIP})
    assert (r.status, r.etag) == (200, full.etag)
    assert world.origin.saw("GET", path) == 6


async def test_short_circuit_needs_a_recent_2xx_for_the_same_credentials(world: World) -> None:
    path = world.new("/sc/")
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}

    async def only_alice(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.headers.get("Authorization") != alice["Authorization"]:
            return web.Response(status=403, text="forbidden")
        return await world.origin.default(request, body)

    world.origin.hooks[path] = only_alice
    tag = (await world.call("GET", path, alice)).etag
    await world.settle()
    r = await world.call("GET", path, {"If-None-Match": str(tag), **alice})
    assert r.status == 304 and world.origin.saw("GET", path) == 1
    # Bob never got a 2xx for this resource: the upstream decides, and says no.
    r = await world.call("GET", path, {"If-None-Match": str(tag), **bob})
    assert r.status == 403
    r = await world.call("GET", path, {"If-None-Match": str(tag), "Cookie": "session=alice"})
    assert r.status == 403
    assert world.origin.saw("GET", path) == 3
    # A write moves the token: the old tag is forwarded and gets the new body.
    w = await world.call("PUT", path, {"If-Match": str(tag), **alice}, b'{"v": 2}')
    assert w.status == 200
    r = await world.call("GET", path, {"If-None-Match": str(tag), **alice})
    assert r.status == 200 and r.etag == w.etag
    assert world.origin.saw("GET", path) == 4


async def test_short_circuit_credentials_expire(world: World) -> None:
    path = world.new("/sc-brief/")
    alice = {"Authorization": "Bearer alice"}
    tag = (await world.call("GET", path, alice)).etag
    await world.settle()
    await asyncio.sleep(0.1)  # twice the route's short_circuit_ttl (50ms)
    r = await world.call("GET", path, {"If-None-Match": str(tag), **alice})
    assert r.status == 304
    assert world.origin.saw("GET", path) == 2, "the record expired: revalidated upstream"


async def test_short_circuit_never_answers_during_a_write(world: World) -> None:
    path = world.new("/pub/")
    held, arrived = hold_writes(world, path, "PATCH")
    tag = (await world.call("GET", path)).etag
    await world.settle()
    write = asyncio.create_task(world.call("PATCH", path, data=b'{"v": 2}'))
    await arrived.wait()
    r = await world.call("GET", path, {"If-None-Match": str(tag)})
    assert r.status == 200 and r.etag is None
    held.set()
    assert (await write).status == 200


# -- fingerprint -------------------------------------------------------------------------------


async def test_fingerprint_catches_a_write_around_the_proxy(world: World) -> None:
    path = world.new("/fp/")
    first = await world.call("GET", path)
    assert (await world.call("GET", path, {"If-None-Match": str(first.etag)})).status == 304
    world.origin.docs[path] = b'{"changed": "behind the proxy"}'
    caught = await world.call("GET", path, {"If-None-Match": str(first.etag)})
    assert caught.status == 200 and caught.body.startswith(b'{"changed"')
    # The read that noticed the change gets no ETag: reads may finish out of
    # order, so its body need not be the newest one.
    assert caught.etag is None
    assert (await world.call("PUT", path, {"If-Match": str(first.etag)}, b"{}")).status == 412
    r = await world.call("GET", path)
    assert r.status == 200 and r.body.startswith(b'{"changed"')
    assert token_of(r.etag) != token_of(first.etag)
    assert (await world.call("PUT", path, {"If-Match": str(r.etag)}, b"{}")).status == 200


async def test_fingerprint_is_stable_across_representations(world: World) -> None:
    path = world.new("/fp/")

    async def ranged(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        if request.headers.get("Range"):
            return web.Response(status=206, body=b"{", headers={"Content-Range": "bytes 0-0/2"})
        return await world.origin.default(request, body)

    world.origin.hooks[path] = ranged
    tag = (await world.call("GET", path)).etag
    # Other encodings, other query parameters and partial content differ in
    # bytes by nature; none of them is a write behind the proxy.
    for headers, query in ((GZIP, ""), ({}, "?page=2"), ({"Range": "bytes=0-0"}, ""), ({}, "")):
        await world.call("GET", path + query, headers)
    r = await world.call("PUT", path, {"If-Match": str(tag)}, b"{}")
    assert r.status == 200


# -- the table: every outcome of RFC 9110 §13.2.2, on the wire ------------------------------------

HEADERS = ("If-Match", "If-Unmodified-Since", "If-None-Match", "If-Modified-Since")
Row = tuple[str, str, str, str]


def pairwise_rows() -> list[Row]:
    """Rows of `KINDS` for the four headers: none, each header alone, then
    a greedy covering array so that every pair of (header, kind) values
    meets in some row (6^4 = 1296 combinations shrink to ~60)."""
    rows: list[Row] = [("absent",) * 4]  # type: ignore[list-item]
    for i, kind in itertools.product(range(4), KINDS):
        if kind != "absent":
            row = ["absent"] * 4
            row[i] = kind
            rows.append(tuple(row))  # type: ignore[arg-type]

    def pairs(row: Row) -> set[tuple[int, str, int, str]]:
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(4), 2)}

    needed = set().union(*(pairs(r) for r in itertools.product(KINDS, repeat=4)))  # type: ignore[arg-type]
    for row in rows:
        needed -= pairs(row)
    candidates = [(r, pairs(r)) for r in itertools.product(KINDS, repeat=4)]  # type: ignore[arg-type]
    while needed:
        row, covered = max(candidates, key=lambda c: len(c[1] & needed))
        rows.append(row)  # type: ignore[arg-type]
        needed -= covered
    return rows


ROWS = pairwise_rows()


def render_row(row: Row, held: str, lm: int) -> tuple[Sent, dict[str, str]]:
    im, im_h = tag_header(row[0], "If-Match", held)
    ius, ius_h = date_header(row[1], lm)
    inm, inm_h = tag_header(row[2], "If-None-Match", held)
    ims, ims_h = date_header(row[3], lm)
    values = dict(zip(HEADERS, (im_h, ius_h, inm_h, ims_h), strict=True))
    return Sent(im, ius, inm, ims), {k: v for k, v in values.items() if v is not None}


@dataclass
class State:
    """A resource as one client sees it after setting it up."""

    path: str
    model: Resource
    held: str
    """Opaque tag the client holds (a never-issued token when it holds none)."""
    lm: int
    headers: dict[str, str]
    """What the client sends to select the representation it holds."""


NEVER = "neverissuedneverissued00"


async def set_up(world: World, state: str) -> State:
    """Bring a fresh resource into `state`, as the oracle models it."""
    now = int(time.time())
    if state == "unseen":
        return State(world.new("/t/"), Resource(None, None, None), NEVER, now, {})
    path = world.new("/nodate/" if state == "no-date" else "/t/")
    selector = GZIP if state == "gzip" else {}
    r = await world.call("GET", path, selector)
    assert r.status == 200 and r.etag is not None
    tag = parse_etag(r.etag)
    assert isinstance(tag, EntityTag)
    lm = seconds(r.headers["Last-Modified"]) if "Last-Modified" in r.headers else now
    if state == "deleted":
        gone = await world.call("DELETE", path)
        # A deleted resource has no validator: the client holds the tag it
        # read before the DELETE.
        assert gone.status == 204 and gone.etag is None
        return State(path, Resource(None, None, None), tag.opaque, lm, {})
    modified = None if state == "no-date" else lm
    return State(path, Resource(tag.token, (False, tag.opaque), modified), tag.opaque, lm, selector)


async def gather_limited(coros: list[Awaitable[Any]], limit: int = 24) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


READ_STATES = ("plain", "gzip", "no-date", "deleted")
WRITE_STATES = ("plain", "gzip", "unseen", "deleted")
WRITE_METHODS = ("PUT", "PATCH", "DELETE", "POST")


async def test_table_reads(world: World) -> None:
    """GET and HEAD x ~60 header rows x 4 resource states."""
    states = {name: await set_up(world, name) for name in READ_STATES}
    cases = [(m, row, s) for m in ("GET", "HEAD") for row in ROWS for s in READ_STATES]

    async def run(method: str, row: Row, name: str) -> str | None:
        st = states[name]
        sent, headers = render_row(row, st.held, st.lm)
        r = await world.call(method, st.path, {**st.headers, **headers})
        if name == "deleted":
            # RFC 9110 §13.2.1: the 404 stands whatever the preconditions.
            expected = 404
        else:
            expected = {"perform": 200, "304": 304, "412": 412}[oracle(method, sent, st.model)]
        problems = []
        if r.status != expected:
            problems.append(f"status {r.status}, expected {expected}")
        elif expected in (200, 304) and r.etag != f'"{st.held}"':
            problems.append(f"ETag {r.etag}, expected the held tag")
        elif expected == 304 and r.body:
            problems.append("304 with content")
        return f"{method} {name} {dict(zip(HEADERS, row))}: {'; '.join(problems)}" if problems else None

    results = await gather_limited([run(*c) for c in cases])
    mismatches = [m for m in results if m]
    assert not mismatches, f"{len(mismatches)}/{len(cases)} mismatches:\n" + "\n".join(mismatches[:15])


async def test_table_writes(world: World) -> None:
    """PUT/PATCH/DELETE/POST x ~60 header rows x 4 resource states, each
    case on its own resource: a 412 must leave the upstream untouched."""
    plan = [
        (WRITE_METHODS[(i + j) % len(WRITE_METHODS)], row, name)
        for i, row in enumerate(ROWS)
        for j, name in enumerate(WRITE_STATES)
    ]
    states = await gather_limited([set_up(world, name) for _, _, name in plan])
    assert {m for m, _, _ in plan} == set(WRITE_METHODS)

    async def run(method: str, row: Row, name: str, st: State) -> tuple[str, str | None]:
        sent, headers = render_row(row, st.held, st.lm)
        expected = oracle(method, sent, st.model)
        before = world.origin.saw(method, st.path)  # the set-up DELETE of "deleted"
        r = await world.call(method, st.path, headers, b'{"v": "new"}')
        reached = world.origin.saw(method, st.path) - before
        problems = []
        if expected == "perform":
            if r.status != WRITE_STATUS[method] or reached != 1:
                problems.append(f"status {r.status}, upstream saw {reached}; expected it performed")
            elif method == "DELETE":
                if r.etag is not None:
                    problems.append(f"a deleted resource has no validator, got {r.etag}")
            elif r.etag is None or token_of(r.etag) == token_of(f'"{st.held}"'):
                problems.append(f"a 2xx write must carry a new ETag, got {r.etag}")
        elif method == "DELETE" and name == "deleted":
            # RFC 9110 §13.2.1: without the preconditions the upstream would
            # answer 404, so the 404 stands; the DELETE is not forwarded.
            if r.status != 404 or reached != 0:
                problems.append(f"status {r.status}, upstream saw {reached}; expected 404 and nothing sent")
        elif r.status != 412 or reached != 0:
            problems.append(f"status {r.status}, upstream saw {reached}; expected 412 and nothing sent")
        line = f"{method} {name} {dict(zip(HEADERS, row))}: {'; '.join(problems)}"
        return expected, line if problems else None

    results = await gather_limited([run(m, row, name, st) for (m, row, name), st in zip(plan, states)])
    mismatches = [line for _, line in results if line]
    assert not mismatches, f"{len(mismatches)}/{len(plan)} mismatches:\n" + "\n".join(mismatches[:15])
    # The table reaches both outcomes for every method.
    for method in WRITE_METHODS:
        outcomes = {exp for (m, _, _), (exp, _) in zip(plan, results) if m == method}
        assert outcomes == {"perform", "412"}, method


async def test_the_table_covers_every_pair_of_header_kinds() -> None:
    assert len(ROWS) < 80
    for (i, a), (j, b) in itertools.combinations(itertools.product(range(4), KINDS), 2):
        if i < j:
            assert any(row[i] == a and row[j] == b for row in ROWS), (HEADERS[i], a, HEADERS[j], b)
