"""prometheus-client value classes for etagproxy's hot path.

`LoopValue` and `LoopHistogram` serve a single process; `_Buffered` a pool's
worker (`buffer_shared_values`, `flush_shared`). metrics.py installs them.
"""

from __future__ import annotations

import bisect
import os

from prometheus_client import Histogram
from prometheus_client import values as _values


class LoopValue:
    """prometheus-client's value of one series in a single process: a plain
    float, without `MutexValue`'s lock.

    Every update comes from the event loop's thread (handlers, store and
    upstream callbacks; the scrape is served on the same loop), so there is
    no second writer to exclude, and a reader on another thread still sees
    whole floats under the GIL. The lock cost 2-3 % of the instructions of
    a store-answered 304 (bench/instructions.py): about six updates each.
    A pool's workers keep prometheus-client's shared-file values
    (`enable_multiprocess`).
    """

    __slots__ = ("_value", "_exemplar")
    _multiprocess = False

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: object, labelvalues: object,
                 help_text: str, **kwargs: object) -> None:
        self._value = 0.0
        self._exemplar: object = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> object:
        return self._exemplar


class LoopHistogram(Histogram):
    """A Histogram whose `observe` finds the bucket by bisection.

    prometheus-client's checks the series is a child on every call and then
    walks the bounds in Python; here a child is checked once, and `bisect`
    finds the first bound >= the amount (the same bucket, `le`). The same
    exposition; the values are whatever the value class is (shared files in
    a pool)."""

    def _metric_init(self) -> None:
        super()._metric_init()
        # Only a child (or an unlabelled histogram) has buckets to count in.
        self.observe = self._observe  # type: ignore[method-assign]

    def _observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            Histogram.observe(self, amount, exemplar)
            return
        self._sum.inc(amount)
        self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(1)


# prometheus-client picks its value class once, when first imported: the
# shared-file one if PROMETHEUS_MULTIPROC_DIR was set, else MutexValue,
# which LoopValue replaces for every metric created from now on.
if not getattr(_values.ValueClass, "_multiprocess", False):
    _values.ValueClass = LoopValue


FLUSH_S = 1.0
"""How often a pool's worker writes its buffered updates to its shared
file (`buffer_shared_values`); a scrape also writes the answering worker's
own first."""


class _Buffered:
    """A pool worker's value of one series: updates gather in a plain float
    and reach the worker's shared file at `flush_shared`.

    prometheus-client's shared-file value takes a lock and writes the file on
    every update: 12 % of a store-answered 304's instructions in a worker
    (bench/instructions.py). Buffered, a scrape that lands on another worker
    sees this one's counts at most `FLUSH_S` late, and a worker that crashes
    loses at most that much of its counts; the totals never go backwards.
    `set` (gauges) writes through.
    """

    __slots__ = ("_shared", "_pending", "_dirty")
    _multiprocess = True
    _etagproxy = True
    shared_class: type = object

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._shared = self.shared_class(*args, **kwargs)
        self._pending = 0.0
        self._dirty = False

    def inc(self, amount: float) -> None:
        self._pending += amount
        if not self._dirty:
            self._dirty = True
            _DIRTY.append(self)

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._pending = 0.0
        self._shared.set(value, timestamp)

    def set_exemplar(self, exemplar: object) -> None:
        return  # as prometheus-client's shared values: no exemplars in a pool

    def get(self) -> float:
        return float(self._shared.get()) + self._pending

    def get_exemplar(self) -> None:
        return None

    def flush(self) -> None:
        self._dirty = False
        if self._pending:
            pending, self._pending = self._pending, 0.0
            self._shared.inc(pending)


_DIRTY: list[_Buffered] = []
os.register_at_fork(after_in_child=_DIRTY.clear)


def buffer_shared_values() -> None:
    """In a pool's worker, before its metrics are made: buffer every update
    of the shared-file values (`_Buffered`); `flush_shared` writes them."""
    current = _values.ValueClass
    if not getattr(current, "_multiprocess", False) or issubclass(current, _Buffered):
        return
    _values.ValueClass = type("BufferedValue", (_Buffered,), {"__slots__": (), "shared_class": current})


def flush_shared() -> None:
    """Write every buffered update to this worker's shared file."""
    dirty = _DIRTY[:]
    _DIRTY.clear()
    for value in dirty:
        value.flush()
