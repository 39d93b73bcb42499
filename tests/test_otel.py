"""OpenTelemetry metrics: the instruments, named after the semantic conventions for SDK
processors and exporters, read through the OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

from typing import Any

import pytest

from fiddler_async.emulator import Emulator

from .conftest import bank_event, loopback_publisher

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from fiddler_async.otel import instrument

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
