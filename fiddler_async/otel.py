"""OpenTelemetry metrics for a publisher (the ``otel`` extra: ``opentelemetry-api``).

    from fiddler_async.otel import instrument
    instrument(publisher)                      # the global MeterProvider, or meter_provider=

The names follow OpenTelemetry's semantic conventions for the metrics of its own SDK
components (a processor with a queue, an exporter), under this library's namespace, since
this is not the OpenTelemetry SDK: ``otel.sdk.processor.log.queue.size`` becomes
``fiddler_async.processor.queue.size``, and so on. Every instrument but the duration is
observed from ``stats()`` when the reader collects, so publishing costs nothing more.

- ``fiddler_async.processor.queue.size`` (gauge, ``{event}``): events in the queue;
- ``fiddler_async.processor.queue.capacity`` (gauge, ``{event}``): ``max_queue_events``;
- ``fiddler_async.processor.processed`` (counter, ``{event}``): events that left the queue,
  handed on (no ``error.type``) or dropped by it (``error.type``: ``queue_full``,
  ``queue_bytes``, ``forked``, and ``shutdown`` for those still queued at the close
  deadline);
- ``fiddler_async.exporter.exported`` (counter, ``{event}``): events whose delivery ended,
  delivered (no ``error.type``), or not (``error.type``: ``failed``, ``spooled``, or the
  reason of a later drop: ``shutdown``, ``spool_full``, ...);
- ``fiddler_async.exporter.inflight`` (gauge, ``{event}``): events in unanswered requests;
- ``fiddler_async.exporter.operation.duration`` (histogram, ``s``): each HTTP request, with
  ``http.response.status_code``, and ``error.type`` (the status, or the kind of failure:
  ``ConnectError``, ``Timeout``) unless it succeeded.

Every instrument also carries ``otel.component.type`` (``fiddler_async.publisher``) and
``otel.component.name`` (``fiddler_async.publisher/N``, one per instrumented publisher).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._version import __version__

if TYPE_CHECKING:
    from .publisher import AsyncPublisher
    from .sync import Publisher

__all__ = ["instrument"]

QUEUE_DROPS = ("queue_full", "queue_bytes", "forked")
"""Reasons an event is dropped *by the queue*; the others happen after it (at the close
deadline, on the way to the spool) and show in ``exporter.exported``."""

DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

_numbers = itertools.count()


class _Reported:
    """A publisher reported through a provider: its attributes, and the most events it was
    seen to hand on. That count is a difference of figures the event loop changes while a
    reader's thread reads them, and a counter that goes down reads as a reset."""

    __slots__ = ("component", "handed_on", "ref")

    def __init__(self, ref: weakref.ref[Any], component: dict[str, Any]) -> None:
        self.ref = ref
        self.component = component
        self.handed_on = 0


