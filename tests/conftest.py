from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from fiddler_async import AsyncPublisher, PublisherConfig
from fiddler_async.emulator import Emulator, running_emulator

from .in_process import MODELS, TOKEN, InProcessFiddler


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def inproc() -> InProcessFiddler:
    """The emulator's app in-process, behind httpx.MockTransport."""
    return InProcessFiddler()


@pytest.fixture
def fiddler() -> Iterator[Emulator]:
    """The emulator on a loopback port (real HTTP), serving tests/models.toml."""
    with running_emulator(models=MODELS, token=TOKEN) as emulator:
        yield emulator


# Tests should not wait on the real backoff: small, but still jittered and exponential.
FAST_RETRY = {"retry_backoff_initial": 0.01, "retry_backoff_max": 0.05}

ONE_SLOT_FULL_QUEUE: dict[str, Any] = {
    "max_in_flight": 1,
    "max_batch_events": 10,
    "max_queue_events": 10,
    "overflow": "block",
    "block_timeout": 60,
    "linger": 0,
}
"""One batch in flight and one queued fill the queue: a callback of the batch in flight that
publishes waits for room (to the block timeout if it keeps the one slot)."""


def config(**changes: Any) -> PublisherConfig:
    return PublisherConfig(**{**FAST_RETRY, **changes})


def mock_publisher(inproc: InProcessFiddler, **changes: Any) -> AsyncPublisher:
    """A publisher talking to the in-process emulator through httpx.MockTransport."""
    on_error = changes.pop("on_error", None)
    return AsyncPublisher(
        "https://fiddler.test",
        TOKEN,
        config=config(**changes),
        transport=inproc.transport(),
        on_error=on_error,
    )


def loopback_publisher(emulator: Emulator, **changes: Any) -> AsyncPublisher:
    """A publisher talking to the emulator over real HTTP."""
    on_error = changes.pop("on_error", None)
    return AsyncPublisher(emulator.url, TOKEN, config=config(**changes), on_error=on_error)


def assert_adds_up(pub: AsyncPublisher) -> None:
    """Every accepted event is delivered, failed, spooled, dropped or still pending."""
    s = pub.stats()
    assert s.accepted == s.delivered + s.failed + s.spooled + s.dropped_total + s.pending


def publishes(emulator: Emulator) -> list[dict[str, Any]]:
    """The emulator's log of POST/PATCH /v3/events requests, oldest first."""
    return [r for r in emulator.requests() if r["path"] == "/v3/events"]


def retry_headers(emulator: Emulator) -> list[str | None]:
    return [r["headers"].get("x-fiddler-client-retry") for r in publishes(emulator)]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; fail the test if it does not within ``timeout``."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  (polls state that has no event to await)
            await anyio.sleep(0.005)


def bank_event(i: int = 0) -> dict[str, Any]:
    """One bank-churn event: the 12 fields of the seed, without id and time."""
    return {
        "customer_id": f"c{i}",
        "creditscore": 600 + i % 200,
        "geography": "France",
        "gender": "Female",
        "age": 30 + i % 40,
        "tenure": i % 10,
        "balance": 1000.5 * (i % 7),
        "numofproducts": 1 + i % 3,
        "hascrcard": "yes",
        "isactivemember": "no",
        "estimatedsalary": 50000.25,
        "predicted_churn": 0.25,
    }
