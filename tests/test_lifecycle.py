"""Start, flush, close: deadlines that hold while the server hangs, and misuse made harmless."""

from __future__ import annotations

import gc
import socketserver
import threading
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from fiddler_async import AsyncPublisher, DeliveryFailure, PublisherClosedError, QueueFullError
from fiddler_async import publisher as publisher_module
from fiddler_async.emulator import Emulator
from fiddler_async.stats import FlushResult

from .conftest import (
    ONE_SLOT_FULL_QUEUE,
    assert_adds_up,
    bank_event,
    config,
    eventually,
    loopback_publisher,
    mock_publisher,
    publishes,
)
from .in_process import TOKEN, InProcessFiddler

pytestmark = pytest.mark.anyio


async def test_flush_returns_at_its_deadline_while_the_server_hangs(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["hang"])
    async with loopback_publisher(fiddler, request_timeout=60) as pub:
        for i in range(5):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        with anyio.fail_after(5):
            result = await pub.flush(0.2)
        assert (result.delivered, result.pending, result.complete) == (0, 5, False)
        assert pub.stats().in_flight_events == 5
        assert_adds_up(pub)
        with anyio.fail_after(5):
            closed = await pub.aclose(0.2)
    # At the close deadline the hanging request is cancelled and its events reported.
    assert (closed.delivered, closed.dropped, closed.pending) == (0, 5, 0)
    stats = pub.stats()
    assert stats.dropped == {"shutdown": 5}
    assert stats.pending == 0
    assert_adds_up(pub)


async def test_close_deadline_also_reports_what_is_still_queued(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["hang"])
    pub = loopback_publisher(fiddler, max_in_flight=1, max_batch_events=10, linger=3600)
    await pub.start()
    for i in range(25):  # one batch of 10 in flight (hanging), 15 queued behind it
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
    await eventually(lambda: pub.stats().in_flight_requests == 1)
    with anyio.fail_after(5):
        result = await pub.aclose(0.2)
    assert (result.delivered, result.dropped, result.pending) == (0, 25, 0)
    assert pub.stats().dropped == {"shutdown": 25}


async def test_aclose_delivers_what_is_queued(fiddler: Emulator) -> None:
    pub = loopback_publisher(fiddler, linger=3600)
    await pub.start()
    for i in range(2500):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
    result = await pub.aclose(10)
    assert (result.delivered, result.dropped, result.pending) == (2500, 0, 0)
    assert fiddler.count() == 2500


async def test_closing_twice_is_harmless_and_publishing_after_raises(
    inproc: InProcessFiddler,
) -> None:
    pub = mock_publisher(inproc)
    with pytest.raises(PublisherClosedError, match="not started"):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    with pytest.raises(PublisherClosedError):
        await pub.flush()
    await pub.start()
    with pytest.raises(PublisherClosedError):
        await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    first = await pub.aclose(5)
    second = await pub.aclose(5)
    assert first == second
    assert first.delivered == 1
    with pytest.raises(PublisherClosedError, match="closed"):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    with pytest.raises(PublisherClosedError):
        await pub.publish_event("bank_churn", "bank_churn", bank_event())
    with pytest.raises(PublisherClosedError):
        await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event()])
    assert (await pub.flush(1)).complete


async def test_a_never_started_publisher_closes_quietly(inproc: InProcessFiddler) -> None:
    pub = mock_publisher(inproc)
    assert (await pub.aclose()).complete
    with pytest.raises(PublisherClosedError):
        await pub.start()


