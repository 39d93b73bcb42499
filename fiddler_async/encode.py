"""Turning a user's event into wire-ready JSON bytes, at publish time.

Encoding at publish time does three jobs at once: it snapshots the event (changing the caller's
dict afterwards changes nothing that is sent), it measures the event for the byte budgets, and
it rejects a value that cannot be sent while the caller is still there to hear about it.

What is encoded, and how (the official client crashes on several of these):

- numpy scalars and arrays: their Python values (orjson's native numpy support, ``tolist()``
  for arrays it cannot take directly); numpy's ``datetime64`` as orjson writes it natively, in
  ISO 8601 to the microsecond (``"2024-01-02T03:04:05.678000"``), and its ``NaT`` as ``null``
  (but orjson writes a NaT of nanosecond unit itself, as ``"1677-09-21T00:12:43.145224"``:
  it never reaches us);
- ``float('nan')``, infinities, ``pandas.NA``, ``pandas.NaT``: ``null``;
- ``datetime``, ``date``, ``time``, ``pandas.Timestamp``: ``str(value)``, as the official
  client sends them (``"2024-01-02 03:04:05.678000"``);
- ``Decimal``: an exact JSON number (NaN and infinities ``null``; one past a double's range
  cannot be read as a number by Fiddler, or by orjson: refused); ``UUID``: its string; sets:
  lists.

Anything else raises :class:`EventEncodeError` naming the field.
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import math
import numbers
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from .exceptions import EventEncodeError, EventError, EventTooLargeError

__all__ = [
    "ENCODE_OPTIONS",
    "compact",
    "encode_default",
    "encode_event",
    "epoch_millis",
    "event_id_text",
    "is_null",
    "new_event_id",
    "splice_members",
]

# What encode_event passes to orjson. Public for the publish hot paths, which call orjson with
# them directly (one Python call fewer per event) and fall back to encode_event for its error.
_LARGEST_DOUBLE = decimal.Decimal(sys.float_info.max)
ENCODE_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_DATETIME
# encode_event's second try, after orjson's numpy support refused a value (a datetime64 NaT):
# every numpy value then goes through encode_default.
_NUMPY_BY_DEFAULT = orjson.OPT_PASSTHROUGH_DATETIME
_dumps = orjson.dumps
# orjson refuses anything nested deeper than this. Our own walks of an event stop there too
# (rather than meet Python's recursion limit), and the error names the column so deep.
_MAX_DEPTH = 254


def encode_default(value: Any) -> Any:
    """orjson's fallback for the types it does not encode natively (or the way we want)."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        # pandas.NaT is a datetime that is not equal to itself.
        return None if value != value else str(value)  # noqa: PLR0124
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        # adjusted(): the exponent, a cheap first look (abs() would round, and overflow)
        if value.adjusted() >= 308 and value.copy_abs() > _LARGEST_DOUBLE:
            raise TypeError(f"the Decimal {value} is past the range of a double")
        return orjson.Fragment(str(value).encode())
    module = type(value).__module__
    if module == "numpy":
        if getattr(value, "dtype", None) is not None and value.dtype.kind == "M":
            return _iso_times(value.astype("datetime64[us]").tolist())
        try:  # as orjson's numpy support writes it (a float32 in its shortest form)...
            return orjson.Fragment(_dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))
        except TypeError:  # ...or, what it cannot take (non-contiguous, object dtype), as lists
            return value.tolist() if hasattr(value, "tolist") else value.item()
    if module.startswith("pandas") and type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode a value of type {type(value).__qualname__!r}")


