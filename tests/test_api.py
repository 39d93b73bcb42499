"""The public surface: names, the exception tree, configuration, and bad input at the caller."""

from __future__ import annotations

import decimal
import inspect
import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pydantic
import pytest

import fiddler_async
from fiddler_async import (
    AsyncPublisher,
    ConfigurationError,
    EventBatchError,
    EventEncodeError,
    EventTooLargeError,
    FiddlerError,
    PublisherConfig,
)
from fiddler_async import exceptions as exceptions_module
from fiddler_async import publisher as publisher_module
from fiddler_async.encode import new_event_id

from .conftest import bank_event, mock_publisher
from .in_process import InProcessFiddler


def test_public_names_are_sorted_and_exist() -> None:
    assert fiddler_async.__all__ == sorted(fiddler_async.__all__)
    for name in fiddler_async.__all__:
        assert hasattr(fiddler_async, name), name


def test_every_exception_descends_from_the_root_and_is_drawn_in_the_tree() -> None:
    doc = exceptions_module.__doc__ or ""
    classes = [
        obj
        for _, obj in inspect.getmembers(exceptions_module, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == exceptions_module.__name__
    ]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, FiddlerError)
        assert re.search(rf"\b{cls.__name__}\b", doc), f"{cls.__name__} missing from the tree"
        assert getattr(fiddler_async, cls.__name__) is cls


def test_config_is_frozen_validated_and_documented() -> None:
    config = PublisherConfig()
    with pytest.raises(pydantic.ValidationError):
        config.linger = 1.0  # type: ignore[misc]
    # A wrong setting is a ConfigurationError (one root, FiddlerError), naming it and the value.
    with pytest.raises(ConfigurationError, match=r"max_batch_events: .* 1000 \(got 1001\)"):
        PublisherConfig(max_batch_events=1001)
    with pytest.raises(ConfigurationError, match=r"overflow: .*got 'drop_everything'"):
        PublisherConfig(overflow="drop_everything")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="must not exceed max_queue_bytes"):
        PublisherConfig(max_batch_bytes=10_000, max_queue_bytes=5_000)
    with pytest.raises(ConfigurationError, match="lingr"):  # a typo is not ignored
        PublisherConfig(lingr=1.0)  # type: ignore[call-arg]
    assert config.model_copy(update={"linger": 2.0}).linger == 2.0
    assert config.model_copy() == config
    with pytest.raises(ConfigurationError, match=r"linger: .*\(got -1\)"):  # checked too
        config.model_copy(update={"linger": -1})
    variant = PublisherConfig(linger=0.5).model_copy(update={"max_in_flight": 2})
    assert variant.model_fields_set == {"linger", "max_in_flight"}  # as pydantic's copy says
    # Settings read from a mapping or a file: the same error, said once.
    with pytest.raises(ConfigurationError, match=r"^PublisherConfig: linger: .*\(got -1\)$"):
        PublisherConfig.model_validate({"linger": -1})
    with pytest.raises(ConfigurationError, match="max_in_flight"):
        PublisherConfig.model_validate_json('{"max_in_flight": 0}')
    # The README's configuration table lists every knob with its default.
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for name in PublisherConfig.model_fields:
        assert re.search(rf"^\| `{name}` \| `[^`]+` \| \w", readme, re.MULTILINE), name


