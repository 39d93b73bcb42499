"""DataFrames to events without a Python loop over rows.

A pandas or polars DataFrame, or a pyarrow Table, is encoded to one JSON object per row by
polars, in Rust, in one call, with the model's event id and timestamp columns added as columns
first (ids generated for the whole batch at once): the rows are then queued as they are. What
the conversion gives, per column type:

- integers (numpy, nullable ``Int64``), floats, booleans, strings: themselves; floats exactly
  (shortest round-trip form; 32- and 16-bit ones as the doubles they are, as their rows);
- nulls (``None``, ``NaN``, ``NA``, ``NaT``), and infinities: ``null``, as for dict events;
- categoricals and enums: their values;
- datetimes: text, as ``str()`` writes them for dict events: ``2024-01-01 01:02:03.456789``
  (no fraction when it is zero), with the offset when the column has a time zone
  (``2024-01-01 01:02:03+00:00``); dates ``2024-01-01``;
- lists and structs of the plain values above (numbers, booleans, strings): JSON arrays and
  objects.

Everything else goes row by row, where polars would write it otherwise than the dict path
(compared over generated frames): without polars (the ``dataframes`` extra); Python objects
of several kinds in one pandas column (dates and datetimes, integers and floats, zones that
differ), durations, binary, decimals, times of day, 128-bit integers,
pandas periods, intervals, complex numbers; dates, times and decimals inside lists and
structs; datetimes past the year 9999, and zoned ones before 1972 or from 2100 on (polars'
zone rules differ there); a name polars changes (an empty one); with ``event_timestamps=``
given, or when the rows need the per-event rules' errors (null ids, an update without ids).
:func:`encode_frame` returns None then, and the caller goes row by row, which writes
decimals exactly and names any value that cannot be sent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import io
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .destination import ModelInfo
from .encode import new_event_id
from .exceptions import EventError

__all__ = [
    "EncodedFrame",
    "check_columns",
    "encode_frame",
    "frame_library",
    "frame_to_parquet",
    "is_frame",
    "polars_rows",
]

_FRAME_TYPES = {("pandas", "DataFrame"), ("polars", "DataFrame"), ("pyarrow", "Table")}


def frame_library(value: object) -> str | None:
    """``"pandas"`` or ``"polars"`` for a DataFrame of theirs (a subclass's too: geopandas,
    pandera), ``"pyarrow"`` for a Table, else None; checked without importing them."""
    for cls in type(value).__mro__:
        library = cls.__module__.partition(".")[0]
        if (library, cls.__name__) in _FRAME_TYPES:
            return library
    return None


def is_frame(value: object) -> bool:
    """A pandas or polars DataFrame, or a pyarrow Table (see :func:`frame_library`)."""
    return frame_library(value) is not None


_libraries_tried = False


def libraries_tried() -> bool:
    """Whether :func:`import_libraries` ran."""
    return _libraries_tried


def import_libraries() -> None:
    """Import pyarrow and polars where installed, for a worker thread: their first import
    takes about half a second, which would hold the event loop at the first frame. One that
    fails, however, is left to fail where it is needed (the rows then go one by one)."""
    global _libraries_tried  # noqa: PLW0603  (tried once a process)
    try:
        for name in ("pyarrow", "polars"):
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    finally:
        _libraries_tried = True


def _column_names(frame: Any) -> list[Any]:
    return list(frame.column_names if frame_library(frame) == "pyarrow" else frame.columns)


def check_columns(frame: Any) -> None:
    """Refuse a frame whose column names are not unique strings, naming the column: as rows,
    a name that is not a string cannot be sent, and of two columns of one name only the last
    would be (pandas warns, then drops the other)."""
    names = _column_names(frame)  # polars' are unique strings already; pandas' need not be
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise EventError(
                f"DataFrame column names must be strings, got {type(name).__qualname__!r} {name!r}"
            )
        if name in seen:
            raise EventError(f"DataFrame has two columns named {name!r}")
        seen.add(name)


@dataclass(frozen=True)
class EncodedFrame:
    bodies: list[bytes]
    """Each row as a JSON object, its id and time in the model's columns already."""
    ids: list[str]
    """The id each row carries (for a model without an id column: empty strings)."""


