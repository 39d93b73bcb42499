"""What only asyncio can do to a publisher: cancel a task natively, as servers do at shutdown."""

from __future__ import annotations

import asyncio

import pytest

from fiddler_async import PublisherClosedError
from fiddler_async.emulator import Emulator

from .conftest import bank_event, eventually, loopback_publisher


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_natively_cancelled_close_still_closes(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["hang"])
    pub = loopback_publisher(fiddler)
    await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    await eventually(lambda: pub.stats().in_flight_requests == 1)
    closing = asyncio.ensure_future(pub.aclose(30))
    await asyncio.sleep(0.05)
    closing.cancel()  # e.g. asyncio.wait_for, a TaskGroup, a server's shutdown
    with pytest.raises(asyncio.CancelledError):
        await closing
    result = await asyncio.wait_for(pub.aclose(1), 2)  # closed already: answers at once
    assert (result.dropped, result.pending) == (1, 0)
    with pytest.raises(PublisherClosedError):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())


def test_a_models_first_event_from_a_plain_loop_callback(fiddler: Emulator) -> None:
    """A loop callback has no task: the model's early lookup is left to its first batch,
    instead of anyio's error out of the publish call. (A program of asyncio's own: under
    anyio's runner, a callback passes for a task.)"""
    outcome: list[object] = []

    async def main() -> None:
        def callback() -> None:
            try:
                outcome.append(pub.publish_event_nowait("bank_churn", "bank_churn", bank_event()))
            except Exception as exc:  # the test's report of it
                outcome.append(exc)

        async with loopback_publisher(fiddler) as pub:
            asyncio.get_running_loop().call_soon(callback)
            await eventually(lambda: bool(outcome))
            assert (await pub.flush(5)).delivered == 1

    asyncio.run(main())
    assert [type(o) for o in outcome] == [str]
    assert [e["event_id"] for e in fiddler.events()] == outcome