def test_missing_or_bad_url_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIDDLER_URL", raising=False)
    monkeypatch.delenv("FIDDLER_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="FIDDLER_URL"):
        AsyncPublisher()
    with pytest.raises(ConfigurationError, match="FIDDLER_TOKEN"):
        AsyncPublisher("https://acme.fiddler.ai")
    with pytest.raises(ConfigurationError, match="http"):
        AsyncPublisher("ftp://acme.fiddler.ai", "t")
    with pytest.raises(ConfigurationError, match="port 99999 is not 1 to 65535"):
        AsyncPublisher("http://127.0.0.1:99999", "t")  # was an OverflowError at the first send
    # A token read from a file with its line break: no request could carry it.
    with pytest.raises(ConfigurationError, match="line break"):
        AsyncPublisher("https://acme.fiddler.ai", "t0ken\n")
    with pytest.raises(ConfigurationError, match="PublisherConfig"):
        AsyncPublisher("https://acme.fiddler.ai", "t", config={"linger": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="token must be a string, got 'bytes'"):
        AsyncPublisher("https://acme.fiddler.ai", b"t")  # type: ignore[arg-type]
    # Every request would go to the query's path ("/?region=eu/v3/..."), answered 404.
    for url in (
        "https://acme.fiddler.ai?region=eu",
        "https://acme.fiddler.ai/#top",
        "https://a.b/?",
    ):
        with pytest.raises(ConfigurationError, match="no query or fragment"):
            AsyncPublisher(url, "t")
    with pytest.raises(ConfigurationError, match="transport must be an httpx"):
        AsyncPublisher("https://acme.fiddler.ai", "t", transport=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_error must be a callable"):
        AsyncPublisher("https://acme.fiddler.ai", "t", on_error=5)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_destination_is_worked_out_once_whatever_update_event_is(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A falsy or truthy update_event that is not a bool (None, 1) took the slow way on
    every call; one that is no key at all (a list) still works."""
    async with mock_publisher(inproc) as pub:
        routed = []
        monkeypatch.setattr(pub, "_route", lambda *key: routed.append(key) or route(*key))
        route = type(pub)._route.__get__(pub)
        for update_event in (None, None, 0, False, []):
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", bank_event(), update_event=update_event
            )
        assert [key[-1] for key in routed] == [None, 0, []]  # False is 0 to a dict
        assert (await pub.flush(5)).delivered == 5


@pytest.mark.anyio
async def test_a_bad_timeout_is_refused_before_the_flush_or_close_begins(
    inproc: InProcessFiddler,
) -> None:
    """A NaN deadline raised only once the close had begun: the queue was dropped."""
    async with mock_publisher(inproc) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        for bad, error in ((math.nan, ValueError), ("5", TypeError), (True, TypeError)):
            with pytest.raises(error, match="timeout must be a number of seconds"):
                await pub.aclose(bad)  # type: ignore[arg-type]
            with pytest.raises(error, match="timeout must be a number of seconds"):
                await pub.flush(bad)  # type: ignore[arg-type]
        assert repr(pub).endswith("state=open>")
        assert (await pub.aclose(5)).delivered == 1
    assert len(inproc.stored("bank_churn", "bank_churn")) == 1


@pytest.mark.anyio
async def test_an_event_that_outgrows_a_request_once_its_id_is_placed_fails_alone(
    inproc: InProcessFiddler,
) -> None:
    """Queued before the model was known, an event is measured with a placeholder id and
    time; placed, they may make it larger than any request may be. It fails as too large,
    as it is refused at the call once the model is known, and is never sent."""
    failures: list[fiddler_async.DeliveryFailure] = []
    large = {"x": 1, "pad": "a" * 949}
    async with mock_publisher(inproc, on_error=failures.append, max_batch_bytes=1024) as pub:
        pub.publish_event_nowait("p", "m", large)  # fits, with the placeholder
        pub.publish_event_nowait("p", "m", {"x": 2})
        result = await pub.flush(5)
        assert (result.delivered, result.failed) == (1, 1)
        with pytest.raises(EventTooLargeError):
            pub.publish_event_nowait("p", "m", large)
    assert isinstance(failures[0].error, EventTooLargeError)
    assert "once its id and time were placed" in str(failures[0].error)
    assert [event["x"] for event in inproc.stored("p", "m")] == [2]


def test_the_token_never_appears_in_repr() -> None:
    pub = AsyncPublisher("https://acme.fiddler.ai", "s3cr3t-token")
    assert "s3cr3t" not in repr(pub)
    assert "acme.fiddler.ai" in repr(pub)


anyio = pytest.mark.anyio


@anyio
async def test_bad_events_raise_at_the_caller_and_queue_nothing(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc, max_batch_bytes=2048) as pub:
        with pytest.raises(EventEncodeError, match=r"'features\.vector\[1\]'") as info:
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", {"features": {"vector": [1, object()]}}
            )
        assert isinstance(info.value, TypeError)
        with pytest.raises(EventEncodeError, match="mapping"):
            await pub.publish_event("bank_churn", "bank_churn", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(EventTooLargeError, match="max_batch_bytes"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {"text": "x" * 4096})
        with pytest.raises(EventEncodeError, match="event_timestamp"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {}, event_timestamp="noon")
        with pytest.raises(EventEncodeError, match="event_id"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {}, event_id=["x"])  # type: ignore[arg-type]
        with pytest.raises(EventEncodeError, match="event_id is not valid Unicode"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {}, event_id="a\ud800")
        with pytest.raises(ConfigurationError, match="env_type"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {}, env_type="STAGING")
        with pytest.raises(ConfigurationError, match="env_name"):
            pub.publish_event_nowait("bank_churn", "bank_churn", {}, env_type="PRE_PRODUCTION")
        with pytest.raises(ConfigurationError, match="model_id"):
            pub.publish_event_nowait("bank_churn", "", {})
        # Named, also where the argument cannot even be looked up (a list is no key).
        for bad in ("", 123, ["baseline"]):
            with pytest.raises(ConfigurationError, match="env_name must be a non-empty string"):
                pub.publish_event_nowait(
                    "bank_churn", "bank_churn", {}, env_type="PRE_PRODUCTION", env_name=bad
                )
            with pytest.raises(ConfigurationError, match="env_name must be a non-empty string"):
                await pub.publish_events_batch(
                    "bank_churn", "bank_churn", [{}], env_type="PRE_PRODUCTION", env_name=bad
                )
        with pytest.raises(ConfigurationError, match="project_id"):
            pub.publish_event_nowait(["bank_churn"], "bank_churn", {})  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="model_id"):
            await pub.resolve("bank_churn", ["bank_churn"])  # type: ignore[arg-type]
        stats = pub.stats()
        assert (stats.accepted, stats.queued_events) == (0, 0)
        # The publisher goes on working.
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        assert (await pub.flush(5)).delivered == 1


@anyio
async def test_a_batch_with_bad_events_names_each_and_queues_nothing(
    inproc: InProcessFiddler,
) -> None:
    events = [bank_event(i) for i in range(10)]
    events[3]["age"] = object()
    events[7]["balance"] = {1, object()}
    async with mock_publisher(inproc) as pub:
        with pytest.raises(EventBatchError) as info:
            await pub.publish_events_batch("bank_churn", "bank_churn", events)
        assert sorted(info.value.errors) == [3, 7]
        assert "events[3]" in str(info.value)
        assert info.value.errors[3].field == "age"  # type: ignore[attr-defined]
        assert pub.stats().accepted == 0
        events = [bank_event(i) for i in range(5)]
        events[4]["notes"] = "x" * 5_000_000  # only the last is over max_batch_bytes
        with pytest.raises(EventBatchError) as info:
            await pub.publish_events_batch("bank_churn", "bank_churn", events)
        assert list(info.value.errors) == [4]
        assert isinstance(info.value.errors[4], EventTooLargeError)
        assert pub.stats().accepted == 0
        with pytest.raises(fiddler_async.EventError, match="event_ids has 1 values"):
            await pub.publish_events_batch(
                "bank_churn", "bank_churn", [bank_event()] * 2, event_ids=["a"]
            )
        with pytest.raises(fiddler_async.EventError, match="'NoneType'"):
            await pub.publish_events_batch("bank_churn", "bank_churn", None)
        with pytest.raises(fiddler_async.EventError, match="event_ids must be an iterable"):
            # (three events, and three letters: not three ids)
            await pub.publish_events_batch(
                "bank_churn", "bank_churn", [bank_event()] * 3, event_ids="abc"
            )
        assert pub.stats().accepted == 0


@anyio
async def test_ids_in_the_id_column_are_checked_like_given_ones(inproc: InProcessFiddler) -> None:
    """A value in the model's id column is an id as ``event_id=`` is: text, an integer or a
    UUID; anything else is refused naming the column, in the batch by position."""
    rows = [
        {"x": 1, "id": np.int64(5)},
        {"x": 2, "id": np.array([1, 2])},
        {"x": 3, "id": 7.0},
        {"x": 4, "id": ""},
        {"x": 5, "id": "e5"},
    ]
    async with mock_publisher(inproc) as pub:
        await pub.resolve("p", "loose")
        with pytest.raises(EventBatchError) as info:
            await pub.publish_events_batch("p", "loose", rows)
        assert sorted(info.value.errors) == [1, 2, 3]
        assert {e.field for e in info.value.errors.values()} == {"id"}  # type: ignore[attr-defined]
        with pytest.raises(EventEncodeError, match="'id'"):
            pub.publish_event_nowait("p", "loose", rows[1])
        ids = await pub.publish_events_batch("p", "loose", [rows[0], rows[4]])
        assert ids == ["5", "e5"]
        assert (await pub.flush(5)).delivered == 2
    assert [e["id"] for e in inproc.stored("p", "loose")] == [5, "e5"]


@anyio
async def test_a_null_time_is_the_publish_time_as_a_missing_one(inproc: InProcessFiddler) -> None:
    """As a null id is replaced by a new one, a null in the time column of a new event is
    replaced by the publish time; a frame's too."""
    async with mock_publisher(inproc) as pub:
        await pub.resolve("p", "loose")
        pub.publish_event_nowait("p", "loose", {"x": 1, "ts": None})
        await pub.publish_events_batch("p", "loose", [{"x": 2, "ts": math.nan}, {"x": 3}])
        frame = pd.DataFrame({"x": [4, 5], "ts": [pd.Timestamp("2024-01-01"), pd.NaT]})
        await pub.publish_events_batch("p", "loose", frame)
        await pub.flush(5)  # (the first events may go while the frame's libraries load)
        assert pub.stats().delivered == 5
    times = {e["x"]: e["ts"] for e in inproc.stored("p", "loose")}
    assert times[4] == "2024-01-01 00:00:00"
    assert all(isinstance(times[x], int) for x in (1, 2, 3, 5))  # epoch ms: the model's format


@anyio
async def test_exact_numbers_stay_exact_when_the_columns_are_placed_after_the_lookup(
    inproc: InProcessFiddler,
) -> None:
    """An event queued before its model is known, whose null time column is replaced once
    it is, keeps its Decimal values as exact as an event queued after."""
    amounts = {
        "balance": decimal.Decimal("12345678901234567890.123456789"),
        "estimatedsalary": decimal.Decimal("123456789012345678901234567890"),
    }
    event = {**bank_event(), **amounts, "timestamp": None}
    async with mock_publisher(inproc) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", event, event_id="before")
        await pub.resolve("bank_churn", "bank_churn")
        pub.publish_event_nowait("bank_churn", "bank_churn", event, event_id="after")
        assert (await pub.flush(5)).delivered == 2
    sent = b"".join(request.content for request in inproc.event_requests())
    for value in amounts.values():
        assert sent.count(str(value).encode()) == 2


@anyio
async def test_a_generator_reusing_one_dict_publishes_each_row_as_yielded(
    inproc: InProcessFiddler,
) -> None:
    """A generator that fills one dict and yields it again for each row (a buffer reused):
    every event is the row as it was when yielded, not the last row over and over."""

    def reused() -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {}
        for i in range(50):
            row.update(bank_event(i))
            yield row

    async with mock_publisher(inproc) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", reused())
        await pub.flush(10)
    stored = inproc.stored()
    assert [e["customer_id"] for e in stored] == [f"c{i}" for i in range(50)]
    assert [e["event_id"] for e in stored] == ids


@anyio
async def test_a_batch_of_plain_rows_is_stamped_whole_and_mixed_rows_one_by_one(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of new events for a resolved model are prepared together with one reading of
    the clock: rows without an id or time of their own (an empty row too), rows with their
    own, ids given as event_ids. A batch where one row needs the long way (here a null id,
    replaced by a new one) goes row by row, a reading each. All keep every row, in order,
    under the id returned for it."""
    ticks = itertools.count(1_700_000_000_000)
    clock = SimpleNamespace(time=lambda: next(ticks) / 1000)  # a millisecond later each time
    own_time = {**bank_event(5), "event_id": "own-5", "timestamp": 5}
    async with mock_publisher(inproc) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        monkeypatch.setattr(publisher_module, "time", clock)
        plain = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(0), {}, bank_event(2)]
        )
        own = await pub.publish_events_batch(
            "bank_churn",
            "bank_churn",
            [{**bank_event(3), "event_id": "own-3"}, {**bank_event(4), "timestamp": 4}, own_time],
        )
        given = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(6), bank_event(7)], event_ids=["g6", None]
        )
        mixed = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(8), {**bank_event(9), "event_id": None}, {}]
        )
        monkeypatch.undo()
        assert (await pub.flush(5)).delivered == 11
    ids = plain + own + given + mixed
    assert len(set(ids)) == 11
    assert (own[0], own[2], given[0]) == ("own-3", "own-5", "g6")
    stored = inproc.stored()
    assert [e["event_id"] for e in stored] == ids
    assert [e.get("customer_id") for e in stored] == [
        *("c0", None, "c2"),
        *(f"c{i}" for i in range(3, 10)),
        None,
    ]
    assert set(stored[1]) == {"event_id", "timestamp"}
    times = [e["timestamp"] for e in stored]
    assert len(set(times[:3])) == 1
    assert times[4:6] == [4, 5]
    assert len({times[3], *times[6:8]}) == 2  # two calls, a reading each
    assert len(set(times[8:])) == 3


@anyio
async def test_events_with_their_own_ids_and_times_take_the_short_ways(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's own ids (as Fiddler's updates need) must cost no more than generated
    ones: with the general path of one event out of order, such events are still queued, and
    updates keyed by them; and a batch of either too, with the per-row short ways out of
    order as well."""

    def general_path(*_: object) -> None:
        raise AssertionError("the long way was taken")

    async with mock_publisher(inproc) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        monkeypatch.setattr(AsyncPublisher, "_prepare", general_path)
        given = pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(0), event_id="r0")
        own = pub.publish_event_nowait(
            "bank_churn", "bank_churn", {**bank_event(1), "event_id": "r1"}
        )
        target = pub.publish_event_nowait(
            "bank_churn", "bank_churn", {"churn": "yes"}, event_id="r0", update_event=True
        )
        timed = pub.publish_event_nowait(
            "bank_churn", "bank_churn", bank_event(5), event_id="r5", event_timestamp=5
        )
        monkeypatch.setattr(AsyncPublisher, "_prepare_new", general_path)
        monkeypatch.setattr(AsyncPublisher, "_prepare_update", general_path)
        rows = [{**bank_event(2), "event_id": "r2"}, {**bank_event(3), "timestamp": 3}]
        batch = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [*rows, bank_event(4)], event_ids=[None, None, "r4"]
        )
        targets = await pub.publish_events_batch(
            "bank_churn",
            "bank_churn",
            [{"churn": "no", "event_id": "r1"}, {"churn": "no"}],
            event_ids=[None, "r2"],
            event_timestamps=[None, 2],
            update_event=True,
        )
        monkeypatch.undo()
        assert (await pub.flush(5)).delivered == 9
    assert (given, own, batch[0], batch[2], timed) == ("r0", "r1", "r2", "r4", "r5")
    assert (target, targets) == ("r0", ["r1", "r2"])
    stored = inproc.stored()
    assert [e["event_id"] for e in stored] == ["r0", "r1", "r5", "r2", batch[1], "r4"]
    assert [e.get("churn") for e in stored] == ["yes", "no", None, "no", None, None]
    assert (stored[2]["timestamp"], stored[3]["timestamp"]) == (5, 2)


@anyio
async def test_new_events_for_a_model_with_a_strftime_time_column(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        await pub.resolve("p", "m")
        one = pub.publish_event_nowait("p", "m", {"x": 1})
        many = await pub.publish_events_batch("p", "m", [{"x": 2}, {}])
        assert (await pub.flush(5)).delivered == 3
    stored = inproc.stored("p", "m")
    assert [e["row_id"] for e in stored] == [one, *many]
    assert [e.get("x") for e in stored] == [1, 2, None]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", e["at"]) for e in stored)


@anyio
async def test_ids_made_after_the_id_prefix_is_renewed_carry_the_new_prefix(
    inproc: InProcessFiddler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked child renews the process's id prefix. What the publisher keeps for the
    current millisecond must not go on writing the old prefix into the bodies."""
    monkeypatch.setattr(publisher_module, "time", SimpleNamespace(time=lambda: 1_700_000_000.0))
    async with mock_publisher(inproc) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        first = pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(0))
        new_event_id.renew()  # as in a forked child
        second = pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        batch = await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(2)])
        assert (await pub.flush(5)).delivered == 3
    assert first[:24] != second[:24] == batch[0][:24]
    assert [e["event_id"] for e in inproc.stored()] == [first, second, *batch]


@anyio
async def test_ids_and_times_given_before_the_lookup_arrive_intact(
    inproc: InProcessFiddler,
) -> None:
    """Until its model is resolved, a queued event keeps its id and time inside its bytes,
    between NUL markers: ids holding NULs, quotes, brackets or any Unicode must survive."""
    ids = ["a\x00b", 'q"]\\', "\t[1,2]\x00", "é—😀", "x" * 300]
    async with mock_publisher(inproc) as pub:
        # No await between these calls, so the model's lookup cannot have completed: every
        # one takes the pending path.
        for i, event_id in enumerate(ids):
            pub.publish_event_nowait(
                "bank_churn", "bank_churn", bank_event(i), event_id=event_id, event_timestamp=i
            )
        assert (await pub.flush(5)).delivered == len(ids)
    stored = inproc.stored()
    assert [e["event_id"] for e in stored] == ids
    assert [e["customer_id"] for e in stored] == [f"c{i}" for i in range(len(ids))]


@anyio
async def test_a_dataframe_batch(inproc: InProcessFiddler) -> None:
    frame = pd.DataFrame([bank_event(i) for i in range(5)])
    frame["age"] = frame["age"].astype(np.int64)
    frame["when"] = pd.Timestamp("2024-01-01 13:00")
    frame.loc[2, "balance"] = np.nan
    async with mock_publisher(inproc) as pub:
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", frame, event_ids=[f"row{i}" for i in range(5)]
        )
        assert ids == [f"row{i}" for i in range(5)]
        await pub.flush(5)
    stored = inproc.stored()
    assert [e["event_id"] for e in stored] == ids
    assert stored[2]["balance"] is None
    assert stored[0]["age"] == 30
    assert stored[0]["when"] == "2024-01-01 13:00:00"


@anyio
async def test_batch_updates_take_ids_from_the_id_column(inproc: InProcessFiddler) -> None:
    async with mock_publisher(inproc) as pub:
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", [bank_event(i) for i in range(3)]
        )
        targets = [{"event_id": eid, "churn": "yes"} for eid in ids]
        assert (
            await pub.publish_events_batch("bank_churn", "bank_churn", targets, update_event=True)
            == ids
        )
        await pub.flush(5)
    assert [{"event_id": e["event_id"], "churn": e["churn"]} for e in inproc.stored()] == targets
