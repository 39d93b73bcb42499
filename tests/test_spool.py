"""The durable spool: what cannot be delivered in time waits on disk, then arrives, in order,
also after a restart or a kill -9; nothing is lost while the disk bound holds, and what passes
it is counted."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from fiddler_async import DeliveryFailure
from fiddler_async.emulator import Emulator
from fiddler_async.spool import Spool, SpoolCorruptError, SpoolKey, iter_dead_letters

from .conftest import assert_adds_up, bank_event, eventually, loopback_publisher
from .in_process import TOKEN

pytestmark = pytest.mark.anyio

# Fail fast while the backend is away: two attempts, then the spool.
SPILL_SOON = {
    "retry_max_attempts": 2,
    "breaker_probe_interval": 0.02,
    "max_batch_events": 100,
    "linger": 0.01,
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
        await eventually(lambda: pub.stats().replayed == 5000, timeout=30)
        assert batch_files(tmp_path) == []
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
    fiddler: Emulator, tmp_path: Path
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
