"""The durable spool: what cannot be delivered in time waits on disk, then arrives, in order,
also after a restart or a kill -9; nothing is lost while the disk bound holds, and what passes
it is counted."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest

from fiddler_async import AsyncPublisher, AuthenticationError, DeliveryFailure, NotFoundError
from fiddler_async.emulator import Emulator
from fiddler_async.spool import (
    Spool,
    SpoolCorruptError,
    SpoolFullError,
    SpoolKey,
    iter_dead_letters,
)

from .conftest import (
    assert_adds_up,
    bank_event,
    config,
    eventually,
    loopback_publisher,
    mock_publisher,
    publishes,
)
from .in_process import TOKEN, InProcessFiddler

pytestmark = pytest.mark.anyio

# Fail fast while the backend is away: two attempts, then the spool.
SPILL_SOON = {
    "retry_max_attempts": 2,
    "breaker_probe_interval": 0.02,
    "max_batch_events": 100,
    "linger": 0.01,
}


# A queue of one event, and one attempt per request: the next event pushes the one queued
# into the spool, and a request that fails once puts its events there.
QUEUE_OF_ONE = {
    "overflow": "drop_oldest",
    "max_queue_events": 1,
    "linger": 0,
    "retry_max_attempts": 1,
    "breaker_probe_interval": 0.02,
}


def stored_ids(emulator: Emulator) -> list[str]:
    return [str(e["event_id"]) for e in emulator.events()]


def batch_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.events"))


async def test_an_outage_longer_than_the_memory_budget_loses_nothing(
    fiddler: Emulator, tmp_path: Path
) -> None:
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    async with loopback_publisher(
        fiddler, spool_dir=tmp_path, max_queue_events=1000, **SPILL_SOON
    ) as pub:
        ids = []
        for i in range(5000):
            ids.append(pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i)))
            assert pub.stats().queued_events <= 1000  # memory stays within its bound
            if i % 500 == 499:
                await anyio.sleep(0.02)  # the flusher tries, and meets the outage
        assert (await pub.flush(30)).complete
        during = pub.stats()
        assert (during.delivered, during.spooled, during.dropped) == (0, 5000, {})
        assert_adds_up(pub)
        fiddler.set_faults(outage_seconds=0)  # the backend comes back
        await eventually(  # counted as they are acknowledged, then the files go
            lambda: pub.stats().replayed == 5000 and not batch_files(tmp_path), timeout=30
        )
    assert sorted(stored_ids(fiddler)) == sorted(ids)


async def test_batches_into_a_full_queue_spill_the_oldest_and_lose_nothing(
    fiddler: Emulator, tmp_path: Path
) -> None:
    async with loopback_publisher(
        fiddler, spool_dir=tmp_path, max_queue_events=300, **SPILL_SOON
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
        ids = []
        for call in range(10):
            rows = [bank_event(100 * call + i) for i in range(100)]
            ids += await pub.publish_events_batch("bank_churn", "bank_churn", rows)
            assert pub.stats().queued_events <= 300
        assert (await pub.flush(30)).complete
        during = pub.stats()
        assert (during.delivered, during.spooled, during.dropped) == (0, 1000, {})
        fiddler.set_faults(outage_seconds=0)
        await eventually(lambda: pub.stats().replayed == 1000, timeout=30)
    assert sorted(stored_ids(fiddler)) == sorted(ids)


async def test_the_spool_is_replayed_in_order_by_the_next_process(
    fiddler: Emulator, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    ids = [f"e{i}" for i in range(1200)]
    async with loopback_publisher(
        fiddler, spool_dir=spool_dir, close_timeout=0.5, **SPILL_SOON
    ) as first:
        for i, event_id in enumerate(ids):
            first.publish_event_nowait("bank_churn", "bank_churn", bank_event(i), event_id=event_id)
    result = first.stats()
    assert (result.delivered, result.spooled, result.dropped) == (0, 1200, {})
    # Owner only; event data, and neither the token nor any header.
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    files = batch_files(spool_dir)
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        assert TOKEN.encode() not in data
        assert b"Bearer" not in data
        assert b'"customer_id":"c' in data

    fiddler.set_faults(outage_seconds=0)
    async with loopback_publisher(fiddler, spool_dir=spool_dir) as second:
        await eventually(lambda: second.stats().replayed == 1200, timeout=30)
        assert second.stats().accepted == 0  # replayed events are not this process's own
    assert stored_ids(fiddler) == ids  # every one, once, in the order published
    assert batch_files(spool_dir) == []


async def test_events_over_the_disk_bound_are_counted_dropped(
    fiddler: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    async with loopback_publisher(
        fiddler, spool_dir=tmp_path, spool_max_bytes=60_000, **SPILL_SOON
    ) as pub:
        for i in range(1000):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        result = await pub.flush(30)
        stats = pub.stats()
    assert result.complete
    assert result.spooled > 0
    assert result.dropped == stats.dropped["spool_full"] > 0
    assert result.spooled + result.dropped == 1000
    assert stats.spool_bytes <= 60_000
    # Logged once, structured: what happened, the kind of message, how many were held back.
    (record,) = [r for r in caplog.records if getattr(r, "fiddler_key", "") == "drop:spool_full"]
    assert (record.fiddler_event, record.fiddler_held) == ("drop", 0)  # type: ignore[attr-defined]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 60_000  # noqa: ASYNC240


async def test_the_close_deadline_spools_what_is_queued_and_in_flight(
    fiddler: Emulator, tmp_path: Path
) -> None:
    fiddler.set_faults(script=["hang"] * 4)  # the first requests never get an answer
    # Batches small enough for a socket's buffer: a request cancelled while still writing its
    # body makes httpx leave an async generator to the garbage collector (a warning on trio).
    async with loopback_publisher(
        fiddler, spool_dir=tmp_path, close_timeout=0.3, max_batch_events=100
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        ids = [
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i)) for i in range(3000)
        ]
        await eventually(lambda: pub.stats().in_flight_requests > 0)
    closed = await pub.aclose()
    assert closed.spooled == 3000  # queued and in flight alike: none dropped
    assert pub.stats().dropped == {}
    fiddler.set_faults(script=[])
    async with loopback_publisher(fiddler, spool_dir=tmp_path) as again:
        result = await again.replay_spool()
    assert result.error is None
    # A hung request may have been stored before the deadline: then it arrives twice.
    assert set(stored_ids(fiddler)) == set(ids)


async def test_refused_events_become_dead_letters(fiddler: Emulator, tmp_path: Path) -> None:
    events = [bank_event(i) for i in range(10)]
    events[4]["age"] = "forty"
    failures: list[DeliveryFailure] = []
    async with loopback_publisher(fiddler, spool_dir=tmp_path, on_error=failures.append) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", events)
        await pub.flush(30)
    assert len(failures) == 1
    (letter,) = iter_dead_letters(tmp_path)
    assert letter["event_id"] == ids[4]
    assert letter["event"]["age"] == "forty"
    assert letter["status"] == 400
    assert letter["project"] == "bank_churn"
    assert "age" in letter["reasons"][0]["message"]
    assert stat.S_IMODE((tmp_path / "dead-letters.jsonl").stat().st_mode) == 0o600


def test_a_damaged_file_is_set_aside_not_sent(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6, fsync=False)
    spool.open()
    path = spool.write(SpoolKey("p", "m", "PRODUCTION", None, False), [(1, b'{"a":1}', None)])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit flipped on disk
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorruptError, match="checksum"):
        spool.read(path)
    assert spool.quarantine(path).name.endswith(".events.corrupt")
    assert spool.batches() == []


def test_a_process_killed_mid_stream_loses_nothing_it_synced(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """SIGKILL while publishing into an outage; `fiddler-async replay` then sends every event
    the child saw synced (a completed flush), and the spool it left is readable."""
    spool_dir = tmp_path / "spool"
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    script = Path(__file__).with_name("spool_child.py")
    with subprocess.Popen(
        [sys.executable, str(script), fiddler.url, TOKEN, str(spool_dir)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        synced = 0
        try:
            for line in child.stdout:
                assert line.startswith("synced "), line
                synced = int(line.split()[1])
                if synced >= 1000:
                    break
        finally:
            os.kill(child.pid, signal.SIGKILL)  # mid-stream: it is publishing the next events
            child.wait(10)
    assert synced >= 1000
    fiddler.set_faults(outage_seconds=0)
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "fiddler_async.cli",
            "replay",
            str(spool_dir),
            "--url",
            fiddler.url,
            "--token",
            TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert "replayed" in replay.stdout
    stored = set(stored_ids(fiddler))
    assert {f"e{i}" for i in range(synced)} <= stored
    assert not list(spool_dir.glob("*.corrupt"))
    assert batch_files(spool_dir) == []


def test_replay_on_the_command_line_keeps_to_its_timeout(fiddler: Emulator, tmp_path: Path) -> None:
    """A server that takes the request and never answers: the command stops at --timeout
    (not after the request's own 30 s timeout, the retries and the close), keeping the file."""
    key = SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False)
    Spool(tmp_path, 10**6, fsync=False).write(key, [(0, orjson.dumps(bank_event(1)), None)])
    fiddler.set_faults(script=["hang"])
    command = [sys.executable, "-m", "fiddler_async.cli", "replay", str(tmp_path)]
    command += ["--url", fiddler.url, "--token", TOKEN, "--timeout", "1"]
    replay = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert replay.returncode == 1
    assert "no progress in 1 s; 1 file(s) still wait" in replay.stderr
    assert len(batch_files(tmp_path)) == 1
    # A slow server that takes every request: the timeout bounds a silence, not the replay,
    # which takes longer here (lookups and 13 requests of 0.3 s each).
    for i in range(12):
        Spool(tmp_path, 10**6, fsync=False).write(key, [(0, orjson.dumps(bank_event(i)), None)])
    fiddler.set_faults(script=[], latency=0.3)
    command[-1] = "3"
    replay = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert replay.returncode == 0, replay.stderr
    assert batch_files(tmp_path) == []


