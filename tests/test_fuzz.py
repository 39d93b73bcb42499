"""Fuzzing the publish path with hypothesis: any event either raises a clear error at the caller
(and is not queued) or is delivered intact; nothing a caller passes stops the flusher."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from types import MappingProxyType, SimpleNamespace
from typing import Any, NamedTuple
from unittest.mock import patch

import anyio
import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fiddler_async import AsyncPublisher, EventBatchError, EventError, PublisherConfig
from fiddler_async import publisher as publisher_module
from fiddler_async.encode import new_event_id

from .in_process import TOKEN, InProcessFiddler, body


class Opaque:
    """A value no encoder knows."""


# Values JSON can carry (NaN and infinities become null), and values it cannot.
good = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.nan, math.inf, -math.inf])
    | st.text(max_size=50)
    | st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(10_000, 100_000))
)
bad = (
    st.integers(min_value=2**64)
    | st.binary(max_size=5)
    | st.builds(Opaque)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # lone surrogates
)
# Keys other than the model's typed columns: a wrong type there is the server's refusal to
# make (tests/test_poison.py), not the publish path's.
TYPED = {"customer_id", "age", "predicted_churn", "event_id", "timestamp"}
names = st.text(max_size=12).filter(lambda k: k not in TYPED)


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


def somewhere(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of ``leaves``, alone or inside a list or a mapping."""
    return (
        leaves
        | st.lists(leaves, min_size=1, max_size=3)
        | st.dictionaries(st.text(max_size=8), leaves, min_size=1, max_size=2)
    )


good_events = st.dictionaries(names, nested(good), max_size=6)
bad_events = (
    st.builds(lambda e, k, v: {**e, k: v}, good_events, names, somewhere(bad))  # a bad value
    | st.builds(lambda e, k: {**e, k: 1}, good_events, st.integers())  # a key that is no name
    | nested(good).filter(lambda v: not isinstance(v, dict))  # not a mapping at all
)


