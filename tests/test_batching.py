"""When batches are sent, how big they are, and how they are grouped (over real loopback HTTP)."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pandas as pd
import pytest

from fiddler_async import buffer as buffer_module
from fiddler_async import publisher as publisher_module
from fiddler_async.emulator import Emulator

from .conftest import bank_event, eventually, loopback_publisher, mock_publisher, publishes
from .in_process import InProcessFiddler

pytestmark = pytest.mark.anyio


async def test_a_full_batch_is_sent_without_waiting_for_linger(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler, linger=3600, max_batch_events=100) as pub:
        for i in range(250):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        # Two full batches go out on their own; the 50 left wait for the linger time.
        await eventually(lambda: pub.stats().delivered == 200)
        assert pub.stats().queued_events == 50
        assert [r["events"] for r in publishes(fiddler)] == [100, 100]
        assert (await pub.flush(5)).delivered == 50


async def test_a_batch_full_in_bytes_is_sent(fiddler: Emulator) -> None:
    limit = 4096
    async with loopback_publisher(fiddler, linger=3600, max_batch_bytes=limit) as pub:
        for i in range(100):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        # Each event is ~300 bytes: only whole batches of at most `limit` bytes of events leave
        # on their own; what is left is under the limit and waits for the linger time.
        await eventually(
            lambda: pub.stats().queued_bytes < limit and not pub.stats().in_flight_requests
        )  # (and the requests answered: the log notes a body's size once it has read it)
        sent = publishes(fiddler)
        assert sent
        envelope = 200  # the body around the events: source, model_id, env
        assert all(r["bytes"] <= limit + envelope for r in sent)
        await pub.flush(5)
    assert fiddler.count() == 100


async def test_linger_sends_a_partial_batch(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler, linger=0.05) as pub:
        for i in range(3):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await eventually(lambda: pub.stats().delivered == 3)  # no flush() called
    assert [r["events"] for r in publishes(fiddler)] == [3]


async def test_flush_sends_partial_batches_at_once(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler, linger=3600) as pub:
        for i in range(3):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        result = await pub.flush(5)
        assert (result.delivered, result.pending, result.complete) == (3, 0, True)


async def test_never_more_than_1000_events_per_request(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler, linger=3600) as pub:
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(2500)]
        )
        result = await pub.flush(10)
    assert result.delivered == 2500
    assert sorted(r["events"] for r in publishes(fiddler)) == [500, 1000, 1000]
    assert sorted(e["event_id"] for e in fiddler.events()) == sorted(ids)


async def test_batches_are_grouped_by_destination(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler, linger=3600, max_batch_events=7) as pub:
        for i in range(30):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i), event_id=f"e{i}")
            pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"age": i})
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
    per_destination: Counter[tuple[str, str, str, str | None]] = Counter()
    for request in publishes(fiddler):
        assert request["events"] <= 7
        key = (request["method"], request["model"], request["env_type"], request["env_name"])
        per_destination[key] += request["events"]
    assert per_destination == {
        ("POST", "bank_churn", "PRODUCTION", None): 30,
        ("POST", "bank_churn_v2", "PRODUCTION", None): 30,
        ("POST", "bank_churn", "PRE_PRODUCTION", "baseline"): 30,
        ("PATCH", "bank_churn", "PRODUCTION", None): 30,
    }
    # Every update was merged into its production event.
    # (Matched by the ids given: a generated id may also start with "e".)
    given = {f"e{i}" for i in range(30)}
    production = [e for e in fiddler.events() if e["event_id"] in given]
    assert {e["event_id"]: e.get("churn") for e in production} == dict.fromkeys(given, "no")


async def test_updates_never_overtake_their_inserts(fiddler: Emulator) -> None:
    # Half the requests are slowed, so a later request often finishes first.
    fiddler.set_faults(spike=0.5, spike_latency=0.03, seed=1)
    async with loopback_publisher(fiddler, linger=0, max_in_flight=8) as pub:
        for i in range(20):
            eid = pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
            # The insert is on its way (maybe slowed) when the update is published.
            await eventually(lambda: pub.stats().queued_events == 0)
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", {"churn": "yes"}, event_id=eid, update_event=True
            )
            await anyio.lowlevel.checkpoint()
        assert (await pub.flush(30)).complete
        assert pub.stats().delivered == 40
    assert fiddler.early_updates() == 0  # no update reached the server before its event
    stored = fiddler.events()
    assert len(stored) == 20
    assert all(e["churn"] == "yes" for e in stored)


async def test_an_update_batch_stops_at_an_insert_not_sent_yet(fiddler: Emulator) -> None:
    """A label of an old event, then a prediction and its label: the batch of labels must not
    carry the second one ahead of its prediction."""
    async with loopback_publisher(fiddler, linger=0.2) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        await pub.publish_event("bank_churn", "bank_churn", bank_event(0), event_id="a1")
        assert (await pub.flush(10)).delivered == 1
        label = {"churn": "yes"}
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", label, event_id="a1", update_event=True
        )
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="b1")
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", label, event_id="b1", update_event=True
        )
        assert (await pub.flush(10)).delivered == 3
    assert fiddler.early_updates() == 0
    sent = [(r["method"], r["events"]) for r in publishes(fiddler)]
    assert sent == [("POST", 1), ("PATCH", 1), ("POST", 1), ("PATCH", 1)]
    assert [e["churn"] for e in fiddler.events()] == ["yes", "yes"]


async def test_two_updates_of_an_id_arrive_in_their_order(fiddler: Emulator) -> None:
    """The first update's request is retried (its connection dropped) while the second is
    ready: the second waits, or the earlier value would overwrite the later one."""
    async with loopback_publisher(
        fiddler,
        linger=0,
        max_batch_events=1,
        max_in_flight=4,
        retry_backoff_initial=0.2,
        retry_backoff_max=0.2,
    ) as pub:
        await pub.publish_event("bank_churn", "bank_churn", bank_event(1), event_id="e1")
        assert (await pub.flush(10)).delivered == 1
        fiddler.set_faults(script=["drop"])  # the first update's first attempt
        for churn in ("no", "yes"):
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", {"churn": churn}, event_id="e1", update_event=True
            )
        assert (await pub.flush(10)).delivered == 2
    assert [e["churn"] for e in fiddler.events()] == ["yes"]


async def test_an_update_does_not_wait_for_another_model(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler, linger=0, max_in_flight=8) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        await pub.resolve("bank_churn", "bank_churn_v2")
        eid = await pub.publish_event("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(10)).delivered == 1
        fiddler.set_faults(latency=1)  # each request is in flight for a while
        pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"customer_id": "other"})
        await eventually(lambda: pub.stats().in_flight_requests == 1)
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"churn": "yes"}, event_id=eid, update_event=True
        )
        await eventually(lambda: pub.stats().in_flight_requests == 2)  # the two side by side
        fiddler.set_faults(latency=0)
        assert (await pub.flush(30)).complete
    assert fiddler.early_updates() == 0


async def test_a_model_uuid_however_written_is_one_destination(fiddler: Emulator) -> None:
    """An insert addressed by the model's UUID in capitals and its update by the UUID as the
    server writes it: one model, so the update waits for the insert (here held back by a
    503 and its retry)."""
    model_id = fiddler.model().id
    shouting = model_id.upper()
    async with loopback_publisher(
        fiddler, linger=0, retry_backoff_initial=0.3, retry_backoff_max=0.3
    ) as pub:
        await pub.resolve("bank_churn", model_id)
        await pub.resolve("bank_churn", shouting)
        fiddler.set_faults(script=["503"])  # the insert's first attempt
        pub.publish_event_nowait("bank_churn", shouting, bank_event(1), event_id="e1")
        await eventually(lambda: len(publishes(fiddler)) == 1)  # turned away, to be retried
        pub.publish_event_nowait(  # (with another project: a UUID names one model)
            "BANK_CHURN", model_id, {"churn": "yes"}, event_id="e1", update_event=True
        )
        assert (await pub.flush(10)).delivered == 2
    assert fiddler.early_updates() == 0
    assert [e["churn"] for e in fiddler.events()] == ["yes"]


async def test_a_burst_of_100k_events_loses_nothing_with_defaults(fiddler: Emulator) -> None:
    async with loopback_publisher(fiddler) as pub:
        event = bank_event(1)
        for _ in range(100_000):
            pub.publish_event_nowait("bank_churn", "bank_churn", event)
        result = await pub.flush(120)
        stats = pub.stats()
    assert result.delivered == 100_000
    assert stats.dropped == {}
    assert fiddler.count() == 100_000
    summary_ids = {e["event_id"] for e in fiddler.events()}
    assert len(summary_ids) == 100_000


async def test_a_busy_destination_does_not_starve_a_quiet_one(fiddler: Emulator) -> None:
    fiddler.set_faults(latency=0.01)  # 50 events per 10 ms at most: the flood outpaces it
    async with loopback_publisher(
        fiddler, max_in_flight=1, max_batch_events=50, linger=0.02
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn_v2")
        for i in range(500):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"customer_id": "quiet"})
        busy = True

        async def flood() -> None:
            while busy:  # the busy destination always has a full batch waiting
                for i in range(50):
                    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            # Sent once the 500 events older than it are: not after the flood ends.
            await eventually(lambda: fiddler.count("bank_churn", "bank_churn_v2") == 1)
            busy = False
        await pub.aclose(0.1)


@pytest.mark.parametrize("kind", ["dicts", "frame", "row-by-row"])
async def test_a_batch_of_many_rows_lets_other_tasks_run_while_it_is_encoded(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(publisher_module, "ROWS_OFF_THE_LOOP", 100)  # many rows, made few
    rows = [bank_event(i) for i in range(300)]
    if kind == "row-by-row":  # a null id to replace: the rows go the long way
        rows[7]["event_id"] = None
    events = pd.DataFrame(rows) if kind == "frame" else rows
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with mock_publisher(inproc) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        await pub.publish_events_batch("bank_churn", "bank_churn", events[:1])  # imports done
        one_by_one = pub._prepare
        threads: set[int] = set()

        def prepare(*args: Any) -> Any:
            threads.add(threading.get_ident())
            return one_by_one(*args)

        monkeypatch.setattr(pub, "_prepare", prepare)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            before = ticks
            ids = await pub.publish_events_batch("bank_churn", "bank_churn", events)
            during = ticks - before
            tg.cancel_scope.cancel()
        await pub.flush(5)  # (the first event may have gone while the rows were encoded)
        assert pub.stats().delivered == 301
    assert during > 0
    assert threading.get_ident() not in threads  # the long way, too, off the loop
    assert bool(threads) == (kind == "row-by-row")
    assert [e["event_id"] for e in inproc.stored()][1:] == ids  # together, in order


async def test_an_idle_destination_keeps_no_trace_of_its_events(inproc: InProcessFiddler) -> None:
    """A lane trimmed its past sequence numbers only every 4096 events: one per dataset
    name (rotated daily, say) kept up to 32 KB for ever once it went idle. Its deque kept
    the blocks it had used (up to 16 of 512 bytes) for reuse, another 8 KB."""
    tracemalloc.start()
    try:
        async with mock_publisher(inproc) as pub:
            for day in range(3):
                name = f"day-{day}"
                for i in range(3000):
                    pub.publish_event_nowait(
                        "bank_churn", "bank_churn", bank_event(i), env_type="PRE_PRODUCTION",
                        env_name=name,
                    )  # fmt: skip
                assert (await pub.flush(10)).delivered == 3000
            gc.collect()
            kept = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, buffer_module.__file__)]
            )
            lanes = list(pub._buffer._lanes.values())
    finally:
        tracemalloc.stop()
    assert len(lanes) == 3
    assert [len(lane.seqs) for lane in lanes] == [0, 0, 0]
    per_lane = sum(stat.size for stat in kept.statistics("filename")) / 3
    assert per_lane < 2048  # a fresh lane's deque, array and slots: about 1 KB
