"""`etagproxy demo`: a legacy API without ETags, the proxy in front, and the
two-client lost-update story played through both.

The toy API is deliberately naive, like many real ones: PUT/PATCH replace or
merge whatever arrives, last writer wins, no validators at all.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import aiohttp
from aiohttp import web

from etagproxy.config import parse_config

DEMO_CONFIG = """\
listen: 127.0.0.1:0
upstream: {upstream}
store: memory://
routes:
  - path: /api/sites/{{id}}/
    require_if_match: true
    invalidates: [/api/sites/]
  - path: /api/sites/
"""


def toy_api() -> web.Application:
    """A JSON "sites" inventory with no ETag support at all."""
    sites: dict[int, dict[str, Any]] = {
        1: {"id": 1, "name": "ams1", "status": "planned", "description": ""},
        2: {"id": 2, "name": "fra1", "status": "active", "description": ""},
    }
    counter = {"writes": 0}

    async def list_sites(request: web.Request) -> web.Response:
        return web.json_response(sorted(sites.values(), key=lambda s: s["id"]))

    async def create_site(request: web.Request) -> web.Response:
        data = await request.json()
        new_id = max(sites, default=0) + 1
        sites[new_id] = {"id": new_id, "name": "", "status": "planned", "description": ""} | data
        sites[new_id]["id"] = new_id
        counter["writes"] += 1
        return web.json_response(
            sites[new_id], status=201, headers={"Location": f"/api/sites/{new_id}/"}
        )

    def find(request: web.Request) -> dict[str, Any]:
        try:
            return sites[int(request.match_info["id"])]
        except (KeyError, ValueError):
            raise web.HTTPNotFound(text='{"detail":"Not found."}', content_type="application/json")

    async def get_site(request: web.Request) -> web.Response:
        return web.json_response(find(request))

    async def put_site(request: web.Request) -> web.Response:
        site = find(request)
        data = await request.json()
        site.clear()
        site.update(data, id=int(request.match_info["id"]))
        counter["writes"] += 1
        return web.json_response(site)

    async def patch_site(request: web.Request) -> web.Response:
        site = find(request)
        site.update(await request.json())
        counter["writes"] += 1
        return web.json_response(site)

    async def delete_site(request: web.Request) -> web.Response:
        find(request)
        del sites[int(request.match_info["id"])]
        counter["writes"] += 1
        return web.Response(status=204)

    app = web.Application()
    app["writes"] = counter
    app.router.add_get("/api/sites/", list_sites)
    app.router.add_post("/api/sites/", create_site)
    app.router.add_get("/api/sites/{id}/", get_site)
    app.router.add_put("/api/sites/{id}/", put_site)
    app.router.add_patch("/api/sites/{id}/", patch_site)
    app.router.add_delete("/api/sites/{id}/", delete_site)
    return app


class Transcript:
    """Prints HTTP exchanges the way a person reads them."""

    def __init__(self, out: Any = sys.stdout) -> None:
        self.out = out

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def send(
        self,
        session: aiohttp.ClientSession,
        who: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> tuple[int, str | None, Any]:
        path = url.split("/", 3)[3]
        self.say(f"{who}: {method} /{path}")
        for name, value in (headers or {}).items():
            self.say(f"{' ' * len(who)}  {name}: {value}")
        if body is not None:
            self.say(f"{' ' * len(who)}  {json.dumps(body)}")
        async with session.request(method, url, headers=headers, json=body) as resp:
            text = await resp.text()
            etag = resp.headers.get("ETag")
            line = f"{' ' * len(who)}  -> {resp.status} {resp.reason}"
            if etag:
                line += f"   ETag: {etag}"
            self.say(line)
            data: Any = None
            if text:
                try:
                    data = json.loads(text)
                except ValueError:
                    data = text
                shown = data.get("detail") if isinstance(data, dict) and "detail" in data and "type" in data else data
                self.say(f"{' ' * len(who)}     {json.dumps(shown) if not isinstance(shown, str) else shown}")
            self.say()
            return resp.status, etag, data


async def start_toy_api() -> tuple[web.AppRunner, str, web.Application]:
    app = toy_api()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", app


async def play(api: str, proxy: str, t: Transcript) -> bool:
    """The story. Returns True if the proxy prevented the lost update."""
    async with aiohttp.ClientSession() as s:
        t.say("=== Without etagproxy: two clients edit site 1 of a legacy API ===")
        t.say()
        await t.send(s, "A", "GET", f"{api}/api/sites/1/")
        await t.send(s, "B", "GET", f"{api}/api/sites/1/")
        await t.send(s, "A", "PATCH", f"{api}/api/sites/1/", body={"status": "active"})
        _, _, after = await t.send(
            s, "B", "PUT", f"{api}/api/sites/1/",
            body={"name": "ams1", "status": "planned", "description": "rack 4 cabled"},
        )
        t.say(f"   A's change (status=active) is gone: status is now {after['status']!r}.")
        t.say("   Nobody was told. This is a lost update.")
        t.say()
        # Put the record back as it was before the second act.
        async with s.patch(f"{api}/api/sites/1/", json={"status": "planned", "description": ""}) as r:
            await r.read()

        t.say("=== With etagproxy in front of the same API ===")
        t.say()
        _, tag_a, _ = await t.send(s, "A", "GET", f"{proxy}/api/sites/1/")
        _, tag_b, _ = await t.send(s, "B", "GET", f"{proxy}/api/sites/1/")
        ok_same = tag_a is not None and tag_a == tag_b
        st_a, new_tag, _ = await t.send(
            s, "A", "PATCH", f"{proxy}/api/sites/1/",
            headers={"If-Match": tag_a or ""}, body={"status": "active"},
        )
        st_b, _, _ = await t.send(
            s, "B", "PUT", f"{proxy}/api/sites/1/",
            headers={"If-Match": tag_b or ""},
            body={"name": "ams1", "status": "planned", "description": "rack 4 cabled"},
        )
        t.say("   B's write was refused before it reached the API: B's copy is stale.")
        t.say()
        st_nc, _, _ = await t.send(
            s, "B", "PUT", f"{proxy}/api/sites/1/",
            body={"name": "ams1", "status": "planned", "description": "rack 4 cabled"},
        )
        t.say("   A blind write is refused too: this route requires If-Match.")
        t.say()
        _, fresh_tag, fresh = await t.send(s, "B", "GET", f"{proxy}/api/sites/1/")
        merged = dict(fresh) | {"description": "rack 4 cabled"}
        st_b2, _, final = await t.send(
            s, "B", "PUT", f"{proxy}/api/sites/1/", headers={"If-Match": fresh_tag or ""}, body=merged
        )
        kept = isinstance(final, dict) and final.get("status") == "active" and final.get("description") == "rack 4 cabled"
        ok = (
            ok_same and st_a == 200 and st_b == 412 and st_nc == 428 and fresh_tag == new_tag
            and st_b2 == 200 and kept
        )
        if ok:
            t.say("   Both changes survived: status=active (A) and the description (B).")
        else:
            t.say("   UNEXPECTED: the story did not go as it should; see the exchanges above.")
        return ok


async def run_demo(*, serve_forever: bool = False, out: Any = sys.stdout) -> int:
    from etagproxy.app import ProxyServer

    t = Transcript(out)
    api_runner, api_url, _ = await start_toy_api()
    config = parse_config(DEMO_CONFIG.format(upstream=api_url), filename="<demo>")
    proxy = ProxyServer(config)
    await proxy.start()
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    try:
        t.say(f"Toy legacy API (no ETags): {api_url}")
        t.say(f"etagproxy (memory store):  {proxy_url}")
        t.say()
        ok = await play(api_url, proxy_url, t)
        if serve_forever:
            t.say()
            t.say("Both keep running; try it by hand (Ctrl-C to stop):")
            t.say(f"  curl -si {proxy_url}/api/sites/2/")
            t.say(f"  curl -si -X PATCH {proxy_url}/api/sites/2/ -H 'If-Match: <ETag from above>' "
                  "-H 'Content-Type: application/json' -d '{\"status\": \"retired\"}'")
            t.say(f"  curl -si -X PATCH {proxy_url}/api/sites/2/ -H 'Content-Type: application/json' "
                  "-d '{\"status\": \"x\"}'    # 428: no If-Match")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 0 if ok else 1
    finally:
        await proxy.stop()
        await api_runner.cleanup()
