"""Fuzzing the publish path with hypothesis: any event either raises a clear error at the caller
(and is not queued) or is delivered intact; nothing a caller passes stops the flusher."""

from __future__ import annotations

import math
from types import MappingProxyType, SimpleNamespace
from typing import Any
from unittest.mock import patch

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fiddler_async import AsyncPublisher, EventError, PublisherConfig
from fiddler_async import publisher as publisher_module
from fiddler_async.encode import new_event_id

from .in_process import TOKEN, InProcessFiddler


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


# The short ways of a new event (one call, or a batch call's rows at once) must write what the
# long way writes, for every mix of what a row brings of its own. A row is drawn as (the id
# given as an argument, the value of its id column, its time column, whether it has other
# fields, whether it is a dict or another mapping); ABSENT is a column the row does not have.
ABSENT = object()
TIME = 1_700_000_000_000
row_shapes = st.tuples(
    st.sampled_from([None, "given", "gïven"]),  # the second is not ASCII: the long way
    st.sampled_from([ABSENT, "own", None]),  # None: a null id, replaced by a new one
    st.sampled_from([ABSENT, TIME]),
    st.booleans(),
    st.booleans(),
)
SHORT_ROWS = [
    (None, ABSENT, ABSENT, True, True),
    (None, ABSENT, ABSENT, False, True),
    ("given", ABSENT, ABSENT, True, True),
    ("given", ABSENT, TIME, True, True),
    (None, "own", ABSENT, True, True),
    (None, "own", TIME, True, True),
    (None, ABSENT, TIME, True, True),
]


def shaped_rows(shapes: list[tuple[Any, ...]]) -> tuple[list[Any], list[Any] | None]:
    rows: list[Any] = []
    for i, (_, own_id, own_time, fields, plain) in enumerate(shapes):
        row: dict[str, Any] = {"customer_id": f"c{i}", "age": i} if fields else {}
        if own_id is not ABSENT:
            row["event_id"] = own_id if own_id is None else f"{own_id}-{i}"
        if own_time is not ABSENT:
            row["timestamp"] = own_time + i
        rows.append(row if plain else MappingProxyType(row))
    given = [None if g is None else f"{g}-{i}" for i, (g, *_) in enumerate(shapes)]
    return rows, given if any(given) else None


async def publish_shaped(
    rows: list[Any], given: list[Any] | None, way: str
) -> tuple[list[str], list[dict[str, Any]]]:
    """Publish ``rows`` to a fresh in-process emulator; the ids returned, and what it stored."""
    inproc = InProcessFiddler()
    config = PublisherConfig(linger=0)
    async with AsyncPublisher(
        "https://fiddler.test", TOKEN, config=config, transport=inproc.transport()
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn_v2")
        if way == "batch":
            ids = await pub.publish_events_batch(
                "bank_churn", "bank_churn_v2", rows, event_ids=given
            )
        else:
            ids = [
                pub.publish_event_nowait(
                    "bank_churn", "bank_churn_v2", row, event_id=None if given is None else given[i]
                )
                for i, row in enumerate(rows)
            ]
        assert (await pub.flush(30)).delivered == len(rows)
    return ids, inproc.stored("bank_churn", "bank_churn_v2")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(row_shapes, min_size=1, max_size=8))
@example(shapes=[SHORT_ROWS[0], ("gïven", ABSENT, ABSENT, True, True)])
@example(shapes=SHORT_ROWS)  # every row of a short way's kind: the batch goes at once
def test_the_short_ways_write_what_the_long_way_writes(
    anyio_backend: str, shapes: list[tuple[Any, ...]]
) -> None:
    rows, given = shaped_rows(shapes)
    frozen = SimpleNamespace(time=lambda: 1_700_000_000.123)

    def made(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events with each id this process made replaced by a mark."""
        return [
            {**e, "event_id": "new"} if e["event_id"].startswith(new_event_id.prefix) else e
            for e in events
        ]

    results = {}
    with patch.object(publisher_module, "time", frozen):
        for way in ("batch", "one by one"):
            results[way] = anyio.run(publish_shaped, rows, given, way, backend=anyio_backend)
        with (
            patch.object(AsyncPublisher, "_prepare_new", lambda *_: None),
            patch.object(AsyncPublisher, "_prepare_rows_new", lambda *_: None),
        ):
            results["long"] = anyio.run(publish_shaped, rows, given, "batch", backend=anyio_backend)
    for ids, stored in results.values():
        assert ids == [e["event_id"] for e in stored]
    expected = made(results["long"][1])
    for way in ("batch", "one by one"):
        assert made(results[way][1]) == expected, way
        assert [list(e) for e in results[way][1]] == [list(e) for e in results["long"][1]], way
