"""Event rows from files (CSV, JSON Lines, Parquet), given the types of a model's columns.

Used by the ``fiddler-async publish`` command and by the emulator's file publishing. A row that
cannot be read or typed is reported with its line and column, never silently skipped or sent.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import math
import re
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .destination import time_style
from .encode import reads_as_seconds

__all__ = ["FORMATS", "RowError", "coerce_row", "count_rows", "file_format", "read_rows"]

FORMATS = ("csv", "jsonl", "parquet")
_NUMERIC = ("int", "float")


class RowError(ValueError):
    """A row that cannot be published as it is; ``line`` is 1-based, ``column`` may be None."""

    def __init__(self, line: int, message: str, column: str | None = None) -> None:
        named = column is not None and repr(column) in message  # e.g. "missing column(s) 'x'"
        where = f"line {line}" + (f", column {column!r}" if column and not named else "")
        super().__init__(f"{where}: {message}")
        self.line = line
        self.column = column


def file_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    fmt = {"ndjson": "jsonl", "json": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unknown format {suffix!r}; use .csv, .jsonl or .parquet")
    return fmt


def read_rows(
    stream: IO[bytes], fmt: str
) -> Generator[tuple[int, dict[str, Any] | RowError], None, None]:
    """Yield (line, row) for each row, or (line, RowError) for one that cannot be read."""
    if fmt == "csv":
        yield from _csv_rows(stream)
    elif fmt == "jsonl":
        yield from _jsonl_rows(stream)
    elif fmt == "parquet":
        yield from _parquet_rows(stream)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def count_rows(path: str | Path) -> int:
    """How many rows a file holds (for progress), cheaply."""
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as stream:
        if fmt != "csv":
            return sum(1 for line in stream if line.strip())
        # Records, not lines: a quoted value may hold line breaks, and a line may end in a
        # bare CR. Blank lines are no records; the first record is the header.
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader, records = csv.reader(text), 0
        while True:
            try:
                records += bool(next(reader))
            except StopIteration:
                return max(0, records - 1)
            except csv.Error:  # a bad record is still one
                records += 1


# A CSV field may be as large as an event (csv's default bound is 128 KiB). The bound is the
# csv module's, for the whole process: only ever raised here, never lowered.
_CSV_FIELD_LIMIT = 4 * 1024 * 1024


def _csv_rows(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    # utf-8-sig: a byte-order mark (Excel's) is not part of the first column's name;
    # surrogateescape: a row that is not UTF-8 is reported alone (by coerce_row), not the file.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    # A plain reader, not a DictReader: blank lines must count in the line numbers, and a
    # name twice in the header must not keep only its last value. strict: a stray quote is an
    # error, not data.
    reader = csv.reader(text, strict=True)
    try:
        names: list[str] | None = []
        while names == []:  # the header: the first line that is not blank
            names = next(reader, None)
        if names is None:
            return  # nothing but blank lines
        # Empty names (a spreadsheet's trailing commas) are no columns anyone meant.
        twice = _twice(name for name in names if name)
        if twice:
            line = reader.line_num
            yield line, RowError(line, f"the header names {twice} more than once")
            return
        ended = reader.line_num  # the line the previous row ended on
        while True:
            line = ended + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # the reader goes on after the bad row
                fields, problem = None, f"malformed CSV: {exc}"
            spans, ended = reader.line_num - line, max(ended, reader.line_num)
            hint = (
                f" (a quoted value runs on to line {ended}: a missing quote?)" if spans > 0 else ""
            )
            if fields is None:
                if problem.endswith("unexpected end of data"):
                    hint = " (a quote opened in this row never closes)"
                yield line, RowError(line, f"{problem}{hint}")
            elif not fields:
                continue  # a blank line
            elif len(fields) > len(names):
                yield line, RowError(line, f"more fields than the header's {len(names)}{hint}")
            elif len(fields) < len(names):
                missing = names[len(fields) :]
                yield line, RowError(line, f"too few fields: no value for {missing}{hint}")
            else:
                yield line, dict(zip(names, fields, strict=True))
    except (csv.Error, UnicodeDecodeError) as exc:  # the header itself
        yield reader.line_num, RowError(reader.line_num, f"malformed CSV: {exc}")
    finally:
        text.detach()


def _jsonl_rows(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    first = True
    for line, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw, object_pairs_hook=_once_each)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError; nested too deeply
            if first and raw.lstrip(b"\xef\xbb\xbf \t").startswith(b"["):
                # The start of an array spread over lines: a .json file, not JSON Lines.
                problem = "the file holds a JSON array, not JSON Lines (one object a line)"
                yield line, RowError(line, problem)
                return
            row = RowError(line, f"malformed JSON: {exc}")
        first = False
        if isinstance(row, dict | RowError):
            yield line, row
        else:
            yield line, RowError(line, f"a line must hold a JSON object, not {type(row).__name__}")


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if it names a member twice (as a CSV header may not)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        raise ValueError(f"{_twice(name for name, _ in pairs)} named twice")
    return found


def _twice(names: Iterable[str]) -> list[str]:
    """The names that come more than once, sorted."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def _parquet_rows(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    parquet = pq.ParquetFile(stream)
    twice = _twice(parquet.schema_arrow.names)
    if twice:  # a row as a dict would keep only the last
        yield 1, RowError(1, f"the file names the columns {twice} more than once")
        return
    line = 0
    for batch in parquet.iter_batches(batch_size=10_000):
        try:
            rows: list[dict[str, Any] | RowError] = batch.to_pylist()
        except Exception:  # a value Python cannot hold (a year past 9999): in which row?
            rows = [_parquet_row(batch, index, line + index + 1) for index in range(len(batch))]
        for row in rows:
            line += 1
            yield line, row