def encode_frame(
    frame: Any,
    info: ModelInfo,
    *,
    update: bool,
    event_ids: list[str | None] | None,
    stamp_millis: int | None,
) -> EncodedFrame | None:
    """Encode ``frame``'s rows for a model whose schema is ``info``, placing ids and times as
    :func:`fiddler_async.wire.place_columns` does for one event, but for all rows at once.
    None when the rows must go one by one instead (see the module's docstring), and for the
    cases where that way gives the precise error (an id the model cannot take, null ids)."""
    placed = _placed(frame, info, update, event_ids, stamp_millis)
    if placed is None:
        return None
    df, ids, pl = placed
    try:
        as_text = [
            _datetime_text(pl, name, aware=dtype.time_zone is not None)
            for name, dtype in df.schema.items()
            if isinstance(dtype, pl.Datetime)
        ]
        text = (df.with_columns(as_text) if as_text else df).write_ndjson()
    except BaseException as exc:  # anything polars cannot write: the row way names it
        if not _failed_in_polars(exc):
            raise
        return None
    bodies = text.encode().split(b"\n")
    if bodies and not bodies[-1]:
        bodies.pop()
    return EncodedFrame(bodies, ids)


def frame_to_parquet(
    frame: Any,
    info: ModelInfo,
    *,
    update: bool,
    event_ids: list[str | None] | None,
    stamp_millis: int | None,
) -> tuple[bytes, list[str]]:
    """``frame`` as a Parquet file for the v3 file upload, with ids and times placed as by
    :func:`encode_frame`; and the ids. Needs polars (the ``dataframes`` extra). The values go
    as they are, nulls too: a null time stays null, and dicts in a column become a Parquet
    struct (each row with every key)."""
    check_columns(frame)
    placed = _placed(frame, info, update, event_ids, stamp_millis, as_file=True)
    assert placed is not None  # as a file: what cannot go raises instead
    df, ids, _ = placed
    out = io.BytesIO()
    df.write_parquet(out)
    return out.getvalue(), ids


def _placed(
    frame: Any,
    info: ModelInfo,
    update: bool,
    event_ids: list[str | None] | None,
    stamp_millis: int | None,
    *,
    as_file: bool = False,
) -> tuple[Any, list[str], Any] | None:
    """The frame in polars with the model's id and time columns placed first, its ids, and
    the polars module; None to go row by row. ``as_file``: for a Parquet file, which has no
    row way: the frame's values go as they are, and what cannot go raises EventError, saying
    why (where the row way would have named it)."""
    try:
        return _place(frame, info, update, event_ids, stamp_millis, as_file=as_file)
    except EventError:
        raise
    except BaseException as exc:  # _RowWay; and e.g. mixed Python objects (polars, pyarrow)
        if not _failed_in_polars(exc):
            raise
        if as_file:
            if isinstance(exc, _RowWay):
                why = str(exc)
            else:
                column = _column_polars_refuses(frame)
                named = f"the column {column!r}: " if column is not None else ""
                why = f"polars cannot take {named or 'it: '}{exc}"
            raise EventError(f"this DataFrame cannot be uploaded as a file: {why}") from None
        return None


