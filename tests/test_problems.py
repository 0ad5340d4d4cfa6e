"""problems.py: RFC 9457 problem details, the shape of every error the proxy makes."""

from __future__ import annotations

import json

from etagproxy.problems import CONTENT_TYPE, PROBLEM_BASE, TITLES, problem


def test_a_problem_is_typed_titled_and_never_stored():
    resp = problem(412, "precondition-failed", "Re-read it.", headers=(("ETag", '"t"'),), current_etag='"t"')
    assert resp.status == 412
    assert resp.content_type == CONTENT_TYPE
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["ETag"] == '"t"'
    assert json.loads(resp.body) == {
        "type": PROBLEM_BASE + "precondition-failed", "title": "Precondition Failed",
        "status": 412, "detail": "Re-read it.", "current_etag": '"t"',
    }


def test_every_status_the_proxy_answers_has_its_title():
    for status in (400, 404, 408, 409, 412, 413, 428, 502, 503, 504):
        assert json.loads(problem(status, "x", "y").body)["title"] == TITLES[status]
    assert json.loads(problem(599, "x", "y").body)["title"] == "Error"
