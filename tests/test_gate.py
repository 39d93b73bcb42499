"""The shared pause and the circuit breaker, on trio's virtual clock: time is exact, and the
test waits for nothing real. Requests are timed where the server sees them."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import httpx
import orjson
import pytest
import trio.testing

from fiddler_async import AsyncPublisher
from fiddler_async.exceptions import ServerError
from fiddler_async.gate import Gate

from .conftest import bank_event, config, eventually
from .in_process import TOKEN, InProcessFiddler

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class Timed:
    """The in-process emulator, noting when each publish request came and how many were
    being answered at once."""

    def __init__(self, inproc: InProcessFiddler) -> None:
        self.inner = inproc.transport()
        self.seen: list[tuple[float, int, int]] = []  # (time, status, concurrent)
        self.sent: dict[str, list[float]] = {}
        """When each batch was sent (for batches of one event: by its customer)."""
        self.answering = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v3/events":
            return await self.inner.handle_async_request(request)
        self.answering += 1
        came, concurrent = anyio.current_time(), self.answering
        first = orjson.loads(request.content)["source"]["events"][0]
        self.sent.setdefault(first.get("customer_id"), []).append(came)
        try:
            response = await self.inner.handle_async_request(request)
        finally:
            self.answering -= 1
        self.seen.append((came, response.status_code, concurrent))
        return response


def publisher(timed: Timed, on_error: Any = None, **changes: Any) -> AsyncPublisher:
    transport = httpx.MockTransport(timed)
    return AsyncPublisher(
        "https://fiddler.test",
        TOKEN,
        config=config(**changes),
        transport=transport,
        on_error=on_error,
    )


async def test_a_retry_after_pauses_every_request(inproc: InProcessFiddler) -> None:
    inproc.state.faults.update({"script": ["429"], "retry_after": 30})
    timed = Timed(inproc)
    async with publisher(timed, linger=0) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        await eventually(lambda: len(timed.seen) == 1, timeout=5)
        refused_at, status, _ = timed.seen[0]
        assert status == 429
        # Published after the 429, by another batch: it waits out the same pause.
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(120)).complete
    later = timed.seen[1:]
    assert [status for _, status, _ in later] == [202, 202]
    assert all(came >= refused_at + 30 for came, _, _ in later)
    assert len(inproc.stored()) == 2


async def test_a_down_backend_is_probed_one_request_at_a_time(inproc: InProcessFiddler) -> None:
    inproc.state.faults.update({"script": ["503"] * 12, "retry_after": 0})
    timed = Timed(inproc)
    async with publisher(
        timed,
        linger=0,
        max_batch_events=1,
        max_in_flight=4,
        breaker_threshold=3,
        breaker_probe_interval=10,
        retry_max_attempts=100,
        retry_max_elapsed=10_000,
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        for i in range(4):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        assert (await pub.flush(10_000)).delivered == 4
    statuses = [status for _, status, _ in timed.seen]
    assert statuses == [503] * 12 + [202] * 4
    first_answer = statuses.index(202)
    # Open after the first failures: then one probe at a time, one every 10 s at most...
    probes = timed.seen[4 : first_answer + 1]
    assert all(concurrent == 1 for _, _, concurrent in probes)
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(probes)]
    assert gaps
    assert min(gaps) >= 10
    # ...and once it answers, the waiting batches go (no more than max_in_flight at once).
    assert all(concurrent <= 4 for _, _, concurrent in timed.seen)


async def test_the_breakers_pause_ends_when_the_probe_passes() -> None:
    gate = Gate(config(breaker_threshold=1, breaker_probe_interval=2.0))
    assert await gate.enter() is False  # a request sent while all is well, answered late
    assert await gate.enter() is False
    gate.failed(ServerError("503", status=503), probe=False)  # the breaker opens
    probe = await gate.enter()
    assert probe
    assert gate.open
    # The late request fails while the probe is out, then the probe passes.
    gate.failed(ServerError("503", status=503), probe=False)
    gate.passed(probe)
    assert not gate.open
    answered = anyio.current_time()
    assert await gate.enter() is False
    assert anyio.current_time() == answered  # on the virtual clock: no wait at all


async def test_a_retry_waits_at_an_open_breaker_within_its_budget(
    inproc: InProcessFiddler,
) -> None:
    """No retry goes out later than retry_max_elapsed after its request's first attempt, even
    while it waits for its turn to probe; past that, its batch fails with the last error."""
    inproc.state.faults.update({"error_503": 1.0, "retry_after": 0})
    timed = Timed(inproc)
    failures: list[Any] = []
    async with publisher(
        timed,
        on_error=failures.append,
        linger=0,
        max_batch_events=1,
        max_in_flight=4,
        breaker_threshold=3,
        breaker_probe_interval=1,
        retry_max_attempts=100,
        retry_max_elapsed=2,
    ) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        for i in range(4):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        result = await pub.flush(10_000)
    assert result.failed == 4
    assert {type(f.error).__name__ for f in failures} == {"ServerError"}
    assert len(timed.sent) == 4
    for times in timed.sent.values():
        assert max(times) <= min(times) + 2
    assert sum(map(len, timed.sent.values())) > 4  # some were retried