async def test_start_and_close_from_different_tasks(fiddler: Emulator) -> None:
    """As a framework does with its startup and shutdown hooks."""
    pub = loopback_publisher(fiddler)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pub.start)
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    results = []

    async def shutdown() -> None:
        results.append(await pub.aclose(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(shutdown)
    assert results[0].delivered == 1
    assert fiddler.count() == 1


async def test_concurrent_close_calls_share_one_result(fiddler: Emulator) -> None:
    pub = loopback_publisher(fiddler)
    await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    results = []

    async def close() -> None:
        results.append(await pub.aclose(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(close)
        tg.start_soon(close)
    assert results[0] == results[1]
    assert results[0].delivered == 1


async def test_stats_add_up_at_every_moment(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["503", "drop", "503", "400"], retry_after=0)
    async with loopback_publisher(
        fiddler, max_batch_events=50, max_queue_events=400, overflow="drop_oldest"
    ) as pub:
        for i in range(2000):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
            if i % 50 == 0:
                assert_adds_up(pub)
                await anyio.lowlevel.checkpoint()
        while pub.stats().pending:
            assert_adds_up(pub)
            await anyio.sleep(0.001)
        stats = pub.stats()
    assert stats.accepted == 2000
    assert stats.delivered + stats.failed + stats.dropped_total == 2000
    assert stats.failed == 0  # the batch that met the 400 was split, and its halves went
    assert stats.delivered == fiddler.count()


async def test_the_flusher_survives_an_exporter_bug(inproc: InProcessFiddler) -> None:
    transport = inproc.transport()
    calls = 0

    async def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 4:  # the first publish after the three lookups
            raise RuntimeError("bug in the transport")
        return await transport.handle_async_request(request)

    async with AsyncPublisher(
        "https://fiddler.test", TOKEN, config=config(), transport=httpx.MockTransport(flaky)
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(5)).failed == 1
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(5)).delivered == 1


async def test_url_and_token_from_the_environment(
    fiddler: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIDDLER_URL", fiddler.url)
    monkeypatch.setenv("FIDDLER_TOKEN", TOKEN)
    async with AsyncPublisher(config=config()) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        assert (await pub.flush(5)).delivered == 1


async def test_a_batch_waiting_on_a_lookup_is_refused_if_the_publisher_closes(
    fiddler: Emulator,
) -> None:
    fiddler.set_faults(latency=0.5)  # every answer, the model lookup included, takes 0.5 s
    pub = loopback_publisher(fiddler)
    await pub.start()
    outcome: list[BaseException] = []

    async def update_batch() -> None:
        try:
            await pub.publish_events_batch(
                "bank_churn", "bank_churn", [{"event_id": "e1", "churn": "yes"}], update_event=True
            )
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(update_batch)
        await anyio.sleep(0.05)  # the batch is waiting for the model lookup
        with anyio.fail_after(5):
            await pub.aclose(0.1)
    assert len(outcome) == 1
    assert isinstance(outcome[0], PublisherClosedError)
    stats = pub.stats()
    assert (stats.accepted, stats.pending) == (0, 0)


@pytest.mark.parametrize("lookup_wait", [0.2, 3600])
async def test_a_batch_call_does_not_wait_out_a_lookup_the_server_cannot_answer(
    fiddler: Emulator, lookup_wait: float
) -> None:
    """Batch calls wait for a model's first lookup only ``lookup_wait`` in all, and not past
    a failed attempt; then their events are queued like single ones, and placed and sent
    once the server answers."""
    pl = pytest.importorskip("polars")
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)  # every v3 request: 503
    pub = loopback_publisher(
        fiddler,
        lookup_wait=lookup_wait,
        retry_max_attempts=1000,
        retry_max_elapsed=60,
        breaker_probe_interval=0.1,
    )
    async with pub:
        # A guard, not a measure: without the bounds, the first call would wait for the
        # lookup's whole retry budget (60 s).
        with anyio.fail_after(20):
            first = await pub.publish_events_batch(
                "bank_churn", "bank_churn", [bank_event(i) for i in range(3)]
            )
            second = await pub.publish_events_batch(
                "bank_churn", "bank_churn", [bank_event(i) for i in range(3, 5)]
            )
            # A DataFrame too: without the model's columns, it goes row by row.
            frame = pl.DataFrame([bank_event(5)])
            third = await pub.publish_events_batch("bank_churn", "bank_churn", frame)
        assert pub.stats().accepted == 6
        assert pub.stats().delivered == 0
        fiddler.set_faults(outage_until=0)
        result = await pub.flush(30)
        assert (result.delivered, result.failed) == (6, 0)
    stored = fiddler.events()
    assert [e["event_id"] for e in stored] == first + second + third
    assert [e["customer_id"] for e in stored] == [f"c{i}" for i in range(6)]


async def test_a_second_close_waits_only_its_own_timeout(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["hang"])
    pub = loopback_publisher(fiddler)
    await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    await eventually(lambda: pub.stats().in_flight_requests == 1)
    results = []

    async def close(timeout: float) -> None:
        results.append((timeout, await pub.aclose(timeout)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(close, 2.0)
        await eventually(lambda: "state=closing" in repr(pub))
        with anyio.fail_after(1.5):  # not the first call's 2 s
            await close(0.1)
        assert results == [(0.1, results[0][1])]
        assert results[0][1].pending == 1  # still in flight when it gave up waiting
    first = results[1][1]
    assert (first.dropped, first.pending) == (1, 0)


async def test_concurrent_or_late_start_is_refused(inproc: InProcessFiddler) -> None:
    pub = mock_publisher(inproc)
    errors: list[BaseException] = []

    async def start() -> None:
        try:
            await pub.start()
        except PublisherClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        tg.start_soon(start)
    assert len(errors) == 1
    assert "starting" in str(errors[0]) or "open" in str(errors[0])
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    assert (await pub.aclose(5)).delivered == 1


async def test_close_during_start_wins(inproc: InProcessFiddler) -> None:
    pub = mock_publisher(inproc)
    refused: list[PublisherClosedError] = []

    async def start() -> None:
        try:
            await pub.start()
        except PublisherClosedError as exc:  # the close came before start() began
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        await anyio.lowlevel.checkpoint()
        await pub.aclose(5)
    assert len(refused) <= 1
    with pytest.raises(PublisherClosedError):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())


async def test_a_start_cancelled_midway_leaves_nothing_running(inproc: InProcessFiddler) -> None:
    pub = mock_publisher(inproc)
    with anyio.move_on_after(0):
        await pub.start()
    with pytest.raises(PublisherClosedError):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    assert (await pub.aclose(1)).complete


async def test_flush_waits_for_the_reports_of_its_own_events_only(fiddler: Emulator) -> None:
    """Failures reported steadily (a project the token cannot write to) must not hold every
    flush to its timeout: a flush waits for the callbacks of the events it covers."""
    started = {"early": anyio.Event(), "late": anyio.Event()}
    go = {"early": anyio.Event(), "late": anyio.Event()}

    async def on_error(failure: DeliveryFailure) -> None:
        (which,) = failure.event_ids
        assert which is not None
        started[which].set()
        await go[which].wait()

    fiddler.set_faults(script=["400", "400"])
    async with loopback_publisher(fiddler, linger=0, on_error=on_error) as pub:
        await pub.resolve("bank_churn", "bank_churn")
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="early")
        results: list[FlushResult] = []
        flushed = anyio.Event()

        async def flush() -> None:
            results.append(await pub.flush(60))
            flushed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
            await started["early"].wait()
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2), event_id="late")
            await started["late"].wait()  # a later event's report, under way
            go["early"].set()
            with anyio.fail_after(10):  # (60 s, the flush's timeout, before the fix)
                await flushed.wait()
            assert not go["late"].is_set()
            go["late"].set()
        assert (results[0].failed, results[0].complete) == (1, True)


async def test_flush_and_close_wait_for_async_callbacks(fiddler: Emulator) -> None:
    reported: list[DeliveryFailure] = []

    async def on_error(failure: DeliveryFailure) -> None:
        await anyio.sleep(0.05)
        reported.append(failure)

    fiddler.set_faults(script=["400", "400"])
    async with loopback_publisher(fiddler, on_error=on_error) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(5)).failed == 1
        assert len(reported) == 1  # the callback finished before flush() returned
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
    assert len(reported) == 2  # and before the close returned