def encode_event(event: Mapping[Any, Any]) -> bytes:
    """The event as compact JSON bytes (an object); EventEncodeError names a bad field."""
    if not isinstance(event, dict):
        if not isinstance(event, Mapping):
            raise EventEncodeError(
                "an event must be a mapping of column name to value, "
                f"got {type(event).__qualname__!r}"
            )
        event = dict(event)
    try:
        return _dumps(event, default=encode_default, option=ENCODE_OPTIONS)
    except TypeError:
        pass
    # The rare cases, tried only now that the usual way failed: numpy values orjson refuses
    # (datetime64's NaT), and column names of a str subclass (a StrEnum, numpy.str_)...
    if any(type(key) is not str and isinstance(key, str) for key in event):
        event = {str.__str__(k) if isinstance(k, str) else k: v for k, v in event.items()}
    try:
        return _dumps(event, default=encode_default, option=_NUMPY_BY_DEFAULT)
    except TypeError:
        pass
    # ...and such keys deeper (class probabilities keyed by a classifier's ``classes_``),
    # which take a walk over every nested value.
    try:
        return _dumps(_plain_keys(event, 0), default=encode_default, option=_NUMPY_BY_DEFAULT)
    except TypeError as exc:
        raise _explain(event, exc) from None


def _plain_keys(value: Any, depth: int) -> Any:
    """``value`` with the keys of a str subclass in its mappings made plain strings."""
    if depth > _MAX_DEPTH:
        return value  # too deep for orjson in any case; _explain says so
    if isinstance(value, Mapping):
        return {
            str.__str__(k) if isinstance(k, str) else k: _plain_keys(v, depth + 1)
            for k, v in value.items()
        }
    if type(value) is list or type(value) is tuple:
        return [_plain_keys(item, depth + 1) for item in value]
    return value


def _iso_times(value: Any) -> Any:
    """numpy datetimes made datetimes by ``tolist()`` (nested as the array was) as orjson
    writes numpy's own: ISO 8601 with a ``T``; NaT (None there) stays None."""
    if isinstance(value, list):
        return [_iso_times(item) for item in value]
    return None if value is None else value.isoformat()


def _explain(event: Mapping[Any, Any], exc: TypeError) -> EventEncodeError:
    """Find the first field that fails to encode, for an error message that names it."""
    path, reason = _find_bad_value(event, "", set(), 0, None)
    if path is None:  # Only the whole failed (e.g. nesting too deep): report orjson's reason.
        return EventEncodeError(f"event cannot be encoded: {exc}")
    return EventEncodeError(f"event field {path!r} cannot be encoded: {reason}", field=path)


def _find_bad_value(
    value: Any, path: str, within: set[int], depth: int, column: str | None
) -> tuple[str | None, str]:
    """The path of the first value that cannot be encoded, and why. ``within`` holds the
    containers on the way down to ``value``: one found again is a cycle, not infinite depth.
    A container whose items all encode is itself the value (a namedtuple, which orjson
    refuses whole). A value nested too deeply is named by its ``column``."""
    if depth > _MAX_DEPTH:
        return column, f"it is nested more than {_MAX_DEPTH} levels deep"
    try:
        _dumps(_plain_keys(value, depth), default=encode_default, option=_NUMPY_BY_DEFAULT)
    except TypeError as exc:
        reason = str(exc.__cause__ or exc)
    else:
        return None, ""
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in within:
            return path or "(the event)", "it contains itself (a circular reference)"
        within.add(id(value))
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            if isinstance(value, Mapping):
                if not isinstance(key, str):
                    where = f"{path}[{key!r}]" if path else repr(key)
                    kind = type(key).__qualname__
                    names = "keys" if path else "column names"
                    return where, f"{names} must be plain strings, got {kind!r}"
                where = f"{path}.{key}" if path else key
                if not key.isascii():
                    try:
                        key.encode()
                    except UnicodeEncodeError:
                        named = where.encode("utf-8", "backslashreplace").decode()
                        return named, "the name is not valid UTF-8 (a lone surrogate)"

            else:
                where = f"{path}[{key}]"
            found = _find_bad_value(item, where, within, depth + 1, column or where)
            if found[0] is not None:
                return found
        within.discard(id(value))
    if "recursion limit" in reason.lower():  # orjson's word for too deep
        if column is None and isinstance(value, Mapping):
            # Each column encodes alone, one level shallower than in the event: name the
            # first that does not at its depth in the event.
            column = next((str(k) for k, v in value.items() if not _encodes([v])), None)
        return column or path or None, f"it is nested more than {_MAX_DEPTH} levels deep"
    return path or None, reason


