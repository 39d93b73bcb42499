"""OpenTelemetry metrics: the instruments, named after the semantic conventions for SDK
processors and exporters, read through the OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import textwrap
import weakref
from typing import Any

import pytest

from fiddler_async.emulator import Emulator

from .conftest import bank_event, eventually, loopback_publisher

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from fiddler_async import AsyncPublisher
from fiddler_async.otel import _by_provider, instrument

pytestmark = pytest.mark.anyio


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "fiddler_async"
            for metric in scope.metrics:
                found[metric.name] = list(metric.data.data_points)
    return found


def value(found: dict[str, list[Any]], name: str, **attributes: Any) -> Any:
    for point in found[name]:
        extra = {k: v for k, v in point.attributes.items() if not k.startswith("otel.component")}
        if extra == attributes:
            return point
    raise AssertionError(f"no {name} point with {attributes}: {found[name]}")


async def test_the_publishers_metrics(fiddler: Emulator) -> None:
    reader = InMemoryMetricReader()
    fiddler.set_faults(script=["503"])  # one answer of each kind
    async with loopback_publisher(
        fiddler, max_queue_events=20, linger=3600, overflow="drop_oldest"
    ) as pub:
        instrument(pub, MeterProvider(metric_readers=[reader]))
        for i in range(25):  # 5 more than the queue holds
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        found = points(reader)
        assert value(found, "fiddler_async.processor.queue.size").value == 20
        assert value(found, "fiddler_async.processor.queue.capacity").value == 20
        dropped = value(found, "fiddler_async.processor.processed", **{"error.type": "queue_full"})
        assert dropped.value == 5
        await pub.flush(10)
        found = points(reader)
    assert value(found, "fiddler_async.processor.queue.size").value == 0
    assert value(found, "fiddler_async.processor.processed").value == 20
    assert value(found, "fiddler_async.exporter.exported").value == 20
    assert value(found, "fiddler_async.exporter.exported", **{"error.type": "failed"}).value == 0
    assert value(found, "fiddler_async.exporter.inflight").value == 0
    ok = value(
        found, "fiddler_async.exporter.operation.duration", **{"http.response.status_code": 202}
    )
    refused = value(
        found,
        "fiddler_async.exporter.operation.duration",
        **{"http.response.status_code": 503, "error.type": "503"},
    )
    assert (ok.count, refused.count) == (1, 1)
    assert ok.sum > 0
    names = {point.attributes["otel.component.type"] for pts in found.values() for point in pts}
    assert names == {"fiddler_async.publisher"}


async def test_publishers_sharing_a_provider_and_a_close_with_requests_in_flight(
    fiddler: Emulator,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fiddler.set_faults(script=["hang"])
    first = loopback_publisher(fiddler, linger=0)
    second = loopback_publisher(fiddler, linger=3600)
    async with first, second:
        instrument(first, provider)
        instrument(second, provider)
        await first.resolve("bank_churn", "bank_churn")
        for i in range(10):
            first.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        second.publish_event_nowait("bank_churn", "bank_churn", bank_event(99))
        await eventually(lambda: first.stats().in_flight_events == 10)
        before = {
            p.attributes["otel.component.name"]: p.value
            for p in points(reader)["fiddler_async.processor.processed"]
        }
        await first.aclose(0.2)  # the hung request's events are dropped at the deadline
        found = points(reader)
    after = {
        p.attributes["otel.component.name"]: p.value
        for p in found["fiddler_async.processor.processed"]
        if "error.type" not in p.attributes
    }
    assert len(after) == 2  # both publishers reported
    assert sorted(after.values()) == [0, 10]
    assert all(after[name] >= count for name, count in before.items())  # never goes down
    shutdown = value(found, "fiddler_async.exporter.exported", **{"error.type": "shutdown"})
    assert shutdown.value == 10


def test_publishers_that_are_gone_are_forgotten() -> None:
    """Short-lived publishers, each instrumented: a provider does not keep one entry each."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    kept = AsyncPublisher("http://127.0.0.1:9", "t")
    instrument(kept, provider)
    for _ in range(50):
        instrument(AsyncPublisher("http://127.0.0.1:9", "t"), provider)
    gc.collect()
    assert [entry.ref() for entry in _by_provider[provider].publishers] == [kept]


def test_providers_that_are_gone_are_forgotten() -> None:
    """Nor does the module keep a provider (one per test, or per tenant), its readers and
    their data, once the provider and its publisher are gone."""
    readers = []
    for _ in range(3):
        reader = InMemoryMetricReader()
        readers.append(weakref.ref(reader))
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        instrument(AsyncPublisher("http://127.0.0.1:9", "t"), provider)
        provider.shutdown()
    del reader, provider
    gc.collect()
    assert [ref() for ref in readers] == [None, None, None]


