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
  handed to the exporter (no ``error.type``) or dropped (``error.type``: the drop reason);
- ``fiddler_async.exporter.exported`` (counter, ``{event}``): events whose delivery ended,
  delivered (no ``error.type``), ``failed`` or ``spooled`` (as ``error.type``);
- ``fiddler_async.exporter.inflight`` (gauge, ``{event}``): events in unanswered requests;
- ``fiddler_async.exporter.operation.duration`` (histogram, ``s``): each HTTP request, with
  ``http.response.status_code``, and ``error.type`` (the status, or the kind of failure:
  ``ConnectError``, ``Timeout``) unless it succeeded.

Every instrument also carries ``otel.component.type`` (``fiddler_async.publisher``) and
``otel.component.name`` (``fiddler_async.publisher/N``, one per instrumented publisher).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._version import __version__

__all__ = ["instrument"]

_numbers = itertools.count()


def instrument(publisher: Any, meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report ``publisher``'s metrics (an ``AsyncPublisher`` or a ``Publisher``) through
    ``meter_provider`` (default: the global one)."""
    inner = getattr(publisher, "_publisher", publisher)  # the sync Publisher's own
    meter = metrics.get_meter("fiddler_async", __version__, meter_provider=meter_provider)
    component = {
        "otel.component.type": "fiddler_async.publisher",
        "otel.component.name": f"fiddler_async.publisher/{next(_numbers)}",
    }
    capacity = publisher.config.max_queue_events

    def queue_size(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(publisher.stats().queued_events, component)

    def queue_capacity(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(capacity, component)

    def processed(options: CallbackOptions) -> Iterable[Observation]:
        s = publisher.stats()
        handed_on = s.accepted - s.queued_events - s.dropped_total
        yield Observation(handed_on, component)
        for reason, count in s.dropped.items():
            yield Observation(count, {**component, "error.type": reason})

    def exported(options: CallbackOptions) -> Iterable[Observation]:
        s = publisher.stats()
        yield Observation(s.delivered, component)
        yield Observation(s.failed, {**component, "error.type": "failed"})
        yield Observation(s.spooled, {**component, "error.type": "spooled"})

    def inflight(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(publisher.stats().in_flight_events, component)

    meter.create_observable_gauge(
        "fiddler_async.processor.queue.size",
        [queue_size],
        unit="{event}",
        description="The number of events in the publisher's queue.",
    )
    meter.create_observable_gauge(
        "fiddler_async.processor.queue.capacity",
        [queue_capacity],
        unit="{event}",
        description="The most events the publisher's queue can hold.",
    )
    meter.create_observable_counter(
        "fiddler_async.processor.processed",
        [processed],
        unit="{event}",
        description="Events that left the queue: handed to the exporter, or dropped.",
    )
    meter.create_observable_counter(
        "fiddler_async.exporter.exported",
        [exported],
        unit="{event}",
        description="Events whose delivery has finished, delivered or not.",
    )
    meter.create_observable_gauge(
        "fiddler_async.exporter.inflight",
        [inflight],
        unit="{event}",
        description="Events in requests that have not been answered yet.",
    )
    duration = meter.create_histogram(
        "fiddler_async.exporter.operation.duration",
        unit="s",
        description="The duration of each HTTP request to Fiddler.",
    )
    by_answer: dict[str, dict[str, Any]] = {}  # attributes per status or error kind

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
        duration.record(seconds, attributes)

    inner._ledger.on_response = on_response
