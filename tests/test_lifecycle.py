"""Start, flush, close: deadlines that hold while the server hangs, and misuse made harmless."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from fiddler_async import AsyncPublisher, PublisherClosedError

from .conftest import bank_event, config, eventually, loopback_publisher, mock_publisher
from .fake_fiddler import TOKEN, FakeFiddler, Fault

pytestmark = pytest.mark.anyio


def assert_adds_up(pub: AsyncPublisher) -> None:
    s = pub.stats()
    assert s.accepted == s.delivered + s.failed + s.dropped_total + s.pending


async def test_flush_returns_at_its_deadline_while_the_server_hangs(
    fake: FakeFiddler, loopback: str
) -> None:
    fake.script(Fault(hang=True))
    async with loopback_publisher(loopback, request_timeout=60) as pub:
        for i in range(5):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        with anyio.fail_after(5):
            result = await pub.flush(0.2)
        assert (result.delivered, result.pending, result.complete) == (0, 5, False)
        assert pub.stats().in_flight_events == 5
        assert_adds_up(pub)
        with anyio.fail_after(5):
            closed = await pub.aclose(0.2)
    # At the close deadline the hanging request is cancelled and its events reported.
    assert (closed.delivered, closed.dropped, closed.pending) == (0, 5, 0)
    stats = pub.stats()
    assert stats.dropped == {"shutdown": 5}
    assert stats.pending == 0
    assert_adds_up(pub)


async def test_close_deadline_also_reports_what_is_still_queued(
    fake: FakeFiddler, loopback: str
) -> None:
    fake.script(Fault(hang=True))
    pub = loopback_publisher(loopback, max_in_flight=1, max_batch_events=10, linger=3600)
    await pub.start()
    for i in range(25):  # one batch of 10 in flight (hanging), 15 queued behind it
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
    await eventually(lambda: pub.stats().in_flight_requests == 1)
    with anyio.fail_after(5):
        result = await pub.aclose(0.2)
    assert (result.delivered, result.dropped, result.pending) == (0, 25, 0)
    assert pub.stats().dropped == {"shutdown": 25}


async def test_aclose_delivers_what_is_queued(fake: FakeFiddler, loopback: str) -> None:
    pub = loopback_publisher(loopback, linger=3600)
    await pub.start()
    for i in range(2500):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
    result = await pub.aclose(10)
    assert (result.delivered, result.dropped, result.pending) == (2500, 0, 0)
    assert len(fake.stored()) == 2500


async def test_closing_twice_is_harmless_and_publishing_after_raises(fake: FakeFiddler) -> None:
    pub = mock_publisher(fake)
    with pytest.raises(PublisherClosedError, match="not started"):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    with pytest.raises(PublisherClosedError):
        await pub.flush()
    await pub.start()
    with pytest.raises(PublisherClosedError):
        await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    first = await pub.aclose(5)
    second = await pub.aclose(5)
    assert first == second
    assert first.delivered == 1
    with pytest.raises(PublisherClosedError, match="closed"):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    with pytest.raises(PublisherClosedError):
        await pub.publish_event("bank_churn", "bank_churn", bank_event())
    with pytest.raises(PublisherClosedError):
        await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event()])
    assert (await pub.flush(1)).complete


async def test_a_never_started_publisher_closes_quietly(fake: FakeFiddler) -> None:
    pub = mock_publisher(fake)
    assert (await pub.aclose()).complete
    with pytest.raises(PublisherClosedError):
        await pub.start()


async def test_start_and_close_from_different_tasks(fake: FakeFiddler, loopback: str) -> None:
    """As a framework does with its startup and shutdown hooks."""
    pub = loopback_publisher(loopback)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pub.start)
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    results = []

    async def shutdown() -> None:
        results.append(await pub.aclose(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(shutdown)
    assert results[0].delivered == 1
    assert len(fake.stored()) == 1


async def test_concurrent_close_calls_share_one_result(fake: FakeFiddler, loopback: str) -> None:
    pub = loopback_publisher(loopback)
    await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    results = []

    async def close() -> None:
        results.append(await pub.aclose(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(close)
        tg.start_soon(close)
    assert results[0] == results[1]
    assert results[0].delivered == 1


async def test_stats_add_up_at_every_moment(fake: FakeFiddler, loopback: str) -> None:
    fake.script(503, Fault(drop=True), 503, 400)
    async with loopback_publisher(
        loopback, max_batch_events=50, max_queue_events=400, overflow="drop_oldest"
    ) as pub:
        for i in range(2000):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
            if i % 50 == 0:
                assert_adds_up(pub)
                await anyio.lowlevel.checkpoint()
        while pub.stats().pending:
            assert_adds_up(pub)
            await anyio.sleep(0.001)
        stats = pub.stats()
    assert stats.accepted == 2000
    assert stats.delivered + stats.failed + stats.dropped_total == 2000
    assert stats.failed == 50  # the batch that met the 400
    assert stats.delivered == len(fake.stored())


async def test_the_flusher_survives_an_exporter_bug(fake: FakeFiddler) -> None:
    calls = 0
    original = fake.handle

    def flaky(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 4:  # the first publish after the three lookups
            raise RuntimeError("bug in the transport")
        return original(*args)  # type: ignore[arg-type]

    fake.handle = flaky  # type: ignore[method-assign]
    async with mock_publisher(fake) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(5)).failed == 1
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(5)).delivered == 1


async def test_url_and_token_from_the_environment(
    fake: FakeFiddler, loopback: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIDDLER_URL", loopback)
    monkeypatch.setenv("FIDDLER_TOKEN", TOKEN)
    async with AsyncPublisher(config=config()) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        assert (await pub.flush(5)).delivered == 1
