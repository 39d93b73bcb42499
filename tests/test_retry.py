"""Retries over real loopback HTTP: what is retried, how often, with which headers."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import httpx
import pytest

from fiddler_async import (
    AsyncPublisher,
    BadRequestError,
    ConnectError,
    DeliveryFailure,
    PublisherConfig,
    RateLimitedError,
    ServerError,
)
from fiddler_async._logging import RateLimitedLog
from fiddler_async.emulator import Emulator
from fiddler_async.retry import RetryBudgetSpent, RetryPolicy, is_retryable

from .conftest import (
    assert_adds_up,
    bank_event,
    config,
    loopback_publisher,
    publishes,
    retry_headers,
)
from .in_process import TOKEN, InProcessFiddler

pytestmark = pytest.mark.anyio


async def test_503_is_retried_with_the_retry_header(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["503", "503"], retry_after=0)
    async with loopback_publisher(fiddler) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(1)] * 3)
        result = await pub.flush(10)
        stats = pub.stats()
    assert result.delivered == 3
    assert retry_headers(fiddler) == [None, "1", "2"]
    assert stats.retries == 2
    assert stats.responses["503"] == 2
    assert stats.responses["202"] == 1
    assert sorted(e["event_id"] for e in fiddler.events()) == sorted(ids)  # same ids on retry


async def test_dropped_connections_are_retried(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["drop", "drop"])
    async with loopback_publisher(fiddler) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        result = await pub.flush(10)
        stats = pub.stats()
    assert result.delivered == 1
    assert stats.responses["ConnectError"] == 2
    assert retry_headers(fiddler) == [None, "1", "2"]


async def test_429_waits_for_retry_after_instead_of_the_backoff(fiddler: Emulator) -> None:
    # With a backoff of up to an hour, only honouring Retry-After (1 s) gets this delivered
    # within the test's deadline.
    fiddler.set_faults(script=["429", "503"], retry_after=1)
    async with loopback_publisher(
        fiddler, retry_backoff_initial=3600, retry_backoff_max=3600
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        with anyio.fail_after(10):
            result = await pub.flush(60)
    assert result.delivered == 1
    assert retry_headers(fiddler) == [None, "1", "2"]


async def test_400_is_not_retried(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["400"])
    failures: list[DeliveryFailure] = []
    async with loopback_publisher(fiddler, on_error=failures.append) as pub:
        (event_id,) = await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event()])
        result = await pub.flush(10)
        stats = pub.stats()
    assert (result.delivered, result.failed) == (0, 1)
    assert len(publishes(fiddler)) == 1
    assert stats.retries == 0
    (failure,) = failures
    assert isinstance(failure.error, BadRequestError)
    assert failure.error.reasons[0].reason == "BadRequest"
    assert list(failure.event_ids) == [event_id]
    assert (failure.project, failure.model, failure.update) == ("bank_churn", "bank_churn", False)


async def test_retries_stop_at_the_attempt_budget(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["503"] * 10, retry_after=0)
    failures: list[DeliveryFailure] = []
    async with loopback_publisher(fiddler, retry_max_attempts=3, on_error=failures.append) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        result = await pub.flush(10)
        # The flusher goes on after a failed batch.
        fiddler.set_faults(script=[])
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(10)).delivered == 1
    assert result.failed == 1
    assert isinstance(failures[0].error, ServerError)
    assert retry_headers(fiddler)[:3] == [None, "1", "2"]


async def test_retries_stop_at_the_elapsed_budget(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["503"] * 50, retry_after=0)
    async with loopback_publisher(
        fiddler,
        retry_max_attempts=1000,
        retry_max_elapsed=0.3,
        retry_backoff_initial=0.1,
        retry_backoff_max=0.1,
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        with anyio.fail_after(10):
            result = await pub.flush(30)
    assert result.failed == 1
    assert len(publishes(fiddler)) < 50


async def test_a_raising_callback_does_not_stop_the_flusher(
    fiddler: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(failure: DeliveryFailure) -> None:
        raise RuntimeError("callback bug")

    fiddler.set_faults(script=["400"])
    async with loopback_publisher(fiddler, on_error=explode) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(10)).failed == 1
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(10)).delivered == 1
    assert any("reporting a delivery failure raised" in r.getMessage() for r in caplog.records)


class _CancellingBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"data":'
        raise asyncio.CancelledError


@pytest.mark.parametrize("where", ["sending", "answering"])
async def test_a_callback_or_transport_raising_cancellation_does_not_stop_delivery(
    inproc: InProcessFiddler, caplog: pytest.LogCaptureFixture, anyio_backend: str, where: str
) -> None:
    """asyncio lets any code raise CancelledError (an awaited future another task
    cancelled): from an async on_error, or a transport, as it sends or while its answer is
    read, it is their failure, not a cancellation of the flusher, which would stop sending for
    good (from the answer, it did: silently on asyncio, with the books wrong on trio)."""
    if sys.version_info < (3, 11) and anyio_backend == "asyncio":
        pytest.skip("Python 3.10's asyncio cannot tell such a CancelledError from its own")
    emulator = inproc.transport()
    seen: set[str] = set()

    async def cancelling_once(request: httpx.Request) -> httpx.Response:
        if request.method not in seen:  # the first lookup, the first events request
            seen.add(request.method)
            if where == "sending":
                raise asyncio.CancelledError
            return httpx.Response(503, stream=_CancellingBody())
        return await emulator.handle_async_request(request)

    async def on_error(failure: DeliveryFailure) -> None:
        raise asyncio.CancelledError

    transport = httpx.MockTransport(cancelling_once)
    async with AsyncPublisher(
        "https://f.test", TOKEN, config=config(), transport=transport, on_error=on_error
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(10)).failed == 1  # the transport's cancellation: its failure
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(10)).delivered == 1
        assert_adds_up(pub)
    assert any("raised a cancellation" in r.getMessage() for r in caplog.records)


async def test_async_callbacks_are_awaited(fiddler: Emulator) -> None:
    seen: list[DeliveryFailure] = []

    async def record(failure: DeliveryFailure) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(failure)

    fiddler.set_faults(script=["400"])
    async with loopback_publisher(fiddler, on_error=record) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        await pub.flush(10)
    assert len(seen) == 1


def test_what_is_retryable() -> None:
    assert is_retryable(ServerError("x", status=503))
    assert is_retryable(ServerError("x", status=500))
    assert not is_retryable(ServerError("x", status=501))
    assert is_retryable(RateLimitedError("x", status=429))
    assert is_retryable(ConnectError("x"))
    assert not is_retryable(BadRequestError("x", status=400))
    assert not is_retryable(ValueError("x"))


def test_backoff_is_full_jitter_capped_and_retry_after_is_capped() -> None:
    config = PublisherConfig(retry_backoff_initial=1.0, retry_backoff_max=8.0, retry_after_max=20.0)
    policy = RetryPolicy(config, RateLimitedLog(0, logging.getLogger("test")))
    for retry, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        draws = [policy.backoff(retry, None) for _ in range(500)]
        assert all(0 <= d <= cap for d in draws)
        assert min(draws) < cap * 0.2  # full jitter reaches down near zero...
        assert max(draws) > cap * 0.8  # ...and up near the cap
    told = RateLimitedError("x", status=429, retry_after=5.0)
    assert all(5.0 <= policy.backoff(1, told) <= 5.5 for _ in range(100))
    too_long = RateLimitedError("x", status=429, retry_after=3600.0)
    assert all(20.0 <= policy.backoff(1, too_long) <= 21.0 for _ in range(100))
    # Retrying until a time limit can pass a thousand retries: 2**n must not overflow.
    assert 0 <= policy.backoff(5000, None) <= 8.0
    # "Retry-After: 0" (or a date past) is the backoff, not a retry at once, again and again;
    # so is every Retry-After when retry_after_max is 0.
    at_once = ServerError("x", status=503, retry_after=0.0)
    draws = [policy.backoff(4, at_once) for _ in range(500)]
    assert all(0 <= d <= 8.0 for d in draws)
    assert max(draws) > 8.0 * 0.8
    ignoring = RetryPolicy(
        config.model_copy(update={"retry_after_max": 0}),
        RateLimitedLog(0, logging.getLogger("test")),
    )
    assert max(ignoring.backoff(4, told) for _ in range(500)) > 8.0 * 0.8


async def test_a_timed_out_request_is_retried(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["hang"])
    async with loopback_publisher(fiddler, request_timeout=0.2) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        result = await pub.flush(10)
        stats = pub.stats()
    assert result.delivered == 1
    assert stats.responses["Timeout"] == 1
    assert stats.last_error is not None
    assert "timed out" in stats.last_error
    assert retry_headers(fiddler) == [None, "1"]


async def test_a_retry_past_its_budget_at_the_gate_raises_the_last_error_as_it_was() -> None:
    policy = RetryPolicy(config(), RateLimitedLog(0, logging.getLogger("test")))
    cause = OSError("connection reset by peer")
    first = ConnectError("POST /v3/events: reset")
    first.__cause__ = cause

    async def attempt(number: int) -> None:
        if number == 0:
            raise first
        raise RetryBudgetSpent  # the gate: the retry could not go out in time

    with pytest.raises(ConnectError) as raised:
        await policy.call(attempt, what="x")
    assert raised.value is first
    assert raised.value.__cause__ is cause
