"""When batches are sent, how big they are, and how they are grouped (over real loopback HTTP)."""

from __future__ import annotations

from collections import Counter

import pytest

from .conftest import bank_event, eventually, loopback_publisher
from .fake_fiddler import FakeFiddler

pytestmark = pytest.mark.anyio


async def test_a_full_batch_is_sent_without_waiting_for_linger(
    fake: FakeFiddler, loopback: str
) -> None:
    async with loopback_publisher(loopback, linger=3600, max_batch_events=100) as pub:
        for i in range(250):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        # Two full batches go out on their own; the 50 left wait for the linger time.
        await eventually(lambda: pub.stats().delivered == 200)
        assert pub.stats().queued_events == 50
        assert [len(r.json()["source"]["events"]) for r in fake.event_requests()] == [100, 100]
        assert (await pub.flush(5)).delivered == 50


async def test_a_batch_full_in_bytes_is_sent(fake: FakeFiddler, loopback: str) -> None:
    limit = 4096
    async with loopback_publisher(loopback, linger=3600, max_batch_bytes=limit) as pub:
        for i in range(100):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        # Each event is ~300 bytes: only whole batches of at most `limit` bytes leave on
        # their own; what is left is under the limit and waits for the linger time.
        await eventually(lambda: pub.stats().queued_bytes < limit)
        requests = fake.event_requests()
        assert requests
        for request in requests:
            events_part = request.body.split(b'"events":[', 1)[1].rsplit(b"]}", 1)[0]
            assert len(events_part) <= limit
        await pub.flush(5)
    assert len(fake.stored()) == 100


async def test_linger_sends_a_partial_batch(fake: FakeFiddler, loopback: str) -> None:
    async with loopback_publisher(loopback, linger=0.05) as pub:
        for i in range(3):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await eventually(lambda: pub.stats().delivered == 3)  # no flush() called
    assert [len(r.json()["source"]["events"]) for r in fake.event_requests()] == [3]


async def test_flush_sends_partial_batches_at_once(fake: FakeFiddler, loopback: str) -> None:
    async with loopback_publisher(loopback, linger=3600) as pub:
        for i in range(3):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        result = await pub.flush(5)
        assert (result.delivered, result.pending, result.complete) == (3, 0, True)


async def test_never_more_than_1000_events_per_request(fake: FakeFiddler, loopback: str) -> None:
    async with loopback_publisher(loopback, linger=3600) as pub:
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(2500)]
        )
        result = await pub.flush(10)
    assert result.delivered == 2500
    sizes = sorted(len(r.json()["source"]["events"]) for r in fake.event_requests())
    assert sizes == [500, 1000, 1000]
    assert sorted(e["event_id"] for e in fake.stored()) == sorted(ids)


async def test_batches_are_grouped_by_destination(fake: FakeFiddler, loopback: str) -> None:
    fake.add_model("bank_churn", "bank_churn_v2")
    async with loopback_publisher(loopback, linger=3600, max_batch_events=7) as pub:
        for i in range(30):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
            pub.publish_event_nowait("bank_churn", "bank_churn_v2", bank_event(i))
            pub.publish_event_nowait(
                "bank_churn",
                "bank_churn",
                bank_event(i),
                env_type="PRE_PRODUCTION",
                env_name="baseline",
            )
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", {"churn": "no"}, event_id=f"e{i}", update_event=True
            )
        assert (await pub.flush(10)).delivered == 120
    names = {m["id"]: m["name"] for m in fake.models.values()}
    per_destination: Counter[tuple[str, str, str, str | None]] = Counter()
    for request in fake.event_requests():
        body = request.json()
        events = body["source"]["events"]
        assert len(events) <= 7
        key = (request.method, names[body["model_id"]], body["env_type"], body["env_name"])
        per_destination[key] += len(events)
        if request.method == "PATCH":
            assert all(set(e) == {"event_id", "churn"} for e in events)
    assert per_destination == {
        ("POST", "bank_churn", "PRODUCTION", None): 30,
        ("POST", "bank_churn_v2", "PRODUCTION", None): 30,
        ("POST", "bank_churn", "PRE_PRODUCTION", "baseline"): 30,
        ("PATCH", "bank_churn", "PRODUCTION", None): 30,
    }


async def test_a_burst_of_100k_events_loses_nothing_with_defaults(
    fake: FakeFiddler, loopback: str
) -> None:
    async with loopback_publisher(loopback) as pub:
        event = bank_event(1)
        for _ in range(100_000):
            pub.publish_event_nowait("bank_churn", "bank_churn", event)
        result = await pub.flush(120)
        stats = pub.stats()
    assert result.delivered == 100_000
    assert stats.dropped == {}
    assert len(fake.stored()) == 100_000
    assert len({e["event_id"] for e in fake.stored()}) == 100_000
