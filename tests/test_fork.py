"""A publisher in a forked child (gunicorn --preload, multiprocessing): the parent's pipeline
does not come along; the child starts its own, and its events arrive."""

from __future__ import annotations

import os
import sys
import threading

import anyio
import pytest

from fiddler_async import AsyncPublisher
from fiddler_async.emulator import Emulator

from .conftest import bank_event, config
from .in_process import TOKEN

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Forking a process that has threads (the emulator's) is what this test is about.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def in_child(pub: AsyncPublisher) -> int:
    """What the forked child does, in a fresh thread with a fresh event loop."""
    outcome = [1]

    async def main() -> None:
        stats = pub.stats()  # what it inherited: the parent's queue, counted, not sent twice
        assert stats.queued_events == 0
        assert stats.dropped == {"forked": 3}
        async with pub:  # a fresh pipeline
            for i in range(5):
                pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(100 + i))
        assert pub.stats().delivered == 5
        outcome[0] = 0

    thread = threading.Thread(target=anyio.run, args=(main,))
    thread.start()
    thread.join(30)
    return outcome[0]


async def test_events_published_in_a_forked_child_arrive(fiddler: Emulator) -> None:
    pub = AsyncPublisher(fiddler.url, TOKEN, config=config(linger=3600))
    await pub.start()
    await pub.resolve("bank_churn", "bank_churn")  # the parent's ids are made the short way
    for i in range(3):  # queued in the parent when it forks
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 1
        try:
            code = in_child(pub)
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (await pub.aclose(10)).delivered == 3  # the parent still sends its own
    events = fiddler.events()
    customers = sorted(e["customer_id"] for e in events)
    assert customers == ["c0", "c1", "c100", "c101", "c102", "c103", "c104", "c2"]
    # Ids are a per-process random prefix and a counter: the child's must not be the parent's.
    parent = {e["event_id"][:24] for e in events if e["customer_id"] in ("c0", "c1", "c2")}
    child = {e["event_id"][:24] for e in events} - parent
    assert len(parent) == len(child) == 1