async def test_a_publisher_is_reported_once_and_a_wrong_argument_breaks_nothing(
    fiddler: Emulator,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with pytest.raises(TypeError, match="takes an AsyncPublisher or a Publisher, got 'dict'"):
        instrument({}, provider)
    async with loopback_publisher(fiddler, linger=0) as pub:
        instrument(pub, provider)
        instrument(pub, provider)  # again: nothing more
        await pub.publish_event("bank_churn", "bank_churn", bank_event(1))
        await pub.flush(10)
        found = points(reader)
    assert len(found["fiddler_async.processor.queue.size"]) == 1
    assert value(found, "fiddler_async.exporter.exported").value == 1
    durations = found["fiddler_async.exporter.operation.duration"]
    assert sum(point.count for point in durations) == pub.stats().requests


async def test_events_handed_on_never_go_down(
    fiddler: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader collects on its own thread while the loop changes the figures: a torn read
    of them (here made on purpose) must not make the counter fall, which reads as a reset."""
    reader = InMemoryMetricReader()
    async with loopback_publisher(fiddler, linger=0) as pub:
        instrument(pub, MeterProvider(metric_readers=[reader]))
        await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(1)] * 10)
        await pub.flush(10)
        assert value(points(reader), "fiddler_async.processor.processed").value == 10
        real = pub.stats()
        monkeypatch.setattr(pub, "stats", lambda: dataclasses.replace(real, accepted=5))
        assert value(points(reader), "fiddler_async.processor.processed").value == 10


@pytest.mark.parametrize(
    ("steps", "reported"),
    [
        # The usual order in an application: publishers made, and instrumented, before the
        # OpenTelemetry SDK becomes the global provider; then one with the global one named.
        (
            [
                "instrument(a)",
                "instrument(b)",
                "metrics.set_meter_provider(provider)",
                "instrument(c, metrics.get_meter_provider())",
            ],
            [3, 5, 7],
        ),
        # A provider given by name, and as the global one, in either order: two sets of
        # instruments of the same names on one SDK provider, of which the SDK kept one and
        # dropped the other's callbacks, losing a publisher's metrics without a word.
        (
            ["instrument(a, provider)", "metrics.set_meter_provider(provider)", "instrument(b)"],
            [3, 5],
        ),
        (
            ["instrument(a)", "instrument(b, provider)", "metrics.set_meter_provider(provider)"],
            [3, 5],
        ),
    ],
    ids=["before-the-sdk", "named-then-global", "global-then-named"],
)
def test_every_publisher_is_reported_whatever_the_order_of_setting_up(
    steps: list[str], reported: list[int]
) -> None:
    """(In a process of its own: the global provider is set once.)"""
    script = textwrap.dedent(
        """
        import anyio
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from fiddler_async import AsyncPublisher, PublisherConfig
        from fiddler_async.otel import instrument

        async def main():
            config = PublisherConfig(linger=3600)
            a, b, c = (AsyncPublisher("http://127.0.0.1:9", "t", config=config) for _ in "abc")
            reader = InMemoryMetricReader()
            provider = MeterProvider(metric_readers=[reader])
            STEPS
            async with a, b, c:
                for publisher, count in ((a, 3), (b, 5), (c, 7)):
                    for i in range(count):
                        publisher.publish_event_nowait("p", "m", {"i": i})
                data = reader.get_metrics_data()
                print(sorted(
                    point.value
                    for resource in data.resource_metrics
                    for scope in resource.scope_metrics
                    for metric in scope.metrics
                    if metric.name == "fiddler_async.processor.queue.size"
                    for point in metric.data.data_points
                ))
                for publisher in (a, b, c):
                    await publisher.aclose(0)

        anyio.run(main)
        """
    ).replace("STEPS", "; ".join(steps))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(reported)


async def test_events_still_queued_at_the_close_deadline_are_the_queues_drops(
    fiddler: Emulator,
) -> None:
    reader = InMemoryMetricReader()
    fiddler.set_faults(script=["hang"])
    pub = loopback_publisher(fiddler, linger=0, max_in_flight=1)
    async with pub:
        instrument(pub, MeterProvider(metric_readers=[reader]))
        await pub.resolve("bank_churn", "bank_churn")
        for i in range(10):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await eventually(lambda: pub.stats().in_flight_events == 10)
        for i in range(5):  # behind the hung request
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await pub.aclose(0.2)
    found = points(reader)
    assert pub.stats().dropped == {"shutdown": 15}
    assert value(found, "fiddler_async.processor.processed").value == 10
    queue_drop = value(found, "fiddler_async.processor.processed", **{"error.type": "shutdown"})
    assert queue_drop.value == 5
    exported = value(found, "fiddler_async.exporter.exported", **{"error.type": "shutdown"})
    assert exported.value == 10
