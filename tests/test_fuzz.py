"""Fuzzing the publish path with hypothesis: any event either raises a clear error at the caller
(and is not queued) or is delivered intact; nothing a caller passes stops the flusher."""

from __future__ import annotations

import math
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fiddler_async import AsyncPublisher, EventError, PublisherConfig

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
