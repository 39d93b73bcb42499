"""Poison isolation: a batch the server refuses for some of its events is split until only
those are left; the rest is delivered, and each refused event is reported with the reason."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from fiddler_async import BadRequestError, DeliveryFailure
from fiddler_async.emulator import Emulator

from .conftest import (
    assert_adds_up,
    bank_event,
    eventually,
    loopback_publisher,
    mock_publisher,
    publishes,
)
from .in_process import InProcessFiddler

pytestmark = pytest.mark.anyio


async def test_one_bad_event_among_1000(fiddler: Emulator) -> None:
    events = [bank_event(i) for i in range(1000)]
    events[637]["age"] = "forty"  # the server refuses this one
    failures: list[DeliveryFailure] = []
    async with loopback_publisher(fiddler, on_error=failures.append) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", events)
        result = await pub.flush(30)
        stats = pub.stats()
    assert (result.delivered, result.failed) == (999, 1)
    assert stats.accepted == stats.delivered + stats.failed
    (failure,) = failures
    assert failure.event_ids == (ids[637],)
    assert failure.events()[0]["age"] == "forty"
    assert isinstance(failure.error, BadRequestError)
    assert "events[0].age: expected int, got str 'forty'" in failure.error.reasons[0].message
    assert fiddler.count() == 999
    assert ids[637] not in {e["event_id"] for e in fiddler.events()}
    # Halving 1000 events down to one: about two requests per level, not one per event.
    assert len(publishes(fiddler)) <= 1 + 2 * 10


@pytest.mark.parametrize(
    ("count", "bad"),
    [
        (100, [3, 50, 51, 99]),
        # 50 at random places among 1000: the split that finds the first ones must not spend
        # what it needs for the others, and fail good events with them.
        (1000, sorted(random.Random(1).sample(range(1000), 50))),
    ],
)
async def test_several_bad_events_are_each_found(
    inproc: InProcessFiddler, count: int, bad: list[int]
) -> None:
    events = [bank_event(i) for i in range(count)]
    for index in bad:
        events[index]["balance"] = "lots"
    failures: list[DeliveryFailure] = []
    async with mock_publisher(inproc, on_error=failures.append) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", events)
        result = await pub.flush(30)
    assert (result.delivered, result.failed) == (count - len(bad), len(bad))
    refused = sorted(i for f in failures for i in f.event_ids if i is not None)
    assert refused == sorted(ids[b] for b in bad)
    assert len(inproc.stored()) == count - len(bad)


async def test_a_refusal_of_the_whole_request_is_not_split_forever(
    inproc: InProcessFiddler,
) -> None:
    # Every request is refused (as a server would refuse a wrong model or environment): the
    # isolation gives up after its budget instead of sending each event alone.
    inproc.state.faults.update({"script": ["400"] * 10_000})
    async with mock_publisher(inproc) as pub:
        await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(1000)]
        )
        result = await pub.flush(10)
    assert result.failed == 1000
    assert len(inproc.event_requests()) <= 1 + 4 * 10 + 4


async def test_a_batch_nearly_all_refused_is_not_sent_event_by_event(
    inproc: InProcessFiddler,
) -> None:
    """999 of 1000 events refused (a schema change the events do not follow): the one good
    half found does not open the way to two requests for every bad event."""
    events = [{**bank_event(i), "age": "forty"} for i in range(1000)]
    events[500] = bank_event(500)
    async with mock_publisher(inproc) as pub:
        await pub.publish_events_batch("bank_churn", "bank_churn", events)
        result = await pub.flush(10)
    assert result.failed >= 999
    assert len(inproc.event_requests()) <= 1 + 4 * 10 + 4 + 2 * 1 * 10


async def test_other_errors_are_not_split(inproc: InProcessFiddler) -> None:
    inproc.state.faults.update({"script": ["401"]})
    async with mock_publisher(inproc) as pub:
        await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(10)]
        )
        result = await pub.flush(10)
    assert result.failed == 10
    assert len(inproc.event_requests()) == 1


async def test_a_bug_while_delivering_a_batch_does_not_end_delivery(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong in a delivery task after its request (here, building the report
    of a refused event), the flusher goes on delivering what comes next."""

    def broken(_: object, failed: list[object]) -> list[DeliveryFailure]:
        if failed:
            raise RuntimeError("a bug")
        return []

    monkeypatch.setattr(DeliveryFailure, "grouped", broken)
    bad = {**bank_event(0), "age": "forty"}  # refused by the server: a failure to report
    async with mock_publisher(inproc) as pub:
        await pub.publish_events_batch("bank_churn", "bank_churn", [bad, bank_event(1)])
        await pub.flush(10)
        for _ in range(5):  # until the failed delivery task has ended
            await anyio.lowlevel.checkpoint()
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(10)).delivered == 1
    assert [e["customer_id"] for e in inproc.stored()] == ["c1", "c2"]
    assert "a bug" in caplog.text


@pytest.mark.parametrize("spooled", [False, True], ids=["no-spool", "spool"])
async def test_a_half_acknowledged_before_the_close_deadline_counts_as_delivered(
    fiddler: Emulator, tmp_path: Path, spooled: bool
) -> None:
    # The batch is refused whole, its first half is stored and acknowledged, its second half
    # hangs past the close deadline: only that half may be dropped, or spooled to go again.
    fiddler.set_faults(script=["400", "ok", "hang"])
    spool = {"spool_dir": tmp_path} if spooled else {}
    pub = loopback_publisher(fiddler, **spool)
    async with pub:
        await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(1000)]
        )
        await eventually(lambda: pub.stats().delivered == 500)
        assert pub.stats().in_flight_events == 500
        assert_adds_up(pub)
        result = await pub.aclose(0.2)
    stats = pub.stats()
    assert fiddler.count() == 500
    assert stats.delivered == 500
    assert (result.dropped, result.spooled) == ((0, 500) if spooled else (500, 0))
    assert (stats.spooled, stats.dropped_total) == ((500, 0) if spooled else (0, 500))
    assert_adds_up(pub)
