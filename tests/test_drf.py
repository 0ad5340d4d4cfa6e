"""etagproxy in front of a real Django REST Framework API (tests/drf_app).

The API is NetBox's stack in miniature: ModelViewSets, `Vary: Accept` on
every answer, the browsable API, 201 without Location, bulk writes on list
endpoints, a computed `device_count`, a web form that answers 302, and a
resource whose PUT answers 303. Every test creates its own rows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from etagproxy.store.base import BeginStatus, Outcome, WriteCondition
from tests.proxy_fixtures import ProxyHandle

CONFIG = """\
upstream: {upstream}
routes:
  - path: /api/sites/{id}/
    require_if_match: true
    invalidates: [/api/sites/]
  - path: /api/sites/
  - path: /api/devices/{id}/
    invalidates: [/api/devices/]
  - path: /api/devices/
  - path: /legacy/sites/{id}
"""


class Client:
    """An aiohttp client on the proxy (or, with `direct`, on the API)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, direct: str) -> None:
        self.session = session
        self.base = base
        self.direct = direct

    async def call(
        self, method: str, path: str, *, json_body: Any = None, headers: dict[str, str] | None = None,
        data: Any = None, via: str | None = None,
    ) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
        async with self.session.request(
            method, (via or self.base) + path, json=json_body, data=data, headers=headers or {},
            allow_redirects=False,
        ) as r:
            return r.status, r.headers, await r.read()

    async def create_site(self, name: str = "site", **fields: Any) -> dict[str, Any]:
        """A new site, created on the API directly."""
        status, _, body = await self.call("POST", "/api/sites/", json_body={"name": name, **fields}, via=self.direct)
        assert status == 201, body
        return json.loads(body)


@pytest.fixture
async def client(drf_api: str, make_proxy: Callable[..., Awaitable[ProxyHandle]]) -> AsyncIterator[Client]:
    proxy = await make_proxy(CONFIG, upstream=drf_api)
    async with aiohttp.ClientSession() as session:
        yield Client(session, proxy.url, drf_api)


async def test_the_api_behaves_as_drf_does(client: Client) -> None:
    """The premises the other tests rest on, checked on the API directly."""
    site = await client.create_site()
    status, headers, _ = await client.call("GET", f"/api/sites/{site['id']}/", via=client.direct)
    assert status == 200
    assert "Accept" in headers["Vary"] and "ETag" not in headers
    status, headers, _ = await client.call("POST", "/api/sites/", json_body={"name": "x"}, via=client.direct)
    assert status == 201 and "Location" not in headers
    status, headers, _ = await client.call(
        "GET", f"/api/sites/{site['id']}/", headers={"Accept": "text/html"}, via=client.direct
    )
    assert status == 200 and headers["Content-Type"].startswith("text/html")


async def test_a_303_after_a_put_leaves_the_old_tag_invalid(client: Client) -> None:
    """Item 1: the upstream applies the PUT and answers 303 (Post/Redirect/
    Get). The old tag must no longer validate, or a second client's stale
    write would be forwarded over the change."""
    site = await client.create_site(value=1)
    path = f"/legacy/sites/{site['id']}"
    status, headers, _ = await client.call("GET", path)
    assert status == 200
    old = headers["ETag"]
    status, headers, _ = await client.call("PUT", path, json_body={"value": 2}, headers={"If-Match": old})
    assert status == 303 and headers["Location"] == path
    # A 303's validators would describe the redirect, not the resource.
    assert "ETag" not in headers
    status, _, _ = await client.call("PUT", path, json_body={"value": 99}, headers={"If-Match": old})
    assert status == 412
    status, headers, body = await client.call("GET", path)
    assert json.loads(body)["value"] == 2 and headers["ETag"] != old


async def test_a_302_from_the_web_form_leaves_the_old_tag_invalid(drf_api: str, make_proxy: Any) -> None:
    """Item 1: Django's redirect() after a form POST is a 302; the outcome is
    unknown, so the tag read before it is dead."""
    proxy = await make_proxy(
        CONFIG + "  - path: /sites/{id}/edit/\n    invalidates: [\"/api/sites/{id}/\"]\n", upstream=drf_api
    )
    async with aiohttp.ClientSession() as session:
        c = Client(session, proxy.url, drf_api)
        site = await c.create_site(value=1)
        path = f"/sites/{site['id']}/edit/"
        _, headers, _ = await c.call("GET", path)
        old = headers["ETag"]
        status, headers, _ = await c.call("POST", path, data={"description": "via form"}, headers={"If-Match": old})
        assert status == 302 and "ETag" not in headers
        status, _, _ = await c.call("POST", path, data={"description": "stale"}, headers={"If-Match": old})
        assert status == 412