def _parquet_row(batch: Any, index: int, line: int) -> dict[str, Any] | RowError:
    try:
        return dict(batch.slice(index, 1).to_pylist()[0])
    except Exception as exc:  # pyarrow's errors, OverflowError, ValueError...
        return RowError(line, f"cannot read this row: {type(exc).__name__}: {exc}")


def _from_text(data_type: str, text: str) -> Any:
    if data_type == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if data_type == "int":
        # Read exactly ("38", "38.0", "1e3"): through a float, digits past 2**53 would change.
        try:
            number = decimal.Decimal(text)
        except decimal.InvalidOperation:
            raise ValueError(f"{text!r} is not a number") from None
        if not _integral_decimal(number):
            raise ValueError(f"{text!r} is not an integer")
        # (adjusted() is the exponent of the first digit: int() of 1e1000000000 would hang)
        if (number and number.adjusted() > 19) or not -(2**63) <= int(number) < 2**64:
            raise ValueError(f"{text!r} is out of the 64-bit integer range")
        return int(number)
    if data_type == "bool":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if data_type == "vector":
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list):
            raise ValueError(f"{text!r} is not a list")
        return value
    return text


_ACCEPTED: dict[str, tuple[type, ...]] = {
    "float": (int, float, decimal.Decimal),  # a Parquet decimal column
    "bool": (bool,),
    "str": (str,),
    "category": (str, int, bool, float),
    "timestamp": (str, int, float, dt.date),  # a datetime from Parquet too
    "vector": (list,),
}


def type_problem(data_type: str, value: Any, ts_format: str | None = None) -> str | None:
    """Why ``value`` does not fit a column of ``data_type`` (None when it does). The one check
    of column types, used by the emulator on what it receives and by the CLI before sending.
    A time given as text reads as ISO 8601 (a date first), or by the model's ``ts_format``."""
    if value is None:
        return None
    if data_type == "timestamp" and isinstance(value, bool | str):
        if isinstance(value, str) and _reads_as_time(value, ts_format):
            return _seconds_problem(float(value), ts_format) if _EPOCH.fullmatch(value) else None
        return f"expected a time, got {type(value).__name__} {value!r}"
    if data_type == "timestamp" and isinstance(value, int | float):
        return _seconds_problem(value, ts_format)
    if data_type == "int":  # JSON has one number type: 38.0 is an integer value too
        integral = (
            isinstance(value, int)
            or (isinstance(value, float) and value.is_integer())
            or (isinstance(value, decimal.Decimal) and _integral_decimal(value))
        )
        if isinstance(value, bool) or not integral:
            return f"expected int, got {type(value).__name__} {value!r}"
        return None
    if isinstance(value, bool) and data_type == "float":
        return f"expected float, got bool {value!r}"
    if not isinstance(value, _ACCEPTED.get(data_type, (object,))):
        return f"expected {data_type}, got {type(value).__name__} {value!r}"
    return None


