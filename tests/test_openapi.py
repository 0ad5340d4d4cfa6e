"""`etagproxy routes --from-openapi`: routes generated from a real NetBox schema
and a small hand-written OpenAPI 3.1 one, overrides, and the error messages.

tests/data/netbox-openapi.json.gz is NetBox's own REST API schema (info.version
"4.2.2 (4.2)", OpenAPI 3.0.3) as published in netbox-community/go-netbox
(api/openapi.yaml at commit c020e460, fetched there from NetBox's /api/schema/),
converted from YAML to JSON. The counts below are derived from the schema here,
independently of etagproxy.openapi.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from etagproxy import cli, openapi
from etagproxy.config import parse_config
from etagproxy.routes import Router
from etagproxy.target import canonicalize

DATA = Path(__file__).parent / "data" / "netbox-openapi.json.gz"
WRITES = {"put", "patch", "delete"}


@pytest.fixture(scope="module")
def netbox() -> dict:
    return json.loads(gzip.decompress(DATA.read_bytes()))


@pytest.fixture(scope="module")
def netbox_yaml(netbox: dict) -> str:
    return openapi.render(openapi.routes_from_schema(netbox), source="netbox-openapi.json.gz")


def _kinds(text: str) -> dict[str, list[str]]:
    """Route paths by the kind their comment names."""
    out: dict[str, list[str]] = {}
    kind = None
    for line in text.splitlines():
        if m := re.match(r"  # (item|collection|passthrough|from overrides)\b", line):
            kind = m[1]
        elif (m := re.match(r"  - path: '?([^']*)'?$", line)) and kind:
            out.setdefault(kind, []).append(m[1])
            kind = None
    return out


def test_netbox_route_counts_match_the_schema(netbox: dict, netbox_yaml: str) -> None:
    assert netbox["info"]["version"] == "4.2.2 (4.2)"
    paths = netbox["paths"]
    items = [p for p in paths if re.search(r"/\{id\}/$", p) and WRITES & set(paths[p])]
    collections = [p for p in items if p[: -len("{id}/")] in paths]
    assert (len(paths), len(items), len(collections)) == (286, 119, 119)
    kinds = _kinds(netbox_yaml)
    assert sorted(kinds["item"]) == sorted(items)
    assert sorted(kinds["collection"]) == sorted(p[: -len("{id}/")] for p in collections)
    # The only literal path a generated template would swallow.
    assert kinds["passthrough"] == ["/api/users/tokens/provision/"]
    config = parse_config(netbox_yaml, filename="netbox.yaml")
    assert len(config.routes) == 119 + 119 + 1
    # created: every collection takes POST; bulk: those that also take PUT/PATCH/DELETE
    # (all but /api/extras/scripts/, which has GET and POST only).
    bulk = [p[: -len("{id}/")] for p in collections if WRITES & set(paths[p[: -len("{id}/")]])]
    assert len(bulk) == 118
    assert sorted(r.path for r in config.routes if r.bulk) == sorted(bulk)
    posts = [p[: -len("{id}/")] for p in collections if "post" in paths[p[: -len("{id}/")]]]
    assert sorted(r.path for r in config.routes if r.created) == sorted(posts) and len(posts) == 119
    omitted = re.findall(r"^#   (/\S+)", netbox_yaml, re.MULTILINE)
    assert len(omitted) == 286 - 239 == 47
    assert "/api/status/" in omitted and "/api/extras/dashboard/" in omitted


def test_netbox_sites_get_the_expected_settings(netbox_yaml: str) -> None:
    routes = {r.path: r for r in parse_config(netbox_yaml).routes}
    item, coll = routes["/api/dcim/sites/{id}/"], routes["/api/dcim/sites/"]
    assert (item.mode, item.require_if_match, item.invalidates) == ("track", True, ("/api/dcim/sites/",))
    assert (coll.mode, coll.require_if_match, coll.created) == ("track", False, "/api/dcim/sites/{response.id}/")
    assert (coll.bulk.field, coll.bulk.member, coll.bulk.max_members) == ("id", "/api/dcim/sites/{id}/", 100)
    assert routes["/api/users/tokens/provision/"].mode == "passthrough"
    comment = netbox_yaml.split("  - path: '/api/dcim/sites/{id}/'")[0].rsplit("\n", 2)[-2]
    assert comment == ("  # item: GET dcim_sites_retrieve, PUT dcim_sites_update,"
                       " PATCH dcim_sites_partial_update, DELETE dcim_sites_destroy")


def test_every_netbox_path_first_matches_its_own_route(netbox: dict, netbox_yaml: str) -> None:
    router = Router(parse_config(netbox_yaml).routes)
    generated = {r.template for r in router.routes}
    for path in netbox["paths"]:
        found = router.match("POST", canonicalize(path.replace("{id}", "7").replace("{name}", "q")))
        if path in generated:
            assert found is not None and found.route.template == path, path
        else:
            assert found is None, (path, found)


def test_cli_writes_a_file_that_check_config_accepts(tmp_path: Path) -> None:
    out = tmp_path / "routes.yaml"
    py = [sys.executable, "-m", "etagproxy"]
    made = subprocess.run([*py, "routes", "--from-openapi", str(DATA), "-o", str(out)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    assert made.stderr.strip() == (f"{out}: 239 routes (119 item, 119 collection, 1 passthrough,"
                                   " 0 from overrides); 47 paths omitted")
    assert "upstream: http://127.0.0.1:8000  # set this" in out.read_text()
    checked = subprocess.run([*py, "check-config", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{out}: OK (239 routes, store memory://)"


OVERRIDES = """\
/api/dcim/sites/{id}/:
  computed: true
  invalidates: ['/api/dcim/sites/', '/api/dcim/regions/{body.region}/']