async def test_vary_accept_the_default_json_carries_the_plain_tag_the_write_returned(client: Client) -> None:
    """Item 2: DRF says `Vary: Accept` on every answer. The JSON it serves by
    default gets the plain tag, the same one a write returns, so a writer's
    re-read gets 304; the browsable API keeps a distinct tag."""
    site = await client.create_site()
    path = f"/api/sites/{site['id']}/"
    tags = set()
    for accept in (None, "*/*", "application/json", "application/json, text/plain;q=0.5"):
        status, headers, _ = await client.call("GET", path, headers={"Accept": accept} if accept else {})
        assert status == 200 and headers["Content-Type"] == "application/json"
        tags.add(headers["ETag"])
    assert len(tags) == 1
    (plain,) = tags
    assert "-" not in plain.strip('"')
    status, headers, _ = await client.call(
        "PATCH", path, json_body={"description": "new"}, headers={"If-Match": plain}
    )
    assert status == 200
    written = headers["ETag"]
    assert written != plain
    status, headers, body = await client.call("GET", path, headers={"If-None-Match": written})
    assert status == 304 and body == b"" and headers["ETag"] == written
    # The browsable API is another representation: its own tag, never a 304
    # for the JSON tag, and its tag never a 304 for the JSON.
    html_tags = []
    for html in ({"Accept": "text/html"}, {}):
        suffix = "?format=api" if not html else ""
        status, headers, _ = await client.call("GET", path + suffix, headers={**html, "If-None-Match": written})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert headers["ETag"] != written
        html_tags.append(headers["ETag"])
    assert len(set(html_tags)) == 2  # the query is another representation again
    html_tag = html_tags[0]
    status, _, _ = await client.call("GET", path, headers={"Accept": "text/html", "If-None-Match": html_tag})
    assert status == 304
    status, _, _ = await client.call("GET", path, headers={"If-None-Match": html_tag})
    assert status == 200


async def test_a_201_without_location_carries_no_collection_tag(client: Client) -> None:
    """Item 3: DRF's create of a site sends no Location. The collection's
    token must not be handed out as the created site's validator."""
    status, _, _ = await client.call("GET", "/api/sites/")
    status, headers, body = await client.call("POST", "/api/sites/", json_body={"name": "new"})
    assert status == 201 and "Location" not in headers
    assert "ETag" not in headers
    created = json.loads(body)
    # The item's own tag, from a read, is what validates its next write.
    _, headers, _ = await client.call("GET", f"/api/sites/{created['id']}/")
    status, _, _ = await client.call(
        "PATCH", f"/api/sites/{created['id']}/", json_body={"value": 5}, headers={"If-Match": headers["ETag"]}
    )
    assert status == 200


async def test_a_201_with_location_carries_the_created_resources_tag(client: Client) -> None:
    """Item 3: a device's create answers Location (DRF does, from `url`);
    the 201's tag is the created device's and validates its next write."""
    site = await client.create_site()
    status, headers, body = await client.call("POST", "/api/devices/", json_body={"name": "d", "site": site["id"]})
    assert status == 201
    created = json.loads(body)
    assert headers["Location"] == created["url"]
    tag = headers["ETag"]
    status, headers, _ = await client.call(
        "PATCH", f"/api/devices/{created['id']}/", json_body={"name": "d2"}, headers={"If-Match": tag}
    )
    assert status == 200


