"""Encoding at publish time: what each kind of value becomes, and errors that name the field."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import uuid
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest

from fiddler_async import EventEncodeError, EventError
from fiddler_async.encode import (
    encode_event,
    epoch_millis,
    event_id_text,
    is_null,
    new_event_id,
    splice_members,
)


def roundtrip(event: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(encode_event(event))
    return decoded


def test_numpy_scalars_and_arrays_become_python_values() -> None:
    event = {
        "i64": np.int64(7),
        "i32": np.int32(-3),
        "f32": np.float32(0.5),
        "b": np.bool_(True),
        "arr": np.array([1.5, 2.5]),
        "strided": np.arange(6).reshape(2, 3)[:, 0],
        "objects": np.array(["a", None], dtype=object),
    }
    assert roundtrip(event) == {
        "i64": 7,
        "i32": -3,
        "f32": 0.5,
        "b": True,
        "arr": [1.5, 2.5],
        "strided": [0, 3],
        "objects": ["a", None],
    }


def test_nan_infinity_and_pandas_missing_values_become_null() -> None:
    event = {
        "nan": float("nan"),
        "inf": math.inf,
        "ninf": -math.inf,
        "np_nan": np.float64("nan"),
        "arr_nan": np.array([1.0, np.nan]),
        "na": pd.NA,
        "nat": pd.NaT,
        "dec_nan": decimal.Decimal("NaN"),
    }
    assert roundtrip(event) == {
        "nan": None,
        "inf": None,
        "ninf": None,
        "np_nan": None,
        "arr_nan": [1.0, None],
        "na": None,
        "nat": None,
        "dec_nan": None,
    }


def test_times_decimals_uuids_as_the_official_client_sends_them() -> None:
    moment = dt.datetime(2024, 1, 2, 3, 4, 5, 678000)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    event = {
        "when": moment,
        "day": dt.date(2024, 1, 2),
        "ts": pd.Timestamp("2024-01-01 13:00:00"),
        "price": decimal.Decimal("12.3400"),
        "id": ident,
        "tags": {"x"},
    }
    body = encode_event(event)
    assert b'"price":12.3400' in body  # exact, not a float approximation
    assert json.loads(body) == {
        "when": "2024-01-02 03:04:05.678000",
        "day": "2024-01-02",
        "ts": "2024-01-01 13:00:00",
        "price": 12.34,
        "id": str(ident),
        "tags": ["x"],
    }


def test_dataframe_records_encode() -> None:
    frame = pd.DataFrame(
        {
            "age": pd.array([41, None], dtype="Int64"),
            "score": [0.5, np.nan],
            "when": pd.to_datetime(["2024-01-01 13:00", None]),
            "geo": pd.Categorical(["France", "Spain"]),
        }
    )
    rows = [roundtrip(r) for r in frame.to_dict(orient="records")]
    assert rows == [
        {"age": 41, "score": 0.5, "when": "2024-01-01 13:00:00", "geo": "France"},
        {"age": None, "score": None, "when": None, "geo": "Spain"},
    ]


class Opaque:
    pass


class Point(NamedTuple):
    x: int
    y: int


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"a": 1, "bad": Opaque()}, "bad"),
        ({"nested": {"ok": 1, "deep": [1, 2, Opaque()]}}, "nested.deep[2]"),
        ({"blob": b"bytes are ambiguous"}, "blob"),
        ({"big": 2**70}, "big"),
        ({"m": {1: "x"}}, "m[1]"),
        ({"d": decimal.Decimal("1E+400")}, "d"),  # no double holds it: Fiddler cannot read it
        ({"p": Point(1, 2)}, "p"),  # orjson refuses a namedtuple whole, its items one by one
    ],
)
def test_unencodable_value_names_the_field(event: dict[str, Any], field: str) -> None:
    with pytest.raises(EventEncodeError) as info:
        encode_event(event)
    assert info.value.field == field
    assert repr(field) in str(info.value)
    assert isinstance(info.value, TypeError)  # what callers of a JSON encoder expect


def test_a_circular_event_is_named_not_a_recursion_error() -> None:
    looped: dict[str, Any] = {"a": 1}
    looped["self"] = looped
    nested: list[Any] = [1]
    nested.append(nested)
    for event, field in ((looped, "self"), ({"x": {"y": nested}}, "x.y[1]")):
        with pytest.raises(EventEncodeError, match="circular") as info:
            encode_event(event)
        assert info.value.field == field
    shared = [1, 2]  # the same list twice is no cycle
    assert roundtrip({"a": shared, "b": shared}) == {"a": [1, 2], "b": [1, 2]}


def test_numpy_datetimes_are_iso_text_and_their_nat_null() -> None:
    event = {
        "at": np.datetime64("2024-01-01T13:00:01.5"),
        "day": np.datetime64("2024-01-01"),
        "never": np.datetime64("NaT"),
        "never_us": np.datetime64("NaT", "us"),
        "times": np.array(["2024-01-01T01:02:03", "NaT"], dtype="datetime64[s]"),
    }
    assert roundtrip(event) == {
        "at": "2024-01-01T13:00:01.500000",
        "day": "2024-01-01T00:00:00",
        "never": None,
        "never_us": None,
        "times": ["2024-01-01T01:02:03", None],
    }
    # The rest of an event with a NaT is written as without one (float32 in its short form).
    assert roundtrip({"f": np.float32(0.1), "never": event["never_us"]}) == {
        "f": 0.1,
        "never": None,
    }
    # Without a NaT, orjson writes them itself: the same text.
    assert roundtrip({"at": event["at"], "day": event["day"]}) == {
        "at": "2024-01-01T13:00:01.500000",
        "day": "2024-01-01T00:00:00",
    }


def test_keys_of_a_str_subclass_are_plain_names_at_any_depth() -> None:
    class Column(str, enum.Enum):
        AGE = "age"

    assert roundtrip({Column.AGE: 40, np.str_("tenure"): 3}) == {"age": 40, "tenure": 3}
    # Class probabilities keyed by a classifier's classes_ (numpy strings), as json.dumps
    # takes them.
    probs = {"probs": [{np.str_("yes"): 0.8, Column.AGE: {np.str_("no"): 0.2}}]}
    assert roundtrip(probs) == {"probs": [{"yes": 0.8, "age": {"no": 0.2}}]}
    with pytest.raises(EventEncodeError, match="keys must be plain strings") as info:
        encode_event({"nested": {np.str_("fine"): 1, 2: "two"}})
    assert info.value.field == "nested[2]"
    # A bad value beside such a key is the one named.
    with pytest.raises(EventEncodeError, match="'object'") as info:
        encode_event({"nested": {np.str_("fine"): object()}})
    assert info.value.field == "nested.fine"


def test_too_deep_and_unencodable_names_are_named() -> None:
    deep: Any = 1
    for _ in range(2000):  # deeper than Python's recursion limit
        deep = [deep]
    for depth in (254, 300, 2000):  # 254 lists in a column: one level past, with the event
        value: Any = deep
        for _ in range(2000 - depth):
            value = value[0]
        with pytest.raises(EventEncodeError, match="nested more than 254 levels") as info:
            encode_event({"ok": 1, "deep": value})
        assert info.value.field == "deep"
    with pytest.raises(EventEncodeError, match="not valid UTF-8") as info:
        encode_event({"ok": 1, "bad\udc80name": 2})
    assert info.value.field == "bad\\udc80name"


def test_event_ids_are_text_integers_or_uuids() -> None:
    made = uuid.uuid4()
    given = ("a", np.str_("b"), 7, np.int64(8), made)
    assert [event_id_text(v) for v in given] == ["a", "b", "7", "8", str(made)]
    # Not sent as their str(): b"x" would arrive as "b'x'", and 1.0 never match a later 1.
    for bad in (b"req-1", 1.5, np.float64(7.0), True, ["x"], np.array([1, 2]), ""):
        with pytest.raises(EventEncodeError) as info:
            event_id_text(bad, "row_id")
        assert info.value.field == "row_id"
    with pytest.raises(EventEncodeError, match="'Int64'"):
        event_id_text(3.0)


def test_what_counts_as_null() -> None:
    nulls = (None, math.nan, np.float32("nan"), pd.NA, pd.NaT, decimal.Decimal("sNaN"))
    assert all(is_null(v) for v in nulls)
    assert not any(is_null(v) for v in (0, "", np.array([1, 2]), np.array([math.nan])))


def test_non_mapping_event_is_refused() -> None:
    with pytest.raises(EventEncodeError, match="mapping"):
        encode_event([("a", 1)])  # type: ignore[arg-type]


def test_splice_members_puts_columns_first() -> None:
    assert splice_members(b'{"a":1}', [b'"id":"x"']) == b'{"id":"x","a":1}'
    assert splice_members(b"{}", [b'"id":"x"', b'"ts":5']) == b'{"id":"x","ts":5}'
    assert splice_members(b'{"a":1}', []) == b'{"a":1}'


def test_epoch_millis() -> None:
    assert epoch_millis(1_700_000_000_123) == 1_700_000_000_123
    assert epoch_millis(1.6) == 2
    aware = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    assert epoch_millis(aware) == 1_704_067_200_000
    assert epoch_millis(aware.replace(tzinfo=None)) == 1_704_067_200_000  # naive is UTC
    with pytest.raises(EventEncodeError, match="event_timestamp"):
        epoch_millis("2024-01-01")
    with pytest.raises(EventError, match="between years 1 and 9999"):
        epoch_millis(float("nan"))
    with pytest.raises(EventEncodeError):
        epoch_millis(True)
    # numpy's numbers, as a DataFrame column gives them (to_numpy(), or a row's values)
    assert epoch_millis(np.int64(1_700_000_000_123)) == 1_700_000_000_123
    assert epoch_millis(np.float32(2.5)) == 2
    with pytest.raises(EventEncodeError):
        epoch_millis(np.bool_(True))
    # numpy's datetimes (a datetime column's to_numpy()), in any unit, read as datetimes are
    for unit in ("ns", "us", "ms", "s", "D"):
        moment = np.datetime64("2024-01-01T00:00:00.123456789", unit)
        as_datetime = moment.astype("datetime64[us]").item()
        assert epoch_millis(moment) == epoch_millis(as_datetime)
    assert epoch_millis(np.datetime64("2024-01-01T00:00:00.1235", "us")) == 1_704_067_200_124
    assert epoch_millis(np.datetime64("1960-01-01", "D")) == -315_619_200_000
    with pytest.raises(EventError, match="NaT"):
        epoch_millis(np.datetime64("NaT"))
    for far in (np.datetime64("10000-01-01", "D"), np.datetime64(2**60, "s")):  # 2**60 s wraps
        with pytest.raises(EventError, match="between years 1 and 9999"):
            epoch_millis(far)
    for unit in ("ns", "ms", "D"):
        with pytest.raises(EventEncodeError):
            epoch_millis(np.timedelta64(5, unit))
    with pytest.raises(EventEncodeError):
        epoch_millis(np.timedelta64(5))  # no unit
    # The last microsecond of 9999 rounds to a millisecond no time format can write.
    with pytest.raises(EventError, match="between years 1 and 9999"):
        epoch_millis(dt.datetime(9999, 12, 31, 23, 59, 59, 999_999))


def test_event_ids_are_unique_uuid_shaped() -> None:
    ids = [new_event_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:50]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert str(parsed) == text
