"""REDbot (`redbot` on PyPI, "lint for HTTP") against a tracked GET route.

REDbot fetches the resource through the proxy, then probes it the way
caches and clients do: If-None-Match and If-Modified-Since revalidation,
gzip negotiation (whose representation must carry a different strong ETag,
RFC 9110 §8.8.3.3), and checks every header it sees. It runs in its own
interpreter, on its own event loop (thor), against the proxy on loopback;
`enable_local_access` is what lets it look at 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys

import redbot  # noqa: F401  (a test dependency: fail here, loudly, if it is missing)
from aiohttp import web

DRIVER = r"""
import json, sys
from configparser import ConfigParser
import thor
from redbot.resource import HttpResource

parser = ConfigParser()
parser.read_dict({"redbot": {"enable_local_access": "True"}})
resource = HttpResource(parser["redbot"])
resource.set_request(sys.argv[1])

@thor.events.on(resource)
def check_done():
    thor.stop()

thor.schedule(20, thor.stop)
resource.check()
thor.run()
print(json.dumps({
    "done": resource.check_done,
    "status": resource.response.status_code,
    "etag": resource.response.headers.parsed.get("etag"),
    "inm": resource.inm_support,
    "ims": resource.ims_support,
    "gzip": resource.gzip_support,
    "notes": [
        {"id": type(n).__name__, "category": n.category.name, "level": n.level.value,
         "summary": n._get_summary()}
        for n in resource.response.notes
    ],
}))
"""

SITE = json.dumps({"id": 1, "name": "site one", "tags": ["rack"] * 200}).encode()


async def upstream_site(request: web.BaseRequest) -> web.Response:
    """A legacy API: no validators, but it negotiates gzip."""
    headers = {"Vary": "Accept-Encoding", "Cache-Control": "max-age=60"}
    body = SITE
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body = gzip.compress(SITE)
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, content_type="application/json", headers=headers)


async def test_redbot_finds_no_validation_problems(make_proxy) -> None:
    server = web.Server(upstream_site, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        proxy = await make_proxy(
            "upstream: {upstream}\nroutes:\n  - path: /api/sites/{id}/\n",
            upstream=f"http://127.0.0.1:{port}",
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DRIVER, proxy.url + "/api/sites/1/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await runner.cleanup()
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["done"], "REDbot did not finish its checks"
    assert report["status"] == 200
    assert report["inm"] is True, "If-None-Match revalidation works"
    assert report["ims"] is True, "If-Modified-Since revalidation works"
    assert report["gzip"] is True
    ids = {n["id"] for n in report["notes"]}
    assert {"INM_304", "IMS_304"} <= ids
    problems = [
        n for n in report["notes"]
        if n["level"] in ("bad", "warning") and n["category"] in ("VALIDATION", "CONNEG", "GENERAL")
    ]
    assert problems == [], problems
    assert "VARY_ETAG_DOESNT_CHANGE" not in ids, "gzip and identity must not share a strong ETag"
