"""Compatibility proof: the official fiddler-client 3.x and this library, against the emulator.

The official client is a test-only dependency (the `test` dependency group).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pandas as pd
import pytest

from fiddler_async import AsyncPublisher
from fiddler_async.emulator import Emulator, running_emulator

fdl = pytest.importorskip("fiddler")


@pytest.fixture
def official(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    monkeypatch.setenv("FIDDLER_CLIENT_RETRY_MAX_DURATION_SECONDS", "5")
    logging.getLogger("fiddler").setLevel(logging.WARNING)
    with running_emulator() as emulator:  # the built-in bank_churn model
        fdl.init(url=emulator.url, token=emulator.token)
        yield emulator


# The official client leaves the file it uploads open (fiddler/entities/file.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_official_client_publishes_streams_updates_and_files(official: Emulator) -> None:
    project = fdl.Project.from_name(name="bank_churn")
    model = fdl.Model.from_name(name="bank_churn", project_id=project.id)
    assert (model.event_id_col, model.event_ts_col) == ("event_id", "timestamp")
    event = {
        "event_id": "o1",
        "creditscore": 600,
        "geography": "France",
        "age": 40,
        "predicted_churn": 0.3,
        "timestamp": "2024-01-01 13:00:00",
    }
    ids = model.publish_stream([event])
    assert [str(i) for i in ids] == ["o1"]
    model.publish_stream([{"event_id": "o1", "churn": "yes"}], update=True)
    assert official.events() == [{**event, "churn": "yes"}]

    job = model.publish_batch(pd.DataFrame([{**event, "event_id": "o2", "age": 41}]))
    job.wait()
    assert job.status == "SUCCESS"
    assert [e["event_id"] for e in official.events()] == ["o1", "o2"]
    paths = [r["path"] for r in official.requests()]
    assert paths[:2] == ["/v3/server-info", "/v3/version-compatibility"]
    assert "/v3/files/upload" in paths


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_this_library_publishes_and_updates(official: Emulator) -> None:
    async with AsyncPublisher(official.url, official.token) as pub:
        event_id = await pub.publish_event(
            "bank_churn", "bank_churn", {"creditscore": 610, "age": 41, "predicted_churn": 0.1}
        )
        await pub.flush(5)
        await pub.publish_event(
            "bank_churn", "bank_churn", {"churn": "no"}, event_id=event_id, update_event=True
        )
    (stored,) = official.events()
    assert stored["event_id"] == event_id
    assert stored["churn"] == "no"
    assert isinstance(stored["timestamp"], int)  # the publish time, in epoch milliseconds
