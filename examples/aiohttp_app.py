"""An aiohttp model endpoint that publishes each prediction to Fiddler without waiting.

Run it (with the emulator in another terminal: ``fiddler-async serve``):

    FIDDLER_URL=http://127.0.0.1:8080 FIDDLER_TOKEN=emulator-token python examples/aiohttp_app.py

The publisher lives in a ``cleanup_ctx``: started before the app serves, closed on shutdown
(``web.run_app`` turns SIGTERM and Ctrl-C into one), which sends what is still queued within
``close_timeout`` seconds. The handler never waits on Fiddler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from fiddler_async import AsyncPublisher, PublisherConfig

PROJECT, MODEL = "bank_churn", "bank_churn"
FIDDLER = web.AppKey("fiddler", AsyncPublisher)
log = logging.getLogger("aiohttp_app")


def churn_score(features: dict[str, Any]) -> float:
    """Stands in for a real model."""
    age = float(features.get("age", 40))
    products = float(features.get("numofproducts", 1))
    return round(min(1.0, max(0.0, 0.01 * (age - 18) + 0.1 * (products - 1))), 4)


async def fiddler_publisher(app: web.Application) -> AsyncIterator[None]:
    publisher = AsyncPublisher(config=PublisherConfig(close_timeout=5.0))
    await publisher.start()
    app[FIDDLER] = publisher
    yield
    result = await publisher.aclose()
    log.warning("fiddler closed: %s; %s", result, publisher.stats())


async def predict(request: web.Request) -> web.Response:
    features: dict[str, Any] = await request.json()
    score = churn_score(features)
    event_id = request.app[FIDDLER].publish_event_nowait(
        PROJECT, MODEL, {**features, "predicted_churn": score}
    )
    return web.json_response({"predicted_churn": score, "event_id": event_id})


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(fiddler_publisher)
    app.router.add_post("/predict", predict)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
