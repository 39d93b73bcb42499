"""Chaos: 50,000 events through a misbehaving server, over real loopback HTTP. Every event id
arrives; the duplicates that lost answers cause are counted and reported."""

from __future__ import annotations

import anyio
import pytest

from fiddler_async import FlushResult
from fiddler_async.emulator import Emulator

from .conftest import bank_event, loopback_publisher

pytestmark = pytest.mark.anyio


async def test_50k_events_through_503s_429s_drops_and_spikes(fiddler: Emulator) -> None:
    fiddler.set_faults(
        error_503=0.20,
        error_429=0.05,
        retry_after=0.05,  # honoured, and shared by every request
        drop=0.02,  # the connection closes before anything is stored
        lose=0.03,  # stored, then the connection closes: the retry makes duplicates
        spike=0.05,
        spike_latency=0.05,
        seed=7,
    )
    async with loopback_publisher(
        fiddler,
        retry_max_attempts=50,
        retry_max_elapsed=600,
        breaker_probe_interval=0.05,
    ) as pub:
        ids = set()
        for i in range(50_000):
            ids.add(pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i)))
        result = await pub.flush(300)
        stats = pub.stats()
    assert result.complete
    assert (stats.delivered, stats.failed, stats.dropped) == (50_000, 0, {})
    assert stats.retries > 0
    assert stats.responses["503"] > 0
    assert stats.responses["429"] > 0
    assert stats.responses["ConnectError"] > 0
    stored = [e["event_id"] for e in fiddler.events()]
    assert set(stored) == ids  # every event arrived
    duplicates = fiddler.duplicates()
    assert len(stored) - len(ids) == sum(n - 1 for n in duplicates.values())
    assert duplicates  # lost answers were retried: counted here, and by the emulator's summary


async def test_an_outage_longer_than_the_memory_budget(fiddler: Emulator) -> None:
    """Without a spool, an outage longer than the queue holds loses events: exactly the
    oldest ones, every one counted, while memory stays within the bound."""
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    async with loopback_publisher(
        fiddler,
        max_queue_events=1000,
        max_batch_events=100,
        max_in_flight=2,
        overflow="drop_oldest",
        retry_max_attempts=10_000,
        retry_max_elapsed=3600,
        breaker_probe_interval=0.05,
    ) as pub:
        ids = []
        first: list[FlushResult] = []

        async def flush_the_first_thousand() -> None:
            first.append(await pub.flush(60))

        async with anyio.create_task_group() as tg:
            for i in range(5000):
                ids.append(pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i)))
                assert pub.stats().queued_events <= 1000
                if i == 999:  # a flush that waits for the first 1000 events
                    tg.start_soon(flush_the_first_thousand)
                if i % 500 == 499:
                    await anyio.sleep(0.02)  # the flusher tries, and meets the outage
            assert pub.stats().responses["503"] > 0
            during = pub.stats()
            assert during.delivered == 0
            assert during.accepted == during.dropped["queue_full"] + during.pending
            fiddler.set_faults(outage_seconds=0)  # the backend comes back
        result = await pub.flush(60)
        stats = pub.stats()
    assert result.complete
    assert stats.delivered + stats.dropped["queue_full"] == 5000
    # The flush that waited through the outage says what became of its events.
    (early,) = first
    assert early.complete
    assert early.dropped > 0
    assert early.delivered + early.dropped == 1000
    stored = {e["event_id"] for e in fiddler.events()}
    assert len(stored) == stats.delivered
    # What was delivered: the batches already in flight when the queue overflowed, and the
    # newest events; everything between them was dropped, and counted.
    assert stored >= set(ids[-1000:])
    assert len(stored - set(ids[-1000:])) <= 2 * 100
