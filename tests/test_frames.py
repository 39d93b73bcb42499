"""DataFrames: pandas and polars DataFrames and pyarrow Tables publish like lists of dicts,
with numpy integers, categoricals, timestamps and nulls converted, encoded without a Python
loop over rows (polars writes the JSON); anything it cannot write goes row by row."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from fiddler_async import EventBatchError, EventEncodeError, EventError, frames
from fiddler_async.destination import ModelInfo
from fiddler_async.emulator import Emulator
from fiddler_async.encode import encode_event
from fiddler_async.frames import encode_frame, polars_rows

from .conftest import bank_event, loopback_publisher

pl = pytest.importorskip("polars")
pa = pytest.importorskip("pyarrow")

pytestmark = pytest.mark.anyio


def pandas_frame() -> pd.DataFrame:
    frame = pd.DataFrame([bank_event(i) for i in range(6)])
    frame["creditscore"] = frame["creditscore"].astype(np.int32)  # numpy integers
    frame["age"] = pd.array([41, None, 43, 44, 45, 46], dtype="Int64")  # nullable, with NA
    frame["geography"] = pd.Categorical(["France", "Spain", "France", None, "Spain", "Spain"])
    frame["balance"] = [1.5, np.nan, np.inf, 0.1 + 0.2, -0.0, 1e300]
    frame["seen"] = [
        pd.Timestamp("2024-01-01 13:00:01.5"),
        pd.NaT,
        *[pd.Timestamp("2024-01-02")] * 4,
    ]
    frame["seen_utc"] = pd.Timestamp("2024-01-01 13:00", tz="UTC")
    return frame


EXPECTED_ROW_0 = {
    "creditscore": 600,
    "age": 41,
    "geography": "France",
    "balance": 1.5,
    "seen": "2024-01-01 13:00:01.500000",
    "seen_utc": "2024-01-01 13:00:00+00:00",
}


def as_sent(emulator: Emulator) -> list[dict[str, Any]]:
    return sorted(emulator.events(), key=lambda e: e["customer_id"])


@pytest.mark.parametrize("kind", ["pandas", "polars", "pyarrow"])
async def test_a_frame_publishes_like_its_rows(fiddler: Emulator, kind: str) -> None:
    frame: Any = pandas_frame()
    if kind == "polars":
        frame = pl.from_pandas(frame)
    elif kind == "pyarrow":
        frame = pa.Table.from_pandas(frame, preserve_index=False)
    async with loopback_publisher(fiddler) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        assert (await pub.flush(10)).delivered == 6
    sent = as_sent(fiddler)
    assert [e["event_id"] for e in sent] == ids
    assert len({str(uuid.UUID(event_id)) for event_id in ids}) == 6  # generated, UUID-shaped
    assert {k: sent[0][k] for k in EXPECTED_ROW_0} == EXPECTED_ROW_0
    assert sent[1]["age"] is None  # NA
    assert sent[3]["geography"] is None  # a null category
    assert [e["balance"] for e in sent] == [1.5, None, None, 0.1 + 0.2, -0.0, 1e300]  # exact
    assert sent[1]["seen"] is None  # NaT
    assert all(isinstance(e["timestamp"], int) for e in sent)  # the publish time, as for dicts


async def test_the_frame_path_sends_what_the_row_path_sends(fiddler: Emulator) -> None:
    rows = [
        {
            **bank_event(i),
            "seen": dt.datetime(2024, 1, 1, 12, 0, 0, 1000 * (i % 2)),  # with and without µs
            "seen_utc": dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc),
            # pandas' own, to the nanosecond: none, some, and whole microseconds
            "seen_ns": pd.Timestamp("2024-01-01 12:00")
            + pd.Timedelta(nanoseconds=(0, 7, 3000)[i % 3]),
        }
        for i in range(50)
    ]
    async with loopback_publisher(fiddler) as pub:
        await pub.publish_events_batch(
            "bank_churn", "bank_churn", rows, event_ids=[f"r{i}" for i in range(50)]
        )
        await pub.publish_events_batch(
            "bank_churn", "bank_churn", pd.DataFrame(rows), event_ids=[f"f{i}" for i in range(50)]
        )
        await pub.flush(10)
    sent = {e["event_id"]: e for e in fiddler.events()}
    for i in range(50):
        by_row, by_frame = dict(sent[f"r{i}"]), dict(sent[f"f{i}"])
        for event in (by_row, by_frame):
            del event["event_id"], event["timestamp"]
        assert by_frame == by_row


async def test_ids_and_times_from_columns_or_arguments(fiddler: Emulator) -> None:
    frame = pl.DataFrame(
        {
            "event_id": ["a", "b", "c"],
            "timestamp": [dt.datetime(2024, 5, 1, 12)] * 3,
            "age": [1, 2, 3],
        }
    )
    async with loopback_publisher(fiddler) as pub:
        carried = await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        replaced = await pub.publish_events_batch(
            "bank_churn",
            "bank_churn",
            frame,
            event_ids=["x", "y", "z"],
            event_timestamps=[dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)] * 3,
        )
        from_column = await pub.publish_events_batch(  # numpy datetime64s
            "bank_churn",
            "bank_churn",
            frame.drop("event_id", "timestamp"),
            event_ids=["p", "q", "r"],
            event_timestamps=frame["timestamp"].to_numpy(),
        )
        labels = pl.DataFrame({"event_id": ["a", "b"], "churn": ["yes", "no"]})
        updated = await pub.publish_events_batch(
            "bank_churn", "bank_churn", labels, update_event=True
        )
        await pub.flush(10)
    assert carried == ["a", "b", "c"]
    assert replaced == ["x", "y", "z"]
    assert from_column == ["p", "q", "r"]
    assert updated == ["a", "b"]
    stored = {e["event_id"]: e for e in fiddler.events()}
    assert set(stored) == {"a", "b", "c", "x", "y", "z", "p", "q", "r"}
    assert stored["p"]["timestamp"] == 1_714_564_800_000  # 2024-05-01 12:00 UTC
    assert stored["a"]["timestamp"] == "2024-05-01 12:00:00"  # its own column
    assert stored["x"]["timestamp"] == 1_735_689_600_000  # the argument's, in epoch ms
    assert (stored["a"]["churn"], stored["b"]["churn"]) == ("yes", "no")


async def test_ids_given_for_a_frame_are_checked_like_any_others(fiddler: Emulator) -> None:
    frame = pl.DataFrame({"age": [1, 2]})
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(EventBatchError) as caught:
            await pub.publish_events_batch("bank_churn", "bank_churn", frame, event_ids=["a", ""])
        assert list(caught.value.errors) == [1]
        ids = await pub.publish_events_batch(
            "bank_churn",
            "bank_churn",
            frame,
            event_ids=["a", None],  # type: ignore[list-item]
        )
        await pub.flush(10)
    assert ids[0] == "a"
    assert ids[1] not in (None, "None")  # generated, as for a dict
    assert sorted(e["event_id"] for e in fiddler.events()) == sorted(ids)


async def test_values_polars_would_change_go_row_by_row(fiddler: Emulator) -> None:
    exact = decimal.Decimal("0.12345678901234567890")
    frame = pd.DataFrame({"age": [1], "price": [exact]})
    periods = pd.DataFrame({"age": [1], "month": pd.period_range("2024-01", periods=1, freq="M")})
    async with loopback_publisher(fiddler) as pub:
        info = await pub.resolve("bank_churn", "bank_churn")
        for kept_exact in (frame, periods):  # polars would make a float, an ordinal
            assert (
                encode_frame(kept_exact, info, update=False, event_ids=None, stamp_millis=0) is None
            )
        await pub.publish_events_batch("bank_churn", "bank_churn", frame)  # row by row, exact
        with pytest.raises(EventBatchError) as caught:  # a Period is no JSON value
            await pub.publish_events_batch("bank_churn", "bank_churn", periods)
        assert caught.value.errors[0].field == "month"  # type: ignore[attr-defined]
        # A 256-bit decimal makes polars panic (not an Exception): the rows go as dicts do.
        wide = pa.table({"age": [2], "price": pa.array([exact], type=pa.decimal256(40, 20))})
        await pub.publish_events_batch("bank_churn", "bank_churn", wide)
        # Python Decimals of more than 38 digits: pyarrow makes them 256-bit on the way.
        long = pd.DataFrame({"age": [3], "price": [decimal.Decimal("1" * 45)]})
        await pub.publish_events_batch("bank_churn", "bank_churn", long)
        # polars would write a 128-bit integer as a float: refused as a dict's would be.
        huge = pl.DataFrame({"age": [3], "count": pl.Series([2**100 + 1], dtype=pl.Int128)})
        with pytest.raises(EventBatchError) as caught:
            await pub.publish_events_batch("bank_churn", "bank_churn", huge)
        assert caught.value.errors[0].field == "count"  # type: ignore[attr-defined]
        assert (await pub.flush(10)).delivered == 3
    assert [e["price"] for e in fiddler.events()] == [float(exact)] * 2 + [float("1" * 45)]


async def test_datetimes_of_differing_zones_keep_their_offsets(fiddler: Emulator) -> None:
    """A pandas column of Python datetimes in several zones, or naive and aware mixed (pandas
    keeps them as objects): each keeps its own offset, as in its row; polars would move them
    all to one zone. A file cannot hold them: refused, saying how to make them one zone."""
    paris = pd.Timestamp("2024-01-01 13:00", tz="Europe/Paris")
    new_york = pd.Timestamp("2024-01-01 13:00", tz="America/New_York")
    naive = dt.datetime(2024, 1, 1, 13, 0, 1, 500000)
    frames = [
        pd.DataFrame({"event_id": ["z0", "z1"], "seen": [paris, new_york]}),
        pd.DataFrame({"event_id": ["z2", "z3"], "seen": [naive, paris]}),
    ]
    async with loopback_publisher(fiddler) as pub:
        for frame in frames:
            await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        assert (await pub.flush(10)).delivered == 4
        with pytest.raises(EventError, match=r"differing kinds or zones .*utc=True"):
            await pub.publish_file("bank_churn", "bank_churn", frames[0])
        one_zone = pd.Series([paris, paris + pd.Timedelta(hours=1)], dtype=object)
        await pub.publish_file(  # Python objects, but of one zone: a file takes them
            "bank_churn", "bank_churn", frames[0].assign(event_id=["z4", "z5"], seen=one_zone)
        )
    seen = {e["event_id"]: e["seen"] for e in fiddler.events()}
    assert seen == {
        "z0": "2024-01-01 13:00:00+01:00",
        "z1": "2024-01-01 13:00:00-05:00",
        "z2": "2024-01-01 13:00:01.500000",
        "z3": "2024-01-01 13:00:00+01:00",
        "z4": "2024-01-01 13:00:00+01:00",
        "z5": "2024-01-01 14:00:00+01:00",
    }


async def test_what_polars_cannot_write_goes_row_by_row(fiddler: Emulator) -> None:
    frame = pd.DataFrame([bank_event(i) for i in range(3)])
    frame["blob"] = [1, object(), "x"]  # a Python object polars cannot write
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(EventBatchError) as caught:
            await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        (error,) = caught.value.errors.values()
        assert list(caught.value.errors) == [1]
        assert isinstance(error, EventEncodeError)
        assert error.field == "blob"
        assert pub.stats().accepted == 0
        # Rows with a null id get a generated one (row by row), not a null.
        frame = pd.DataFrame({"event_id": ["k", None], "age": [1, 2]})
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        await pub.flush(10)
    assert ids[0] == "k"
    assert ids[1] not in (None, "None")
    assert sorted(e["event_id"] for e in fiddler.events()) == sorted(ids)


async def test_a_frame_goes_as_its_rows_would_or_not_at_all(fiddler: Emulator) -> None:
    """What the row way refuses or sends as it is, a frame does alike: column names that are
    not unique strings are refused (pandas would drop all but the last of a name), ids that
    are not text or integers are refused by row, and dicts in a column keep their own keys."""
    numbered = pd.DataFrame([[1, 2]])  # columns 0 and 1
    twice = pd.DataFrame([[1, 2]], columns=["age", "age"])
    float_ids = pd.DataFrame({"event_id": [1.0, None], "age": [1, 2]})
    empty_id = pl.DataFrame({"event_id": ["a", ""], "age": [1, 2]})
    nested = pd.DataFrame({"age": [1, 2], "extra": [{"a": 1}, {"b": 2}]})
    async with loopback_publisher(fiddler) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        with pytest.raises(EventError, match="column names must be strings, got 'int' 0"):
            await pub.publish_events_batch("bank_churn", "bank_churn", numbered)
        with pytest.raises(EventError, match="two columns named 'age'"):
            await pub.publish_events_batch("bank_churn", "bank_churn", twice)
        arrow_twice = pa.table([pa.array([1]), pa.array([2])], names=["age", "age"])
        with pytest.raises(EventError, match="two columns named 'age'"):
            await pub.publish_events_batch("bank_churn", "bank_churn", arrow_twice)
        with pytest.raises(EventError, match="two columns named 'age'"):
            await pub.publish_file("bank_churn", "bank_churn", twice)
        for bad_ids, rows in ((float_ids, [0]), (empty_id, [1])):
            with pytest.raises(EventBatchError) as caught:
                await pub.publish_events_batch("bank_churn", "bank_churn", bad_ids)
            assert list(caught.value.errors) == rows
            assert caught.value.errors[rows[0]].field == "event_id"  # type: ignore[attr-defined]
        assert pub.stats().accepted == 0
        await pub.publish_events_batch("bank_churn", "bank_churn", nested)
        assert (await pub.flush(10)).delivered == 2
    assert sorted((e["age"], e["extra"]) for e in fiddler.events()) == [
        (1, {"a": 1}),
        (2, {"b": 2}),
    ]


async def test_nanoseconds_are_kept_on_the_row_way_too(fiddler: Emulator) -> None:
    """A null id sends the frame row by row: its nanoseconds still go, for every frame kind."""
    ns = [1704114000000000001, 1704114000000000002]
    frames = {
        "polars": pl.DataFrame(
            {"event_id": ["a", None], "seen": pl.Series(ns, dtype=pl.Datetime("ns"))}
        ),
        "pandas": pd.DataFrame({"event_id": ["b", None], "seen": pd.to_datetime(ns)}),
        "pyarrow": pa.table(
            {"event_id": ["c", None], "seen": pa.array(ns, type=pa.timestamp("ns"))}
        ),
    }
    async with loopback_publisher(fiddler) as pub:
        for frame in frames.values():
            await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        assert (await pub.flush(10)).delivered == 6
    assert (
        sorted(e["seen"] for e in fiddler.events())
        == ["2024-01-01 13:00:00.000000001"] * 3 + ["2024-01-01 13:00:00.000000002"] * 3
    )


async def test_an_arrow_date_column_is_sent_as_a_date(fiddler: Emulator) -> None:
    """Arrow has two date types; polars reads the 64-bit one as a datetime. Both go as the
    dates they are, as their rows would."""
    days = [dt.date(2024, 1, 2), None, dt.date(1999, 12, 31)]
    table = pa.table(
        {
            "customer_id": ["d0", "d1", "d2"],
            "day32": pa.array(days, type=pa.date32()),
            "day64": pa.array(days, type=pa.date64()),
        }
    )
    async with loopback_publisher(fiddler) as pub:
        await pub.publish_events_batch("bank_churn", "bank_churn", table)
        await pub.publish_events_batch(
            "bank_churn", "bank_churn", table.to_pandas(types_mapper=pd.ArrowDtype)
        )
        await pub.flush(10)
    sent = fiddler.events()
    expected = ["2024-01-02", None, "1999-12-31"] * 2
    assert [e["day64"] for e in sent] == expected
    assert [e["day32"] for e in sent] == expected


# Columns polars would write otherwise than their rows (found by comparing the two ways over
# generated frames): each must go as its rows would, or row by row.
PARIS, NEW_YORK = "Europe/Paris", "America/New_York"
TRICKY_FRAMES: dict[str, Callable[[], Any]] = {
    "dates and datetimes in one column (cut to dates)": lambda: pd.DataFrame(
        {"a": pd.Series([dt.date(2024, 1, 1), dt.datetime(2024, 1, 1, 13, 5)], dtype=object)}
    ),
    "integers and floats in one column (ints made floats)": lambda: pd.DataFrame(
        {"a": pd.Series([1.5, None, 3], dtype=object)}
    ),
    "datetimes in lists, naive and aware": lambda: pd.DataFrame(
        {"a": [[dt.datetime(2024, 1, 1)], [pd.Timestamp("2024-01-01 13:00", tz=PARIS)]]}
    ),
    "datetimes in lists, two zones": lambda: pd.DataFrame(
        {"a": [[pd.Timestamp("2024-01-01", tz=PARIS), pd.Timestamp("2024-01-01", tz=NEW_YORK)]]}
    ),
    "an offset with seconds (1950)": lambda: pd.DataFrame(
        {"a": pd.to_datetime(["1950-01-01 12:00"]).tz_localize("Africa/Monrovia")}
    ),
    "summer time after 2099": lambda: pd.DataFrame(
        {"a": pd.to_datetime(["2100-07-01 12:00"]).tz_localize(PARIS)}
    ),
    "a year past 9999": lambda: pd.DataFrame(
        {"a": np.array(["12000-01-01"], dtype="datetime64[s]")}
    ),
    "decimals in lists": lambda: pl.DataFrame(
        {"a": pl.Series([[decimal.Decimal("1.10")]], dtype=pl.List(pl.Decimal(10, 2)))}
    ),
    "durations in lists": lambda: pd.DataFrame({"a": [[dt.timedelta(days=1)]]}),
    "128-bit integers in lists": lambda: pl.DataFrame(
        {"a": pl.Series([[2**100]], dtype=pl.List(pl.Int128))}
    ),
    "bytes in lists (a panic in polars)": lambda: pl.DataFrame(
        {"a": pl.Series([[b"x"]], dtype=pl.List(pl.Binary))}
    ),
    "float32": lambda: pd.DataFrame({"a": np.array([0.1], dtype=np.float32)}),
    "times of day": lambda: pl.DataFrame({"a": [dt.time(1, 2, 3, 500000)]}),
    "datetimes in lists": lambda: pl.DataFrame(
        {"a": pl.Series([[dt.datetime(2024, 1, 1, 1, 2, 3, 500000)]])}
    ),
    "an Arrow column without a name": lambda: pa.table({"": [1], "b": [2]}),
}


def typed(value: Any) -> Any:
    """Decoded JSON with each number's type, for comparing: 3 is not 3.0 on the wire."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def rows_of(frame: Any) -> list[Any]:
    """What the row way sends of ``frame``, decoded; None when it refuses a row."""
    module = type(frame).__module__.partition(".")[0]
    if module == "pandas":
        rows = frame.to_dict(orient="records")
    else:
        rows = polars_rows(frame) if module == "polars" else frame.to_pylist()
    try:
        return [typed(orjson.loads(encode_event(row))) for row in rows]
    except EventError:
        return None  # type: ignore[return-value]