class _Instruments:
    """One provider's instruments, reporting every publisher instrumented with it: an SDK
    gives back the same instrument for the same name, so callbacks cannot be per
    publisher."""

    def __init__(self, meter: metrics.Meter, provider: Any = None) -> None:
        self.publishers: list[_Reported] = []
        self.provider = None if provider is None else weakref.ref(provider)
        """The provider given, for one set made on it directly; None for the global set."""
        meter.create_observable_gauge(
            "fiddler_async.processor.queue.size",
            [self._observe(lambda p, r: [Observation(p.stats().queued_events, r.component)])],
            unit="{event}",
            description="The number of events in the publisher's queue.",
        )
        meter.create_observable_gauge(
            "fiddler_async.processor.queue.capacity",
            [self._observe(lambda p, r: [Observation(p.config.max_queue_events, r.component)])],
            unit="{event}",
            description="The most events the publisher's queue can hold.",
        )
        meter.create_observable_counter(
            "fiddler_async.processor.processed",
            [self._observe(_processed)],
            unit="{event}",
            description="Events that left the queue: handed on, or dropped by the queue.",
        )
        meter.create_observable_counter(
            "fiddler_async.exporter.exported",
            [self._observe(lambda p, r: _exported(p, r.component))],
            unit="{event}",
            description="Events whose delivery has finished, delivered or not.",
        )
        meter.create_observable_gauge(
            "fiddler_async.exporter.inflight",
            [self._observe(lambda p, r: [Observation(p.stats().in_flight_events, r.component)])],
            unit="{event}",
            description="Events in requests that have not been answered yet.",
        )
        self.duration = meter.create_histogram(
            "fiddler_async.exporter.operation.duration",
            unit="s",
            description="The duration of each HTTP request to Fiddler.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def forget(self, gone: weakref.ref[Any]) -> None:
        """A publisher was collected: stop reporting it (short-lived publishers add up)."""
        for entry in [entry for entry in self.publishers if entry.ref is gone]:
            self.publishers.remove(entry)  # one by one: an instrument() may run meanwhile

    def reports(self, publisher: Any) -> bool:
        return any(entry.ref() is publisher for entry in self.publishers)

    def _observe(
        self, observations: Callable[[Any, _Reported], list[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A callback observing every live publisher of this provider."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for entry in self._reported():
                publisher = entry.ref()
                if publisher is not None:
                    yield from observations(publisher, entry)

        return callback

    def _reported(self) -> list[_Reported]:
        """This set's publishers; for a provider given by name that has since become the
        global one, those of the global set too. Its instruments were made on the provider
        first, so the SDK keeps them and drops the global set's, made there later under the
        same names (with their callbacks, silently)."""
        shared = _global
        if (
            self.provider is not None
            and shared is not None
            and self.provider() is metrics.get_meter_provider()
        ):
            return [*self.publishers, *shared.publishers]
        return list(self.publishers)


def _processed(publisher: Any, entry: _Reported) -> list[Observation]:
    s, component = publisher.stats(), entry.component
    drops = _queue_drops(publisher, s)
    entry.handed_on = max(entry.handed_on, s.accepted - s.queued_events - sum(drops.values()))
    found = [Observation(entry.handed_on, component)]
    for reason, count in drops.items():
        found.append(Observation(count, {**component, "error.type": reason}))
    return found


def _queue_drops(publisher: Any, s: Any) -> dict[str, int]:
    """The events the queue dropped, by reason: those still queued at the close deadline
    among them (the rest of the ``shutdown`` drops were in flight: the exporter's)."""
    drops = {reason: s.dropped[reason] for reason in QUEUE_DROPS if reason in s.dropped}
    unsent = _ledger(publisher).dropped_unsent
    if unsent:
        drops["shutdown"] = unsent
    return drops


def _exported(publisher: Any, component: dict[str, Any]) -> list[Observation]:
    s = publisher.stats()
    found = [
        Observation(s.delivered, component),
        Observation(s.failed, {**component, "error.type": "failed"}),
        Observation(s.spooled, {**component, "error.type": "spooled"}),
    ]
    queue_drops = _queue_drops(publisher, s)
    for reason, count in s.dropped.items():
        after_the_queue = count - queue_drops.get(reason, 0)
        if after_the_queue:
            found.append(Observation(after_the_queue, {**component, "error.type": reason}))
    return found


def _ledger(publisher: Any) -> Any:
    """The counters of an AsyncPublisher, or of the one a sync Publisher runs."""
    return getattr(publisher, "_publisher", publisher)._ledger


_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
"""The instruments of each provider given, for as long as the provider lives."""
_global: _Instruments | None = None
"""The global provider's: made once. Its meter, made before the application sets the SDK
up, is a proxy that reports through the SDK's once it is (a new proxy each call would make a
second set of instruments, which the SDK drops for having the same names)."""


def instrument(
    publisher: AsyncPublisher | Publisher, meter_provider: metrics.MeterProvider | None = None
) -> None:
    """Report ``publisher``'s metrics (an ``AsyncPublisher`` or a ``Publisher``) through
    ``meter_provider`` (default: the global one, set up before or after this call). Several
    publishers may share a provider; each is told apart by ``otel.component.name``. Once
    per publisher and provider: a second call does nothing."""
    from .publisher import AsyncPublisher  # noqa: PLC0415  (no cycle at import time)
    from .sync import Publisher  # noqa: PLC0415

    if not isinstance(publisher, AsyncPublisher | Publisher):
        raise TypeError(
            "instrument() takes an AsyncPublisher or a Publisher, got "
            f"{type(publisher).__qualname__!r}"
        )
    global _global  # noqa: PLW0603  (made once, on first use)
    inner = publisher._publisher if isinstance(publisher, Publisher) else publisher
    current = metrics.get_meter_provider()
    if meter_provider is current:  # the global one, named
        meter_provider = None
    if meter_provider is None and _global is None and current in _by_provider:
        meter_provider = current  # given by name before it became the global one: one set
    instruments = _global if meter_provider is None else _by_provider.get(meter_provider)
    if instruments is None:
        meter = metrics.get_meter("fiddler_async", __version__, meter_provider=meter_provider)
        instruments = _Instruments(meter, meter_provider)
        if meter_provider is None:
            _global = instruments
        else:
            _by_provider[meter_provider] = instruments
    if instruments.reports(publisher):
        return
    component = {
        "otel.component.type": "fiddler_async.publisher",
        "otel.component.name": f"fiddler_async.publisher/{next(_numbers)}",
    }
    instruments.publishers.append(_Reported(weakref.ref(publisher, instruments.forget), component))
    by_answer: dict[str, dict[str, Any]] = {}  # attributes per status or error kind
    histogram = instruments.duration

    def on_response(key: str, seconds: float) -> None:
        attributes = by_answer.get(key)
        if attributes is None:
            if key.isdigit():
                attributes = {**component, "http.response.status_code": int(key)}
                if not key.startswith("2"):
                    attributes["error.type"] = key
            else:
                attributes = {**component, "error.type": key}
            by_answer[key] = attributes
        histogram.record(seconds, attributes)

    previous = inner._ledger.on_response
    if previous is None:
        inner._ledger.on_response = on_response
        return

    def both(key: str, seconds: float) -> None:  # instrumented through another provider too
        previous(key, seconds)
        on_response(key, seconds)

    inner._ledger.on_response = both
