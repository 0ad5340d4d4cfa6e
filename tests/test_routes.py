"""Route templates, first-match-wins routing, resource keys and invalidation."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etagproxy.routes import (
    Match,
    Route,
    Router,
    TemplateError,
    check_invalidates,
    compile_template,
    expand,
    resource_key,
)
from etagproxy.target import TargetError, canonicalize


@dataclass(frozen=True)
class RouteConfig:
    """Stands in for etagproxy.config.RouteConfig: only what routing reads."""

    path: str
    methods: frozenset[str] | None = None
    mode: str = "track"
    key_query: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()


def route(path: str, **kw: object) -> RouteConfig:
    return RouteConfig(path, **kw)  # type: ignore[arg-type]


def match(router: Router, target: str, method: str = "GET") -> Match | None:
    return router.match(method, canonicalize(target))


NETBOX = Router(
    [
        route("/api/dcim/sites/{id}/", invalidates=("/api/dcim/sites/",)),
        route("/api/dcim/sites/", key_query=("limit", "offset")),
        route(
            "/api/dcim/regions/{region}/sites/{id}/",
            invalidates=(
                "/api/dcim/regions/{region}/sites/",
                "/api/dcim/sites/{id}/",
                "/api/dcim/sites/",
            ),
        ),
        route("/api/dcim/regions/{region}/sites/"),
        route("/static/{rest:path}", mode="passthrough"),
    ]
)


# --- matching ------------------------------------------------------------------


def test_variable_matches_one_segment() -> None:
    m = match(NETBOX, "/api/dcim/sites/42/")
    assert m is not None
    assert m.route.index == 0
    assert m.params == {"id": "42"}
    assert m.key == "/api/dcim/sites/42/"
    # {id} never crosses '/': two segments match no route at all.
    assert match(NETBOX, "/api/dcim/sites/4/2/") is None


def test_encoded_slash_stays_inside_a_segment() -> None:
    m = match(NETBOX, "/api/dcim/sites/a%2fb/")
    assert m is not None and m.params == {"id": "a%2Fb"}
    assert m.key == "/api/dcim/sites/a%2Fb/"


def test_trailing_slash_is_significant() -> None:
    assert match(NETBOX, "/api/dcim/sites/1") is None
    assert match(NETBOX, "/api/dcim/sites") is None
    router = Router([route("/sites/{id}/"), route("/sites/{id}", mode="passthrough")])
    with_slash, without = match(router, "/sites/1/"), match(router, "/sites/1")
    assert with_slash is not None and with_slash.route.index == 0
    assert without is not None and without.route.index == 1


def test_canonical_spellings_reach_the_same_route_and_key() -> None:
    plain = match(NETBOX, "/api/dcim/sites/7/")
    for spelling in ("/api//dcim/./sites/%37/", "/api/dcim/x/../sites/7/", "/api/%64cim/sites/7/"):
        other = match(NETBOX, spelling)
        assert other is not None and plain is not None
        assert (other.route, other.key) == (plain.route, plain.key)


def test_path_variable_takes_the_rest() -> None:
    m = match(NETBOX, "/static/css/site.css")
    assert m is not None
    assert m.params == {"rest": "css/site.css"}
    assert m.key == ""  # passthrough routes have no key
    assert match(NETBOX, "/static/a/") is not None
    assert match(NETBOX, "/static/a/").params == {"rest": "a/"}  # type: ignore[union-attr]
    # One or more characters: the bare prefix is not matched.
    assert match(NETBOX, "/static/") is None
    assert match(NETBOX, "/static") is None


def test_first_match_wins() -> None:
    router = Router(
        [
            route("/items/special/", mode="passthrough"),
            route("/items/{id}/"),
            route("/items/{other}/", key_query=("x",)),
            route("/{rest:path}"),
        ]
    )
    special = match(router, "/items/special/")
    assert special is not None and special.route.index == 0
    item = match(router, "/items/3/?x=1")
    assert item is not None and item.route.index == 1
    assert item.key == "/items/3/"  # route 1 has no key_query
    anything = match(router, "/elsewhere")
    assert anything is not None and anything.route.index == 3


def test_methods_filter() -> None:
    router = Router(
        [
            route("/things/{id}/", methods=frozenset({"PUT", "PATCH"}), key_query=("v",)),
            route("/things/{id}/", methods=frozenset({"GET"}), mode="passthrough"),
            route("/things/{id}/"),
        ]
    )
    assert match(router, "/things/1/", "PUT").route.index == 0  # type: ignore[union-attr]
    assert match(router, "/things/1/", "GET").route.index == 1  # type: ignore[union-attr]
    assert match(router, "/things/1/", "DELETE").route.index == 2  # type: ignore[union-attr]
    assert match(router, "/things/1/", "PROPFIND").route.index == 2  # type: ignore[union-attr]
    # RFC 9110 §9.1: method names are case-sensitive.
    assert match(router, "/things/1/", "put").route.index == 2  # type: ignore[union-attr]
    only_get = Router([route("/x", methods=frozenset({"GET"}))])
    assert match(only_get, "/x", "POST") is None
    assert match(only_get, "/x", "GET") is not None


def test_key_for_ignores_methods() -> None:
    router = Router(
        [route("/a/{id}", methods=frozenset({"POST"})), route("/a/{id}", mode="passthrough")]
    )
    assert match(router, "/a/1", "GET").route.index == 1  # type: ignore[union-attr]
    m = router.key_for(canonicalize("/a/1"))
    assert m is not None and m.route.index == 0 and m.key == "/a/1"
    assert router.key_for(canonicalize("/b")) is None


def test_empty_router_matches_nothing() -> None:
    router = Router([])
    assert router.match("GET", canonicalize("/")) is None
    assert router.key_for(canonicalize("/")) is None


def test_route_match_path() -> None:
    r = Route("/v{version}/items/{id}.json", route("/v{version}/items/{id}.json"), index=0)
    assert r.match_path("/v2/items/9.json") == {"version": "2", "id": "9"}
    assert r.match_path("/v2/items/9.xml") is None
    assert r.match_path("/v/items/9.json") is None  # variables are never empty
    assert r.match_path("/v2/items/a.b.json") == {"version": "2", "id": "a.b"}


def test_literal_parts_are_canonicalised() -> None:
    for template in ("/caf%c3%a9/{id}", "/café/{id}", "/caf%C3%A9/{id}"):
        r = Route(template, route(template), index=0)
        assert r.match_path(canonicalize("/caf%C3%A9/1").path) == {"id": "1"}, template
    r = Route("/%7Euser/{id}", route("/%7Euser/{id}"), index=0)
    assert r.match_path(canonicalize("/~user/1").path) == {"id": "1"}
    r = Route("/a%2fb/", route("/a%2fb/"), index=0)
    assert r.match_path("/a%2Fb/") == {}
    assert r.match_path("/a/b/") is None


def test_many_routes_keep_file_order() -> None:
    configs = [route(f"/r{i}/{{id}}/") for i in range(60)] + [route("/{a}/{b}/")]
    router = Router(configs)
    for i in (0, 17, 59):
        m = match(router, f"/r{i}/x/")
        assert m is not None and m.route.index == i and m.params == {"id": "x"}
    m = match(router, "/other/x/")
    assert m is not None and m.route.index == 60 and m.params == {"a": "other", "b": "x"}


# --- resource keys -------------------------------------------------------------


def test_key_query_selects_and_sorts() -> None:
    m = match(NETBOX, "/api/dcim/sites/?offset=50&brief=1&limit=25")
    assert m is not None and m.key == "/api/dcim/sites/?limit=25&offset=50"
    other_order = match(NETBOX, "/api/dcim/sites/?limit=25&brief=0&offset=50")
    assert other_order is not None and other_order.key == m.key
    assert match(NETBOX, "/api/dcim/sites/?brief=1").key == "/api/dcim/sites/"  # type: ignore[union-attr]
    assert match(NETBOX, "/api/dcim/sites/").key == "/api/dcim/sites/"  # type: ignore[union-attr]
    # A parameter without '=' has an empty value.
    assert match(NETBOX, "/api/dcim/sites/?limit").key == "/api/dcim/sites/?limit="  # type: ignore[union-attr]


def test_key_query_compares_canonical_names_and_values() -> None:
    router = Router([route("/s", key_query=("q", "name~", "a&b"))])
    m1 = match(router, "/s?%71=%7e&name%7E=1&a%26b=2")
    m2 = match(router, "/s?q=~&name~=1&a%26b=2")
    assert m1 is not None and m2 is not None
    assert m1.key == m2.key == "/s?a%26b=2&name~=1&q=~"
    # '+' and '%2B' are different bytes upstream, hence different keys.
    assert match(router, "/s?q=a+b").key != match(router, "/s?q=a%2Bb").key  # type: ignore[union-attr]


def test_repeated_parameters_keep_their_order() -> None:
    router = Router([route("/s", key_query=("tag", "a"))])
    ab = match(router, "/s?tag=b&a=1&tag=a")
    ba = match(router, "/s?tag=a&tag=b&a=1")
    assert ab is not None and ba is not None
    assert ab.key == "/s?a=1&tag=b&tag=a"
    assert ba.key == "/s?a=1&tag=a&tag=b"


def test_resource_key_directly() -> None:
    r = Route("/s", route("/s", key_query=("b", "a")), index=0)
    assert resource_key(r, canonicalize("/s?z=1&b=2&a=3")) == "/s?a=3&b=2"
    assert resource_key(r, canonicalize("/s?z=1")) == "/s"


_query_chars = st.sampled_from([*"abz=&+%~-._", "%7e", "%2B", "%26", "%61", "%C3%A9"])


@settings(max_examples=200)
@given(
    st.lists(st.sampled_from(["a", "b", "%2F", "%7e", ".", "..", "", "c%2e"]), max_size=5),
    st.lists(_query_chars, max_size=12),
)
def test_key_is_stable_under_recanonicalisation(
    path_parts: list[str], query_parts: list[str]
) -> None:
    router = Router([route("/{rest:path}", key_query=("a", "b", "~")), route("/")])
    raw = "/" + "/".join(path_parts) + "?" + "".join(query_parts)
    try:
        target = canonicalize(raw)
    except TargetError:
        return
    again = canonicalize(target.raw)
    first, second = router.key_for(target), router.key_for(again)
    assert first is not None and second is not None
    assert first.key == second.key
    assert first.key.split("?")[0] == target.path


# --- invalidation ----------------------------------------------------------------


def test_invalidation_keys_expand_member_variables() -> None:
    m = match(NETBOX, "/api/dcim/regions/eu/sites/7/", "PATCH")
    assert m is not None
    assert NETBOX.invalidation_keys(m) == [
        "/api/dcim/regions/eu/sites/",
        "/api/dcim/sites/7/",
        "/api/dcim/sites/",
    ]
    assert NETBOX.invalidation_keys(match(NETBOX, "/api/dcim/sites/7/", "PUT")) == [  # type: ignore[arg-type]
        "/api/dcim/sites/"
    ]


def test_invalidation_keys_drop_untracked_own_and_duplicates() -> None:
    router = Router(
        [
            route(
                "/items/{id}/",
                invalidates=(
                    "/items/",  # tracked by the next route
                    "/items/{id}/",  # the match's own key
                    "/static/{id}",  # only a passthrough route matches it
                    "/nowhere/",  # no route matches it
                    "/items/",  # duplicate
                    "/lists/{missing}/",  # variable the route lacks
                    "/%69tems/",  # another spelling of /items/
                ),
            ),
            route("/items/"),
            route("/static/{rest:path}", mode="passthrough"),
        ]
    )
    m = match(router, "/items/5/", "DELETE")
    assert m is not None
    assert router.invalidation_keys(m) == ["/items/"]


def test_invalidation_keys_of_passthrough_and_plain_routes() -> None:
    router = Router([route("/a/{id}", invalidates=("/b/{id}",)), route("/b/{x}")])
    m = match(router, "/a/%7Ex")
    assert m is not None and router.invalidation_keys(m) == ["/b/~x"]
    assert router.invalidation_keys(match(router, "/b/1")) == []  # type: ignore[arg-type]


def test_check_invalidates_reports_missing_variables() -> None:
    router = Router(
        [
            route(
                "/api/sites/{id}/",
                invalidates=("/api/sites/", "/api/regions/{region}/sites/", "/api/sites/{id}/x/"),
            ),
            route(
                "/api/regions/{region}/sites/{id}/",
                invalidates=("/api/regions/{region}/sites/",),
            ),
            route("/api/sites/"),
            route("/api/regions/{region}/sites/"),
            route("/api/sites/{id}/x/"),
        ]
    )
    errors = check_invalidates(router.routes[0], router)
    assert len(errors) == 1
    assert "{region}" in errors[0] and "/api/sites/{id}/" in errors[0]
    assert check_invalidates(router.routes[1], router) == []
    assert check_invalidates(router.routes[2], router) == []


def test_check_invalidates_reports_unmatched_fixed_templates() -> None:
    router = Router(
        [
            route("/a/{id}", invalidates=("/nothing/", "/b/")),
            route("/b/"),
            route("/c/", mode="passthrough"),
        ]
    )
    errors = check_invalidates(router.routes[0], router)
    assert len(errors) == 1 and "/nothing/" in errors[0]
    bad = Router([route("/a/{id}", invalidates=("/c/",)), route("/c/", mode="passthrough")])
    assert len(check_invalidates(bad.routes[0], bad)) == 1


def test_router_refuses_malformed_invalidates_template() -> None:
    with pytest.raises(TemplateError, match="unbalanced"):
        Router([route("/a/{id}", invalidates=("/b/{id",))])


# --- templates -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "must start with '/'"),
        ("api/{id}", "must start with '/'"),
        ("/a/{id", "unbalanced '{'"),
        ("/a/id}", "unbalanced '}'"),
        ("/a/{{id}}", "unbalanced"),
        ("/a/{}", "not an identifier"),
        ("/a/{1st}", "not an identifier"),
        ("/a/{my-id}", "not an identifier"),
        ("/a/{id:int}", "unknown variable type 'int'"),
        ("/a/{id}/b/{id}", "'id' appears twice"),
        ("/a/{x}{y}", "separated by literal text"),
        ("/a/{rest:path}/b", "must be the last part"),
        ("/a/{rest:path}{x}", "must be the last part"),
        ("/a//b", "empty path segment"),
        ("/a/../b", "dot segments"),
        ("/a/%2e/b", "dot segments"),
        ("/a?x=1", "'?'"),
        ("/a#x", "'#'"),
        ("/a\\b", "backslash"),
        ("/a/%zz", "malformed percent-escape"),
        ("/a/%00", "NUL"),
        ("/a/%C0%AE", "UTF-8"),
    ],
)
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)) as info:
        compile_template(template)
    assert repr(template) in str(info.value)  # every message names the template


def test_bad_template_in_router_config() -> None:
    with pytest.raises(TemplateError, match="appears twice"):
        Router([route("/ok/"), route("/a/{x}/{x}")])


def test_expand() -> None:
    assert expand("/regions/{region}/sites/{id}/", {"region": "eu", "id": "7", "x": "y"}) == (
        "/regions/eu/sites/7/"
    )
    assert expand("/static/{rest:path}", {"rest": "a/b/c"}) == "/static/a/b/c"
    assert expand("/caf%c3%a9/", {}) == "/caf%C3%A9/"
    with pytest.raises(TemplateError, match=r"\{region\}"):
        expand("/regions/{region}/sites/", {"id": "7"})
    with pytest.raises(TemplateError, match="one path segment"):
        expand("/sites/{id}/", {"id": "a/b"})
    with pytest.raises(TemplateError, match="one path segment"):
        expand("/sites/{id}/", {"id": ""})


@settings(max_examples=200)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="abc-~%2F", min_size=1, max_size=4).map(lambda s: ("seg", s)),
            st.just(("var", "")),
        ),
        min_size=1,
        max_size=5,
    ),
    st.data(),
)
def test_expand_then_match_round_trips(parts: list[tuple[str, str]], data: st.DataObject) -> None:
    template_parts, values = [], {}
    for i, (kind, text) in enumerate(parts):
        if kind == "var":
            template_parts.append(f"{{v{i}}}")
            values[f"v{i}"] = data.draw(st.sampled_from(["1", "x.y", "a%2Fb", "~", "%C3%A9"]))
        else:
            template_parts.append(text)
    template = "/" + "/".join(template_parts) + "/"
    try:
        compiled = compile_template(template)
        target = canonicalize(expand(template, values))
    except (TemplateError, TargetError):
        return
    r = Route(template, route(template), index=0)
    assert r.match_path(target.path) == {name: values[name] for name in compiled.names}