async def test_a_slow_disk_at_the_close_deadline_loses_nothing(
    fiddler: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = Spool.write

    def slow_write(self: Spool, key: SpoolKey, items: Any) -> Path:
        time.sleep(0.1)
        return write(self, key, items)

    monkeypatch.setattr(Spool, "write", slow_write)
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    pub = loopback_publisher(
        fiddler, spool_dir=tmp_path, max_queue_events=10, overflow="drop_newest", **SPILL_SOON
    )
    await pub.start()
    for i in range(600):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        assert_adds_up(pub)  # also while events wait for the disk
    result = await pub.aclose(0.1)  # writes are still going on at the deadline
    assert (result.spooled, result.dropped, result.pending) == (600, 0, 0)
    assert pub.stats().dropped == {}
    assert_adds_up(pub)


async def test_an_update_follows_its_spilled_insert(fiddler: Emulator, tmp_path: Path) -> None:
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(script=["drop", "drop"])  # the insert's two attempts
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="u1")
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"predicted_churn": 0.9}, event_id="u1", update_event=True
        )
        await pub.flush(10)
        assert pub.stats().spooled == 2  # the update went to the spool behind its insert
        await pub.replay_spool()
    delivered = [r["method"] for r in publishes(fiddler) if r["status"] == 202]
    assert delivered == ["POST", "PATCH"]
    assert fiddler.early_updates() == 0