async def test_delete_leaves_no_validator_and_a_repeat_gets_404_without_reaching_the_api(
    client: Client, drf_api: str, make_proxy: Any
) -> None:
    """Item 6: a deleted resource has no validator; the pre-delete tag then
    gets what the API would answer without preconditions (404), and no
    write on a stale tag is ever forwarded."""
    site = await client.create_site()
    path = f"/api/sites/{site['id']}/"
    _, headers, _ = await client.call("GET", path)
    tag = headers["ETag"]
    status, headers, _ = await client.call("DELETE", path, headers={"If-Match": tag})
    assert status == 204 and "ETag" not in headers
    status, headers, _ = await client.call("DELETE", path, headers={"If-Match": tag})
    assert status == 404 and "ETag" not in headers
    status, headers, _ = await client.call("GET", path)
    assert status == 404 and "ETag" not in headers
    # A PUT on the stale tag is refused before it could re-create anything.
    status, _, _ = await client.call("PUT", path, json_body={"name": "back"}, headers={"If-Match": tag})
    assert status == 412


async def test_if_none_match_star_is_a_precondition_on_a_require_if_match_route(client: Client) -> None:
    """Item 7: `If-None-Match: *` (create only) is a precondition, so a
    require_if_match route evaluates it instead of answering 428."""
    site = await client.create_site()
    path = f"/api/sites/{site['id']}/"
    status, _, _ = await client.call("PUT", path, json_body={"name": "x"})
    assert status == 428
    await client.call("GET", path)  # the proxy now knows the site exists
    status, _, body = await client.call("PUT", path, json_body={"name": "x"}, headers={"If-None-Match": "*"})
    assert status == 412, body
    _, _, body = await client.call("GET", path, via=client.direct)
    assert json.loads(body)["name"] == "site"
    # On a site the proxy has no record of, the PUT goes on; DRF's PUT does
    # not create, so its 404 is the answer.
    status, _, _ = await client.call("PUT", "/api/sites/999999/", json_body={"name": "x"}, headers={"If-None-Match": "*"})
    assert status == 404


NETBOX_CONFIG = """\
upstream: {upstream}
routes:
  - path: /api/sites/{id}/
    require_if_match: true
    computed: true
  - path: /api/sites/
    created: '/api/sites/{response.id}/'
    bulk: {field: id, member: '/api/sites/{id}/', max_members: 5}
  - path: /api/devices/{id}/
    invalidates: ['/api/sites/{body.site}/', '/api/sites/{response.site}/']
  - path: /api/devices/
    invalidates: ['/api/sites/{response.site}/']
"""


@pytest.fixture
async def netbox(drf_api: str, make_proxy: Callable[..., Awaitable[ProxyHandle]]) -> AsyncIterator[Client]:
    """The proxy configured as a NetBox user would: created, bulk, related
    resources from the bodies, and the computed site representation."""
    proxy = await make_proxy(NETBOX_CONFIG, upstream=drf_api)
    async with aiohttp.ClientSession() as session:
        yield Client(session, proxy.url, drf_api)


async def test_created_names_the_new_resource_from_the_response_body(netbox: Client) -> None:
    """Item 3: no Location, but `created` names the site from `id`: the 201
    carries the site's own tag, which validates its next write, and which a
    read of the site then confirms."""
    status, headers, body = await netbox.call("POST", "/api/sites/", json_body={"name": "made"})
    assert status == 201 and "Location" not in headers
    tag = headers["ETag"]
    site = json.loads(body)
    path = f"/api/sites/{site['id']}/"
    status, headers, _ = await netbox.call("PATCH", path, json_body={"value": 3}, headers={"If-Match": tag})
    assert status == 200
    status, _, _ = await netbox.call("PATCH", path, json_body={"value": 4}, headers={"If-Match": tag})
    assert status == 412


async def test_bulk_patch_outdates_every_member_it_names(netbox: Client) -> None:
    """Item 4: NetBox's bulk PATCH on the list endpoint. A client holding a
    member's old tag must get 412 afterwards; a member the bulk did not name
    keeps its tag."""
    a, b, c = [await netbox.create_site(f"s{i}") for i in range(3)]
    tags = {}
    for site in (a, b, c):
        _, headers, _ = await netbox.call("GET", f"/api/sites/{site['id']}/")
        tags[site["id"]] = headers["ETag"]
    status, _, body = await netbox.call(
        "PATCH", "/api/sites/", json_body=[{"id": a["id"], "value": 7}, {"id": b["id"], "value": 8}]
    )
    assert status == 200, body
    for site, expected in ((a, 412), (b, 412), (c, 200)):
        status, _, _ = await netbox.call(
            "PATCH", f"/api/sites/{site['id']}/", json_body={"description": "stale?"},
            headers={"If-Match": tags[site["id"]]},
        )
        assert status == expected, site
    _, _, body = await netbox.call("GET", f"/api/sites/{a['id']}/", via=netbox.direct)
    assert json.loads(body)["value"] == 7 and json.loads(body)["description"] == ""