async def test_closing_from_inside_on_error(fiddler: Emulator) -> None:
    results = []

    async def on_error(failure: DeliveryFailure) -> None:
        results.append(await pub.aclose(5))

    fiddler.set_faults(script=["400"])
    pub = loopback_publisher(fiddler, on_error=on_error)
    await pub.start()
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
    with anyio.fail_after(5):
        await pub.flush(5)
        await eventually(lambda: bool(results))
    # The failed event was settled before its report began: nothing was pending at the close.
    assert results[0].complete
    assert pub.stats().failed == 1
    with pytest.raises(PublisherClosedError):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())


async def test_a_callback_raising_system_exit_does_not_stop_delivery(fiddler: Emulator) -> None:
    def on_error(failure: DeliveryFailure) -> None:
        raise SystemExit(3)

    fiddler.set_faults(script=["400"])
    async with loopback_publisher(fiddler, on_error=on_error) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        assert (await pub.flush(5)).failed == 1
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2))
        assert (await pub.flush(5)).delivered == 1


async def test_a_batch_call_does_not_wait_while_the_breaker_is_open(fiddler: Emulator) -> None:
    """With the circuit breaker open, the lookup's next attempt waits for the probe interval:
    a batch call does not wait for it."""
    fiddler.set_faults(outage_seconds=3600, retry_after=0.01)
    async with loopback_publisher(
        fiddler,
        lookup_wait=3600,
        breaker_threshold=1,
        breaker_probe_interval=3600,
        retry_max_attempts=1000,
        close_timeout=0.5,
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(0))  # starts the lookup
        await eventually(lambda: pub.stats().responses.get("503", 0) >= 1)
        with anyio.fail_after(20):  # a guard: the lookup's next attempt is an hour away
            ids = await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(1)])
        assert len(ids) == 1
        assert pub.stats().accepted == 2


