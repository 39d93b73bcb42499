"""Run by ``nox -s minimal`` in a venv holding only ``pip install .`` (no extras, no trio, no
test tools): the core must import and publish with its declared dependencies alone."""

from __future__ import annotations

import json
import sys

import anyio
import httpx

from fiddler_async import AsyncPublisher

MODEL = {"id": "9d5c6c1e-0000-4000-8000-000000000001", "name": "m", "event_id_col": "id"}
received: list[dict[str, object]] = []


def answer(request: httpx.Request) -> httpx.Response:
    page = {"total": 1, "items": [{"id": MODEL["id"], "name": "m"}]}
    if request.url.path in ("/v3/projects", "/v3/models"):
        return httpx.Response(200, json={"data": page})
    if request.url.path == f"/v3/models/{MODEL['id']}":
        return httpx.Response(200, json={"data": MODEL})
    received.extend(json.loads(request.content)["source"]["events"])
    return httpx.Response(202, json={"data": {"source_type": "EVENTS", "event_ids": []}})


async def main() -> None:
    transport = httpx.MockTransport(answer)
    async with AsyncPublisher("https://fiddler.test", "t", transport=transport) as pub:
        ids = [pub.publish_event_nowait("p", "m", {"x": i}) for i in range(10)]
        result = await pub.flush(5)
    assert result.delivered == 10, result
    assert [e["id"] for e in received] == ids
    for optional in ("trio", "pandas", "starlette", "uvicorn", "rich"):
        assert optional not in sys.modules, f"the core imported {optional}"


anyio.run(main)
print("minimal install: imports, publishes 10 events on asyncio")