async def test_bulk_delete_outdates_members_and_a_bad_bulk_body_is_refused(netbox: Client) -> None:
    """Item 4: bulk DELETE versions each member; a body past max_members is
    413, one whose items lack the field is 400, and neither reaches the API."""
    sites = [await netbox.create_site(f"d{i}") for i in range(6)]
    _, headers, _ = await netbox.call("GET", f"/api/sites/{sites[0]['id']}/")
    tag = headers["ETag"]
    status, _, body = await netbox.call("DELETE", "/api/sites/", json_body=[{"id": s["id"]} for s in sites])
    assert status == 413 and json.loads(body)["type"].endswith("bulk-members")
    status, _, body = await netbox.call("DELETE", "/api/sites/", json_body=[{"name": "no id"}])
    assert status == 400
    _, _, body = await netbox.call("GET", "/api/sites/", via=netbox.direct)
    assert {s["id"] for s in sites} <= {s["id"] for s in json.loads(body)}
    status, _, _ = await netbox.call("DELETE", "/api/sites/", json_body=[{"id": sites[0]["id"]}])
    assert status == 204
    status, _, _ = await netbox.call(
        "PUT", f"/api/sites/{sites[0]['id']}/", json_body={"name": "back"}, headers={"If-Match": tag}
    )
    assert status == 412


async def test_a_bulk_write_never_interleaves_with_a_member_write(drf_api: str, make_proxy: Any) -> None:
    """Item 4: the bulk leases every member. While a member write holds its
    lease, the bulk waits and then gets 409 without reaching the API; once
    the member write has ended, the bulk goes through."""
    proxy = await make_proxy(NETBOX_CONFIG + "timeouts: {write_wait: 200ms}\n", upstream=drf_api)
    store = proxy.server.store
    async with aiohttp.ClientSession() as session:
        c = Client(session, proxy.url, drf_api)
        site = await c.create_site("busy")
        path = f"/api/sites/{site['id']}/"
        await c.call("GET", path)
        # A member write in flight, as the proxy's write path holds it.
        begun = await store.begin(path, WriteCondition(), "member-writer", 10_000, 0)
        assert begun.status is BeginStatus.OK
        status, headers, _ = await c.call("PATCH", "/api/sites/", json_body=[{"id": site["id"], "value": 9}])
        assert status == 409 and "Retry-After" in headers
        _, _, body = await c.call("GET", path, via=drf_api)
        assert json.loads(body)["value"] == 0
        await store.end(path, "member-writer", Outcome.SUCCESS)
        status, _, _ = await c.call("PATCH", "/api/sites/", json_body=[{"id": site["id"], "value": 9}])
        assert status == 200
        # The collection's lease was given back too: nothing is left held.
        status, _, _ = await c.call("PATCH", "/api/sites/", json_body=[{"id": site["id"], "value": 10}])
        assert status == 200


async def test_a_device_write_outdates_its_site_from_the_body(netbox: Client) -> None:
    """Item 5: creating or moving a device changes its site's device_count.
    The site's old tag must not get a 304, nor pass If-Match."""
    site = await netbox.create_site("home")
    other = await netbox.create_site("other")
    path = f"/api/sites/{site['id']}/"
    _, headers, body = await netbox.call("GET", path)
    assert json.loads(body)["device_count"] == 0
    tag = headers["ETag"]
    status, _, dev = await netbox.call("POST", "/api/devices/", json_body={"name": "d", "site": site["id"]})
    assert status == 201
    # `{response.site}` named the site: its token moved on.
    status, _, _ = await netbox.call("PATCH", path, json_body={"value": 1}, headers={"If-Match": tag})
    assert status == 412
    # Moving the device: the request body names the new site.
    _, headers, _ = await netbox.call("GET", f"/api/sites/{other['id']}/")
    other_tag = headers["ETag"]
    device = json.loads(dev)
    _, headers, _ = await netbox.call("GET", f"/api/devices/{device['id']}/")
    status, _, _ = await netbox.call(
        "PATCH", f"/api/devices/{device['id']}/", json_body={"site": other["id"]}, headers={"If-Match": headers["ETag"]}
    )
    assert status == 200
    status, _, body = await netbox.call("GET", f"/api/sites/{other['id']}/", headers={"If-None-Match": other_tag})
    assert status == 200 and json.loads(body)["device_count"] == 1
    status, _, _ = await netbox.call(
        "PATCH", f"/api/sites/{other['id']}/", json_body={"value": 1}, headers={"If-Match": other_tag}
    )
    assert status == 412


