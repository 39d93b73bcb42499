"""The benchmark sink's other doors: the ingestion endpoints of the libraries the benchmark
compares this one with, answering as their services do and counting the events they carry.

- Segment (``segment-analytics-python``): ``POST /v1/batch``, ``{"batch": [...]}``;
- PostHog (``posthog``): ``POST /batch/``, ``{"api_key": ..., "batch": [...]}``;
- Honeycomb (``libhoney``): ``POST /1/batch/{dataset}``, a list of events; the answer is one
  ``{"status": 202}`` per event;
- OpenTelemetry logs over OTLP/HTTP: ``POST /v1/logs``, a protobuf ExportLogsServiceRequest
  (counted with ``opentelemetry-proto`` when it is installed, else by request).

Bodies may be gzipped. These doors take any credentials (none is checked), and the
emulator's ``latency`` fault applies to them as to the v3 routes, for the "slow" runs.
"""

from __future__ import annotations

import gzip
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["PEER_PATHS", "count_events", "peer_of", "peer_response"]

PEER_PATHS = {"/v1/batch": "segment", "/batch/": "posthog", "/v1/logs": "otlp"}
HONEYCOMB_PREFIX = "/1/batch/"


def peer_of(path: str) -> str | None:
    if path.startswith(HONEYCOMB_PREFIX):
        return "libhoney"
    return PEER_PATHS.get(path)


async def peer_response(request: Request, peer: str, counts: dict[str, int]) -> Response:
    body = await request.body()
    if request.headers.get("content-encoding", "").lower() == "gzip":
        body = gzip.decompress(body)
    count = count_events(peer, body)
    counts[peer] = counts.get(peer, 0) + count
    if peer == "libhoney":
        return Response(orjson.dumps([{"status": 202}] * count), media_type="application/json")
    if peer == "otlp":
        return Response(b"", media_type="application/x-protobuf")
    answer: dict[str, Any] = {"status": 1} if peer == "posthog" else {"success": True}
    return Response(orjson.dumps(answer), media_type="application/json")


def count_events(peer: str, body: bytes) -> int:
    if peer == "otlp":
        return _count_log_records(body)
    data = orjson.loads(body)
    if peer == "libhoney":
        return len(data)
    return len(data.get("batch", []))


def _count_log_records(body: bytes) -> int:
    try:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (  # noqa: PLC0415
            ExportLogsServiceRequest,
        )
    except ImportError:  # pragma: no cover  (the benchmark installs it)
        return 1
    request = ExportLogsServiceRequest()
    request.ParseFromString(body)
    return sum(
        len(scope.log_records)
        for resource in request.resource_logs
        for scope in resource.scope_logs
    )