def _place(
    frame: Any,
    info: ModelInfo,
    update: bool,
    event_ids: list[str | None] | None,
    stamp_millis: int | None,
    *,
    as_file: bool,
) -> tuple[Any, list[str], Any]:
    """:func:`_placed`'s work: _RowWay (or an error of polars or pyarrow) when the rows must
    go one by one."""
    try:
        import polars as pl  # noqa: PLC0415  (an optional extra)
    except ImportError:
        raise _RowWay("it is written to Parquet by polars: pip install '.[dataframes]'") from None
    ts_col = info.event_ts_col
    foreign = _types_polars_cannot_take(frame)
    if foreign:
        raise _RowWay(f"polars cannot read the column {foreign[0]!r} of type {foreign[1]}")
    if as_file and frame_library(frame) == "pandas":
        frame = _pandas_for_file(frame)
    df = _to_polars(frame, pl)
    source = _source_types(frame)
    if source and [name for name, _ in source] != df.columns:  # polars names "" column_0
        raise _RowWay("polars renames a column (an empty name)")
    if not as_file:
        df = _widen_floats(df, pl)
    for name, dtype in df.schema.items():
        if as_file:
            refused = any(kind in _NOT_IN_FILES for kind, _ in _kinds(dtype))
        else:  # polars writes it as the rows would: a plain value at every depth
            refused = not all(
                kind in (_PLAIN if nested else _TOP_LEVEL) for kind, nested in _kinds(dtype)
            )
        if refused:
            raise _RowWay(f"the column {name!r} holds {dtype} values")
    for name, kind in source:
        made = type(df.schema[name]).__name__
        if kind == "object" and made not in ("String", "Null"):
            # Python objects of several kinds in a pandas column (dates and datetimes, zones
            # that differ, integers and floats, lists, dicts): polars makes them one type,
            # cutting a datetime to a date, moving times to one zone, ints to floats; the row
            # way sends each as it is. A file keeps what polars made, unless times would
            # change.
            if not as_file:
                raise _RowWay(f"the column {name!r} holds Python objects of several kinds")
            if made in ("Date", "Datetime") and not _one_kind_of_time(frame[name]):
                raise _RowWay(
                    f"the column {name!r} holds dates or datetimes of differing kinds or "
                    "zones (one kind and zone: pandas.to_datetime(column, utc=True))"
                )
    if not as_file:
        _check_times(df, pl)
    df, ids, first = _place_ids(df, pl, info, update, event_ids)
    if stamp_millis is not None and ts_col is not None and not update:
        if ts_col not in df.columns:
            stamp = orjson.loads(info.timestamp_json(stamp_millis))
            first.append(pl.lit(stamp).alias(ts_col))
        elif not as_file and _has_nulls(df[ts_col]):
            raise _RowWay("a null time is replaced by the publish time, row by row")
    if first:
        df = df.select(*first, *(pl.col(name) for name in df.columns))
    return df, ids, pl


def _place_ids(
    df: Any, pl: Any, info: ModelInfo, update: bool, event_ids: list[str | None] | None
) -> tuple[Any, list[str], list[Any]]:
    """The frame's ids: the frame (without an id column replaced by ``event_ids``), the ids,
    and the columns to place first (the id column, when given or generated)."""
    id_col = info.event_id_col
    first: list[Any] = []  # columns placed first, as place_columns does
    if id_col is None:
        if update or event_ids is not None:  # the row way raises SchemaMismatchError
            raise _RowWay(f"model {info.name!r} has no event id column")
        ids = [""] * df.height
    elif event_ids is not None:
        if len(event_ids) != df.height:
            raise _RowWay(f"event_ids has {len(event_ids)} values for {df.height} rows")
        missing = sum(event_id is None for event_id in event_ids)  # None: an id to make
        if missing and (update or id_col in df.columns):
            # The row way keys such an update by its row's id column, refuses one without,
            # and takes a new event's own id from its column before it makes one.
            raise _RowWay(f"event_ids has None for rows that may carry their {id_col!r}")
        made = iter(_new_ids(missing, pl).to_list() if missing else ())
        ids = [next(made) if event_id is None else event_id for event_id in event_ids]
        df = df.drop(id_col, strict=False)
        first.append(pl.Series(id_col, ids, dtype=pl.String))
    elif id_col in df.columns:
        id_type = df[id_col].dtype
        if df[id_col].null_count():  # the row way replaces a null id by a new one
            raise _RowWay(f"the id column {id_col!r} holds nulls")
        id_texts = df[id_col].cast(pl.String)
        text_or_integer = id_type.is_integer() or isinstance(id_type, pl.String | pl.Categorical)
        if not text_or_integer:  # the row way refuses each such id by its row
            raise _RowWay(f"the id column {id_col!r} must hold text or integers, not {id_type}")
        if (id_texts == "").any():
            raise _RowWay(f"the id column {id_col!r} holds an empty id")
        ids = id_texts.to_list()
    elif update:  # the row way says so for each
        raise _RowWay(f"an update needs the id column {id_col!r}")
    else:
        generated = _new_ids(df.height, pl)
        ids = generated.to_list()
        first.append(generated.alias(id_col))
    return df, ids, first