async def test_computed_representations_never_get_a_304_for_changed_content(netbox: Client, drf_api: str) -> None:
    """Item 5, safe mode: a device created on the API directly (no proxy,
    nothing to invalidate) changes the site's device_count. The computed
    route's tag names the body, so the old tag gets 200 with the new count;
    an unchanged body still gets 304, and the site's own writes still need
    the tag's version."""
    site = await netbox.create_site("computed")
    path = f"/api/sites/{site['id']}/"
    _, headers, _ = await netbox.call("GET", path)
    tag = headers["ETag"]
    assert "Last-Modified" not in headers
    status, _, _ = await netbox.call("GET", path, headers={"If-None-Match": tag})
    assert status == 304
    status, _, _ = await netbox.call(
        "POST", "/api/devices/", json_body={"name": "bypass", "site": site["id"]}, via=drf_api
    )
    assert status == 201
    status, headers, body = await netbox.call("GET", path, headers={"If-None-Match": tag})
    assert status == 200 and json.loads(body)["device_count"] == 1
    assert headers["ETag"] != tag
    # The site itself did not change: its version still validates a write.
    status, _, _ = await netbox.call("PATCH", path, json_body={"value": 2}, headers={"If-Match": tag})
    assert status == 200


async def test_an_upstream_etag_is_replaced_and_its_tag_never_validates(client: Client) -> None:
    """Item 8: the API sends its own weak tag (as NetBox 4.6 does). Clients
    of the proxy see only the proxy's strong tag; a tag the API handed out
    directly gets a full 200 on If-None-Match (never a 304 the proxy cannot
    vouch for) and 412 on If-Match (a write the proxy cannot check is never
    forwarded)."""
    site = await client.create_site(value=1)
    path = f"/legacy/sites/{site['id']}"
    _, headers, _ = await client.call("GET", path, via=client.direct)
    theirs = headers["ETag"]
    assert theirs.startswith('W/"')
    status, headers, _ = await client.call("GET", path)
    ours = headers["ETag"]
    assert status == 200 and ours != theirs and not ours.startswith("W/")
    assert headers.getall("ETag") == [ours]
    status, headers, body = await client.call("GET", path, headers={"If-None-Match": theirs})
    assert status == 200 and json.loads(body)["value"] == 1 and headers["ETag"] == ours
    status, _, _ = await client.call("PUT", path, json_body={"value": 5}, headers={"If-Match": theirs})
    assert status == 412
    _, _, body = await client.call("GET", path, via=client.direct)
    assert json.loads(body)["value"] == 1
    status, _, _ = await client.call("GET", path, headers={"If-None-Match": ours})
    assert status == 304