# ISO 8601 as data exports write it: a date, then maybe a time (to the hour, the minute or
# the second, with a fraction) and a zone (Z, an offset, UTC or GMT as BigQuery writes them).
_ISO_TIME = re.compile(
    r"\s*(?P<year>[+-]?\d{4,})-(?P<month>\d{2})-(?P<day>\d{2})"
    r"(?:[Tt ](?P<hour>\d{2})(?::(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,]\d+)?)?)?"
    r"\s*(?:[Zz]|(?i:UTC|GMT)|[+-](?P<offset_hours>\d{2})(?::?(?P<offset_minutes>\d{2}))?)?)?"
    r"\s*"
)
_EPOCH = re.compile(r"\s*-?\d+(\.\d+)?\s*")  # as a CSV cell holds epoch milliseconds


def _seconds_problem(number: float, ts_format: str | None) -> str | None:
    """Epoch seconds where the model's times are epoch milliseconds: filed in 1970. (A
    model whose times are seconds, or text in a strftime format, is not asked.)"""
    if time_style(ts_format) != "millis" or not reads_as_seconds(number):
        return None
    return f"{number:.15g} looks like epoch seconds; the model's times are epoch milliseconds"


def _is_iso_time(text: str) -> bool:
    """Whether ``text`` is an ISO 8601 time that exists (no 2024-13-45 99:99)."""
    found = _ISO_TIME.fullmatch(text)
    if found is None:
        return False
    year, month, day = (int(found[name]) for name in ("year", "month", "day"))
    if not 1 <= year <= 9999:  # past what a date holds: checked in a year as leap as it
        year = 2000 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 2001
    try:
        dt.date(year, month, day)
    except ValueError:
        return False
    hour, minute, second, offset_hours, offset_minutes = (
        int(found[name] or 0)
        for name in ("hour", "minute", "second", "offset_hours", "offset_minutes")
    )
    return (
        hour <= 23 and minute <= 59 and second <= 59 and offset_hours <= 23 and offset_minutes <= 59
    )


def _reads_as_time(text: str, ts_format: str | None) -> bool:
    if _is_iso_time(text) or _EPOCH.fullmatch(text):
        return True
    if ts_format and "%" in ts_format:
        try:
            dt.datetime.strptime(text, ts_format)
        except ValueError:
            return False
        return True
    return False


def _integral_decimal(value: decimal.Decimal) -> bool:
    return value.is_finite() and value == value.to_integral_value()


def coerce_row(
    line: int,
    row: Mapping[str, Any],
    types: Mapping[str, str],
    required: tuple[str, ...] = (),
    ts_format: str | None = None,
) -> dict[str, Any]:
    """The row with the model's types: text converted, empty text and NaN as null. Raises
    RowError naming the column for a value that does not fit, or a required column missing."""
    missing = [column for column in required if column not in row]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise RowError(line, f"missing column(s) {names}", missing[0])
    out: dict[str, Any] = {}
    for column, raw in row.items():
        data_type = types.get(column, "")
        if raw is None or raw == "" or (isinstance(raw, float) and math.isnan(raw)):
            out[column] = None
            continue
        if isinstance(raw, str) and not raw.isascii() and not _is_utf8(raw):
            raise RowError(line, "not valid UTF-8 text", column)
        value = raw
        try:
            if isinstance(raw, str) and data_type in (*_NUMERIC, "bool", "vector"):
                value = _from_text(data_type, raw)
        except ValueError as exc:
            raise RowError(line, str(exc), column) from None
        problem = type_problem(data_type, value, ts_format)
        if problem:
            raise RowError(line, problem, column)
        out[column] = int(value) if data_type == "int" and isinstance(value, float) else value
    return out


def _is_utf8(text: str) -> bool:
    """False for text read with ``surrogateescape`` from bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