/api/dcim/sites/:
  bulk: {max_members: 500}
  key_query: [format]
/api/dcim/regions/{id}/: null
/api/dcim/devices/{pk}/:
  mode: passthrough
/api/status/:
  methods: [GET, HEAD]
  short_circuit: true
  public: true
"""


def test_overrides_merge_over_generated_settings_and_survive_regeneration(tmp_path: Path, capsys) -> None:
    schema = tmp_path / "netbox.json.gz"
    schema.write_bytes(DATA.read_bytes())
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(OVERRIDES)
    out = tmp_path / "routes.yaml"
    args = ["routes", "--from-openapi", str(schema), "--overrides", str(overrides), "--upstream", "http://nb:8000"]
    assert cli.main([*args, "-o", str(out)]) == 0
    first = out.read_text()
    assert cli.main([*args, "-o", str(out)]) == 0
    assert out.read_text() == first  # regenerating gives the same file, hand edits included
    capsys.readouterr()
    routes = {r.path: r for r in parse_config(first).routes}
    site = routes["/api/dcim/sites/{id}/"]
    assert (site.computed, site.require_if_match) == (True, True)
    assert site.invalidates == ("/api/dcim/sites/", "/api/dcim/regions/{body.region}/")
    sites = routes["/api/dcim/sites/"]
    assert (sites.bulk.field, sites.bulk.max_members, sites.key_query) == ("id", 500, ("format",))
    assert "/api/dcim/regions/{id}/" not in routes  # a null entry drops the route
    devices = routes["/api/dcim/devices/{id}/"]  # matched by shape, whatever the variable is called
    assert (devices.mode, devices.require_if_match, devices.invalidates) == ("passthrough", False, ())
    status = routes["/api/status/"]
    assert (status.short_circuit, status.public, status.methods) == (True, True, frozenset({"GET", "HEAD"}))
    assert "  # from overrides: not in the schema\n  - path: /api/status/\n" in first
    assert first.count("# settings merged from overrides") == 3
    assert "upstream: http://nb:8000\n" in first


PETSTORE_31 = """\
openapi: 3.1.0
info: {title: Pets, version: 1.0.0}
servers: [{url: 'https://pets.example/{base}', variables: {base: {default: v2}}}]
paths:
  /pets:
    get: {operationId: listPets}
    post: {operationId: createPet}
    put:
      operationId: replaceAllPets
      requestBody: {$ref: '#/components/requestBodies/PetObject'}
  /pets/search:
    get: {operationId: searchPets}
  /pets/{pet-id}:
    parameters: [{name: pet-id, in: path, required: true, schema: {type: [integer]}}]
    get: {operationId: showPet}
    patch: {operationId: updatePet}
    delete: {operationId: deletePet}
  /pets/{pet-id}/photos/{photoId}.png:
    get: {operationId: photo}
  /owners/{id}/:
    get: {operationId: showOwner}
  /stores/{storeId}:
    put: {operationId: putStore}
  /bad/{a}{b}:
    delete: {operationId: bad}
components:
  requestBodies:
    PetObject:
      content: {application/json: {schema: {type: object}}}