def polars_rows(frame: Any) -> list[Mapping[str, Any]]:
    """A polars frame's rows as dicts (the row way), its nanosecond datetime columns as text
    first: a Python datetime holds microseconds, and pandas' and Arrow's rows keep them."""
    import polars as pl  # noqa: PLC0415  (a polars frame: polars is there)

    as_text = [
        _datetime_text(pl, name, aware=dtype.time_zone is not None)
        for name, dtype in frame.schema.items()
        if isinstance(dtype, pl.Datetime) and dtype.time_unit == "ns"
    ]
    rows: list[Mapping[str, Any]] = (frame.with_columns(as_text) if as_text else frame).to_dicts()
    return rows


def _datetime_text(pl: Any, name: str, *, aware: bool) -> Any:
    """A datetime column as ``str()`` writes its values (and so the dict path, as the official
    client does): a fraction only when there is one, of 6 digits, or 9 for nanoseconds (as
    pandas' Timestamp), and the offset when there is a zone."""
    column = pl.col(name)
    zone = "%:z" if aware else ""
    fraction = column.dt.nanosecond()
    return (
        pl.when(fraction == 0)
        .then(column.dt.to_string(f"%Y-%m-%d %H:%M:%S{zone}"))
        .when(fraction % 1000 == 0)
        .then(column.dt.to_string(f"%Y-%m-%d %H:%M:%S%.6f{zone}"))
        .otherwise(column.dt.to_string(f"%Y-%m-%d %H:%M:%S%.9f{zone}"))
        .alias(name)
    )


def _types_polars_cannot_take(frame: Any) -> tuple[str, str] | None:
    """A column (name, type) polars would turn into something else (a pandas Period into its
    ordinal), or cannot read at all (a 256-bit decimal makes it panic, which no ``except
    Exception`` catches); None if none."""
    for name, kind in _source_types(frame):
        if kind.startswith(("period", "interval", "complex")) or "decimal256" in kind:
            return name, kind
    return None


def _source_types(frame: Any) -> list[tuple[str, str]]:
    """A pandas frame's or Arrow table's columns (name, type as text); none for polars."""
    module = frame_library(frame)
    if module == "pandas":
        return [(name, str(kind)) for name, kind in frame.dtypes.items()]
    if module == "pyarrow":
        return [(field.name, str(field.type)) for field in frame.schema]
    return []


def _failed_in_polars(exc: BaseException) -> bool:
    """An error of polars or pyarrow, or a panic in polars' Rust (decimals of more than 38
    digits in a column of objects), which is no Exception; not a cancellation or an exit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class _RowWay(Exception):
    """The frame's rows must go one by one (for a file, which has no row way: why not)."""


