"""Chaos: 50,000 events through a misbehaving server, over real loopback HTTP. Every event id
arrives; the duplicates that lost answers cause are counted and reported."""

from __future__ import annotations

import pytest

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
