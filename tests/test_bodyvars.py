"""Body fields as template values, and bulk member names (bodyvars.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etagproxy.bodyvars import BulkError, bulk_values, field_value, fields_for, json_document
from etagproxy.config import RouteConfig
from etagproxy.routes import Route


def test_field_values_are_strings_or_whole_numbers_as_one_segment() -> None:
    doc = {"id": 7, "slug": "a/b c", "site": {"id": 3}, "flag": True, "ratio": 1.5, "empty": "", "dots": ".."}
    assert field_value(doc, "id") == "7"
    assert field_value(doc, "slug") == "a%2Fb%20c"
    assert field_value(doc, "site.id") == "3"
    for name in ("flag", "ratio", "empty", "dots", "missing", "site", "id.x"):
        assert field_value(doc, name) is None, name
    assert field_value([1, 2], "id") is None


@given(st.text(min_size=1))
def test_no_value_escapes_its_segment(text: str) -> None:
    value = field_value({"x": text}, "x")
    assert value is None or ("/" not in value and value not in (".", ".."))


def test_fields_for_reads_only_the_sources_given() -> None:
    config = RouteConfig(
        path="/x/{id}", invalidates=("/posts/{body.postId}", "/sites/{response.site.id}/", "/x/{id}"),
    )
    route = Route(config.path, config, index=0)
    assert route.body_names == ("body.postId", "response.site.id")
    assert route.reads_request and route.reads_response
    names = route.body_names
    fields = fields_for(names, {"body": {"postId": 1}, "response": {"site": {"id": "s"}}})
    assert fields == {"body.postId": "1", "response.site.id": "s"}
    assert fields_for(names, {"body": {"postId": 1}}) == {"body.postId": "1"}
    assert fields_for(names, {"body": None}) == {}
    plain = Route("/x/{id}", RouteConfig(path="/x/{id}", invalidates=("/x/{id}/",)), index=0)
    assert not plain.reads_request and not plain.reads_response


def test_json_document_is_none_for_anything_not_json() -> None:
    assert json_document(b'{"a": 1}') == {"a": 1}
    for raw in (None, b"", b"not json", b"\xff\xfe", b"[" * 100_000):
        assert json_document(raw) is None


def test_bulk_values_name_each_member_once_in_order() -> None:
    assert bulk_values([{"id": 2}, {"id": 1}, {"id": 2}], "id", 10) == ["2", "1"]
    assert bulk_values({"id": 1}, "id", 10) is None  # not a bulk request
    assert bulk_values(None, "id", 10) is None


@pytest.mark.parametrize(
    ("document", "status"),
    [([{"id": 1}, {"name": "x"}], 400), ([{"id": 1}, 5], 400), ([{"id": True}], 400), ([{"id": i} for i in range(4)], 413)],
)
def test_bulk_bodies_that_cannot_be_named_are_refused(document: object, status: int) -> None:
    with pytest.raises(BulkError) as info:
        bulk_values(document, "id", 3)
    assert info.value.status == status