async def test_an_earlier_process_files_do_not_release_this_one_updates(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """Replaying what an earlier process left in the spool is not replaying this process's
    own inserts: an update of an insert still on disk follows it there."""
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(outage_seconds=1000)
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(9), event_id="e9")
        assert (await pub.flush(10)).spooled == 1
        # An earlier process's file, older than this one's, so replayed first.
        key = SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False)
        old = [(0, orjson.dumps({**bank_event(i), "event_id": f"old{i}"}), None) for i in range(3)]
        path = Spool(tmp_path, 10**6, fsync=False).write(key, old)
        path.rename(path.with_name("0" * 23 + path.name[23:]))
        # The earlier file is delivered; this process's insert fails again and stays on disk.
        fiddler.set_faults(outage_seconds=0, script=["ok", "drop", "drop"])
        await pub.replay_spool()
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"predicted_churn": 0.9}, event_id="e9", update_event=True
        )
        await pub.flush(10)
        await pub.replay_spool()
    delivered = [r["method"] for r in publishes(fiddler) if r["status"] == 202]
    assert delivered == ["POST", "POST", "PATCH"]
    assert fiddler.early_updates() == 0


async def test_at_the_close_deadline_an_insert_in_flight_is_spooled_before_its_update(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """The next process replays in the order the files were written: each update after the
    insert it joins, though the updates queued (of e1, e2) span the insert of e2."""
    async with loopback_publisher(fiddler, spool_dir=tmp_path, linger=0.01, max_in_flight=1) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(script=["hang"])  # the first insert's request
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="e1")
        await eventually(lambda: pub.stats().in_flight_events == 1)
        label = {"churn": "yes"}
        for eid in ("e1", "e2"):
            if eid == "e2":
                pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2), event_id=eid)
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", label, event_id=eid, update_event=True
            )
        closed = await pub.aclose(0.3)
    assert closed.spooled == 4
    spool = Spool(tmp_path, 10**6, fsync=False)  # as the next process sees it
    batches = [spool.read(path) for path in spool.batches()]
    assert [(b.key.update, len(b.items)) for b in batches] == [(False, 2), (True, 2)]


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
async def test_an_update_spilled_by_a_full_queue_stays_behind_its_insert(
    fiddler: Emulator, tmp_path: Path, overflow: str
) -> None:
    """The queue overflows into the spool while the insert is queued (``drop_newest`` spills
    the new update) or in flight (``drop_oldest`` evicts the held update): the replay must
    not send the update first."""
    publisher = loopback_publisher(
        fiddler, spool_dir=tmp_path, overflow=overflow, max_queue_events=2, linger=3600
    )
    async with publisher as pub, anyio.create_task_group() as tasks:
        await pub.resolve("bank_churn", "bank_churn")
        await pub.resolve("bank_churn", "bank_churn_v2")
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="e1")
        label = {"churn": "yes"}
        if overflow == "drop_oldest":  # the insert goes, and takes a while
            fiddler.set_faults(latency=1)
            tasks.start_soon(pub.flush, 10)
            await eventually(lambda: pub.stats().in_flight_events == 1)
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", label, event_id="e1", update_event=True
            )
            # Another model's events: the queue overflows, and evicts the (held) update.
            for i in range(2):
                pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"customer_id": f"v{i}"})
        else:  # another model's event fills the queue: the update is spilled at once
            pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"customer_id": "v0"})
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", label, event_id="e1", update_event=True
            )
            # ...and its insert, queued, goes to the spool before it.
            assert pub.stats().spooled + pub.stats().spilling_events == 2
        assert pub.stats().spooled + pub.stats().spilling_events >= 1
        fiddler.set_faults(latency=0)
        await pub.flush(10)
        await eventually(lambda: pub.stats().replayed == pub.stats().spooled)
    assert fiddler.early_updates() == 0
    assert [e["churn"] for e in fiddler.events("bank_churn", "bank_churn")] == ["yes"]