async def test_a_batch_call_giving_up_on_the_lookup_leaves_it_running(
    fiddler: Emulator,
) -> None:
    """The batch call waits for the lookup the background runs, so giving up at
    ``lookup_wait`` cancels none of it: the model is looked up once."""
    fiddler.set_faults(latency=0.2)  # three lookup requests: 0.6 s
    async with loopback_publisher(fiddler, lookup_wait=0.05) as pub:
        ids = await pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(1)])
        assert (await pub.flush(10)).delivered == 1
    projects = [r for r in fiddler.requests() if r["path"] == "/v3/projects"]
    assert len(projects) == 1
    assert [e["event_id"] for e in fiddler.events()] == ids


async def test_a_batch_is_all_or_nothing_when_its_lookup_is_late(fiddler: Emulator) -> None:
    """Events queued before their model is known carry their id and time in the queue, and
    the room a batch needs under ``raise`` counts those bytes: none queued, not some."""
    fiddler.set_faults(outage_seconds=3600, retry_after=0.05)
    async with loopback_publisher(
        fiddler,
        overflow="raise",
        max_queue_bytes=1024,
        max_batch_bytes=1024,
        lookup_wait=0,
        close_timeout=0.5,
    ) as pub:
        events = [bank_event(i) for i in range(4)]  # ~900 bytes as JSON; more with ids
        with pytest.raises(QueueFullError, match="can never fit the queue"):
            await pub.publish_events_batch("bank_churn", "bank_churn", events)
        stats = pub.stats()
        assert (stats.accepted, stats.rejected, stats.queued_events) == (0, 4, 0)


async def test_an_update_batch_with_rows_keyed_by_their_column_waits_for_the_lookup(
    fiddler: Emulator,
) -> None:
    """Rows of an update whose ``event_ids`` entry is None are keyed by the model's id column,
    so that batch waits for the lookup even past ``lookup_wait``."""
    fiddler.set_faults(outage_seconds=0.5, retry_after=0.05)
    async with loopback_publisher(
        fiddler, lookup_wait=0, retry_max_attempts=1000, breaker_probe_interval=0.1
    ) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1), event_id="given")
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(2), event_id="carried")
        rows = [{"churn": "yes"}, {"event_id": "carried", "churn": "no"}]
        ids = await pub.publish_events_batch(
            "bank_churn", "bank_churn", rows, update_event=True, event_ids=["given", None]
        )
        assert ids == ["given", "carried"]
        assert (await pub.flush(10)).delivered == 4
    patches = [r for r in publishes(fiddler) if r["method"] == "PATCH"]
    assert sum(r["events"] for r in patches) == 2
    assert {e["event_id"]: e.get("churn") for e in fiddler.events()} == {
        "given": "yes",
        "carried": "no",
    }