@pytest.mark.parametrize("name", list(TRICKY_FRAMES))
def test_a_frame_goes_as_its_rows_or_row_by_row(name: str) -> None:
    frame = TRICKY_FRAMES[name]()
    info = ModelInfo(id="m", name="m", project_id="p", project_name="p")
    encoded = encode_frame(frame, info, update=False, event_ids=None, stamp_millis=None)
    expected = rows_of(frame)
    if encoded is not None:  # in one pass: then exactly as the rows
        assert [typed(orjson.loads(body)) for body in encoded.bodies] == expected
    if expected is None:  # a row refused: only the row way can name it
        assert encoded is None


@pytest.mark.parametrize("library", ["polars", "pyarrow"])
def test_a_nan_time_gets_the_publish_time_as_in_its_row(library: str) -> None:
    """NaN in a float time column is a null (polars does not count it as one)."""
    times = [float("nan"), 1_700_000_000_000.0]
    frame: Any = (pl.DataFrame if library == "polars" else pa.table)({"x": [1, 2], "ts": times})
    info = ModelInfo(id="m", name="m", project_id="p", project_name="p", event_ts_col="ts")
    assert encode_frame(frame, info, update=False, event_ids=None, stamp_millis=5) is None


async def test_a_none_in_event_ids_leaves_a_rows_own_id(fiddler: Emulator) -> None:
    """As for dicts: None in ``event_ids`` takes the row's id column (an update is keyed by
    it); only a row without one gets a new id."""
    frame = pd.DataFrame([{**bank_event(i), "event_id": f"row{i}"} for i in range(2)])
    labels = pd.DataFrame({"event_id": ["row0", "row1"], "churn": ["yes", "no"]})
    async with loopback_publisher(fiddler) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", frame, event_ids=[None, "given"]
        )
        assert ids == ["row0", "given"]
        updated = await pub.publish_events_batch(
            "bank_churn", "bank_churn", labels, update_event=True, event_ids=[None, "given"]
        )
        assert updated == ["row0", "given"]
        assert (await pub.flush(10)).delivered == 4
    assert {e["event_id"]: e["churn"] for e in fiddler.events()} == {"row0": "yes", "given": "no"}


