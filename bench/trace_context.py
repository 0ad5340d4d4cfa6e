"""Per-request cost of W3C trace context handling (docs/DEPLOYING.md, "Tracing"):
what Proxy.handle and the upstream headers do for it, timed with timeit.

    python -m bench.trace_context
"""
import timeit

from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy import tracing
from etagproxy.exchange import Exchange

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
base = [("Host","h"),("User-Agent","bench"),("Accept","*/*"),("Authorization","Bearer x")]
with_tp = CIMultiDictProxy(CIMultiDict(base + [("traceparent", TP), ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")]))
without = CIMultiDictProxy(CIMultiDict(base))
ex = Exchange("r", "GET")
def step(h):
    ex.trace_id, ex.parent_id, ex.trace_flags, ex.tracestate, ex.span_id = tracing.incoming(
        h.getall("traceparent", None), h.getall("tracestate", None), sampled=False)
    return f"00-{ex.trace_id}-{ex.span_id}-{ex.trace_flags}"
for name, h in (("client traceparent+tracestate", with_tp), ("no traceparent (new trace)", without)):
    n = 200_000
    best = min(timeit.repeat(lambda: step(h), number=n, repeat=5)) / n * 1e6
    print(f"{name}: {best:.2f} us/request")
n=200_000
print("regex alone: %.2f us" % (min(timeit.repeat(lambda: tracing.parse_traceparent(TP), number=n, repeat=5))/n*1e6))