class _StallingServer(socketserver.ThreadingTCPServer):
    """Answers the model lookups as the emulator did, then reads no request body: a publish
    request's send blocks once the socket buffers are full."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _StallingHandler)


class _StallingHandler(socketserver.StreamRequestHandler):
    server: _StallingServer

    def handle(self) -> None:
        while True:
            request_line = self.rfile.readline().decode()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass  # the headers
            if not request_line.startswith("GET "):
                self.server.stop.wait(30)  # a publish: its body is never read
                return
            path = request_line.split()[1].split("?")[0]
            body = self.server.answers[path]
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_request_cut_off_mid_body_leaves_nothing_for_the_garbage_collector(
    backend: str, fiddler: Emulator
) -> None:
    """A close deadline that cancels a request while its body is being sent leaves no
    unfinished async generator behind (httpx's own body iterator is one; trio reports it as
    a ResourceWarning when the garbage collector finds it after the run)."""
    model_id = fiddler.model("bank_churn", "bank_churn").id
    answers = {}
    with httpx.Client(base_url=fiddler.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for path in ("/v3/projects", "/v3/models", f"/v3/models/{model_id}"):
            answers[path] = c.get(path).content
    server = _StallingServer(answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    async def main() -> None:
        pub = AsyncPublisher(url, TOKEN, config=config(max_batch_bytes=32 * 1024 * 1024))
        async with pub:
            pub.publish_event_nowait("bank_churn", "bank_churn", {"text": "x" * 24_000_000})
            await pub.resolve("bank_churn", "bank_churn")
            await eventually(lambda: pub.stats().in_flight_requests == 1)
            await pub.aclose(0.3)  # cancels the request in the middle of its body

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            anyio.run(main, backend=backend)
            gc.collect()
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
    assert unfinished_generators(caught) == []


def unfinished_generators(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "garbage collected" in str(w.message)]


# Closing and flushing from on_error callbacks


async def refuse_two_batches(fiddler: Emulator, pub: AsyncPublisher) -> None:
    """Publish one event to each of two models, both refused: two callbacks at once."""
    for model in ("bank_churn", "bank_churn_v2"):
        await pub.resolve("bank_churn", model)
    fiddler.set_faults(script=["400", "400"])
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
    pub.publish_event_nowait("bank_churn", "bank_churn_v2", {"customer_id": "v1"})


async def test_a_close_from_a_callback_lets_the_other_callbacks_finish(fiddler: Emulator) -> None:
    """Two batches refused, their callbacks running at once; one of them closes the
    publisher. The close waits for the other callback (not for its own): every failure
    reaches on_error."""
    finished: list[str] = []
    other_started = anyio.Event()

    async def on_error(failure: DeliveryFailure) -> None:
        if failure.model == "bank_churn":
            await other_started.wait()
            await pub.aclose(5)
        else:
            other_started.set()
            await anyio.sleep(0.3)  # a slow callback (posting an alert)
        finished.append(failure.model)

    pub = loopback_publisher(fiddler, linger=0, on_error=on_error)
    async with pub:
        await refuse_two_batches(fiddler, pub)
        await eventually(lambda: len(finished) == 2)
    assert sorted(finished) == ["bank_churn", "bank_churn_v2"]


async def test_a_close_from_a_callback_while_the_app_closes_ends_both(fiddler: Emulator) -> None:
    """The app closes while a callback of the publisher closes it too: the callback's close
    returns (it used to wait for the app's, which waited for the callback, until the app's
    deadline cancelled the callback)."""
    outcome: list[str] = []
    started = anyio.Event()

    async def on_error(failure: DeliveryFailure) -> None:
        started.set()
        await anyio.sleep(0.05)  # the app's close begins meanwhile
        try:
            await pub.aclose(3)
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        outcome.append("returned")

    pub = loopback_publisher(fiddler, linger=0, on_error=on_error)
    await pub.start()
    await pub.resolve("bank_churn", "bank_churn")
    fiddler.set_faults(script=["400"])
    pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
    await started.wait()
    result = await pub.aclose(2)
    assert outcome == ["returned"]
    assert (result.failed, result.pending) == (0, 0)  # settled before the close began


async def test_a_flush_from_another_publishers_callback_waits_for_its_reports(
    fiddler: Emulator,
) -> None:
    """A's on_error forwards to publisher B and flushes it: B's flush waits for B's own
    on_error, as it does from any task (A's background is not B's)."""
    b_reported: list[DeliveryFailure] = []
    seen_by_flush: list[int] = []

    async def b_on_error(failure: DeliveryFailure) -> None:
        await anyio.sleep(0.2)
        b_reported.append(failure)

    async def a_on_error(failure: DeliveryFailure) -> None:
        b.publish_event_nowait("bank_churn", "bank_churn", bank_event(99))
        await b.flush(5)
        seen_by_flush.append(len(b_reported))

    a = loopback_publisher(fiddler, linger=0, on_error=a_on_error)
    b = loopback_publisher(fiddler, linger=0, on_error=b_on_error)
    async with a, b:
        for pub in (a, b):
            await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(script=["400", "400"])
        a.publish_event_nowait("bank_churn", "bank_churn", bank_event(1))
        await a.flush(5)
    assert seen_by_flush == [1]


async def test_a_flush_during_a_close_waits_for_what_the_close_sends(fiddler: Emulator) -> None:
    fiddler.set_faults(latency=0.05)
    pub = loopback_publisher(fiddler, linger=5)
    await pub.start()
    await pub.resolve("bank_churn", "bank_churn")
    for i in range(100):
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
    flushed: list[FlushResult] = []

    async def flush_soon() -> None:
        await anyio.sleep(0.01)  # the close has begun
        flushed.append(await pub.flush(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(pub.aclose, 5.0)
        tg.start_soon(flush_soon)
    assert (flushed[0].delivered, flushed[0].pending) == (100, 0)  # was pending=100 at once


async def test_callbacks_flushing_at_once_do_not_wait_for_each_other(fiddler: Emulator) -> None:
    """Two failed batches whose callbacks both flush: neither waits for the other (each would
    until its timeout: a minute here, past the test's bound)."""
    flushed: list[str] = []

    async def on_error(failure: DeliveryFailure) -> None:
        await pub.flush(60)
        flushed.append(failure.model)

    pub = loopback_publisher(fiddler, linger=0, on_error=on_error)
    async with pub:
        await refuse_two_batches(fiddler, pub)
        await eventually(lambda: len(flushed) == 2)


async def test_a_slow_callback_holds_back_delivery_not_memory(fiddler: Emulator) -> None:
    """Every batch refused and on_error slow (a post to an alerting service): a failed batch
    keeps its delivery slot until its callback returns, so at most ``max_in_flight`` failures
    (their events' bytes) wait for callbacks, and the rest waits in the bounded queue. They
    used to pile up in memory, one per refused batch, as fast as the server refused them."""
    started: list[DeliveryFailure] = []
    release = anyio.Event()

    async def on_error(failure: DeliveryFailure) -> None:
        started.append(failure)
        await release.wait()

    fiddler.set_faults(script=["403"] * 10)
    pub = loopback_publisher(
        fiddler, max_in_flight=2, max_batch_events=10, linger=0, on_error=on_error
    )
    async with pub:
        await pub.resolve("bank_churn", "bank_churn")
        for i in range(100):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await eventually(lambda: len(started) == 2)
        held = await pub.flush(1)  # the callbacks are not done: it returns at its deadline
        stats = pub.stats()
        assert (held.pending, stats.failed, stats.queued_events) == (80, 20, 80)
        assert len(started) == 2
        release.set()
        assert (await pub.flush(10)).complete
    assert [len(failure.event_ids) for failure in started] == [10] * 10
    assert pub.stats().failed == 100


async def test_a_callback_that_flushes_gives_its_slot_back(fiddler: Emulator) -> None:
    """With one slot, held by a failed batch's callback, the callback flushes: the slot goes
    back first, so the events queued behind the batch are sent (the flush would otherwise
    wait for its own callback, until its timeout)."""
    flushed: list[FlushResult] = []

    async def on_error(failure: DeliveryFailure) -> None:
        flushed.append(await pub.flush(60))

    fiddler.set_faults(script=["403"])
    pub = loopback_publisher(
        fiddler, max_in_flight=1, max_batch_events=10, linger=0, on_error=on_error
    )
    async with pub:
        await pub.resolve("bank_churn", "bank_churn")
        for i in range(30):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i))
        await eventually(lambda: bool(flushed))
    assert (flushed[0].delivered, flushed[0].pending) == (20, 0)
    assert len(fiddler.events()) == 20


