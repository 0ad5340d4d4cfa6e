"""OpenTelemetry spans (`tracing: {otel: true}`, the `otel` extra).

A server span per request, parented on the client's traceparent, with a
child span per store call (named by the operation) and per upstream call;
the upstream's traceparent names the upstream call's span. Span and trace
ids come from the SDK, and so does the sampling decision of a trace the
proxy starts (OTEL_TRACES_SAMPLER); the access log shows the same ids.

Imported only when the setting is on: without it the request path checks
`ex.span is None` and nothing else.

The tracer provider is the global one when something (a test, an
`opentelemetry-instrument` wrapper) set an SDK provider already; else one
is built from the SDK's environment: resource attributes and service name
(OTEL_SERVICE_NAME, default "etagproxy"), sampler (OTEL_TRACES_SAMPLER) and
the exporters OTEL_TRACES_EXPORTER names (default "otlp", "none" for none),
each found by its entry point, as the SDK's own auto-configuration does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from etagproxy.exchange import Exchange
from etagproxy.tracing import traceparent

log = logging.getLogger("etagproxy")

_EXPORTER_GROUP = "opentelemetry_traces_exporter"


def build_provider(env: Mapping[str, str] = os.environ) -> tuple[TracerProvider, list[str]]:
    """A provider configured from `env`, and the exporter names it could
    not find (their packages are not installed)."""
    attrs: dict[str, Any] = {}
    if "OTEL_SERVICE_NAME" not in env:
        attrs["service.name"] = "etagproxy"
    provider = TracerProvider(resource=Resource.create(attrs))
    missing = []
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    for name in names:
        if name == "none":
            continue
        found = entry_points(group=_EXPORTER_GROUP, name=name)
        if not found:
            missing.append(name)
            continue
        exporter = next(iter(found)).load()()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, missing


def global_provider() -> TracerProvider:
    """The SDK provider spans go to, set up on first use."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider, missing = build_provider()
    for name in missing:
        log.error(
            "OTEL_TRACES_EXPORTER names %r, but no exporter of that name is installed "
            "(for otlp: pip install opentelemetry-exporter-otlp); its spans are dropped",
            name, extra={"fields": {"exporter": name}},
        )
    trace.set_tracer_provider(provider)
    return provider


def _parent(ex: Exchange) -> Context:
    """The client's span as a remote parent, or an empty context (a root)."""
    if not ex.parent_id:
        return Context()
    state = TraceState.from_header([ex.tracestate]) if ex.tracestate else None
    remote = SpanContext(
        int(ex.trace_id, 16), int(ex.parent_id, 16), is_remote=True,
        trace_flags=TraceFlags(int(ex.trace_flags, 16)), trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


class Spans:
    """Starts and ends the spans of requests."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider or global_provider()
        self.tracer = self.provider.get_tracer("etagproxy")

    def server(self, ex: Exchange) -> None:
        """Start `ex`'s server span; the trace and span ids become the span's."""
        span = self.tracer.start_span(
            ex.method, context=_parent(ex), kind=SpanKind.SERVER,
            attributes={"http.request.method": ex.method},
        )
        sc = span.get_span_context()
        ex.trace_id = format(sc.trace_id, "032x")
        ex.span_id = format(sc.span_id, "016x")
        ex.trace_flags = format(int(sc.trace_flags), "02x")
        ex.span = span

    @staticmethod
    def finish(ex: Exchange) -> None:
        span: Span = ex.span  # type: ignore[assignment]
        if ex.route != "-":
            span.update_name(f"{ex.method} {ex.route}")
        span.set_attributes({
            "http.response.status_code": ex.status,
            "etagproxy.route": ex.route,
            "etagproxy.decision": ex.decision,
        })
        if ex.error:
            span.set_attribute("error.type", ex.error)
        if ex.status >= 500:
            span.set_status(Status(StatusCode.ERROR, ex.error or None))
        span.end()

    def child(self, ex: Exchange, name: str, kind: SpanKind, attributes: dict[str, Any]) -> Span:
        return self.tracer.start_span(
            name, context=trace.set_span_in_context(ex.span), kind=kind,  # type: ignore[arg-type]
            attributes=attributes,
        )

    def store(self, ex: Exchange, op: str) -> Span:
        return self.child(ex, op, SpanKind.CLIENT, {"etagproxy.store.op": op})

    def upstream(self, ex: Exchange, method: str, origin: Any, headers: Any, cm: Any) -> _UpstreamSpan:
        return _UpstreamSpan(self, ex, method, origin, headers, cm)

    @staticmethod
    def error_status(description: str) -> Status:
        return Status(StatusCode.ERROR, description or None)

    def flush(self) -> None:
        """Export what is buffered (at shutdown); waits at most 5 s."""
        self.provider.force_flush(timeout_millis=5000)


class _UpstreamSpan:
    """Wraps `Upstream.request`'s context manager in a client span, and
    names that span as the traceparent's parent-id."""

    __slots__ = ("cm", "ex", "headers", "method", "origin", "span", "spans")

    def __init__(self, spans: Spans, ex: Exchange, method: str, origin: Any, headers: Any, cm: Any) -> None:
        self.spans, self.ex, self.method, self.origin, self.headers, self.cm = spans, ex, method, origin, headers, cm
        self.span: Span | None = None

    async def __aenter__(self) -> Any:
        span = self.span = self.spans.child(self.ex, self.method, SpanKind.CLIENT, {
            "http.request.method": self.method,
            "server.address": self.origin.host,
            "server.port": self.origin.port,
        })
        sc = span.get_span_context()
        self.headers["traceparent"] = traceparent(self.ex.trace_id, format(sc.span_id, "016x"), self.ex.trace_flags)
        try:
            up = await self.cm.__aenter__()
        except BaseException as exc:
            self._end(exc)
            raise
        span.set_attribute("http.response.status_code", up.status)
        if up.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return up

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            return await self.cm.__aexit__(kind, exc, tb)  # type: ignore[no-any-return]
        finally:
            self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        span = self.span
        assert span is not None
        if exc is not None:
            span.set_attribute("error.type", getattr(exc, "kind", type(exc).__name__))
            span.set_status(Status(StatusCode.ERROR, str(exc) or None))
        span.end()