def _encodes(value: Any) -> bool:
    try:
        _dumps(value, default=encode_default, option=_NUMPY_BY_DEFAULT)
    except TypeError:
        return False
    return True


def compact(body: bytes) -> bytes:
    """A copy of exactly its length, for keeping in the queue. orjson's result holds on to a
    buffer of several kilobytes whatever its length: 100,000 queued events would hold ~400 MB
    instead of ~30 MB. The copy costs ~0.1 µs."""
    return memoryview(body).tobytes()


def splice_members(body: bytes, members: list[bytes]) -> bytes:
    """Put ``members`` (each ``"name":value``) first into the encoded object ``body``; the
    result is always a new object of exactly its length (see :func:`compact`)."""
    if not members:
        return compact(body)
    head = b",".join(members)
    if body == b"{}":
        return b"{" + head + b"}"
    return b"{" + head + b"," + body[1:]


# The times a datetime can hold (years 1 to 9999), in epoch milliseconds.
_MIN_MILLIS, _MAX_MILLIS = -62_135_596_800_000, 253_402_300_799_999
# Epoch seconds since March 1973 (what time.time() gives) read as milliseconds fall here, in
# 1970-01-02 to 1973-03-03: a time no monitored event has, which would file it out of sight.
_SECONDS_FROM, _SECONDS_UNTIL = 100_000_000, 100_000_000_000


def reads_as_seconds(number: float) -> bool:
    """Whether a time in epoch milliseconds is, it seems, epoch seconds since 1973."""
    return _SECONDS_FROM <= number < _SECONDS_UNTIL


def check_event_size(body: bytes, limit: int, *, placed: bool = False) -> None:
    """EventTooLargeError unless ``body`` and its comma fit a request of ``limit`` bytes;
    ``placed``: measured once its id and time were placed, after its model was known."""
    if len(body) + 1 > limit:
        when = " once its id and time were placed" if placed else ""
        raise EventTooLargeError(
            f"event is {len(body)} bytes encoded{when}; max_batch_bytes is {limit}"
        )


def epoch_millis(value: object, field: str = "event_timestamp") -> int:
    """Epoch milliseconds from a number (already ms; numpy's too) or a datetime (naive means
    UTC; numpy's ``datetime64`` too), within years 1 to 9999 (what a time column's format can
    write). A number that reads as epoch seconds since 1973 is refused, not filed in 1970."""
    if type(value) is int and _SECONDS_UNTIL <= value <= _MAX_MILLIS:  # the usual: no more checks
        return value
    if isinstance(value, dt.datetime):
        if value != value:  # noqa: PLR0124  (pandas.NaT)
            raise EventError(f"{field} must be a time, got NaT")
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        millis = round(value.timestamp() * 1000)
        if not _MIN_MILLIS <= millis <= _MAX_MILLIS:  # rounded up past the year 9999
            raise EventError(f"{field} must be a time between years 1 and 9999, got {value}")
        return millis
    number = value
    if not isinstance(value, (int, float)) and isinstance(value, numbers.Real):  # numpy's
        if type(value).__name__ == "timedelta64":  # it calls itself an integer: not a time
            number = None
        else:
            number = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        if not (math.isfinite(number) and _MIN_MILLIS <= number <= _MAX_MILLIS):
            raise EventError(
                f"{field} must be epoch milliseconds between years 1 and 9999, got {value!r}"
            )
        if reads_as_seconds(number):
            epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
            as_seconds = epoch + dt.timedelta(seconds=number)
            as_millis = epoch + dt.timedelta(milliseconds=number)
            raise EventError(
                f"{field} must be epoch milliseconds: {value!r} looks like epoch seconds "
                f"({as_seconds:%Y-%m-%d}; as milliseconds it is {as_millis:%Y-%m-%d}). "
                "Pass int(time.time() * 1000), or a datetime"
            )
        return round(number)
    if isinstance(value, dt.date):
        return epoch_millis(dt.datetime(value.year, value.month, value.day), field)
    if type(value).__name__ == "datetime64" and hasattr(value, "astype"):
        # numpy's, as a datetime column's to_numpy() gives them (numpy is not imported: only
        # its values get here). Read as a datetime, so that both round alike (nanoseconds are
        # cut to microseconds first).
        if value != value:  # noqa: PLR0124  (NaT)
            raise EventError(f"{field} must be a time, got NaT")
        # The year first: a far time in a coarse unit wraps around silently when cast finer.
        if not 1 <= int(value.astype("datetime64[Y]").astype("int64")) + 1970 <= 9999:
            raise EventError(f"{field} must be a time between years 1 and 9999, got {value}")
        return epoch_millis(value.astype("datetime64[us]").item(), field)  # a datetime
    raise EventEncodeError(
        f"{field} must be epoch milliseconds or a datetime, got {type(value).__qualname__!r}",
        field=field,
    )