def test_float32_columns_and_embeddings_go_in_one_pass_as_their_rows() -> None:
    """Widened to the doubles the rows send (polars would write 0.1 for float32's 0.1)."""
    info = ModelInfo(id="m", name="m", project_id="p", project_name="p")
    frames = [
        pd.DataFrame({"a": np.array([0.1, np.nan], dtype=np.float32)}),
        pl.DataFrame({"embedding": pl.Series([[0.1, 0.2], None], dtype=pl.List(pl.Float32))}),
    ]
    for frame in frames:
        encoded = encode_frame(frame, info, update=False, event_ids=None, stamp_millis=None)
        assert encoded is not None
        assert [typed(orjson.loads(body)) for body in encoded.bodies] == rows_of(frame)


class _SubFrame(pd.DataFrame):
    """A DataFrame subclass, as geopandas' or a pandera-typed frame is."""

    @property
    def _constructor(self) -> type[_SubFrame]:
        return _SubFrame


async def test_a_dataframe_subclass_is_a_dataframe(fiddler: Emulator) -> None:
    frame = _SubFrame([bank_event(i) for i in range(3)])
    async with loopback_publisher(fiddler) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        await pub.flush(5)
        job = await pub.publish_file("bank_churn", "bank_churn", frame, poll_interval=0.05)
    assert len(ids) == 3
    assert job.info["events"] == 3
    assert sorted(e["customer_id"] for e in fiddler.events()) == [
        "c0",
        "c0",
        "c1",
        "c1",
        "c2",
        "c2",
    ]


async def test_a_polars_that_fails_to_import_leaves_the_rows_way(
    fiddler: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken install (an import that raises other than ImportError) must not break every
    batch call: it fails again where polars is needed, and the rows go one by one."""

    def broken(name: str) -> None:
        raise RuntimeError(f"{name} is broken")

    monkeypatch.setattr(frames, "_libraries_tried", False)
    monkeypatch.setattr(frames.importlib, "import_module", broken)
    async with loopback_publisher(fiddler) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", pandas_frame())
        await pub.flush(5)
    assert frames.libraries_tried()
    assert sorted(e["event_id"] for e in fiddler.events()) == sorted(ids)