async def test_an_update_file_spanning_an_insert_is_replayed_after_it(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """A full queue spills the new label of b, the queued insert of b, and the queued label
    of a before it: the labels make one file whose events span the insert's. The replay
    sends the insert first."""
    async with loopback_publisher(
        fiddler, spool_dir=tmp_path, overflow="drop_newest", max_queue_events=2, linger=3600
    ) as pub:
        await pub.publish_event("bank_churn", "bank_churn", bank_event(1), event_id="a")
        assert (await pub.flush(10)).delivered == 1
        fiddler.set_faults(outage_seconds=1000)  # the files wait in the spool
        label = {"churn": "yes"}
        pub.publish_event_nowait("bank_churn", "bank_churn", label, event_id="a", update_event=True)
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2), event_id="b")
        pub.publish_event_nowait("bank_churn", "bank_churn", label, event_id="b", update_event=True)
        await eventually(lambda: pub.stats().spooled == 3)
        fiddler.set_faults(outage_seconds=0)
        await pub.replay_spool()
        await eventually(lambda: pub.stats().replayed == 3)
    assert fiddler.early_updates() == 0


async def test_a_spooled_update_waits_for_its_insert_on_the_way_to_the_disk(
    fiddler: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update is evicted to the spool while its insert is in flight; the insert then
    fails and goes to the spool too, slowly (a slow disk). Between the two, it is neither in
    memory nor in a file: the replay must still wait for it."""
    write = Spool._write_atomically

    def slow_write(self: Spool, path: Path, data: bytes) -> None:
        time.sleep(0.3)
        write(self, path, data)

    monkeypatch.setattr(Spool, "_write_atomically", slow_write)
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **QUEUE_OF_ONE) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        await pub.resolve("bank_churn", "bank_churn_v2")
        fiddler.set_faults(latency=1)  # the insert's answer comes after a second
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="e1")
        await eventually(lambda: pub.stats().in_flight_events == 1)
        fiddler.set_faults(latency=0, script=["ok", "503"])  # the other model's; the insert's
        label = {"churn": "yes"}
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", label, event_id="e1", update_event=True
        )
        pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"age": 1})  # evicts the label
        await pub.flush(10)
        await eventually(lambda: pub.stats().replayed == pub.stats().spooled == 2, timeout=20)
    assert fiddler.early_updates() == 0


@pytest.mark.parametrize("older", ["queued", "in flight"])
async def test_two_labels_of_an_id_keep_their_order_through_a_full_queue(
    fiddler: Emulator, tmp_path: Path, older: str
) -> None:
    """The newer label is spilled by ``drop_newest`` while the older one is still queued, or
    in flight in an outage (then spooled too): the replay must send the older one first."""
    async with loopback_publisher(
        fiddler,
        spool_dir=tmp_path,
        overflow="drop_newest",
        max_queue_events=1 if older == "in flight" else 2,
        linger=0 if older == "in flight" else 3600,
        **{k: v for k, v in SPILL_SOON.items() if k != "linger"},
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn_v2")
        await pub.publish_event("bank_churn", "bank_churn", bank_event(1), event_id="e1")
        assert (await pub.flush(10)).delivered == 1
        if older == "in flight":
            fiddler.set_faults(outage_seconds=1)
        label = {"churn": "no"}
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", label, event_id="e1", update_event=True
        )
        if older == "in flight":
            await eventually(lambda: pub.stats().in_flight_events == 1)
        pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"age": 1})  # fills the queue
        label = {"churn": "yes"}  # the queue is full: spilled
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", label, event_id="e1", update_event=True
        )
        await pub.flush(10)
        await eventually(lambda: pub.stats().replayed == pub.stats().spooled, timeout=20)
    assert [e["churn"] for e in fiddler.events("bank_churn", "bank_churn")] == ["yes"]


async def test_a_request_level_refusal_keeps_the_spool(fiddler: Emulator, tmp_path: Path) -> None:
    """A wrong token (401) at replay is no reason to give the events up: only events the
    server refuses for what they hold become dead letters."""
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON) as pub:
        for i in range(10):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await pub.flush(30)
    fiddler.set_faults(outage_seconds=0)
    wrong = AsyncPublisher(fiddler.url, "not-the-token", config=config(spool_dir=tmp_path))
    async with wrong:
        result = await wrong.replay_spool()
    assert isinstance(result.error, AuthenticationError)
    assert result.remaining == 1
    assert len(batch_files(tmp_path)) == 1
    assert list(iter_dead_letters(tmp_path)) == []


async def test_a_missing_model_holds_back_only_its_own_files(
    fiddler: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spooled file for a model the server does not know (a misspelt name, a model not
    created yet) stays for later passes, and its updates behind it; the other models' files
    are delivered meanwhile."""
    earlier = Spool(tmp_path, 10**6, fsync=False)  # a process before this one spilled these
    earlier.open()
    body = orjson.dumps({"event_id": "lost-1", "timestamp": 1700000000000, **bank_event(0)})
    earlier.write(
        SpoolKey("bank_churn", "no_such_model", "PRODUCTION", None, False), [(1, body, None)]
    )
    label = orjson.dumps({"event_id": "lost-1", "churn": "yes"})
    earlier.write(
        SpoolKey("bank_churn", "no_such_model", "PRODUCTION", None, True), [(2, label, None)]
    )
    good = orjson.dumps({"event_id": "kept-1", "timestamp": 1700000000000, **bank_event(1)})
    earlier.write(
        SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False), [(3, good, None)]
    )
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON) as pub:
        result = await pub.replay_spool()
        assert stored_ids(fiddler) == ["kept-1"]
        assert isinstance(result.error, NotFoundError)
        assert "no_such_model" in str(result.error)
        assert (pub.stats().replayed, result.remaining) == (1, 2)
        assert len(batch_files(tmp_path)) == 2  # both kept, in order, for the next pass
        # Then the events requests fail: the pass stops there, and counts every file left.
        fiddler.set_faults(script=["503"] * 10, retry_after=0.05)
        earlier.write(
            SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False), [(4, good, None)]
        )
        result = await pub.replay_spool()
        assert (type(result.error).__name__, result.remaining) == ("ServerError", 3)
    assert list(iter_dead_letters(tmp_path)) == []
    held = [r for r in caplog.records if getattr(r, "fiddler_event", "") == "spool-held"]
    assert held
    assert "bank_churn/no_such_model" in held[0].getMessage()