async def test_a_callback_waiting_for_room_gives_its_slot_back(fiddler: Emulator) -> None:
    """Under ``block``, a callback publishes into a full queue whose next batch waits for
    the one slot, which the callback's batch holds: the slot goes back as it starts to wait,
    so that batch is sent and makes room."""
    go, republished = anyio.Event(), []

    async def on_error(failure: DeliveryFailure) -> None:
        await go.wait()
        republished.append(await pub.publish_event("bank_churn", "bank_churn", bank_event(99)))

    fiddler.set_faults(script=["403"])
    pub = loopback_publisher(fiddler, **ONE_SLOT_FULL_QUEUE, on_error=on_error)
    async with pub:
        await pub.resolve("bank_churn", "bank_churn")
        for i in range(10):  # the batch that is refused
            await pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        await eventually(lambda: pub.stats().failed == 10)
        for i in range(10, 20):  # a full queue behind it
            await pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        go.set()
        await eventually(lambda: bool(republished))
    assert sorted(e["customer_id"] for e in fiddler.events()) == sorted(
        f"c{i}" for i in [*range(10, 20), 99]
    )


async def test_callbacks_waiting_for_room_in_each_others_queue(fiddler: Emulator) -> None:
    """Two publishers, one slot each, each one's callback publishing into the other's full
    queue under ``block``: each gives its own publisher's slot back as it waits, so neither
    waits for the other (until its block timeout, a minute here)."""
    go, republished = anyio.Event(), []
    pubs: dict[str, AsyncPublisher] = {}

    def republishing_to(other: str) -> Callable[[DeliveryFailure], Awaitable[None]]:
        async def on_error(failure: DeliveryFailure) -> None:
            await go.wait()
            await pubs[other].publish_event("bank_churn", "bank_churn", bank_event(99))
            republished.append(other)

        return on_error

    for name, other in (("a", "b"), ("b", "a")):
        pubs[name] = loopback_publisher(
            fiddler, **ONE_SLOT_FULL_QUEUE, on_error=republishing_to(other)
        )
    async with pubs["a"], pubs["b"]:
        for pub in pubs.values():
            await pub.resolve("bank_churn", "bank_churn")
            await pub.publish_event("bank_churn", "bank_churn", {**bank_event(0), "age": "x"})
        await eventually(lambda: all(pub.stats().failed == 1 for pub in pubs.values()))
        for pub in pubs.values():  # a full queue behind each callback's slot
            for i in range(1, 11):
                await pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        go.set()
        await eventually(lambda: len(republished) == 2)
    assert sorted(republished) == ["a", "b"]
    assert [pub.stats().delivered for pub in pubs.values()] == [11, 11]