def expected(value: Any) -> Any:
    """What the server should receive for a value that was accepted."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: expected(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expected(v) for v in value]
    return value


# Huge strings are the point here; hypothesis warns that their repr is large.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), good_events, bad_events), min_size=1, max_size=20))
def test_every_event_is_refused_clearly_or_delivered_intact(
    draws: list[tuple[bool, dict[str, Any], Any]],
) -> None:
    batch = [(is_good, g if is_good else b) for is_good, g, b in draws]
    inproc = InProcessFiddler()

    async def main() -> None:
        config = PublisherConfig(linger=0)
        async with AsyncPublisher(
            "https://fiddler.test", TOKEN, config=config, transport=inproc.transport()
        ) as pub:
            await pub.resolve("bank_churn", "bank_churn_v2")  # few typed columns
            sent: dict[str, Any] = {}
            refused: list[EventError] = []
            for is_good, event in batch:
                try:
                    event_id = pub.publish_event_nowait("bank_churn", "bank_churn_v2", event)
                except EventError as exc:
                    refused.append(exc)
                    continue
                assert is_good, f"accepted {event!r}"
                sent[event_id] = event
            # Every bad one refused, with a clear message, as a kind a caller expects.
            assert len(refused) == sum(not is_good for is_good, _ in batch) + sum(
                is_good and len(orjson.dumps(e, default=str)) > 4_000_000 for is_good, e in batch
            )
            assert all(str(e) and isinstance(e, TypeError | ValueError) for e in refused)
            assert pub.stats().accepted == len(sent)
            result = await pub.flush(30)
            assert result.complete
            stored = {e["event_id"]: e for e in inproc.stored("bank_churn", "bank_churn_v2")}
            for event_id, event in sent.items():
                got = dict(stored[event_id])
                got.pop("event_id")
                got.pop("timestamp")
                assert got == expected(event), event_id
            # The flusher is still at work after whatever came before.
            pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"age": 1})
            assert (await pub.flush(30)).delivered == 1

    anyio.run(main)


# The short ways of an event (one call, or a batch call's rows at once) must do what the long
# way does, for every mix of what a row brings of its own: the same bodies key for key, the
# same ids returned, the same errors. A row is drawn as (the id given as an argument, the
# value of its id column, the value of its time column, whether it has other fields, whether
# it is too large, whether it is a dict or another mapping, the time given as an argument);
# ABSENT is a column it lacks.
ABSENT = object()
TIME = 1_700_000_000_000
# Times a caller may give, good and bad (the long way's epoch_millis says which).
UTC_PLUS_2 = dt.timezone(dt.timedelta(hours=2))
TIMES = [
    *(TIME, 2.5, np.int64(TIME), True, math.inf, 10**20, pd.NaT),
    *(dt.datetime(2024, 1, 1, 13, 0, 0, 500_000), dt.datetime(2024, 1, 1, tzinfo=UTC_PLUS_2)),
    *(dt.date(2024, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59, 999_999)),
]
ids = st.sampled_from(["id", 'q"\\\t\x00', "ïd", "", 7, uuid.UUID(int=7)])
row_shapes = st.tuples(
    st.none() | ids,
    st.just(ABSENT) | st.none() | st.just(math.nan) | ids,
    st.sampled_from([ABSENT, None, TIME]),
    st.booleans(),
    st.sampled_from([False, False, False, True]),  # too large: rarer, it hides the rest
    st.sampled_from([True, True, True, False]),  # another mapping: rarer, likewise
    st.none() | st.sampled_from(TIMES),
)
SHORT_ROWS = [  # every row of a kind the short ways take: a batch of them goes at once
    (None, ABSENT, ABSENT, True, False, True, None),
    (None, ABSENT, ABSENT, False, False, True, None),
    ("id", ABSENT, ABSENT, True, False, True, None),
    ("id", ABSENT, TIME, True, False, True, None),
    (None, "id", ABSENT, True, False, True, None),
    (None, 7, TIME, True, False, True, None),
    (None, ABSENT, TIME, True, False, True, None),
    ("id", ABSENT, ABSENT, True, False, True, TIME),
    (None, "id", ABSENT, True, False, True, dt.datetime(2024, 1, 1, 13, 0, 0, 500_000)),
]


def shaped_rows(
    shapes: list[tuple[Any, ...]],
) -> tuple[list[Any], list[Any] | None, list[Any] | None]:
    rows: list[Any] = []
    given: list[Any] = []
    for i, (argument, own_id, own_time, fields, large, plain, _) in enumerate(shapes):
        row: dict[str, Any] = {"x": i, "note": "n" * (3000 if large else 3)} if fields else {}
        if own_id is not ABSENT:
            row["id"] = f"{own_id}-{i}" if isinstance(own_id, str) and own_id else own_id
        if own_time is not ABSENT:
            row["ts"] = own_time
        rows.append(row if plain else MappingProxyType(row))
        given.append(f"{argument}-{i}" if isinstance(argument, str) and argument else argument)
    times = [shape[6] for shape in shapes]
    return (
        rows,
        given if any(g is not None for g in given) else None,
        times if any(t is not None for t in times) else None,
    )


class Case(NamedTuple):
    rows: list[Any]
    given: list[Any] | None  # event_ids
    times: list[Any] | None  # event_timestamps
    stamp: bool  # stamp_publish_time
    update: bool  # update_event
    model: str


async def publish_shaped(case: Case, batch: bool) -> tuple[Any, list[dict[str, Any]]]:
    """Publish a case's rows to a fresh in-process emulator, in one batch call or one call
    each: the ids returned (or the errors by position), and the events sent (as inserts, or
    as updates)."""
    rows, given, times, stamp, update, model = case
    inproc = InProcessFiddler()
    config = PublisherConfig(linger=0, max_batch_bytes=2000, stamp_publish_time=stamp)
    async with AsyncPublisher(
        "https://fiddler.test", TOKEN, config=config, transport=inproc.transport()
    ) as pub:
        await pub.resolve("p", model)
        returned: Any
        if batch:
            try:
                returned = await pub.publish_events_batch(
                    "p",
                    model,
                    rows,
                    event_ids=given,
                    event_timestamps=times,
                    update_event=update,
                )
            except EventBatchError as exc:
                returned = {i: type(e) for i, e in exc.errors.items()}
        else:
            returned = []
            for i, row in enumerate(rows):
                event_id = None if given is None else given[i]
                when = None if times is None else times[i]
                try:
                    returned.append(
                        pub.publish_event_nowait(
                            "p",
                            model,
                            row,
                            event_id=event_id,
                            event_timestamp=when,
                            update_event=update,
                        )
                    )
                except EventError as exc:
                    returned.append(type(exc))
        await pub.flush(30)
    requests = inproc.event_requests()
    assert {r.method for r in requests} <= {"PATCH" if update else "POST"}
    return returned, [e for r in requests for e in body(r)["source"]["events"]]


def made_here(value: Any) -> Any:
    """``value`` with each id this process made replaced by a mark."""
    if isinstance(value, str) and value.startswith(new_event_id.prefix):
        return "new"
    if isinstance(value, list | tuple):
        return [made_here(v) for v in value]
    if isinstance(value, dict):
        return {k: made_here(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(row_shapes, min_size=1, max_size=6),
    stamp=st.booleans(),
    update=st.booleans(),
    # noid: no id or time column; idonly: no time column; m: both, with other names and a
    # strftime time format
    model=st.sampled_from(["loose", "loose", "loose", "noid", "idonly", "m"]),
)
@example(shapes=SHORT_ROWS, stamp=True, update=False, model="loose")
@example(shapes=SHORT_ROWS, stamp=False, update=False, model="loose")
@example(shapes=SHORT_ROWS[2:6], stamp=True, update=True, model="loose")  # rows with an id
@example(shapes=[SHORT_ROWS[2], SHORT_ROWS[0]], stamp=True, update=True, model="loose")
@example(shapes=SHORT_ROWS[2:6], stamp=True, update=True, model="noid")
@example(shapes=SHORT_ROWS[7:], stamp=True, update=True, model="loose")
@example(shapes=SHORT_ROWS[7:], stamp=True, update=False, model="m")
@example(shapes=SHORT_ROWS[7:], stamp=True, update=True, model="idonly")
@example(
    shapes=[SHORT_ROWS[0], ("ïd", ABSENT, ABSENT, True, False, True, None)],
    stamp=True,
    update=False,
    model="loose",
)
def test_the_short_ways_do_what_the_long_way_does(
    anyio_backend: str, shapes: list[tuple[Any, ...]], stamp: bool, update: bool, model: str
) -> None:
    case = Case(*shaped_rows(shapes), stamp, update, model)
    frozen = SimpleNamespace(time=lambda: 1_700_000_000.123)
    long_way = [
        patch.object(AsyncPublisher, name, lambda *_: None)
        for name in ("_prepare_new", "_prepare_update", "_prepare_rows")
    ]
    with patch.object(publisher_module, "time", frozen):
        for batch in (True, False):
            short = anyio.run(publish_shaped, case, batch, backend=anyio_backend)
            with long_way[0], long_way[1], long_way[2]:
                long = anyio.run(publish_shaped, case, batch, backend=anyio_backend)
            assert made_here(short) == made_here(long), batch
            # Key for key, in order (a dict's equality ignores the order).
            assert [list(e) for e in short[1]] == [list(e) for e in long[1]], batch
            if model == "loose" and isinstance(short[0], list):  # each id as sent
                ids = [r for r in short[0] if isinstance(r, str)]
                assert ids == [str(e["id"]) for e in short[1]], batch