async def _increments(c: Client, path: str, count: int, *, conditional: bool, deadline: float) -> tuple[int, int]:
    """One client: `count` read-modify-write increments of `value` (a 412
    or 409 means re-read and retry). Returns (acknowledged writes, refusals)."""
    acked = refused = 0
    via = None if conditional else c.direct
    while acked < count and asyncio.get_running_loop().time() < deadline:
        status, headers, body = await c.call("GET", path, via=via)
        assert status == 200, body
        if conditional and "ETag" not in headers:
            continue  # read while a write was in flight: no validator to use
        extra = {"If-Match": headers["ETag"]} if conditional else {}
        value = json.loads(body)["value"]
        status, _, body = await c.call("PATCH", path, json_body={"value": value + 1}, headers=extra, via=via)
        if status == 200:
            acked += 1
        else:
            assert status in (412, 409), body
            refused += 1
    return acked, refused


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_eight_clients_incrementing_through_the_proxy_lose_no_update(
    store: str, drf_api: str, make_proxy: Any, request: pytest.FixtureRequest
) -> None:
    """The DRF run of docs/CONFORMANCE.md: 8 clients, 10 read-modify-write
    increments each, through the proxy. Every acknowledged increment is in
    the final value. (Going direct, the same run loses most of them; that
    number is printed, not asserted, since it depends on timing.)"""
    text = CONFIG
    if store == "redis":
        text += f"store: {request.getfixturevalue('redis_server').url}\n"
    proxy = await make_proxy(text, upstream=drf_api)
    async with aiohttp.ClientSession() as session:
        c = Client(session, proxy.url, drf_api)
        results = {}
        for conditional in (True, False):
            site = await c.create_site("counter")
            path = f"/api/sites/{site['id']}/"
            deadline = asyncio.get_running_loop().time() + 60
            runs = await asyncio.gather(
                *(_increments(c, path, 10, conditional=conditional, deadline=deadline) for _ in range(8))
            )
            acked = sum(a for a, _ in runs)
            _, _, body = await c.call("GET", path, via=drf_api)
            results[conditional] = (acked, json.loads(body)["value"], sum(r for _, r in runs))
        acked, final, refused = results[True]
        assert acked == 80 and final == 80, results
        assert refused > 0  # the clients did contend
        print(f"DRF {store}: proxy acked {acked} final {final} ({refused} x 412); "
              f"direct acked {results[False][0]} final {results[False][1]}")


VERSIONED_CONFIG = """\
upstream: {upstream}
routes:
  - path: /api/sites/{id}/
    require_if_match: true
    version: {from: field, field: last_updated}
  - path: /legacy/sites/{id}
    version: {from: header, header: ETag}
  - path: /checked/sites/{id}
    require_if_match: true
    version: {from: header, header: ETag, upstream_if_match: true}
"""


@pytest.fixture
async def versioned(drf_api: str, make_proxy: Callable[..., Awaitable[ProxyHandle]]) -> AsyncIterator[Client]:
    proxy = await make_proxy(VERSIONED_CONFIG, upstream=drf_api)
    async with aiohttp.ClientSession() as session:
        yield Client(session, proxy.url, drf_api)


async def _form_edit(c: Client, site_id: int, description: str) -> None:
    """A colleague edits the site in the web UI, which the proxy never sees."""
    status, _, _ = await c.call("POST", f"/sites/{site_id}/edit/", data={"description": description}, via=c.direct)
    assert status == 302


async def test_version_from_last_updated_catches_a_web_ui_edit(versioned: Client) -> None:
    """#14: with the version taken from `last_updated`, an edit made through
    the web UI (bypassing the proxy) outdates every tag read before it: the
    proxied write on such a tag gets 412 and the colleague's edit stands."""
    site = await versioned.create_site("ui")
    path = f"/api/sites/{site['id']}/"
    _, headers, _ = await versioned.call("GET", path)
    before = headers["ETag"]
    assert not before.startswith("W/") and "Last-Modified" not in headers
    await _form_edit(versioned, site["id"], "edited in the UI")
    status, _, body = await versioned.call("PATCH", path, json_body={"value": 5}, headers={"If-Match": before})
    assert status == 412, body
    _, _, body = await versioned.call("GET", path, via=versioned.direct)
    assert json.loads(body) | {"last_updated": None} == json.loads(body) | {
        "description": "edited in the UI", "value": 0, "last_updated": None
    }
    # The new read names the new version; the write's answer names the next.
    status, headers, _ = await versioned.call("GET", path, headers={"If-None-Match": before})
    assert status == 200
    current = headers["ETag"]
    status, headers, _ = await versioned.call("PATCH", path, json_body={"value": 6}, headers={"If-Match": current})
    assert status == 200
    written = headers["ETag"]
    assert written != current
    status, _, _ = await versioned.call("GET", path, headers={"If-None-Match": written})
    assert status == 304