# The polars types that polars writes as the row way writes their values; a column of any
# other goes row by row. Left out: Float32 and Float16 (widened first, at the top and in
# lists: see _widen_floats), times of day (polars' fraction differs), decimals (the
# row way writes them exactly), durations, objects, bytes and 128-bit integers (the row way
# refuses them, naming the field). Inside lists and structs, polars writes dates and times
# its own way: only plain values there.
_PLAIN = frozenset(
    {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"}
    | {"Float64", "Boolean", "String", "Null"}
)
_TOP_LEVEL = _PLAIN | {"Categorical", "Enum", "Date", "Datetime"}
# What a Parquet file cannot carry for Fiddler, at any depth (the row way refuses them too).
_NOT_IN_FILES = frozenset(("Object", "Binary", "Duration", "Int128", "UInt128"))


def _kinds(dtype: Any, nested: bool = False) -> Iterator[tuple[str, bool]]:
    """The kinds of value a column of ``dtype`` holds (the name of each polars type that is
    no list, array or struct), each with whether it sits inside one."""
    kind = type(dtype).__name__
    if kind in ("List", "Array"):
        yield from _kinds(dtype.inner, nested=True)
    elif kind == "Struct":
        for field in dtype.fields:
            yield from _kinds(field.dtype, nested=True)
    else:
        yield kind, nested


def _widen_floats(df: Any, pl: Any) -> Any:
    """32- and 16-bit float columns, and lists of them (embeddings), as 64-bit floats: the
    row way sends each value as the double it is (``0.10000000149011612``), where polars
    would write a float32's own shortest form (``0.1``)."""
    narrow = (pl.Float32, pl.Float16) if hasattr(pl, "Float16") else (pl.Float32,)
    widened = [
        pl.col(name).cast(pl.List(pl.Float64) if isinstance(dtype, pl.List) else pl.Float64)
        for name, dtype in df.schema.items()
        if isinstance(dtype, narrow) or (isinstance(dtype, pl.List) and dtype.inner in narrow)
    ]
    return df.with_columns(widened) if widened else df


def _check_times(df: Any, pl: Any) -> None:
    """_RowWay for the datetimes polars would write otherwise than ``str()``: past the year
    9999 (a sign, "+12000-..."), and in a time zone before 1972 or from 2100 on, where its
    zone rules differ from Python's (seconds in old offsets, no summer time after 2099)."""
    for name, dtype in df.schema.items():
        if not isinstance(dtype, pl.Datetime):
            continue
        years = df[name].dt.year()
        first, last = years.min(), years.max()
        if first is None:
            continue
        if last > 9999:
            raise _RowWay(f"the column {name!r} holds times past the year 9999")
        zone = dtype.time_zone
        if zone is not None and zone != "UTC" and (first < 1972 or last >= 2100):
            raise _RowWay(f"the column {name!r} holds times in {zone} before 1972 or after 2099")


def _one_kind_of_time(column: Any) -> bool:
    """Whether a pandas column of Python dates or datetimes holds one kind: all dates, or all
    datetimes in one zone (or none)."""
    kinds = {
        (type(value) is dt.date, str(getattr(value, "tzinfo", None))) for value in column.dropna()
    }
    return len(kinds) <= 1


def _has_nulls(column: Any) -> bool:
    """Nulls, or NaN in a float column (which the row way takes as null too)."""
    return bool(column.null_count()) or (column.dtype.is_float() and bool(column.is_nan().any()))


def _new_ids(count: int, pl: Any) -> Any:
    """``count`` UUID-shaped ids at once: a fresh random prefix for the batch, then the row
    number (decimal digits are hex digits). Unique as :func:`new_event_id`'s are."""
    prefix = new_event_id.random_prefix()
    rows = pl.int_range(0, count, dtype=pl.Int64, eager=True).cast(pl.String).str.zfill(12)
    return (prefix + rows).rename("id")


def _pandas_for_file(frame: Any) -> Any:
    """A pandas frame's columns that polars cannot take as they are, made as the rows send
    them: times at a fixed offset (``+05:30``, which polars cannot name as a zone) moved to
    UTC, the same instants; ``uuid.UUID`` objects (polars makes them bytes) as their text."""
    changed = {}
    for name, dtype in frame.dtypes.items():
        column = frame[name]
        zone = getattr(dtype, "tz", None)
        if isinstance(zone, dt.timezone) and zone != dt.timezone.utc:
            changed[name] = column.dt.tz_convert("UTC")
        elif getattr(dtype, "kind", "") == "O":  # numpy objects (and pandas strings)
            first = column.first_valid_index()
            if first is not None and isinstance(column[first], uuid.UUID):
                changed[name] = column.map(lambda v: str(v) if isinstance(v, uuid.UUID) else v)
    if not changed:
        return frame
    frame = frame.copy(deep=False)  # the caller's frame stays as it was
    for name, column in changed.items():
        frame[name] = column
    return frame


def _column_polars_refuses(frame: Any) -> str | None:
    """The first column of a pandas frame or Arrow table that polars fails to convert on
    its own, to name it in an error; None if none does (or polars is not the one failing)."""
    import polars as pl  # noqa: PLC0415  (only called once polars failed, so it is there)

    library = frame_library(frame)
    if library not in ("pandas", "pyarrow"):
        return None
    for name in _column_names(frame):
        try:
            _to_polars(frame.select([name]) if library == "pyarrow" else frame[[name]], pl)
        except BaseException as exc:  # a panic in polars' Rust is no Exception
            if not _failed_in_polars(exc):
                raise
            return str(name)
    return None


def _to_polars(frame: Any, pl: Any) -> Any:
    module = frame_library(frame)
    if module == "polars":
        return frame
    # From pandas, the index is left out, as to_dict(orient="records") does.
    df = pl.from_arrow(frame) if module == "pyarrow" else pl.from_pandas(frame)
    # polars reads Arrow's 64-bit dates as datetimes: they are dates, as their rows say.
    dates = [name for name, kind in _source_types(frame) if kind.startswith("date64")]
    return df.with_columns(pl.col(dates).cast(pl.Date)) if dates else df