async def test_a_stray_entry_in_the_spool_does_not_stop_delivery(
    fiddler: Emulator, tmp_path: Path
) -> None:
    (tmp_path / "00000000000000000000001-1-000001.events").mkdir()  # not a batch file
    async with loopback_publisher(fiddler, spool_dir=tmp_path) as pub:
        await pub.replay_spool()
        for i in range(10):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        assert (await pub.flush(10)).delivered == 10
    assert list(tmp_path.glob("*.corrupt"))  # noqa: ASYNC240


def test_processes_sharing_a_spool_keep_to_its_bound_together(tmp_path: Path) -> None:
    """Two processes (gunicorn workers) writing to one spool: neither may take the directory
    past ``spool_max_bytes`` by counting only its own files."""
    key = SpoolKey("p", "m", "PRODUCTION", None, False)
    items = [(1, b'{"a":"' + b"x" * 400 + b'"}', None)]
    first, second = Spool(tmp_path, 2000, fsync=False), Spool(tmp_path, 2000, fsync=False)
    first.open()
    second.open()  # both opened on an empty directory
    for spool in (first, second):
        written = 0
        with contextlib.suppress(SpoolFullError):
            while written < 10:
                spool.write(key, items)
                written += 1
        assert written < 10  # refused before ten
    assert sum(path.stat().st_size for path in batch_files(tmp_path)) <= 2000


