"""Backfills through Fiddler's file path: upload, a server-side job, progress; the ids placed
as for streamed events."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from fiddler_async import ConnectError, EventError, FileJobError
from fiddler_async.emulator import Emulator

from .conftest import bank_event, loopback_publisher, publishes

pytest.importorskip("polars")
pytestmark = pytest.mark.anyio

EXAMPLE_CSV = Path(__file__).parent.parent / "examples" / "bank_churn.csv"


async def test_a_dataframe_backfill_goes_as_one_file(fiddler: Emulator) -> None:
    frame = pd.DataFrame([bank_event(i) for i in range(5000)])
    seen: list[tuple[str, float]] = []
    async with loopback_publisher(fiddler) as pub:
        job = await pub.publish_file(
            "bank_churn", "bank_churn", frame, progress=lambda *step: seen.append(step)
        )
        labels = pd.DataFrame({"event_id": job.event_ids[:10], "churn": ["yes"] * 10})
        await pub.publish_file("bank_churn", "bank_churn", labels, update_event=True)
    assert job.status == "SUCCESS"
    assert job.info["events"] == 5000
    assert len(set(job.event_ids)) == 5000
    stored = {e["event_id"]: e for e in fiddler.events()}
    assert set(stored) == set(job.event_ids)
    assert all(isinstance(e["timestamp"], int) for e in stored.values())  # stamped
    assert [stored[i]["churn"] for i in job.event_ids[:10]] == ["yes"] * 10
    assert seen[:2] == [("upload", 0.0), ("upload", 1.0)]
    assert seen[-1] == ("job", 1.0)
    paths = [(r["method"], r["path"]) for r in fiddler.requests()]
    assert ("POST", "/v3/files/upload") in paths
    assert len(publishes(fiddler)) == 2  # the insert and the update: one request each


async def test_a_frame_file_carries_its_values_as_they_are(fiddler: Emulator) -> None:
    """A file has no row way: null times stay null and dicts become structs, as Parquet
    carries them; an id column that cannot be sent is refused, naming it."""
    frame = pd.DataFrame(
        [
            {**bank_event(0), "event_id": "f0", "timestamp": None, "extra": {"a": 1}},
            {**bank_event(1), "event_id": "f1", "timestamp": 1700000000000, "extra": {"b": 2}},
        ]
    )
    floats = pd.DataFrame({"event_id": [1.0, 2.0], "age": [1, 2]})
    async with loopback_publisher(fiddler) as pub:
        job = await pub.publish_file("bank_churn", "bank_churn", frame)
        with pytest.raises(EventError, match="the id column 'event_id'"):
            await pub.publish_file("bank_churn", "bank_churn", floats)
    assert (job.status, job.event_ids) == ("SUCCESS", ("f0", "f1"))
    stored = {e["event_id"]: e for e in fiddler.events()}
    assert stored["f0"]["timestamp"] is None
    assert stored["f1"]["extra"] == {"a": None, "b": 2}


async def test_a_csv_file_is_sent_as_it_is(fiddler: Emulator) -> None:
    with EXAMPLE_CSV.open(encoding="utf-8") as file:
        rows = sum(1 for _ in csv.DictReader(file))
    async with loopback_publisher(fiddler) as pub:
        job = await pub.publish_file("bank_churn", "bank_churn", EXAMPLE_CSV)
    assert job.event_ids == ()
    assert fiddler.count() == rows


async def test_a_failed_job_raises_with_the_servers_reason(fiddler: Emulator) -> None:
    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    frame["age"] = ["forty", "41", "42"]  # text in an int column
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(FileJobError, match="ValidationError") as caught:
            await pub.publish_file("bank_churn", "bank_churn", frame)
    assert caught.value.reason == "ValidationError"
    assert fiddler.count() == 0


async def test_a_lost_answer_does_not_start_a_second_job(fiddler: Emulator) -> None:
    """The publish request of a file is stored, then its answer lost: retrying it would
    publish the file twice. It is not retried; the error says what happened."""
    frame = pd.DataFrame([bank_event(i) for i in range(100)])
    fiddler.set_faults(script=["lose"])
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(ConnectError):
            await pub.publish_file("bank_churn", "bank_churn", frame)
        fiddler.set_faults(script=["503"])  # turned away: nothing done, so retried
        await pub.publish_file("bank_churn", "bank_churn", frame)
    assert fiddler.count() == 200  # once for each call, never twice for one
    assert fiddler.duplicates() == {}
