"""Backfills through Fiddler's file path: upload, a server-side job, progress; the ids placed
as for streamed events."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import pickle
import uuid
from pathlib import Path

import anyio
import httpx
import pandas as pd
import pytest

from fiddler_async import (
    AsyncPublisher,
    ConnectError,
    EventBatchError,
    EventError,
    FileJobError,
    FileJobTimeoutError,
    ServerError,
    backfill,
)
from fiddler_async.emulator import Emulator

from .conftest import bank_event, config, loopback_publisher, publishes
from .in_process import TOKEN, InProcessFiddler

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


async def test_a_frame_file_takes_offset_times_and_uuids_and_names_what_it_cannot(
    fiddler: Emulator,
) -> None:
    """Columns polars cannot take as they are go as the rows would send them: times at a
    fixed offset as the same instants in UTC, UUIDs as text. A column of mixed kinds is
    refused, naming it."""
    made = [uuid.UUID(int=i) for i in range(2)]
    frame = pd.DataFrame([bank_event(i) for i in range(2)]).assign(
        customer_id=made,
        timestamp=pd.to_datetime(["2024-01-01 18:30:00+05:30", "2024-01-02 05:30:00+05:30"]),
    )
    frame["self"] = made  # a name pandas' assign() takes for itself
    mixed = pd.DataFrame([bank_event(i) for i in range(2)]).assign(customer_id=["c0", 1])
    async with loopback_publisher(fiddler) as pub:
        job = await pub.publish_file("bank_churn", "bank_churn", frame)
        with pytest.raises(EventError, match="polars cannot take the column 'customer_id'"):
            await pub.publish_file("bank_churn", "bank_churn", mixed)
    assert job.status == "SUCCESS"
    stored = sorted(fiddler.events(), key=lambda e: e["customer_id"])
    assert [e["customer_id"] for e in stored] == [str(u) for u in made]
    # The same instants, in UTC.
    assert [e["timestamp"] for e in stored] == [
        "2024-01-01 13:00:00+00:00",
        "2024-01-02 00:00:00+00:00",
    ]


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
    publish the file twice. It is not retried; the error says what happened, and which file."""
    frame = pd.DataFrame([bank_event(i) for i in range(100)])
    fiddler.set_faults(script=["lose"])
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(FileJobError, match="the server may have started its job") as caught:
            await pub.publish_file("bank_churn", "bank_churn", frame)
        assert isinstance(caught.value.__cause__, ConnectError)
        uploads = [r for r in fiddler.requests() if r["path"] == "/v3/files/upload"]
        assert len(uploads) == 1
        assert caught.value.file_id
        assert caught.value.file_id in str(caught.value)
        fiddler.set_faults(script=["503"])  # turned away: nothing done, so retried
        await pub.publish_file("bank_churn", "bank_churn", frame)
    assert fiddler.count() == 200  # once for each call, never twice for one
    assert fiddler.duplicates() == {}


async def test_times_and_decimals_of_a_frame_or_a_parquet_file(
    fiddler: Emulator, tmp_path: Path
) -> None:
    """A backfill's own times (a datetime column, as Parquet carries it) and exact decimals."""
    frame = pd.DataFrame(
        {
            "event_id": ["t0", "t1"],
            "timestamp": [dt.datetime(2024, 1, 1, 10), dt.datetime(2024, 1, 2, 11, 0, 0, 500)],
            "price": [decimal.Decimal("0.10"), decimal.Decimal("12345678901234567.25")],
            "balance": [decimal.Decimal("1000.50"), decimal.Decimal("2")],  # a float column
        }
    )
    path = tmp_path / "history.parquet"
    frame.assign(event_id=["p0", "p1"]).to_parquet(path)
    async with loopback_publisher(fiddler) as pub:
        await pub.publish_file("bank_churn", "bank_churn", frame)
        await pub.publish_file("bank_churn", "bank_churn", path)
    stored = {e["event_id"]: e for e in fiddler.events()}
    assert [stored[i]["timestamp"] for i in ("t0", "t1", "p0", "p1")] == [
        "2024-01-01 10:00:00",
        "2024-01-02 11:00:00.000500",
    ] * 2
    assert stored["t1"]["price"] == stored["p1"]["price"] == 12345678901234567.25
    assert stored["t0"]["balance"] == stored["p0"]["balance"] == 1000.5