async def test_a_close_from_a_callback_leaves_no_report_to_wait_for(fiddler: Emulator) -> None:
    """One batch, two refused events reported one after the other; the first callback
    closes the publisher, so the second is never reported: a flush does not wait for it."""
    reported: list[object] = []

    async def on_error(failure: DeliveryFailure) -> None:
        reported.append(failure.event_ids)
        if len(reported) == 1:
            await pub.aclose(5)
            await anyio.lowlevel.checkpoint()  # goes on a little: the close has ended its task

    pub = loopback_publisher(fiddler, linger=5, on_error=on_error)
    await pub.start()
    await pub.resolve("bank_churn", "bank_churn")
    events = [bank_event(i) for i in range(4)]
    events[1]["age"], events[3]["balance"] = "forty", "lots"  # refused, split apart
    await pub.publish_events_batch("bank_churn", "bank_churn", events)
    with anyio.fail_after(10):  # it used to wait for the second report to its own timeout
        await pub.flush(60)
    assert pub.stats().failed == 2


async def test_a_task_a_callback_started_waits_like_any_other(fiddler: Emulator) -> None:
    """A callback hands work to the app's task group; that task, after the callback has
    returned, flushes during the close: it waits for the close, as a plain task does."""
    flushed: dict[str, FlushResult] = {}
    go = anyio.Event()

    async def worker(name: str) -> None:
        await go.wait()
        flushed[name] = await pub.flush(5)

    async def on_error(failure: DeliveryFailure) -> None:
        app.start_soon(worker, "started by the callback")

    async with anyio.create_task_group() as app:
        app.start_soon(worker, "plain")
        pub = loopback_publisher(fiddler, linger=5, on_error=on_error)
        await pub.start()
        await pub.resolve("bank_churn", "bank_churn")
        fiddler.set_faults(script=["400"])
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(0))
        await pub.flush(5)  # reported: the worker is started
        fiddler.set_faults(latency=0.3)
        for i in range(50):
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event(i + 1))
        app.start_soon(pub.aclose, 5.0)
        await anyio.sleep(0.05)  # the close has begun
        go.set()
    assert {name: result.delivered for name, result in flushed.items()} == {
        "plain": 50,
        "started by the callback": 50,
    }