def test_opening_removes_only_its_own_stale_temporaries(tmp_path: Path) -> None:
    """A temporary a killed writer left is removed once old; a ``*.tmp`` of someone else's
    (a spool_dir pointed at a shared folder) is not."""
    key = SpoolKey("p", "m", "PRODUCTION", None, False)
    name = Spool(tmp_path, 10**6, fsync=False).write(key, [(1, b"{}", None)]).name
    ours, theirs = tmp_path / f".{name}.140234.tmp", tmp_path / "draft.tmp"
    for path in (ours, theirs):
        path.write_text("left behind")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    Spool(tmp_path, 10**6, fsync=False).open()
    assert (ours.exists(), theirs.exists()) == (False, True)


def test_a_dead_letter_cut_short_does_not_take_the_next_with_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6, fsync=False)
    spool.open()
    for event_id in ("a", "b"):
        spool.write_dead_letters([orjson.dumps({"event_id": event_id})])
    letters = tmp_path / "dead-letters.jsonl"
    os.truncate(letters, letters.stat().st_size - 5)  # b's append cut short (a kill, a full disk)
    spool.write_dead_letters([orjson.dumps({"event_id": "c"})])
    assert [letter["event_id"] for letter in iter_dead_letters(tmp_path)] == ["a", "c"]


async def test_updates_go_live_again_once_another_process_replayed_the_inserts(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """Two processes share a spool: one spools an insert in an outage, the other (which
    holds the replay lock) delivers it. The first process's later updates of that model no
    longer follow it to the disk: they are sent."""
    holder = loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON)
    writer = loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON)
    async with holder:
        assert not (await holder.replay_spool()).locked  # holds the replay lock from now on
        async with writer:
            for pub in (holder, writer):
                await pub.resolve("bank_churn", "bank_churn")
            fiddler.set_faults(outage_seconds=1000)
            writer.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="e1")
            assert (await writer.flush(10)).spooled == 1
            fiddler.set_faults(outage_seconds=0)
            await holder.replay_spool()  # (or its background pass, first)
            await eventually(lambda: holder.stats().replayed == 1)
            assert (await writer.replay_spool()).locked  # and sees its file gone
            for i in range(5):
                update = {"predicted_churn": i / 10}
                writer.publish_event_nowait(
                    "bank_churn", "bank_churn", update, event_id="e1", update_event=True
                )
            result = await writer.flush(10)
            assert (result.delivered, result.spooled) == (5, 0)
    assert fiddler.early_updates() == 0


async def test_a_file_of_ours_removed_by_hand_holds_back_nothing(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """One of this process's spool files replayed by another process, which has ended since
    (or removed by hand): this process's next pass replays the others."""
    other = Spool(tmp_path, 10**6, fsync=False)
    other.open()
    assert other.try_lock()  # the other process replays: this one's passes leave the files
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **SPILL_SOON) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(outage_seconds=1000)
        for i in range(2):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i), event_id=f"e{i}")
            assert (await pub.flush(10)).spooled == 1
        first, _ = batch_files(tmp_path)
        other.remove(first)
        other.unlock()
        fiddler.set_faults(outage_seconds=0)
        with anyio.fail_after(10):  # it used to list the files again and again
            result = await pub.replay_spool()
        # (the background pass, free to run once the other process unlocked, may be first)
        assert (pub.stats().replayed, result.remaining) == (1, 0)
    assert stored_ids(fiddler) == ["e1"]


async def test_an_insert_spooled_during_a_replay_pass_goes_before_its_update(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """A replay pass busy with older files while this process spools an insert that failed
    in flight: the update of it, spooled before, is not sent first (the pass lists the files
    again on seeing a file of its own that goes before)."""
    async with loopback_publisher(fiddler, spool_dir=tmp_path, **QUEUE_OF_ONE) as pub:
        for model in ("bank_churn", "bank_churn_v2"):
            await pub.resolve("bank_churn", model)
        fiddler.set_faults(latency=0.5, script=["503"])  # the insert fails, after 0.5 s
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="e1")
        await eventually(lambda: pub.stats().in_flight_events == 1)
        # An earlier process's files, of another model: the pass spends a while on them.
        key = SpoolKey("bank_churn", "bank_churn_v2", "PRODUCTION", None, False)
        earlier = Spool(tmp_path, 10**9, fsync=False)
        for i in range(2):
            earlier.write(key, [(0, orjson.dumps({"customer_id": f"old{i}"}), None)])
        # The update of e1 goes to the spool at once, pushed out of the queue of one.
        pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"churn": "yes"}, event_id="e1", update_event=True
        )
        pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"customer_id": "v0"})
        await pub.flush(20)
        fiddler.set_faults(latency=0)
        await eventually(
            lambda: [e.get("churn") for e in fiddler.events("bank_churn", "bank_churn")] == ["yes"],
            timeout=20,
        )
    assert fiddler.early_updates() == 0