async def test_a_derived_version_survives_a_store_wipe(
    versioned: Client, drf_api: str, make_proxy: Callable[..., Awaitable[ProxyHandle]]
) -> None:
    """The tag is derived from the upstream's value, not from the store: a
    fresh proxy (an empty store) hands out the same tag and accepts it."""
    site = await versioned.create_site("wipe")
    path = f"/api/sites/{site['id']}/"
    _, headers, _ = await versioned.call("GET", path)
    tag = headers["ETag"]
    fresh = await make_proxy(VERSIONED_CONFIG, upstream=drf_api)
    status, headers, _ = await versioned.call("GET", path, headers={"If-None-Match": tag}, via=fresh.url)
    assert status == 304 and headers["ETag"] == tag
    status, _, _ = await versioned.call("PATCH", path, json_body={"value": 1}, headers={"If-Match": tag}, via=fresh.url)
    assert status == 200


async def test_version_from_the_upstreams_weak_etag(versioned: Client) -> None:
    """#14: an upstream whose own weak tags are version-exact (NetBox 4.6's
    last_updated tags): the proxy derives a strong tag from them and checks
    If-Match itself, so a direct write outdates the proxy's tag too."""
    site = await versioned.create_site("hdr", value=1)
    path = f"/legacy/sites/{site['id']}"
    _, headers, _ = await versioned.call("GET", path)
    tag = headers["ETag"]
    assert not tag.startswith("W/")
    status, _, _ = await versioned.call("GET", path, headers={"If-None-Match": tag})
    assert status == 304
    status, _, _ = await versioned.call("PUT", path, json_body={"value": 2}, via=versioned.direct)
    assert status == 303
    status, _, _ = await versioned.call("PUT", path, json_body={"value": 3}, headers={"If-Match": tag})
    assert status == 412
    _, _, body = await versioned.call("GET", path, via=versioned.direct)
    assert json.loads(body)["value"] == 2


async def test_an_upstream_that_checks_if_match_itself_gets_its_own_tag(versioned: Client) -> None:
    """#14, a NetBox-4.6-style view (weak last_updated tags, If-Match
    checked under a row lock): the proxy hands out strong tags derived from
    the upstream's, evaluates the client's If-Match itself, and sends the
    upstream's own tag on with the write, so the upstream re-checks it in
    the same transaction that applies the write."""
    site = await versioned.create_site("checked", value=1)
    path = f"/checked/sites/{site['id']}"
    _, direct, _ = await versioned.call("GET", path, via=versioned.direct)
    _, headers, _ = await versioned.call("GET", path)
    tag = headers["ETag"]
    assert not tag.startswith("W/") and tag != direct["ETag"]
    # The upstream's weak tag never passes a strong comparison (§13.1.1).
    status, _, _ = await versioned.call("PATCH", path, json_body={"value": 2}, headers={"If-Match": direct["ETag"]})
    assert status == 412
    status, headers, body = await versioned.call("PATCH", path, json_body={"value": 2}, headers={"If-Match": tag})
    assert status == 200, body
    assert headers["X-Checked-If-Match"] == direct["ETag"]
    written = headers["ETag"]
    assert written != tag and not written.startswith("W/")
    status, _, _ = await versioned.call("GET", path, headers={"If-None-Match": written})
    assert status == 304
    # A colleague's direct edit outdates the tag; the proxy's own check refuses.
    status, _, _ = await versioned.call("PATCH", path, json_body={"value": 9}, via=versioned.direct)
    assert status == 200
    status, headers, _ = await versioned.call("DELETE", path, headers={"If-Match": written})
    assert status == 412
    assert headers["Content-Type"] == "application/problem+json" and "X-Checked-If-Match" not in headers
    _, _, body = await versioned.call("GET", path, via=versioned.direct)
    assert json.loads(body)["value"] == 9


async def test_a_verified_write_on_a_deleted_resource(versioned: Client) -> None:
    """The verify read finds the resource gone: a DELETE gets the API's 404,
    a PATCH on the old tag 412; neither is forwarded."""
    site = await versioned.create_site("gone")
    path = f"/api/sites/{site['id']}/"
    _, headers, _ = await versioned.call("GET", path)
    tag = headers["ETag"]
    status, _, _ = await versioned.call("DELETE", path, via=versioned.direct)
    assert status == 204
    status, _, _ = await versioned.call("DELETE", path, headers={"If-Match": tag})
    assert status == 404
    status, _, _ = await versioned.call("PATCH", path, json_body={"value": 1}, headers={"If-Match": tag})
    assert status == 412