async def test_a_publisher_is_refused_from_another_thread(
    fiddler: Emulator, anyio_backend: str
) -> None:
    """Its queue belongs to the event loop that started it: from a worker thread, a call
    would race for it and never wake the flusher (the sync Publisher is for threads)."""
    async with loopback_publisher(fiddler) as pub:
        with pytest.raises(PublisherClosedError, match="the sync Publisher"):
            await anyio.to_thread.run_sync(
                lambda: pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
            )
        for call in (pub.flush, pub.aclose):
            with pytest.raises(PublisherClosedError, match="the thread that started it"):
                await anyio.to_thread.run_sync(lambda call=call: anyio.run(call))  # type: ignore[misc]
        assert pub.stats().accepted == 0
    # Closed, it may be closed again from anywhere (another loop, even of the other kind):
    # the result is the close's.
    other = "trio" if anyio_backend == "asyncio" else "asyncio"
    closed = await anyio.to_thread.run_sync(lambda: anyio.run(pub.aclose, backend=other))
    assert closed == await pub.aclose()


async def test_a_batch_prepared_while_the_publisher_closes_is_refused(
    fiddler: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of many rows is prepared on a worker thread: a close meanwhile settles what
    was queued, and the batch, coming back, is refused whole (its ids would name events
    never sent)."""
    monkeypatch.setattr(publisher_module, "ROWS_OFF_THE_LOOP", 100)
    entered, release = threading.Event(), threading.Event()
    outcome: list[object] = []
    pub = loopback_publisher(fiddler)
    await pub.start()
    real = pub._prepare_all

    def held(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(pub, "_prepare_all", held)

    async def batch() -> None:
        try:
            outcome.append(
                await pub.publish_events_batch(
                    "bank_churn", "bank_churn", [bank_event(i) for i in range(300)]
                )
            )
        except PublisherClosedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(batch)
        await eventually(entered.is_set)
        result = await pub.aclose(1)
        release.set()
    assert result.complete
    assert [type(o) for o in outcome] == [PublisherClosedError]
    stats = pub.stats()
    assert (stats.accepted, stats.pending) == (0, 0)