def is_null(value: object) -> bool:
    """None, or a null of numpy/pandas: NaN and NaT are unequal to themselves, and pandas.NA
    has no truth value. An array is not a null, even of one NaN."""
    if value is None:
        return True
    try:
        unequal = value != value  # noqa: PLR0124
        return getattr(unequal, "shape", ()) == () and bool(unequal)  # an array's has a shape
    except (TypeError, ArithmeticError):  # pandas.NA; Decimal's signalling NaN
        return True


def event_id_text(value: object, field: str = "event_id") -> str:
    """An event id as the text it is sent and returned as: a string, an integer (numpy's
    too) or a UUID. Anything else is refused, naming ``field`` (the argument, or the model's
    id column), rather than sent as its ``str()`` (a float's ``1.0`` would never match a later
    update's ``1``)."""
    name = field if field == "event_id" else f"the id column {field!r}"
    if isinstance(value, str):
        text = str.__str__(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        text = str(int(value))
    elif isinstance(value, uuid.UUID):
        text = str(value)
    else:
        hint = ""
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            hint = " (a pandas column of integers with missing values is float: use 'Int64')"
        raise EventEncodeError(
            f"{name} must be a string, an integer or a UUID, got "
            f"{type(value).__qualname__!r}{hint}",
            field=field,
        )
    if not text:
        raise EventEncodeError(f"{name} must not be empty", field=field)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate: JSON cannot carry it
            raise EventEncodeError(f"{name} is not valid Unicode: {exc}", field=field) from exc
    return text


class _EventIds:
    """UUID-shaped event ids, unique per process and cheap: a random prefix and a counter.

    ``uuid.uuid4()`` costs about a microsecond, most of the publish budget. A random 76-bit prefix
    per process (renewed in a forked child) plus a 48-bit counter keeps ids unique and well-formed
    at a fraction of that.
    """

    MASK = (1 << 48) - 1
    LOW = tuple(b"%02x" % low for low in range(256))
    LOW_TEXT = tuple(f"{low:02x}" for low in range(256))
    """An id's last two counter digits, for the hot paths that keep the first ten for 256
    ids (formatting all twelve for each id was a tenth of a batch call's work)."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        # Plain attributes, read by the hot paths that build ids in place (the publisher's
        # short ways for new events, which keep prefix_bytes in a cache checked by identity):
        # the id is the prefix and the counter's low 48 bits in 12 hex digits.
        self.prefix = self.random_prefix()
        self.prefix_bytes = self.prefix.encode()
        self.counter: Iterator[int] = itertools.count(int(uuid.uuid4().hex[20:], 16))

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter) & self.MASK:012x}"

    @staticmethod
    def random_prefix() -> str:
        """A fresh random prefix, for a batch of ids numbered by the caller (12 hex digits)."""
        r = uuid.uuid4().hex
        return f"{r[:8]}-{r[8:12]}-4{r[13:16]}-{'89ab'[int(r[16], 16) & 3]}{r[17:20]}-"


new_event_id = _EventIds()
