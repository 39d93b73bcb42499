from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from fiddler_async import AsyncPublisher, PublisherConfig

from .fake_fiddler import TOKEN, FakeFiddler, serve


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fake() -> FakeFiddler:
    return FakeFiddler()


@pytest.fixture
def loopback(fake: FakeFiddler) -> Iterator[str]:
    """The fake served over real HTTP on a loopback port."""
    with serve(fake) as url:
        yield url


# Tests should not wait on the real backoff: small, but still jittered and exponential.
FAST_RETRY = {"retry_backoff_initial": 0.01, "retry_backoff_max": 0.05}


def config(**changes: Any) -> PublisherConfig:
    return PublisherConfig(**{**FAST_RETRY, **changes})


def mock_publisher(fake: FakeFiddler, **changes: Any) -> AsyncPublisher:
    """A publisher talking to ``fake`` through httpx.MockTransport."""
    on_error = changes.pop("on_error", None)
    return AsyncPublisher(
        "https://fiddler.test",
        TOKEN,
        config=config(**changes),
        transport=fake.mock_transport(),
        on_error=on_error,
    )


def loopback_publisher(url: str, **changes: Any) -> AsyncPublisher:
    """A publisher talking to the fake over real HTTP."""
    on_error = changes.pop("on_error", None)
    return AsyncPublisher(url, TOKEN, config=config(**changes), on_error=on_error)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; fail the test if it does not within ``timeout``."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  (polls state that has no event to await)
            await anyio.sleep(0.005)


def bank_event(i: int = 0) -> dict[str, Any]:
    """One bank-churn event (the seed's 12 fields but the id and time)."""
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
