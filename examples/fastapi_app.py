"""A FastAPI model endpoint that publishes each prediction to Fiddler without waiting.

Run it (with the emulator in another terminal: ``fiddler-async serve``):

    FIDDLER_URL=http://127.0.0.1:8080 FIDDLER_TOKEN=emulator-token python examples/fastapi_app.py

then ``curl -X POST localhost:8000/predict -H 'content-type: application/json'
-d '{"customer_id": "c1", "age": 42, "balance": 1000.0, "numofproducts": 2}'``.

The publisher lives in the app's lifespan: started before the first request, closed on
shutdown (uvicorn turns SIGTERM and Ctrl-C into one), which sends what is still queued within
``close_timeout`` seconds. The predictions never wait on Fiddler: ``publish_event_nowait``
queues the event and returns, whether Fiddler is fast, slow, hung or down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request

from fiddler_async import (
    AsyncPublisher,
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    PublisherConfig,
)

PROJECT, MODEL = "bank_churn", "bank_churn"
log = logging.getLogger("fastapi_app")


def churn_score(features: dict[str, Any]) -> float:
    """Stands in for a real model."""
    age = float(features.get("age", 40))
    products = float(features.get("numofproducts", 1))
    return round(min(1.0, max(0.0, 0.01 * (age - 18) + 0.1 * (products - 1))), 4)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    config = PublisherConfig(close_timeout=5.0)
    async with AsyncPublisher(config=config) as publisher:
        # A wrong model name or token stops the app here; an unreachable Fiddler does not.
        with anyio.move_on_after(5.0) as waited:
            try:
                await publisher.resolve(PROJECT, MODEL)
            except (NotFoundError, AuthenticationError, PermissionDeniedError):
                raise  # Fiddler answered: every event would fail
            except Exception as exc:  # the backend's trouble: events wait in the queue
                log.warning("Fiddler not reachable at startup (%s); publishing anyway", exc)
        if waited.cancelled_caught:
            log.warning("Fiddler did not answer within 5 s at startup; publishing anyway")
        app.state.fiddler = publisher
        yield
    # Leaving the block flushed and closed the publisher.
    log.warning("fiddler: %s", publisher.stats())


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(features: dict[str, Any], request: Request) -> dict[str, Any]:
    score = churn_score(features)
    event_id = request.app.state.fiddler.publish_event_nowait(
        PROJECT, MODEL, {**features, "predicted_churn": score}
    )
    return {"predicted_churn": score, "event_id": event_id}


@app.post("/label/{event_id}")
async def label(event_id: str, outcome: dict[str, Any], request: Request) -> dict[str, str]:
    """The ground truth, once known, joined to the prediction by its event id."""
    request.app.state.fiddler.publish_event_nowait(
        PROJECT, MODEL, outcome, event_id=event_id, update_event=True
    )
    return {"event_id": event_id}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