def test_processes_sharing_a_spool_count_its_bytes_from_disk(tmp_path: Path) -> None:
    key = SpoolKey("p", "m", "PRODUCTION", None, False)
    items = [(1, b'{"a":"' + b"x" * 400 + b'"}', None)]
    writer, replayer = Spool(tmp_path, 2000, fsync=False), Spool(tmp_path, 2000, fsync=False)
    writer.open()
    replayer.open()
    paths = [writer.write(key, items) for _ in range(3)]
    with pytest.raises(SpoolFullError):
        writer.write(key, items)
    for path in paths:  # another process replays them
        replayer.remove(path)
    assert replayer.used_bytes == 0
    writer.write(key, items)  # the writer looks at the disk before refusing


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("spooled", [True, False])
def test_a_loop_ending_without_aclose_is_not_silent(
    fiddler: Emulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    spooled: bool,
) -> None:
    """The event loop ends under an open publisher: what is queued is spooled (or counted
    dropped), and a warning says so."""
    pub = loopback_publisher(fiddler, linger=3600, spool_dir=tmp_path if spooled else None)

    async def main() -> None:
        await pub.start()
        for i in range(10):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))

    anyio.run(main, backend=backend)
    stats = pub.stats()
    assert (stats.spooled, stats.dropped_total) == ((10, 0) if spooled else (0, 10))
    assert_adds_up(pub)
    (record,) = [r for r in caplog.records if getattr(r, "fiddler_event", "") == "loop-ended"]
    assert "without aclose()" in record.getMessage()
    assert len(batch_files(tmp_path)) == (1 if spooled else 0)


async def test_a_replay_cut_short_keeps_only_what_the_server_did_not_acknowledge(
    fiddler: Emulator, tmp_path: Path
) -> None:
    # 1000 events spooled (their request hangs past the close deadline).
    fiddler.set_faults(script=["hang"])
    async with loopback_publisher(fiddler, spool_dir=tmp_path) as pub:
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(1000)]
        )
        await eventually(lambda: len(publishes(fiddler)) == 1)
        assert (await pub.aclose(0.2)).spooled == 1000
    # The next process replays them: refused whole, the first half acknowledged, the second
    # hangs; it closes meanwhile. The first half must not be in the spool any more.
    fiddler.set_faults(script=["400", "ok", "hang"])
    async with loopback_publisher(fiddler, spool_dir=tmp_path) as pub:
        await eventually(lambda: len(publishes(fiddler)) == 4)  # the half that hangs is sent
        await pub.aclose(0.2)
    assert fiddler.count() == pub.stats().replayed == 500
    (left,) = batch_files(tmp_path)
    assert len(Spool(tmp_path, 10**9, fsync=False).read(left).items) == 500
    # A third process sends the rest: each event once.
    fiddler.set_faults(script=[])
    async with loopback_publisher(fiddler, spool_dir=tmp_path) as pub:
        await eventually(lambda: fiddler.count() == 1000)
        assert (await pub.flush(5)).complete
    assert sorted(stored_ids(fiddler)) == sorted(ids)


async def test_a_file_refused_for_good_is_a_dead_letter_not_a_roadblock(
    inproc: InProcessFiddler, tmp_path: Path
) -> None:
    """An answer that is never retried (409, 501) to a replayed file is final, as it is for a
    live event: its events are dead letters, and the files behind it go on. Such a file held
    back every file of the spool, and was sent again on every pass."""
    earlier = Spool(tmp_path, 10**6, fsync=False)
    earlier.open()
    refused = {"event_id": "v2-0", "timestamp": 1700000000000, "customer_id": "c", "age": 3}
    earlier.write(
        SpoolKey("bank_churn", "bank_churn_v2", "PRODUCTION", None, False),
        [(1, orjson.dumps(refused), None)],
    )
    good = orjson.dumps({"event_id": "kept-1", "timestamp": 1700000000000, **bank_event(1)})
    earlier.write(
        SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False), [(2, good, None)]
    )
    refusing = inproc.model_id("bank_churn", "bank_churn_v2")
    inner = inproc.transport()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/events" and refusing in request.content.decode():
            return httpx.Response(409, json={"error": {"code": 409, "message": "conflict"}})
        return await inner.handle_async_request(request)

    pub = AsyncPublisher(
        "https://fiddler.test",
        TOKEN,
        config=config(spool_dir=tmp_path),
        transport=httpx.MockTransport(handler),
    )
    async with pub:
        result = await pub.replay_spool()  # (or the pass at start did it all)
        assert (result.remaining, result.error, pub.stats().replayed) == (0, None, 1)
    assert [e["event_id"] for e in inproc.stored("bank_churn", "bank_churn")] == ["kept-1"]
    assert [(d["event_id"], d["status"]) for d in iter_dead_letters(tmp_path)] == [("v2-0", 409)]
    assert batch_files(tmp_path) == []


