"""Never run: mypy --strict checks that the public API reads well to a type checker.

(pytest does not collect it: the name does not start with ``test_``.)
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from fiddler_async import (
    APIError,
    AsyncPublisher,
    DeliveryFailure,
    ErrorReason,
    EventBatchError,
    FiddlerError,
    FileJob,
    FlushResult,
    ModelInfo,
    Publisher,
    PublisherConfig,
    ReplayResult,
    StatsSnapshot,
)
from fiddler_async.otel import instrument


async def on_error(failure: DeliveryFailure) -> None:
    error: BaseException = failure.error
    ids: tuple[str | None, ...] = failure.event_ids
    del error, ids


def on_error_sync(failure: DeliveryFailure) -> None:
    del failure


async def use() -> None:
    config = PublisherConfig(linger=0.1, overflow="block", max_in_flight=2)
    async with AsyncPublisher("https://acme.fiddler.ai", "token", config=config) as pub:
        event_id: str = pub.publish_event_nowait("p", "m", {"x": 1})
        same: str = await pub.publish_event(
            "p",
            "m",
            {"churn": 1},
            event_id=event_id,
            update_event=True,
            event_timestamp=dt.datetime.now(dt.timezone.utc),
        )
        ids: list[str] = await pub.publish_events_batch("p", "m", [{"x": 1}, {"x": 2}])
        # Ids are text, integers or UUIDs (returned as text); None in a batch makes one.
        await pub.publish_event("p", "m", {"x": 1}, event_id=7)
        given = [uuid.UUID(int=1), None, "c"]
        await pub.publish_events_batch("p", "m", [{"x": 1}] * 3, event_ids=given)
        info: ModelInfo = await pub.resolve("p", "m")
        result: FlushResult = await pub.flush(timeout=5)
        complete: bool = result.complete
        stats: StatsSnapshot = pub.stats()
        total: int = stats.dropped_total + stats.pending
        del same, ids, info, complete, total

    other = AsyncPublisher(on_error=on_error)
    third = AsyncPublisher(on_error=on_error_sync)
    await other.start()
    closed: FlushResult = await other.aclose(timeout=1.0)
    del closed, third


async def use_files_and_metrics() -> None:
    def show(stage: str, done: float) -> None:
        del stage, done

    async with AsyncPublisher() as pub:
        instrument(pub)
        job: FileJob = await pub.publish_file("p", "m", Path("history.parquet"), progress=show)
        ids: tuple[str, ...] = job.event_ids
        del ids


async def use_a_spool() -> None:
    config = PublisherConfig(spool_dir=Path("/var/lib/app/spool"), spool_max_bytes=10**9)
    async with AsyncPublisher(config=config) as pub:
        replay: ReplayResult = await pub.replay_spool()
        left: int = replay.remaining
        failed: BaseException | None = replay.error
        spooled: int = pub.stats().spooled + (await pub.flush()).spooled
        del left, failed, spooled


def use_from_sync_code() -> None:
    with Publisher("https://acme.fiddler.ai", "token", backend="trio", exit_timeout=2) as pub:
        event_id: str = pub.publish_event("p", "m", {"x": 1})
        ids: list[str] = pub.publish_events_batch("p", "m", [{"x": 1}], event_ids=["a"])
        result: FlushResult = pub.flush(5)
        stats: StatsSnapshot = pub.stats()
        del event_id, ids, result, stats
    closed: FlushResult = Publisher(on_error=on_error_sync).close(timeout=1)
    del closed


def describe(error: FiddlerError) -> str:
    if isinstance(error, APIError):
        reasons: tuple[ErrorReason, ...] = error.reasons
        return f"{error.status} {error.code} {error.message} {reasons} {error.retry_after}"
    return str(error)


# As users write it (from a type-checking audit): each of these was refused by a checker, or
# (the `type: ignore` lines, which strict mode reports when unused) accepted though the
# library refuses it at run time.


def sentry_like(error: BaseException) -> str | None:
    del error
    return None


async def use_as_users_write_it(df: pd.DataFrame) -> None:
    config = PublisherConfig(linger=0.1, spool_dir="/var/lib/myapp/fiddler-spool")
    PublisherConfig(linger="fast")  # type: ignore[arg-type]
    PublisherConfig(overflow="drop")  # type: ignore[arg-type]
    async with AsyncPublisher(
        config=config, on_error=lambda failure: sentry_like(failure.error)
    ) as pub:
        for row in df.to_dict(orient="records"):  # keys typed Hashable by pandas
            pub.publish_event_nowait("p", "m", row, event_id=np.int64(7))
        await pub.publish_events_batch("p", "m", df, event_ids=[np.int64(1), None])
        await pub.publish_events_batch("p", "m", df.to_dict(orient="records"))
        await pub.publish_event("p", "m", {"x": 1}, event_timestamp=pd.Timestamp("2024-01-01"))
        await pub.publish_event("p", "m", {"x": 1}, event_timestamp=np.datetime64("2024-01-01"))
        await pub.publish_events_batch("p", "m", {"x": 1})  # type: ignore[dict-item]
        await pub.publish_event("p", "m", {}, event_timestamp="noon")  # type: ignore[arg-type]
        try:
            await pub.publish_events_batch("p", "m", [{"age": "x"}])
        except EventBatchError as err:
            fields: list[str | None] = [error.field for error in err.errors.values()]
            del fields
        instrument(config)  # type: ignore[arg-type]


def use_files_from_sync_code() -> None:
    with Publisher() as pub:
        pub.publish_file("p", "m", Path("x.parquet"), progress=lambda stage, done: 1)
        pub.publish_file("p", "m", Path("x.parquet"), progres=print)  # type: ignore[call-arg]
