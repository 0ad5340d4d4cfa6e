"""W3C Trace Context through the proxy, and the optional OpenTelemetry spans."""

from __future__ import annotations

import json
import re
import sys

import aiohttp
import pytest

from etagproxy import logs, tracing
from etagproxy.config import ConfigError, parse_config
from etagproxy.headers import upstream_request_headers

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CLIENT_TP = f"00-{TRACE}-{PARENT}-01"
VALID = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

CONFIG = """
upstream: {upstream}
routes:
  - path: /api/sites/{id}/
  - path: /api/strict/{id}/
    require_if_match: true
"""


def parts(value: str | None) -> tuple[str, str, str]:
    assert value is not None
    m = VALID.fullmatch(value)
    assert m is not None, value
    trace_id, parent_id, flags = m.groups()
    assert trace_id != "0" * 32 and parent_id != "0" * 16
    return trace_id, parent_id, flags


# -- parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        f"00-{TRACE}-{PARENT}",
        f"00-{TRACE}-{PARENT}-1",
        f"00-{TRACE}-{PARENT}-01-",             # version 00 ends at the flags
        f"00-{TRACE}-{PARENT}-01-extra",
        f"00-{TRACE.upper()}-{PARENT}-01",      # lower-case hex only
        f"00-{'0' * 32}-{PARENT}-01",           # all-zero trace-id
        f"00-{TRACE}-{'0' * 16}-01",            # all-zero parent-id
        f"ff-{TRACE}-{PARENT}-01",              # version ff is invalid
        f"0-{TRACE}-{PARENT}-01",
        f"00-{TRACE}x-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f" 00-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01\n",
        f"00-{TRACE}-{PARENT}-0g",
    ],
)
def test_invalid_traceparents_are_refused(value):
    assert tracing.parse_traceparent(value) is None


def test_valid_traceparents_parse():
    assert tracing.parse_traceparent(CLIENT_TP) == (TRACE, PARENT, "01")
    assert tracing.parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, "00")
    # A later version may append fields; trace-id, parent-id and flags are read.
    assert tracing.parse_traceparent(f"01-{TRACE}-{PARENT}-03-what-ever") == (TRACE, PARENT, "03")
    assert tracing.parse_traceparent(f"cc-{TRACE}-{PARENT}-01") == (TRACE, PARENT, "01")