@pytest.mark.parametrize("change", ["remove", "rewrite"])
async def test_a_file_that_cannot_be_changed_after_its_events_went_is_not_sent_again(
    fiddler: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    """A read-only or full disk: the file cannot be removed (all of it delivered) or
    rewritten (part of it). This process remembers what went and sends only the rest, also
    when the rest fails again; the file was sent whole again on every pass."""
    earlier = Spool(tmp_path, 10**6, fsync=False)
    earlier.open()
    bodies = [
        orjson.dumps({"event_id": f"s{i}", "timestamp": 1, "customer_id": "c" * 600})
        for i in range(4)
    ]
    earlier.write(
        SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False),
        [(i + 1, body, None) for i, body in enumerate(bodies)],
    )

    def read_only(*args: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Spool, change, read_only)
    # Two requests of two events (the byte bound); the second fails, then the rest once more.
    async with loopback_publisher(
        fiddler, spool_dir=tmp_path, max_batch_bytes=2 * len(bodies[0]) + 10, retry_max_attempts=1
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(script=["ok", "503", "503"])
        for _ in range(3):
            await pub.replay_spool()
        assert sorted(stored_ids(fiddler)) == ["s0", "s1", "s2", "s3"]
        assert pub.stats().replayed == 4
        monkeypatch.undo()  # the disk is writable again: the file goes
        await pub.replay_spool()
    assert batch_files(tmp_path) == []
    assert sorted(stored_ids(fiddler)) == ["s0", "s1", "s2", "s3"]
    logged = [getattr(record, "fiddler_event", "") for record in caplog.records]
    assert logged.count("spool-unwritable") == 1


async def test_a_file_counts_its_events_replayed_as_each_request_is_acknowledged(
    inproc: InProcessFiddler, tmp_path: Path
) -> None:
    """A file sent in several requests shows its progress as they are acknowledged, not at
    its end: the command line's --timeout watches it, and ended a long, slow replay that was
    going well."""
    earlier = Spool(tmp_path, 10**6, fsync=False)
    earlier.open()
    bodies = [orjson.dumps({"event_id": f"s{i}", "customer_id": "c" * 600}) for i in range(4)]
    earlier.write(
        SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False),
        [(i + 1, body, None) for i, body in enumerate(bodies)],
    )
    inner, second_sent, second_may_go = inproc.transport(), anyio.Event(), anyio.Event()
    sent: list[httpx.Request] = []

    async def holding_the_second(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/events":
            sent.append(request)
            if len(sent) == 2:
                second_sent.set()
                await second_may_go.wait()
        return await inner.handle_async_request(request)

    pub = AsyncPublisher(
        "https://fiddler.test",
        TOKEN,
        config=config(spool_dir=tmp_path, max_batch_bytes=2 * len(bodies[0]) + 10),
        transport=httpx.MockTransport(holding_the_second),
    )
    async with pub:
        with anyio.fail_after(10):
            await second_sent.wait()  # by the pass at start: its first request answered
        assert pub.stats().replayed == 2
        second_may_go.set()
        await pub.replay_spool()
        assert pub.stats().replayed == 4
    assert len(inproc.stored("bank_churn", "bank_churn")) == 4


async def test_a_close_while_refusals_are_reported_still_takes_the_delivered_out(
    inproc: InProcessFiddler, tmp_path: Path
) -> None:
    """The close comes while a replayed file's refused event is being reported: the events
    delivered from it must leave the file all the same (the file stayed whole, and the next
    process sent them again); the refused one stays, to be refused again."""
    earlier = Spool(tmp_path, 10**6, fsync=False)
    earlier.open()
    events = [{"event_id": f"e{i}", "timestamp": 1, **bank_event(i)} for i in range(3)]
    events[1]["age"] = "forty"  # refused by the server
    earlier.write(
        SpoolKey("bank_churn", "bank_churn", "PRODUCTION", None, False),
        [(i + 1, orjson.dumps(event), None) for i, event in enumerate(events)],
    )
    reporting = anyio.Event()

    async def on_error(failure: DeliveryFailure) -> None:
        reporting.set()
        await anyio.sleep_forever()

    pub = mock_publisher(inproc, spool_dir=tmp_path, on_error=on_error)
    await pub.start()
    with anyio.fail_after(10):
        await reporting.wait()
    await pub.aclose(0.2)
    assert sorted(e["event_id"] for e in inproc.stored("bank_churn", "bank_churn")) == ["e0", "e2"]
    (left,) = batch_files(tmp_path)
    assert [orjson.loads(item[1])["event_id"] for item in earlier.read(left).items] == ["e1"]