"""


def test_a_hand_written_31_yaml_schema() -> None:
    schema = openapi.parse_document(PETSTORE_31, "pets.yaml")
    text = openapi.render(openapi.routes_from_schema(schema), source="pets.yaml")
    assert _kinds(text) == {
        "collection": ["/v2/pets"],
        "passthrough": ["/v2/pets/search"],
        "item": ["/v2/pets/{pet_id}", "/v2/stores/{storeId}"],
    }
    routes = {r.path: r for r in parse_config(text).routes}
    assert routes["/v2/pets/{pet_id}"].invalidates == ("/v2/pets",)
    assert routes["/v2/pets"].created == "/v2/pets/{response.pet_id}"
    assert routes["/v2/pets"].bulk is None  # its PUT takes one object, not an array
    assert routes["/v2/stores/{storeId}"].invalidates == ()  # no /stores list in the schema
    assert "  # schema path: /pets/{pet-id}\n" in text
    assert "#   /bad/{a}{b}  not a template the proxy can match, DELETE bad" in text
    assert "#   /owners/{id}/  GET showOwner" in text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "{f}: cannot read the schema: No such file or directory"),
        ("bad.json", '{"openapi": "3.0.0",\n "paths": }', "{f}:2: invalid JSON: Expecting value (column 11)"),
        ("bad.yaml", "openapi: 3.1.0\npaths: [unclosed\n", "{f}:3: invalid YAML: "),
        ("swagger.yaml", "swagger: '2.0'\npaths: {}\n",
         "{f}: not an OpenAPI 3.x document (no 'openapi' field) (it says swagger: '2.0'; convert it to OpenAPI 3)"),
        ("v4.json", '{"openapi": "4.0", "paths": {"/a": {}}}',
         "{f}: not an OpenAPI 3.x document (openapi: '4.0'; 3.0 and 3.1 are read)"),
        ("list.yaml", "- 1\n", "{f}: not an OpenAPI 3.x document (the top level is not a mapping)"),
        ("nopaths.yaml", "openapi: 3.0.3\ninfo: {}\n",
         "{f}: OpenAPI 3.0.3 document without paths (a mapping of /path: operations)"),
    ],
)
def test_errors_are_one_line_naming_the_file(tmp_path: Path, capsys, name, content, message) -> None:
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    assert cli.main(["routes", "--from-openapi", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    # The YAML parser's own wording (libyaml's or PyYAML's) follows "invalid YAML: ".
    assert captured.err.startswith(message.format(f=f)) and captured.err.count("\n") == 1, captured.err


def test_a_bad_overrides_file_is_one_line_too(tmp_path: Path, capsys) -> None:
    schema = tmp_path / "pets.yaml"
    schema.write_text(PETSTORE_31)
    overrides = tmp_path / "o.yaml"
    overrides.write_text(textwrap.dedent("""\
        /v2/pets: [not, a, mapping]
    """))
    assert cli.main(["routes", "--from-openapi", str(schema), "--overrides", str(overrides)]) == 2
    assert capsys.readouterr().err == f"{overrides}: /v2/pets: expected a mapping of route settings or null, got list\n"
    overrides.write_text("/v2/pets: {require_if_match: maybe}\n")
    assert cli.main(["routes", "--from-openapi", str(schema), "--overrides", str(overrides)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "etagproxy: the generated routes do not pass check-config:"
    assert "require_if_match: expected true or false, got 'maybe'" in err[1]


def test_a_schema_served_over_http_reads_like_the_file(tmp_path: Path, capsys) -> None:
    """The schema of a running API, as `/api/schema/` serves it: fetched from a
    real HTTP server on loopback, gzip-encoded or not, and a 404 said in one line."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = {"/schema.yaml": PETSTORE_31.encode(), "/schema.yaml.gz": gzip.compress(PETSTORE_31.encode())}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        local = tmp_path / "pets.yaml"
        local.write_text(PETSTORE_31)
        assert cli.main(["routes", "--from-openapi", str(local)]) == 0
        from_file = capsys.readouterr().out
        for path in ("/schema.yaml", "/schema.yaml.gz"):
            assert cli.main(["routes", "--from-openapi", base + path]) == 0
            served = capsys.readouterr().out
            # The same routes; only the comment naming the source differs.
            assert served.replace(base + path, "SRC") == from_file.replace(str(local), "SRC")
        assert cli.main(["routes", "--from-openapi", base + "/missing"]) == 2
        err = capsys.readouterr().err
        assert err == f"{base}/missing: cannot read the schema: Not Found\n", err
    finally:
        server.shutdown()
        server.server_close()