@pytest.mark.parametrize(
    ("values", "out"),
    [
        (["congo=t61rcWkgMzE"], "congo=t61rcWkgMzE"),
        (["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (["rojo=1", "congo=2"], "rojo=1,congo=2"),                  # field lines combined
        (["a=1 , ,b=2"], "a=1 , ,b=2"),                             # empty members, OWS
        (["tenant@vendor=x"], "tenant@vendor=x"),
        ([], None),
        ([""], None),
        (["Upper=1"], None),                                         # keys are lower case
        (["a"], None),
        (["a=1,b"], None),
        (["a=1=2"], None),
        (["a=x\x01"], None),
        (["a=" + "x" * 600], None),                                  # over 512 bytes
        ([",".join(f"k{i}=v" for i in range(33))], None),            # over 32 members
    ],
)
def test_tracestate_is_checked(values, out):
    assert tracing.clean_tracestate(values) == out


def test_incoming_keeps_the_trace_or_starts_one():
    kept = tracing.incoming([CLIENT_TP], ["a=1"], sampled=False)
    assert kept[:4] == (TRACE, PARENT, "01", "a=1")
    assert re.fullmatch("[0-9a-f]{16}", kept[4]) and kept[4] != PARENT, "the proxy's own span"
    # Two traceparent lines are invalid: a new trace, and no tracestate.
    trace_id, parent, flags, state, span = tracing.incoming([CLIENT_TP, CLIENT_TP], ["a=1"], sampled=False)
    assert trace_id != TRACE and (parent, flags, state) == ("", "00", None)
    assert tracing.incoming(None, None, sampled=True)[2] == "01"
    assert tracing.incoming(["junk"], ["a=1"], sampled=True)[1:4] == ("", "01", None)
    # A new trace's id and span are well-formed, nonzero and new each time.
    seen = set()
    for _ in range(200):
        trace_id, _, _, _, span = tracing.incoming(None, None, sampled=False)
        assert re.fullmatch("[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
        assert re.fullmatch("[0-9a-f]{16}", span) and span != "0" * 16
        assert trace_id[-16:] != span
        seen.add((trace_id, span))
    assert len(seen) == 200


def test_upstream_headers_replace_the_clients_trace_fields():
    out = upstream_request_headers(
        [(b"Host", b"h"), (b"traceparent", CLIENT_TP.encode()), (b"TraceState", b"a=1"), (b"tracestate", b"b=2")],
        drop=frozenset(), peer=None, trusted=False, proto="http", via="p", rid="r", keep_framing=False,
        traceparent="00-" + TRACE + "-1111111111111111-01", tracestate="a=1,b=2",
    )
    assert out.getall("traceparent") == ["00-" + TRACE + "-1111111111111111-01"]
    assert out.getall("tracestate") == ["a=1,b=2"]


# -- through the proxy ---------------------------------------------------------


async def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers or {}) as r:
            await r.read()
            return r


async def test_upstream_sees_the_clients_trace_with_the_proxys_span(make_proxy, recording_upstream):
    p = await make_proxy(CONFIG, upstream=recording_upstream.url)
    r = await get(f"{p.url}/api/sites/1/", {"traceparent": CLIENT_TP, "tracestate": "rojo=00f067aa0ba902b7,congo=t61"})
    assert r.status == 200
    seen = recording_upstream.requests[-1]
    assert len(seen.headers_named("traceparent")) == 1
    trace_id, parent_id, flags = parts(seen.header("traceparent"))
    assert (trace_id, flags) == (TRACE, "01")
    assert parent_id != PARENT
    assert seen.headers_named("tracestate") == ["rojo=00f067aa0ba902b7,congo=t61"]
    ex = p.exchanges[-1]
    assert (ex.trace_id, ex.span_id, ex.parent_id) == (TRACE, parent_id, PARENT)
    # Responses carry no trace context.
    assert "traceparent" not in r.headers and "tracestate" not in r.headers


@pytest.mark.parametrize(
    "sent",
    [
        {},
        {"traceparent": f"00-{'0' * 32}-{PARENT}-01", "tracestate": "a=1"},
        {"traceparent": f"00-{TRACE}-{PARENT}-01-extra", "tracestate": "a=1"},
        {"traceparent": "garbage"},
    ],
)
async def test_absent_or_invalid_traceparent_starts_a_new_trace(make_proxy, recording_upstream, sent):
    p = await make_proxy(CONFIG, upstream=recording_upstream.url)
    assert (await get(f"{p.url}/api/sites/1/", sent)).status == 200
    seen = recording_upstream.requests[-1]
    trace_id, parent_id, flags = parts(seen.header("traceparent"))
    assert trace_id != TRACE and flags == "00"
    assert seen.header("tracestate") is None
    ex = p.exchanges[-1]
    assert (ex.trace_id, ex.span_id, ex.parent_id) == (trace_id, parent_id, "")
    # Another request gets another trace.
    await get(f"{p.url}/api/sites/1/", sent)
    assert parts(recording_upstream.requests[-1].header("traceparent"))[0] != trace_id


async def test_new_traces_are_sampled_when_configured(make_proxy, recording_upstream):
    p = await make_proxy(CONFIG + "tracing: {sampled: true}\n", upstream=recording_upstream.url)
    await get(f"{p.url}/api/sites/1/")
    assert parts(recording_upstream.requests[-1].header("traceparent"))[2] == "01"
    # A client's flags are kept either way.
    await get(f"{p.url}/api/sites/1/", {"traceparent": f"00-{TRACE}-{PARENT}-00"})
    assert parts(recording_upstream.requests[-1].header("traceparent"))[:3:2] == (TRACE, "00")


async def test_writes_and_plain_requests_carry_the_trace(make_proxy, recording_upstream):
    p = await make_proxy(CONFIG, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/api/sites/1/") as r:
            tag = r.headers["ETag"]
        hdrs = {"traceparent": CLIENT_TP, "If-Match": tag, "Content-Type": "application/json"}
        async with s.put(f"{p.url}/api/sites/1/", data=b'{"a":1}', headers=hdrs) as r:
            assert r.status == 200
        async with s.get(f"{p.url}/unrouted", headers={"traceparent": CLIENT_TP}) as r:
            assert r.status == 200
    put, plain = recording_upstream.requests[-2:]
    assert put.method == "PUT" and parts(put.header("traceparent"))[0] == TRACE
    assert plain.raw_path == "/unrouted" and parts(plain.header("traceparent"))[0] == TRACE


async def test_the_proxys_own_answers_carry_no_trace_context(make_proxy, recording_upstream):
    p = await make_proxy(CONFIG, upstream=recording_upstream.url)
    hdrs = {"traceparent": CLIENT_TP, "tracestate": "a=1"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/api/sites/1/") as r:
            tag = r.headers["ETag"]
        answers = []
        async with s.get(f"{p.url}/api/sites/1/", headers={**hdrs, "If-None-Match": tag}) as r:
            answers.append((r.status, r.headers))
        async with s.put(f"{p.url}/api/sites/1/", data=b"{}", headers={**hdrs, "If-Match": '"nope"'}) as r:
            answers.append((r.status, r.headers))
        async with s.put(f"{p.url}/api/strict/1/", data=b"{}", headers=hdrs) as r:
            answers.append((r.status, r.headers))
    assert [a[0] for a in answers] == [304, 412, 428]
    for _, h in answers:
        assert "traceparent" not in h and "tracestate" not in h
    assert [e.trace_id for e in p.exchanges[-3:]] == [TRACE] * 3


def test_access_log_lines_name_the_trace_and_span():
    from etagproxy.exchange import Exchange

    ex = Exchange("r1", "GET", route="/x/{id}/", status=200, trace_id=TRACE, span_id=PARENT)
    record = json.loads(logs.json_line(ex, 7))
    assert (record["trace_id"], record["span_id"]) == (TRACE, PARENT)
    assert f" trace={TRACE}/{PARENT}" in logs.text_line(ex, 7)


def test_config_tracing_section():
    cfg = parse_config("upstream: http://u\ntracing: {sampled: true}\n", filename="t.yaml")
    assert (cfg.tracing.sampled, cfg.tracing.otel) == (True, False)
    with pytest.raises(ConfigError) as err:
        parse_config("upstream: http://u\ntracing:\n  sample: true\n", filename="t.yaml")
    assert err.value.problems == [
        "t.yaml:3: tracing.sample: expected a known key (did you mean 'sampled'?), got an unknown key"
    ]


def test_otel_without_the_extra_is_a_config_error(monkeypatch):
    # As if the SDK were not installed: importing it raises ImportError.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError) as err:
        parse_config("upstream: http://u\ntracing:\n  sampled: false\n  otel: true\n", filename="t.yaml")
    assert err.value.problems == [(
        "t.yaml:4: tracing.otel: true needs the OpenTelemetry SDK, which is not installed "
        "(pip install 'etagproxy[otel]')"
    )]


# -- OpenTelemetry -------------------------------------------------------------


@pytest.fixture
def otel_spans(monkeypatch):
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from etagproxy import otel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(otel, "global_provider", lambda: provider)
    yield exporter
    provider.shutdown()


OTEL_CONFIG = CONFIG + "tracing: {otel: true}\n"


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


async def test_otel_server_span_with_store_and_upstream_children(make_proxy, recording_upstream, otel_spans):
    from opentelemetry.trace import SpanKind

    p = await make_proxy(OTEL_CONFIG, upstream=recording_upstream.url)
    r = await get(f"{p.url}/api/sites/1/?x=1", {"traceparent": CLIENT_TP, "tracestate": "a=1"})
    assert r.status == 200
    await p.server.stop()
    spans = otel_spans.get_finished_spans()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(server) == 1
    srv = server[0]
    assert srv.name == "GET /api/sites/{id}/"
    assert hexid(srv.context.trace_id, 32) == TRACE
    assert srv.parent is not None and hexid(srv.parent.span_id, 16) == PARENT and srv.parent.is_remote
    assert srv.context.trace_state.to_header() == "a=1"
    assert dict(srv.attributes) == {
        "http.request.method": "GET", "url.path": "/api/sites/1/", "http.response.status_code": 200,
        "etagproxy.route": "/api/sites/{id}/", "etagproxy.decision": p.exchanges[-1].decision,
    }
    children = [s for s in spans if s is not srv]
    assert children and all(s.parent.span_id == srv.context.span_id for s in children)
    assert all(s.context.trace_id == srv.context.trace_id for s in children)
    names = {s.name for s in children}
    assert "observe" in names and "GET" in names
    up = next(s for s in children if s.name == "GET")
    assert up.kind == SpanKind.CLIENT and up.attributes["http.response.status_code"] == 200
    # The upstream's parent is the proxy's upstream-call span.
    seen = parts(recording_upstream.requests[-1].header("traceparent"))
    assert seen == (TRACE, hexid(up.context.span_id, 16), "01")
    # The access log shows the server span.
    ex = p.exchanges[-1]
    assert (ex.trace_id, ex.span_id) == (TRACE, hexid(srv.context.span_id, 16))


async def test_otel_write_spans_and_a_new_trace(make_proxy, recording_upstream, otel_spans):
    from opentelemetry.trace import SpanKind

    p = await make_proxy(OTEL_CONFIG, upstream=recording_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/api/sites/1/") as r:
            tag = r.headers["ETag"]
        async with s.put(f"{p.url}/api/sites/1/", data=b"{}", headers={"If-Match": tag}) as r:
            assert r.status == 200
        async with s.put(f"{p.url}/api/sites/1/", data=b"{}", headers={"If-Match": tag}) as r:
            assert r.status == 412
    await p.server.stop()
    spans = otel_spans.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 200, 412]
    assert all(s.parent is None for s in servers)  # no traceparent came in: roots
    assert len({s.context.trace_id for s in servers}) == 3
    put_ok = servers[1]
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == put_ok.context.span_id]
    assert "begin" in {k.name for k in kids} and "PUT" in {k.name for k in kids}
    assert servers[2].attributes["etagproxy.decision"] == p.exchanges[-1].decision
    assert "PUT" not in {s.name for s in spans if s.parent is not None and s.parent.span_id == servers[2].context.span_id}


async def test_otel_upstream_failure_marks_the_spans(make_proxy, otel_spans):
    from opentelemetry.trace import SpanKind, StatusCode

    p = await make_proxy(OTEL_CONFIG + "timeouts: {connect: 200ms}\n", upstream="http://127.0.0.1:9")
    r = await get(f"{p.url}/unrouted")
    assert r.status == 502
    await p.server.stop()
    spans = otel_spans.get_finished_spans()
    srv = next(s for s in spans if s.kind == SpanKind.SERVER)
    up = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert up.parent.span_id == srv.context.span_id
    assert up.status.status_code == StatusCode.ERROR and up.attributes["error.type"] == "upstream-unreachable"
    assert srv.status.status_code == StatusCode.ERROR and srv.attributes["error.type"] == "upstream-unreachable"


def test_otel_provider_from_the_environment():
    pytest.importorskip("opentelemetry.sdk.trace")
    from etagproxy.otel import build_provider

    provider, missing = build_provider({"OTEL_TRACES_EXPORTER": "console,nosuch"})
    assert missing == ["nosuch"]
    assert provider.resource.attributes["service.name"] == "etagproxy"
    provider.shutdown()
    provider, missing = build_provider({"OTEL_TRACES_EXPORTER": "none", "OTEL_SERVICE_NAME": "edge"})
    assert missing == []
    provider.shutdown()