async def test_what_cannot_go_as_a_file_is_refused_at_the_call(
    fiddler: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = pd.DataFrame([bank_event(i) for i in range(2)])
    waits = frame.assign(wait=[dt.timedelta(seconds=1), dt.timedelta(0)])
    path = tmp_path / "events.csv"
    frame.to_csv(path, index=False)
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(EventError, match="event_ids has 1 values for 2 rows"):
            await pub.publish_file("bank_churn", "bank_churn", frame, event_ids=["a"])
        with pytest.raises(EventError, match="the column 'wait' holds Duration"):
            await pub.publish_file("bank_churn", "bank_churn", waits)
        nested = frame.assign(waits=[[dt.timedelta(seconds=1)], []])  # at any depth
        with pytest.raises(EventError, match=r"the column 'waits' holds List\(Duration"):
            await pub.publish_file("bank_churn", "bank_churn", nested)
        with pytest.raises(ValueError, match="event_ids= places ids in a DataFrame"):
            await pub.publish_file("bank_churn", "bank_churn", path, event_ids=["a", "b"])
        monkeypatch.setattr(backfill, "MAX_UPLOAD_BYTES", 100)  # the file is bigger
        with pytest.raises(ValueError, match="under 100 MB"):
            await pub.publish_file("bank_churn", "bank_churn", path)
    assert not [r for r in fiddler.requests() if r["path"] == "/v3/files/upload"]


async def test_a_job_past_the_timeout_is_named(inproc: InProcessFiddler) -> None:
    """The job keeps running on the server: the error says which, so that the file is not
    published twice by a caller who tries again."""
    emulator = inproc.transport()

    async def never_done(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v3/jobs/"):
            running = {"id": request.url.path.rpartition("/")[2], "status": "STARTED"}
            return httpx.Response(200, json={"data": running, "kind": "NORMAL"})
        return await emulator.handle_async_request(request)

    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    transport = httpx.MockTransport(never_done)
    async with AsyncPublisher("https://f.test", TOKEN, config=config(), transport=transport) as pub:
        with pytest.raises(FileJobTimeoutError) as caught:
            await pub.publish_file("bank_churn", "bank_churn", frame, poll_interval=0.01, timeout=2)
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert pickle.loads(pickle.dumps(error)).job_id == error.job_id  # e.g. from a worker process
    assert error.job_id is not None
    assert f"job {error.job_id} was STARTED: it may still finish" in str(error)


async def test_a_job_that_cannot_be_followed_is_named(inproc: InProcessFiddler) -> None:
    """The job started, then its status requests failed past the retries: the caller gets
    the job's id (it may finish), not a bare server error, which a caller would take for a
    file not published and publish again."""
    emulator = inproc.transport()

    async def jobs_down(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v3/jobs/"):
            return httpx.Response(503, json={"error": {"code": 503, "message": "jobs down"}})
        return await emulator.handle_async_request(request)

    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    transport = httpx.MockTransport(jobs_down)
    async with AsyncPublisher("https://f.test", TOKEN, config=config(), transport=transport) as pub:
        with pytest.raises(FileJobError, match="the job may still finish") as caught:
            await pub.publish_file("bank_churn", "bank_churn", frame, poll_interval=0.01)
    assert caught.value.job_id is not None
    assert caught.value.file_id is not None
    assert f"GET /v3/jobs/{caught.value.job_id}" in str(caught.value)
    assert isinstance(caught.value.__cause__, ServerError)


async def test_a_job_not_answered_for_before_the_timeout_is_not_called_unstarted(
    inproc: InProcessFiddler,
) -> None:
    emulator = inproc.transport()

    async def silent_jobs(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v3/jobs/"):
            await anyio.sleep(30)
        return await emulator.handle_async_request(request)

    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    transport = httpx.MockTransport(silent_jobs)
    async with AsyncPublisher("https://f.test", TOKEN, config=config(), transport=transport) as pub:
        with pytest.raises(FileJobTimeoutError) as caught:
            await pub.publish_file("bank_churn", "bank_churn", frame, timeout=0.5)
    assert f"job {caught.value.job_id} was started, its state not known yet" in str(caught.value)


async def test_a_wrong_argument_is_said_before_any_request(tmp_path: Path) -> None:
    """No server answers here: the mistake in the call is what the caller hears of."""
    path = tmp_path / "events.csv"
    path.write_text("age\n1\n")
    async with AsyncPublisher("http://127.0.0.1:9", TOKEN, config=config()) as pub:
        with pytest.raises(ValueError, match="event_ids= places ids"):
            await pub.publish_file("bank_churn", "bank_churn", path, event_ids=["a"])
        with pytest.raises(ValueError, match="a file to publish is one of"):
            await pub.publish_file("bank_churn", "bank_churn", tmp_path / "events.txt")
        with pytest.raises(TypeError, match="source must be"):
            await pub.publish_file("bank_churn", "bank_churn", [{"age": 1}])
        frame = pd.DataFrame([bank_event(i) for i in range(3)])
        for wrong, error, said in [
            ({"poll_interval": -1}, ValueError, "poll_interval must be a positive number"),
            ({"poll_interval": float("inf")}, ValueError, "poll_interval must be a positive"),
            ({"poll_interval": "1"}, TypeError, "poll_interval must be a number of seconds"),
            ({"timeout": float("nan")}, ValueError, "timeout must be a positive number"),
            ({"progress": 5}, TypeError, "progress must be a callable"),
            ({"event_ids": "abc"}, EventError, "event_ids must be an iterable of one value"),
            ({"event_ids": ["a", "", 1.5]}, EventBatchError, r"events\[1\].*must not be empty"),
        ]:
            with pytest.raises(error, match=said):
                await pub.publish_file("bank_churn", "bank_churn", frame, **wrong)


async def test_a_wrong_option_sends_nothing_at_all(fiddler: Emulator) -> None:
    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(ValueError, match="poll_interval"):
            await pub.publish_file("bank_churn", "bank_churn", frame, poll_interval=0)
        with pytest.raises(EventBatchError):
            await pub.publish_file("bank_churn", "bank_churn", frame, event_ids=["", "a", "b"])
        with pytest.raises(ValueError, match="no rows"):  # no empty file, no job
            await pub.publish_file("bank_churn", "bank_churn", frame.iloc[:0])
        await anyio.sleep(0.2)  # a lookup started in the background would have been made
    assert fiddler.requests() == []


async def test_ids_given_for_a_frame_file_are_as_for_a_batch(fiddler: Emulator) -> None:
    """None makes an id, as in publish_events_batch; integers and UUIDs go as their text."""
    frame = pd.DataFrame([bank_event(i) for i in range(4)])
    given = [None, 7, uuid.UUID(int=1), None]
    async with loopback_publisher(fiddler) as pub:
        job = await pub.publish_file("bank_churn", "bank_churn", frame, event_ids=given)
        batch = await pub.publish_events_batch("bank_churn", "bank_churn", frame, event_ids=given)
    for ids in (list(job.event_ids), batch):
        assert ids[1:3] == ["7", "00000000-0000-0000-0000-000000000001"]
        assert len(set(ids)) == 4
        assert "None" not in ids
    stored = {e["event_id"] for e in fiddler.events()}
    assert set(job.event_ids) | set(batch) == stored  # 6 distinct ids: "7" and the UUID twice
    assert len(stored) == 6


async def test_retries_of_different_jobs_share_one_rate_limit(
    inproc: InProcessFiddler, caplog: pytest.LogCaptureFixture
) -> None:
    """A log key for each job (and each file) was kept for ever, one per publish_file call,
    and limited nothing: every job's retry was logged."""
    emulator = inproc.transport()
    refused_once: set[str] = set()

    async def jobs_busy_once(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v3/jobs/") and request.url.path not in refused_once:
            refused_once.add(request.url.path)
            return httpx.Response(503, json={"error": {"code": 503, "message": "busy"}})
        return await emulator.handle_async_request(request)

    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    transport = httpx.MockTransport(jobs_busy_once)
    async with AsyncPublisher(
        "https://f.test", TOKEN, config=config(log_interval=60), transport=transport
    ) as pub:
        for _ in range(3):
            await pub.publish_file("bank_churn", "bank_churn", frame, poll_interval=0.01)
    assert len(refused_once) == 3
    retries = [r.getMessage() for r in caplog.records if "retry 1 of" in r.getMessage()]
    assert len(retries) == 1, retries  # the others held back, counted
